//! The original models: an MLP body of ReLU layers and a linear head per task, their training
//! (`fsmerge train`) and their conversion to and from checkpoints.

use crate::core::eval::accuracy;
use crate::core::linear::Linear;
use crate::core::tensor::{to_host, to_tch};
use crate::train::optim::{Run, Schedule};
use crate::train::progress::{LogRow, Progress};
use fsmerge_common::checkpoint::{MlpCheckpoint, MlpConfig, MLP_FORMAT};
use fsmerge_common::Result;
use tch::Tensor;

/// One merged network: a body shared by all tasks and one linear head per task.
pub struct MergedModel {
    pub body: Vec<Linear>,
    pub heads: Vec<Linear>,
}

impl MergedModel {
    pub fn logits(&self, x: &Tensor) -> Vec<Tensor> {
        let h = body_forward(&self.body, x);
        self.heads.iter().map(|head| head.forward(&h)).collect()
    }
}

pub struct Mlp {
    pub body: Vec<Linear>,
    pub head: Linear,
}

impl Mlp {
    pub fn init(input_dim: usize, hidden: &[usize], classes: usize) -> Self {
        let mut fan_in = input_dim;
        let body = hidden
            .iter()
            .map(|&w| {
                let l = Linear::init(fan_in, w);
                fan_in = w;
                l
            })
            .collect();
        Self {
            body,
            head: Linear::init(fan_in, classes),
        }
    }

    /// Body output (features before the head).
    pub fn body_forward(&self, x: &Tensor) -> Tensor {
        body_forward(&self.body, x)
    }

    /// The activation after every body layer (f_1 … f_L).
    pub fn features(&self, x: &Tensor) -> Vec<Tensor> {
        let mut h = x.shallow_clone();
        self.body
            .iter()
            .map(|l| {
                h = l.forward(&h).relu();
                h.shallow_clone()
            })
            .collect()
    }

    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.head.forward(&self.body_forward(x))
    }

    pub fn from_checkpoint(ck: &MlpCheckpoint) -> Self {
        Self {
            body: ck
                .body
                .iter()
                .map(|(w, b)| Linear {
                    w: to_tch(w),
                    b: to_tch(b),
                })
                .collect(),
            head: Linear {
                w: to_tch(&ck.head.0),
                b: to_tch(&ck.head.1),
            },
        }
    }

    pub fn to_checkpoint(&self, config: MlpConfig) -> Result<MlpCheckpoint> {
        Ok(MlpCheckpoint {
            config,
            file: Default::default(),
            body: self
                .body
                .iter()
                .map(|l| Ok((to_host(&l.w)?, to_host(&l.b)?)))
                .collect::<Result<_>>()?,
            head: (to_host(&self.head.w)?, to_host(&self.head.b)?),
        })
    }

    fn params(&self) -> Vec<Tensor> {
        self.body
            .iter()
            .chain(std::iter::once(&self.head))
            .flat_map(|l| [l.w.shallow_clone(), l.b.shallow_clone()])
            .collect()
    }
}

pub fn body_forward(body: &[Linear], x: &Tensor) -> Tensor {
    body.iter()
        .fold(x.shallow_clone(), |h, l| l.forward(&h).relu())
}

/// Settings for training one original model.
pub struct TrainSpec<'a> {
    pub input_dim: usize,
    pub hidden: &'a [usize],
    pub task: &'a str,
    pub classes: &'a [usize],
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
}

/// Train one original MLP from its own seed with Adam and cross-entropy; returns the model's
/// checkpoint, its validation accuracy and the training log.
pub fn train_original(
    spec: &TrainSpec,
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    progress: &dyn Progress,
) -> Result<(MlpCheckpoint, f64, Vec<LogRow>)> {
    tch::manual_seed(spec.seed as i64);
    let model = Mlp::init(spec.input_dim, spec.hidden, spec.classes.len());
    let params = model.params();
    for p in &params {
        let _ = p.set_requires_grad(true);
    }
    let run = Run {
        phase: &format!("train {}", spec.task),
        epochs: spec.epochs,
        batch_size: spec.batch_size,
        seed: spec.seed ^ 0xabcd,
        schedule: Schedule::Constant(spec.lr),
        weight_decay: 0.0,
        lr_field: "train.lr",
    };
    let log = run.optimise(&params, train.0.size()[0] as usize, progress, |idx| {
        let (x, y) = (train.0.index_select(0, idx), train.1.index_select(0, idx));
        model.logits(&x).cross_entropy_for_logits(&y)
    })?;
    let frozen = Mlp {
        body: model.body.iter().map(Linear::copy).collect(),
        head: model.head.copy(),
    };
    let val_acc = tch::no_grad(|| accuracy(&frozen.logits(val.0), val.1));
    let config = MlpConfig {
        format: MLP_FORMAT.into(),
        input_dim: spec.input_dim,
        hidden: spec.hidden.to_vec(),
        task: spec.task.to_string(),
        classes: spec.classes.to_vec(),
        seed: spec.seed,
    };
    Ok((frozen.to_checkpoint(config)?, val_acc, log))
}
