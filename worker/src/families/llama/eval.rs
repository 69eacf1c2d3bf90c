//! A Llama stage's models for evaluation on the workers: every original's units (on the last
//! stage each read at its last real token through its own `score`, or at every token through
//! its own `lm_head`), a standard Llama's units
//! from merged tensors, RegMean and KD's student. Every stage reads the attention mask from
//! the evaluation rows it holds.

use crate::core::baselines::RegmeanSums;
use crate::core::linear::Linear;
use crate::data::text::tokens;
use crate::dist::distill::StudentPart;
use crate::dist::evaluate::{first_or_average, MergedPart, ModelPart, Readout};
use crate::dist::stage::{head_pair, own_rows, take_task_heads, StageData};
use crate::families::llama::config::LlamaConfig;
use crate::families::llama::model::{last_token, AttentionContext, BLOCK_PROJ};
use crate::families::llama::part::LlamaPart;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use tch::Tensor;

impl ModelPart for LlamaPart {
    /// On text rows `rows` (token ids on the stage with the embeddings, else the stream), with
    /// their attention mask: the last unit's stream, or on the last stage the final hidden
    /// state at each text's last real token (what `score` reads; an LM head reads them all).
    fn output(&self, rows: &Tensor, stream: Option<Tensor>) -> Tensor {
        let (ids, mask) = tokens(rows);
        let input = match (&self.embed, stream) {
            (None, Some(s)) => s,
            _ => ids,
        };
        let last = self.is_last() && self.readout == Readout::Classes;
        read_out(last, run_part(self, &input, &mask), &mask)
    }
}

/// The part's last output on its input: the stream, or the final hidden states.
fn run_part(part: &LlamaPart, input: &Tensor, mask: &Tensor) -> Tensor {
    part.trace(input, mask)
        .pop()
        .unwrap_or_else(|| input.shallow_clone())
}

/// What leaves a stage in evaluation: the stream, or (`at_last_token`: the last stage of a
/// classifier) the state the heads read at each text's last real token.
pub fn read_out(at_last_token: bool, out: Tensor, mask: &Tensor) -> Tensor {
    if at_last_token {
        last_token(&out, mask)
    } else {
        out
    }
}

/// A standard Llama's units `units` from tensors under the merged names, with every task's
/// head on the last stage, read out as `readout`.
pub fn merged_part(
    cfg: LlamaConfig,
    units: Range<usize>,
    tasks: &[String],
    mut tensors: BTreeMap<String, Tensor>,
    readout: Readout,
) -> Result<MergedPart<LlamaPart>> {
    let last = units.end == cfg.num_hidden_layers + 1;
    let heads = if last {
        take_task_heads(tasks, &mut tensors)?
    } else {
        Vec::new()
    };
    let mut part = LlamaPart::from_tensors(cfg, units, tensors, Path::new("the merged model"))?;
    part.readout = readout;
    Ok(MergedPart {
        part,
        heads,
        readout,
    })
}

/// One original's tensors of its part under the merged names, with `head` as task `task`'s
/// on the last stage.
pub fn named(part: &LlamaPart, task: &str, head: Option<&Linear>) -> Vec<(String, Tensor)> {
    let mut v = part.named();
    if let Some(h) = head {
        v.extend(head_pair(task, h));
    }
    v
}

/// RegMean of a stage's units (method.md §13): each block's seven linear maps solved from
/// their inputs inside each model on its own task's merge rows (the teacher streams `data`,
/// real tokens only), the embeddings and RMSNorms averaged, each task its own head. `mask` is
/// the merge rows' attention mask [N, T].
pub fn regmean(
    parts: &[LlamaPart],
    tensors: Vec<Vec<(String, Tensor)>>,
    data: &StageData,
    mask: &Tensor,
    alpha: f64,
) -> Result<BTreeMap<String, Tensor>> {
    let merged = first_or_average(tensors, true);
    let Some(p0) = parts.first() else {
        return Ok(merged);
    };
    let start = p0.units.start;
    let first = crate::core::transformer::unit_blocks(&p0.units).start;
    tch::no_grad(|| {
        for j in 0..p0.blocks.len() {
            let l = first + j;
            let mut sums: Vec<RegmeanSums> = (0..7).map(|_| RegmeanSums::default()).collect();
            for (i, p) in parts.iter().enumerate() {
                let rows = data.task.eq(i as i64).nonzero().squeeze_dim(1);
                let m = mask.index_select(0, &rows);
                let real = m.flatten(0, -1).nonzero().squeeze_dim(1);
                let x = crate::core::tensor::f32(&own_rows(data.stream(start, l), data, i));
                let ctx = AttentionContext::new(&p.cfg, &m);
                let block = p.blocks[j].map(&crate::core::tensor::f32);
                let inputs = block.linear_inputs(&x, &ctx);
                // q, k, v read the first input; o the second; gate, up the third; down the last.
                for (k, input) in [0, 0, 0, 1, 2, 2, 3].into_iter().enumerate() {
                    let t = &inputs[input];
                    let x = t.reshape([-1, t.size()[2]]).index_select(0, &real);
                    sums[k].add(&x, &block.projs()[k].w, alpha);
                }
            }
            for (k, s) in sums.into_iter().enumerate() {
                let name = format!("layers.{l}.{}.weight", BLOCK_PROJ[k]);
                let w = merged.get(&name).ok_or_else(|| {
                    Error::Compute(format!("RegMean: the merged block lacks `{name}`"))
                })?;
                let target = Linear {
                    w: w.shallow_clone(),
                    b: Tensor::zeros([0], (tch::Kind::Float, w.device())),
                };
                s.solve_into(&target, &format!("block {l}, {}", BLOCK_PROJ[k]))?;
            }
        }
        Ok(merged)
    })
}

/// KD's student on a Llama stage: a trainable copy of model 1's part (no head), with the merge
/// rows' attention mask [N, T]; on the last stage its output is the final hidden states, as
/// the originals' last features are.
pub struct Student {
    part: LlamaPart,
    mask: Tensor,
}

impl Student {
    pub fn of(model1: &LlamaPart, mask: &Tensor) -> Result<Self> {
        // Trained in fp32 whatever the originals' precision.
        let tensors = (model1.named().into_iter())
            .map(|(n, t)| (n, crate::core::tensor::f32(&t.detach()).copy()))
            .collect();
        let part = LlamaPart::from_tensors(
            model1.cfg.clone(),
            model1.units.clone(),
            tensors,
            Path::new("KD's student"),
        )?;
        Ok(Self {
            part,
            mask: mask.shallow_clone(),
        })
    }
}

impl StudentPart for Student {
    fn params(&self) -> Vec<Tensor> {
        self.named().into_iter().map(|(_, t)| t).collect()
    }
    fn forward(&self, input: &Tensor, idx: &Tensor) -> Tensor {
        let x = match &self.part.embed {
            Some(_) => tokens(input).0,
            None => input.shallow_clone(),
        };
        run_part(&self.part, &x, &self.mask.index_select(0, idx))
    }
    fn named(&self) -> Vec<(String, Tensor)> {
        self.part.named()
    }
}
