//! The original models: an MLP body of ReLU layers and a linear head per task, their training
//! (`fsmerge train`) and their conversion to and from checkpoints.

use crate::optim::{Run, Schedule};
use crate::progress::{LogRow, Progress};
use crate::tensor::{to_host, to_tch, F32};
use fsmerge_common::checkpoint::{MlpCheckpoint, MlpConfig, MLP_FORMAT};
use fsmerge_common::Result;
use tch::{Kind, Tensor};

/// A linear layer, PyTorch layout: weight [out, in], bias [out].
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
}

impl Linear {
    /// PyTorch's default init: U(-1/√in, 1/√in) for weight and bias.
    pub fn init(input: usize, output: usize) -> Self {
        let bound = 1.0 / (input as f64).sqrt();
        let w = Tensor::rand([output as i64, input as i64], F32) * (2.0 * bound) - bound;
        let b = Tensor::rand([output as i64], F32) * (2.0 * bound) - bound;
        Self { w, b }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, Some(&self.b))
    }
    pub fn copy(&self) -> Self {
        Self {
            w: self.w.detach().copy(),
            b: self.b.detach().copy(),
        }
    }
}

/// Copies of each original's classifier, for a merged encoder that keeps every task's head (a
/// model without one gets a 1×1 placeholder; the merge jobs check heads beforehand).
pub fn own_heads<'a>(classifiers: impl IntoIterator<Item = Option<&'a Linear>>) -> Vec<Linear> {
    classifiers
        .into_iter()
        .map(|c| c.map_or_else(|| Linear::init(1, 1), Linear::copy))
        .collect()
}

/// Every task's head stacked into one classifier (detached): task t's logits are its rows.
pub fn stacked_heads(heads: &[Linear]) -> Linear {
    let w: Vec<Tensor> = heads.iter().map(|h| h.w.detach()).collect();
    let b: Vec<Tensor> = heads.iter().map(|h| h.b.detach()).collect();
    Linear {
        w: Tensor::cat(&w, 0),
        b: Tensor::cat(&b, 0),
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

/// Share of rows where argmax(logits) equals the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    if labels.size()[0] == 0 {
        return 0.0;
    }
    logits
        .argmax(1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
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
