//! Evaluation on the workers: a model is one `EvalPart` per stage, run as a pipeline over the
//! test and validation rows (stage 0 reads the rows, every other stage receives the stream; every
//! stage holds the rows, which BERT's attention mask needs), and the last stage scores every
//! task's logits. The coordinator receives only the scores.

use crate::core::eval::EvalSet;
use crate::core::tensor::CHUNK;
use crate::data::rows::Splits;
use crate::dist::collective::Collective;
use fsmerge_common::config::{JobConfig, Objective};
use fsmerge_common::metrics::SplitScores;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// A model's part on one stage, for evaluation.
pub trait EvalPart {
    /// The stage's units on a chunk of evaluation rows `rows` [B, D], from the previous stage's
    /// stream `input` (None on stage 0): the next stream, or on the last stage every task's
    /// logits concatenated in task order [B, Σ classes].
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor;
}

/// One model's part on a stage (a family's unit range of one model), as evaluation runs it.
pub trait ModelPart {
    /// The part on a chunk of evaluation rows `rows` (the part with the embeddings reads
    /// them) or the previous stage's stream of this model: its last unit's stream, or on the
    /// last stage what the heads read.
    fn output(&self, rows: &Tensor, stream: Option<Tensor>) -> Tensor;
}

/// What a model's last stage reads its heads out as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readout {
    /// Every task's class logits, concatenated in task order [B, Σ classes].
    Classes,
    /// A causal LM's next-token statistics (`next_token_stats`): the part's output is the
    /// final hidden state of every token, each head an LM head.
    NextToken,
}

impl From<Objective> for Readout {
    fn from(o: Objective) -> Self {
        match o {
            Objective::Classify => Readout::Classes,
            Objective::Lm => Readout::NextToken,
        }
    }
}

/// Every original's part of a stage; on the last stage each read through its own task's
/// classifier (`classifiers`, empty elsewhere).
pub struct OriginalsPart<'a, P> {
    pub parts: &'a [P],
    pub classifiers: &'a [crate::core::linear::Linear],
    pub readout: Readout,
}

impl<P: ModelPart> EvalPart for OriginalsPart<'_, P> {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let outs: Vec<Tensor> = (self.parts.iter().enumerate())
            .map(|(i, p)| p.output(rows, input.map(|s| s.get(i as i64))))
            .collect();
        if self.classifiers.is_empty() {
            return Tensor::stack(&outs, 0);
        }
        match self.readout {
            Readout::Classes => own_heads_logits(self.classifiers, &Tensor::stack(&outs, 0)),
            Readout::NextToken => next_token_stats(self.classifiers, &|t| &outs[t], rows),
        }
    }
}

/// A standard model's part of a stage and, on the last stage, every task's head (`heads`,
/// empty elsewhere).
pub struct MergedPart<P> {
    pub part: P,
    pub heads: Vec<crate::core::linear::Linear>,
    pub readout: Readout,
}

impl<P: ModelPart> EvalPart for MergedPart<P> {
    fn forward(&self, rows: &Tensor, input: Option<&Tensor>) -> Tensor {
        let out = self.part.output(rows, input.map(Tensor::shallow_clone));
        match (self.heads.is_empty(), self.readout) {
            (true, _) => out,
            (false, Readout::Classes) => merged_logits(&self.heads, &out),
            (false, Readout::NextToken) => next_token_stats(&self.heads, &|_| &out, rows),
        }
    }
}

/// The rows a job is evaluated on: test and validation, each cut into tasks; on the last
/// stage, once the originals are evaluated, their logits on those rows (the reference of every
/// later model's fidelity).
pub struct EvalRows {
    splits: [EvalSet; 2],
    /// Number of classes of each task (its slice of the logits).
    classes: Vec<i64>,
    /// Whether each task's rows carry labels (else they are held-out merge inputs).
    labeled: Vec<bool>,
    /// Class logits, or causal LMs' next-token statistics of every task's text domain.
    readout: Readout,
    reference: Option<SplitLogits>,
}

/// Every task's logits [N_t, Σ classes] on the test and the validation rows.
pub type SplitLogits = [Vec<Tensor>; 2];

impl EvalRows {
    pub fn new(job: &JobConfig, splits: &Splits) -> Self {
        Self {
            splits: [
                EvalSet::new(&splits.test, &job.tasks),
                EvalSet::new(&splits.val, &job.tasks),
            ],
            classes: job.tasks.iter().map(|t| t.classes.len() as i64).collect(),
            labeled: (0..job.tasks.len()).map(|t| job.labeled(t)).collect(),
            readout: job.objective().into(),
            reference: None,
        }
    }

    pub fn to_device(&self, device: Device) -> Self {
        let moved = |s: &EvalSet| EvalSet {
            tasks: s
                .tasks
                .iter()
                .map(|(x, y)| (x.to_device(device), y.to_device(device)))
                .collect(),
        };
        Self {
            splits: [moved(&self.splits[0]), moved(&self.splits[1])],
            classes: self.classes.clone(),
            labeled: self.labeled.clone(),
            readout: self.readout,
            reference: None,
        }
    }

    /// The originals' logits, which later models' fidelity is measured against.
    pub fn set_reference(&mut self, logits: SplitLogits) {
        self.reference = Some(logits);
    }

    /// Width of the last stage's output per row for text rows of `tokens` tokens: every
    /// task's classes, or each head's two rows of next-token statistics.
    fn output_width(&self, tokens: i64) -> i64 {
        match self.readout {
            Readout::Classes => self.classes.iter().sum(),
            Readout::NextToken => self.classes.len() as i64 * 2 * (tokens - 1).max(0),
        }
    }
}

/// Run `part` over every evaluation row, task by task in chunks, down the pipeline `pipe`
/// (member s is stage s). Returns, on the last stage, the [test, val] scores and the logits
/// they were computed from; None elsewhere.
pub fn evaluate(
    part: &dyn EvalPart,
    rows: &EvalRows,
    pipe: &mut dyn Collective,
) -> Result<Option<([SplitScores; 2], SplitLogits)>> {
    let (me, last) = (pipe.rank(), pipe.rank() + 1 == pipe.size());
    let mut logits: Vec<Vec<Tensor>> = Vec::new();
    for split in &rows.splits {
        let mut per_task = Vec::new();
        for (x, _) in &split.tasks {
            let n = x.size()[0];
            let mut chunks = Vec::new();
            for start in (0..n).step_by(CHUNK as usize) {
                let chunk = x.narrow(0, start, CHUNK.min(n - start));
                let input = if me == 0 {
                    None
                } else {
                    Some(recv_stream(pipe, me - 1, x.device())?)
                };
                let out = tch::no_grad(|| part.forward(&chunk, input.as_ref()));
                if last {
                    chunks.push(out);
                } else {
                    send_stream(pipe, &out, me + 1)?;
                }
            }
            if last {
                let total = rows.output_width(x.size()[1]);
                per_task.push(if chunks.is_empty() {
                    Tensor::zeros([0, total], (Kind::Float, x.device()))
                } else {
                    Tensor::cat(&chunks, 0)
                });
            }
        }
        logits.push(per_task);
    }
    if !last {
        return Ok(None);
    }
    let logits: SplitLogits = [
        std::mem::take(&mut logits[0]),
        std::mem::take(&mut logits[1]),
    ];
    let reference = rows.reference.as_ref().unwrap_or(&logits);
    let score = |i: usize| -> Result<SplitScores> {
        let counts = (rows.splits[i].tasks.iter().enumerate())
            .map(|(t, (x, y))| match rows.readout {
                Readout::Classes => count(rows, t, &logits[i][t], y, &reference[i][t]),
                Readout::NextToken => {
                    count_next_tokens(rows, t, x, &logits[i][t], &reference[i][t])
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(split_scores(&counts, &rows.labeled))
    };
    let scores = [score(0)?, score(1)?];
    Ok(Some((scores, logits)))
}

/// What one task's rows scored.
struct Counts {
    /// Correct predictions on the task's own head, and jointly.
    own: i64,
    joint: i64,
    /// Own-head predictions equal to the original's.
    agree: i64,
    rows: i64,
    /// ‖z − z_orig‖² and ‖z_orig‖² of the task head's logits (a causal LM: of its per-token
    /// negative log-likelihoods).
    error_sq: f64,
    reference_sq: f64,
    /// A causal LM's summed negative log-likelihood of the rows' next tokens under each head
    /// (task order; empty for classifiers); `rows` then counts the predicted tokens.
    nll: Vec<f64>,
}

/// Score task t's `logits` against its labels `y` (its own slice; and the argmax over every
/// slice against `y` offset by the earlier tasks' classes) and against the original's logits
/// `reference` on the same rows.
fn count(
    rows: &EvalRows,
    t: usize,
    logits: &Tensor,
    y: &Tensor,
    reference: &Tensor,
) -> Result<Counts> {
    let classes = &rows.classes;
    let total: i64 = classes.iter().sum();
    let n = y.size()[0];
    if logits.size() != [n, total] || reference.size() != [n, total] {
        return Err(Error::Compute(format!(
            "the last stage gave logits of shape {:?} (reference {:?}) for {n} rows of {total} classes",
            logits.size(),
            reference.size(),
        )));
    }
    let offset: i64 = classes[..t].iter().sum();
    let equal = |a: &Tensor, b: &Tensor| {
        a.eq_tensor(b)
            .to_kind(Kind::Int64)
            .sum(Kind::Int64)
            .int64_value(&[])
    };
    let own = logits.narrow(1, offset, classes[t]);
    let theirs = reference.narrow(1, offset, classes[t]);
    let sq = |x: &Tensor| {
        x.to_kind(Kind::Double)
            .square()
            .sum(Kind::Double)
            .double_value(&[])
    };
    let predicted = own.argmax(1, false);
    Ok(Counts {
        own: equal(&predicted, y),
        joint: equal(&logits.argmax(1, false), &(y + offset)),
        agree: equal(&predicted, &theirs.argmax(1, false)),
        rows: n,
        error_sq: sq(&(&own - &theirs)),
        reference_sq: sq(&theirs),
        nll: Vec::new(),
    })
}

/// Score domain t's texts `x` from every head's next-token statistics `stats` (and the
/// originals' `reference`): the own head's next-token accuracy and agreement with original t,
/// the relative error of its per-token NLL, and every head's summed NLL.
fn count_next_tokens(
    rows: &EvalRows,
    t: usize,
    x: &Tensor,
    stats: &Tensor,
    reference: &Tensor,
) -> Result<Counts> {
    let (n, tokens) = (x.size()[0], x.size()[1]);
    let heads = rows.classes.len() as i64;
    let width = rows.output_width(tokens);
    if stats.size() != [n, width] || reference.size() != [n, width] {
        return Err(Error::Compute(format!(
            "the last stage gave next-token statistics of shape {:?} (reference {:?}) for {n} texts of {tokens} tokens and {heads} heads",
            stats.size(),
            reference.size(),
        )));
    }
    let split = |s: &Tensor| s.view([n, heads, 2, tokens - 1]).to_kind(Kind::Double);
    let (stats, reference) = (split(stats), split(reference));
    let target = crate::data::text::tokens(x).0.narrow(1, 1, tokens - 1);
    let real = target.ne(0);
    let sum = |v: &Tensor| v.sum(Kind::Double).double_value(&[]);
    let own = stats.select(1, t as i64);
    let theirs = reference.select(1, t as i64);
    let (nll, predicted) = (own.select(1, 0), own.select(1, 1).to_kind(Kind::Int64));
    let (ref_nll, ref_predicted) = (
        theirs.select(1, 0),
        theirs.select(1, 1).to_kind(Kind::Int64),
    );
    let real_and = |b: Tensor| b.logical_and(&real).to_kind(Kind::Int64);
    let count = |b: Tensor| real_and(b).sum(Kind::Int64).int64_value(&[]);
    Ok(Counts {
        own: count(predicted.eq_tensor(&target)),
        joint: 0,
        agree: count(predicted.eq_tensor(&ref_predicted)),
        rows: real.sum(Kind::Int64).int64_value(&[]),
        error_sq: sum(&(&nll - &ref_nll).square()),
        reference_sq: sum(&ref_nll.square()),
        nll: (0..heads)
            .map(|h| sum(&stats.select(1, h).select(1, 0)))
            .collect(),
    })
}

/// Per-task scores; the joint accuracy averages the labeled tasks only.
fn split_scores(counts: &[Counts], labeled: &[bool]) -> SplitScores {
    let share = |k: i64, rows: i64| {
        if rows == 0 {
            0.0
        } else {
            k as f64 / rows as f64
        }
    };
    let per_task: Vec<f64> = counts.iter().map(|c| share(c.own, c.rows)).collect();
    let joints: Vec<f64> = (counts.iter().zip(labeled))
        .filter(|(_, &l)| l)
        .map(|(c, _)| share(c.joint, c.rows))
        .collect();
    let joint = joints.iter().sum::<f64>() / joints.len().max(1) as f64;
    SplitScores {
        per_task,
        joint,
        fidelity: counts.iter().map(|c| share(c.agree, c.rows)).collect(),
        logit_error: (counts.iter())
            .map(|c| {
                if c.reference_sq > 0.0 {
                    (c.error_sq / c.reference_sq).sqrt()
                } else {
                    0.0
                }
            })
            .collect(),
        perplexity: (counts.iter())
            .filter(|c| !c.nll.is_empty())
            .map(|c| {
                (c.nll.iter())
                    .map(|&nll| (nll / c.rows.max(1) as f64).exp())
                    .collect()
            })
            .collect(),
    }
}

/// Longest stream shape sent between stages ([n, B, T, d] and its rank).
const MAX_DIMS: usize = 6;

/// Send a stream of any shape: its shape first (rank, then dims, in a fixed-size header).
fn send_stream(pipe: &mut dyn Collective, t: &Tensor, peer: usize) -> Result<()> {
    let shape = t.size();
    if shape.len() > MAX_DIMS {
        return Err(Error::Compute(format!(
            "a stream of rank {} is too long to send",
            shape.len()
        )));
    }
    let mut header = vec![0f32; MAX_DIMS + 1];
    header[0] = shape.len() as f32;
    for (h, &d) in header[1..].iter_mut().zip(&shape) {
        *h = d as f32;
    }
    let device = pipe.device();
    pipe.send(&Tensor::from_slice(&header).to_device(device), peer)?;
    pipe.send(&t.to_kind(Kind::Float).to_device(device).contiguous(), peer)
}

/// Receive a stream `send_stream` sent, onto `device`.
fn recv_stream(pipe: &mut dyn Collective, peer: usize, device: Device) -> Result<Tensor> {
    let on = (Kind::Float, pipe.device());
    let mut header = Tensor::zeros([MAX_DIMS as i64 + 1], on);
    pipe.recv(&mut header, peer)?;
    let h: Vec<f32> = Vec::<f32>::try_from(header.to_device(Device::Cpu))
        .map_err(|e| Error::Compute(format!("stream header: {e}")))?;
    let rank = h[0] as usize;
    if rank == 0 || rank > MAX_DIMS {
        return Err(Error::Collective(format!(
            "member {peer} sent a stream header of rank {rank}"
        )));
    }
    let shape: Vec<i64> = h[1..=rank].iter().map(|&d| d as i64).collect();
    let mut t = Tensor::zeros(shape.as_slice(), on);
    pipe.recv(&mut t, peer)?;
    Ok(t.to_device(device))
}

/// Every task's logits from each model's own output through its own head, concatenated in task
/// order: the originals' last stage (`outputs` [n, B, ..]).
pub fn own_heads_logits(heads: &[crate::core::linear::Linear], outputs: &Tensor) -> Tensor {
    let logits: Vec<Tensor> = heads
        .iter()
        .enumerate()
        .map(|(t, h)| h.forward(&crate::core::tensor::f32(&outputs.get(t as i64))))
        .collect();
    Tensor::cat(&logits, 1)
}

/// Next-token statistics of causal LMs on text rows `rows` [B, T]: for each head h, read on
/// `output(h)` (final hidden states [B, T, d]), the negative log-likelihood of every next
/// token and the token it predicts (both 0 where the next token is `[PAD]`), as
/// [B, heads · 2 · (T − 1)] (head, then NLL / prediction, then position).
pub fn next_token_stats<'a>(
    heads: &[crate::core::linear::Linear],
    output: &dyn Fn(usize) -> &'a Tensor,
    rows: &Tensor,
) -> Tensor {
    let (ids, _) = crate::data::text::tokens(rows);
    let (b, t) = (ids.size()[0], ids.size()[1]);
    let target = ids.narrow(1, 1, t - 1);
    let real = target.ne(0).to_kind(Kind::Float);
    if b == 0 {
        let width = heads.len() as i64 * 2 * (t - 1);
        return Tensor::zeros([0, width], (Kind::Float, ids.device()));
    }
    // Vocabulary-wide logits of a few rows at a time: a real LM's head is ~10⁵ wide.
    let vocab = heads.first().map_or(1, |h| h.w.size()[0]);
    let per_slice = (LOGITS_PER_SLICE / ((t - 1).max(1) * vocab)).max(1);
    let per_head: Vec<Tensor> = (heads.iter().enumerate())
        .map(|(h, head)| {
            let states = output(h).narrow(1, 0, t - 1);
            let slices: Vec<Tensor> = (0..b)
                .step_by(per_slice as usize)
                .map(|start| {
                    let len = per_slice.min(b - start);
                    let x = crate::core::tensor::f32(&states.narrow(0, start, len));
                    let log_p = head.forward(&x).log_softmax(-1, Kind::Float);
                    let next = target.narrow(0, start, len).unsqueeze(-1);
                    let nll = -log_p.gather(2, &next, false).squeeze_dim(-1);
                    let predicted = log_p.argmax(-1, false).to_kind(Kind::Float);
                    let real = real.narrow(0, start, len);
                    Tensor::stack(&[nll * &real, predicted * &real], 1)
                })
                .collect();
            Tensor::cat(&slices, 0)
        })
        .collect();
    Tensor::stack(&per_head, 1).flatten(1, -1)
}

/// Most logits `next_token_stats` holds at once (64 MiB in fp32).
const LOGITS_PER_SLICE: i64 = 1 << 24;

/// Every task's head on one shared output [B, ..], concatenated in task order: a merged
/// model's last stage.
pub fn merged_logits(heads: &[crate::core::linear::Linear], output: &Tensor) -> Tensor {
    let logits: Vec<Tensor> = heads.iter().map(|h| h.forward(output)).collect();
    Tensor::cat(&logits, 1)
}

/// A baseline merged from every original's tensors of a stage, under the merged model's names
/// (`models[i]` holds model i's; a head name only model i holds is its task's head and stays):
/// `first` takes model 1's shared tensors, `average` their element-wise mean.
pub fn first_or_average(
    models: Vec<Vec<(String, Tensor)>>,
    average: bool,
) -> BTreeMap<String, Tensor> {
    let mut by_name: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    for model in models {
        for (name, t) in model {
            // fp32, what the merged model is built in (the originals may be stored in half).
            by_name
                .entry(name)
                .or_default()
                .push(crate::core::tensor::f32(&t));
        }
    }
    by_name
        .into_iter()
        .map(|(name, ts)| {
            let t = if average && ts.len() > 1 {
                Tensor::stack(&ts.iter().map(Tensor::detach).collect::<Vec<_>>(), 0)
                    .mean_dim(0, false, None)
            } else {
                ts[0].detach().copy()
            };
            (name, t)
        })
        .collect()
}
