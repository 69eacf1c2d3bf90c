//! A ViT stage's models for evaluation on the workers: every original's units (each through
//! its own head on the last stage), and a standard ViT's units built from merged tensors.

use crate::core::baselines::regmean_block;
use crate::core::linear::Linear;
use crate::core::tensor::to_host;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{first_or_average, MergedPart, ModelPart, Readout};
use crate::dist::stage::{head_pair, own_rows, take_task_heads, StageData};
use crate::families::vit::merge::images;
use crate::families::vit::model::{VitPart, EMBEDDING_NAMES, VIT_BLOCK};
use fsmerge_common::hf::VitConfig;
use fsmerge_common::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use tch::Tensor;

impl ModelPart for VitPart {
    /// Images of `rows` on the stage with the embeddings, else the stream; the pooled output
    /// on the last stage.
    fn output(&self, rows: &Tensor, stream: Option<Tensor>) -> Tensor {
        let input = match (&self.embeddings, stream) {
            (None, Some(s)) => s,
            _ => images(rows, self.cfg.num_channels),
        };
        self.trace(&input).pop().unwrap_or(input)
    }
}

/// A standard ViT's units `units` from tensors under the merged model's names, with every
/// task's head on the last stage.
pub fn merged_part(
    cfg: VitConfig,
    units: Range<usize>,
    tasks: &[String],
    mut tensors: BTreeMap<String, Tensor>,
) -> Result<MergedPart<VitPart>> {
    let last = units.end == cfg.num_hidden_layers + 1;
    let heads = if last {
        take_task_heads(tasks, &mut tensors)?
    } else {
        Vec::new()
    };
    let host = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, to_host(&t)?)))
        .collect::<Result<_>>()?;
    let part = VitPart::from_tensors(cfg, units, "", host)?;
    Ok(MergedPart {
        part,
        heads,
        readout: Readout::Classes,
    })
}

/// One original's tensors of its part under the merged model's names, with `classifier` as
/// task `task`'s head on the last stage.
pub fn named(part: &VitPart, task: &str, classifier: Option<&Linear>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = Vec::new();
    if let Some(e) = &part.embeddings {
        v.extend(
            EMBEDDING_NAMES
                .iter()
                .map(|n| n.to_string())
                .zip(e.iter().map(Tensor::shallow_clone)),
        );
    }
    for (j, b) in part.blocks.iter().enumerate() {
        v.extend(
            b.named(part.first_block() + j, &VIT_BLOCK)
                .into_iter()
                .map(|(n, t)| (n, t.shallow_clone())),
        );
    }
    if let Some(ln) = &part.ln_final {
        v.push(("layernorm.weight".into(), ln.w.shallow_clone()));
        v.push(("layernorm.bias".into(), ln.b.shallow_clone()));
    }
    if let Some(c) = classifier {
        v.extend(head_pair(task, c));
    }
    v
}

/// RegMean of a stage's units (method.md §13): every linear map of every block solved from
/// its inputs inside each model on its own task's merge rows (the teacher streams `data`),
/// everything else averaged; each task keeps its own head.
pub fn regmean(
    parts: &[VitPart],
    tensors: Vec<Vec<(String, Tensor)>>,
    data: &StageData,
    alpha: f64,
) -> Result<BTreeMap<String, Tensor>> {
    let merged = first_or_average(tensors, true);
    let Some(p0) = parts.first() else {
        return Ok(merged);
    };
    let heads = p0.cfg.num_attention_heads as i64;
    tch::no_grad(|| {
        for j in 0..p0.blocks.len() {
            let l = p0.first_block() + j;
            let models: Vec<_> = (parts.iter().enumerate())
                .map(|(i, p)| {
                    let x = own_rows(data.stream(p0.units.start, l), data, i);
                    let (inputs, _) = p.blocks[j].linear_inputs_pre_ln(&x, heads);
                    (&p.blocks[j], inputs.map(|t| t.reshape([-1, t.size()[2]])))
                })
                .collect();
            regmean_block(&merged, l, &VIT_BLOCK, &models, alpha)?;
        }
        Ok(merged)
    })
}

/// KD's student on a ViT stage: a trainable copy of model 1's part (no classifier).
pub struct Student(VitPart);

impl Student {
    pub fn of(model1: &VitPart) -> Result<Self> {
        let host = (named(model1, "", None).into_iter())
            .map(|(n, t)| Ok((n, to_host(&t)?)))
            .collect::<Result<_>>()?;
        let part = VitPart::from_tensors(model1.cfg.clone(), model1.units.clone(), "", host)?;
        Ok(Self(part))
    }
}

impl StudentPart for Student {
    fn params(&self) -> Vec<Tensor> {
        self.named().into_iter().map(|(_, t)| t).collect()
    }
    fn forward(&self, input: &Tensor, _idx: &Tensor) -> Tensor {
        self.0.output(input, Some(input.shallow_clone()))
    }
    fn named(&self) -> Vec<(String, Tensor)> {
        named(&self.0, "", None)
    }
}
