//! The data of a `[[models]]` job as the splits every job reads: task t's rows are model t's
//! `merge_data` (the train split FS-Merge draws its merge rows from; labels unused) and its
//! `eval_data` (the test split; the validation split repeats it) — or, for a model without
//! `eval_data`, every fifth merge input held out as an unlabeled test split, on which the task
//! is scored by fidelity to its original alone. Each input is preprocessed by
//! the models' processor and labels mapped through model t's `label2id` to the job's class ids
//! (task t's classes follow task t-1's). The merged model reads one input, so the models must
//! preprocess alike: a processor setting or tokenizer that differs is refused by name.

use crate::data::preprocess::image::{ChannelAffine, ImageProcessor};
use crate::data::preprocess::parallel::{self, process_all, Encoded};
use crate::data::preprocess::text::TextProcessor;
use crate::data::rows::{ImageSet, Splits};
use crate::data::sources::{self, Input, InputKind, Record};
use fsmerge_common::config::JobConfig;
use fsmerge_common::models::ModelFacts;
use fsmerge_common::{Error, Result};

/// One model's preprocessing.
enum Processor {
    Image(ImageProcessor, usize),
    Text(Box<TextProcessor>),
}

impl Processor {
    fn load(job: &JobConfig, t: usize) -> Result<Self> {
        let dir = &job.models[t].path;
        if job.data.is_text() {
            let p = TextProcessor::load(dir, job.data.max_tokens)?;
            if p.pad_id() != 0 {
                return Err(Error::Data {
                    path: dir.join("tokenizer.json"),
                    msg: format!(
                        "pads with id {}; fsmerge's BERT reads id 0 as padding",
                        p.pad_id()
                    ),
                });
            }
            Ok(Processor::Text(Box::new(p)))
        } else {
            let channels = job.data.channels();
            let p = ImageProcessor::load(dir)?;
            p.check_channels(channels)?;
            Ok(Processor::Image(p, channels))
        }
    }

    /// Each record's row (`dim` values: CHW pixels, or token ids as f32).
    fn rows(&self, records: &[Record], pixels: bool) -> Result<(Vec<f32>, usize)> {
        match self {
            Processor::Image(p, channels) => {
                let dim = channels * p.height * p.width;
                if !pixels {
                    return Ok((Vec::new(), 0));
                }
                let encoded = records
                    .iter()
                    .map(|r| match &r.input {
                        Input::Image(bytes) => Ok(Encoded {
                            bytes,
                            origin: &r.origin,
                        }),
                        Input::Text(_) => Err(not_an(r, "image")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let out = process_all(p, *channels, dim, &encoded, parallel::threads())?;
                Ok((out, dim))
            }
            Processor::Text(p) => {
                let texts = records
                    .iter()
                    .map(|r| match &r.input {
                        Input::Text(t) => Ok(t.as_str()),
                        Input::Image(_) => Err(not_an(r, "text")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let tokens = p.encode(&texts)?;
                Ok((
                    tokens.ids.iter().map(|&id| id as f32).collect(),
                    p.max_tokens(),
                ))
            }
        }
    }
}

fn not_an(r: &Record, what: &str) -> Error {
    Error::Data {
        path: r.origin.clone().into(),
        msg: format!("not an {what}"),
    }
}

/// The first preprocessing setting in which model `t`'s processor differs from model 0's and
/// the merged model cannot absorb (image rescale and normalization differences fold into each
/// original's patch embedding: `input_adapters`).
fn differs(a: &Processor, b: &Processor) -> Option<&'static str> {
    match (a, b) {
        (Processor::Image(a, _), Processor::Image(b, _)) => {
            let keys: [(&str, String, String); 3] = [
                (
                    "do_resize",
                    a.do_resize.to_string(),
                    b.do_resize.to_string(),
                ),
                (
                    "size",
                    format!("{}x{}", a.height, a.width),
                    format!("{}x{}", b.height, b.width),
                ),
                (
                    "resample",
                    format!("{:?}", a.resample),
                    format!("{:?}", b.resample),
                ),
            ];
            keys.into_iter().find(|(_, x, y)| x != y).map(|(k, _, _)| k)
        }
        (Processor::Text(a), Processor::Text(b)) => {
            (!a.same_vocabulary(b)).then_some("the vocabulary")
        }
        _ => Some("the input kind"),
    }
}

/// Every `HOLD_OUT`-th merge input of a model without `eval_data` is held out for its fidelity.
const HOLD_OUT: usize = 5;

/// Model `t`'s inputs: (merged on, evaluated on, whether the evaluated ones carry labels).
/// Without `eval_data`, every fifth merge input is held out, unlabeled.
fn task_records(
    job: &JobConfig,
    t: usize,
    kind: InputKind,
) -> Result<(Vec<Record>, Vec<Record>, bool)> {
    let m = &job.models[t];
    let merge = sources::read(&m.merge_data, kind)?;
    if let Some(eval) = &m.eval_data {
        return Ok((merge, sources::read(eval, kind)?, true));
    }
    if merge.len() < HOLD_OUT {
        return Err(Error::field(
            format!("models[{t}].merge_data"),
            format!(
                "{} inputs; without eval_data at least {HOLD_OUT} are needed (every {HOLD_OUT}th is held out to measure the task's fidelity)",
                merge.len()
            ),
        ));
    }
    let (held, kept): (Vec<_>, Vec<_>) =
        (merge.into_iter().enumerate()).partition(|(i, _)| i % HOLD_OUT == HOLD_OUT - 1);
    let strip = |v: Vec<(usize, Record)>| v.into_iter().map(|(_, r)| r).collect();
    Ok((strip(kept), strip(held), false))
}

/// What the job's models read, and each model's processor (all alike, or the setting that
/// differs is named).
fn processors(job: &JobConfig) -> Result<(InputKind, Vec<Processor>)> {
    let kind = if job.data.is_text() {
        InputKind::Text
    } else {
        InputKind::Image
    };
    let processors = (0..job.models.len())
        .map(|t| Processor::load(job, t))
        .collect::<Result<Vec<_>>>()?;
    check_alike(job, &processors, kind)?;
    Ok((kind, processors))
}

/// Model `t`'s class id of every eval record, through its `label2id`.
fn eval_classes(job: &JobConfig, t: usize, eval: &[Record]) -> Result<Vec<usize>> {
    let path = &job.models[t].path;
    let facts = ModelFacts::read(path)?;
    sources::class_ids(
        eval,
        &facts.label2id(),
        facts.labels.len(),
        &path.join("config.json"),
    )
}

/// Every model preprocesses as the first one does, or the setting that differs is named.
fn check_alike(job: &JobConfig, processors: &[Processor], kind: InputKind) -> Result<()> {
    for (t, p) in processors.iter().enumerate().skip(1) {
        if let Some(key) = differs(&processors[0], p) {
            let file = if kind == InputKind::Text {
                "tokenizer.json"
            } else {
                "preprocessor_config.json"
            };
            return Err(Error::Data {
                path: job.models[t].path.join(file),
                msg: format!(
                    "{key} differs from {}'s: the merged model reads one input, so the models must preprocess alike",
                    job.models[0].path.join(file).display()
                ),
            });
        }
    }
    Ok(())
}

/// Per model, how its pixels follow from model 0's (the merged model's input), per channel
/// (a, b) with own = a·x₀ + b; `None` where they are equal, and for jobs without `[[models]]`
/// or of text. An original's patch embedding composed with it reads model 0's pixels exactly.
pub fn input_adapters(job: &JobConfig) -> Result<Vec<Option<ChannelAffine>>> {
    if job.models.is_empty() || job.data.is_text() {
        return Ok(vec![None; job.tasks.len()]);
    }
    let (_, processors) = processors(job)?;
    processors
        .iter()
        .map(|p| match (p, &processors[0]) {
            (Processor::Image(own, channels), Processor::Image(first, _)) => {
                own.from_reference(first, *channels)
            }
            _ => Ok(None),
        })
        .collect()
}

/// The processor task t's inputs go through: model 0's for images (the merged model's input;
/// each original is adapted to it), the model's own tokenizer for text (same vocabulary).
fn reader(processors: &[Processor], t: usize) -> &Processor {
    match processors[t] {
        Processor::Image(..) => &processors[0],
        Processor::Text(_) => &processors[t],
    }
}

/// The splits of a `[[models]]` job; `pixels` false: labels only (image rows of width 0), for
/// a stage that never reads the rows.
pub fn load(job: &JobConfig, pixels: bool) -> Result<Splits> {
    let (kind, processors) = processors(job)?;
    let empty = || ImageSet {
        pixels: Vec::new(),
        labels: Vec::new(),
        dim: 0,
    };
    let (mut train, mut test) = (empty(), empty());
    for (t, task) in job.tasks.iter().enumerate() {
        let offset = task.classes[0];
        let (merge, eval, labeled) = task_records(job, t, kind)?;
        let reader = reader(&processors, t);
        let (rows, dim) = reader.rows(&merge, pixels)?;
        append(&mut train, rows, vec![offset; merge.len()], dim);
        // Held-out inputs carry class 0 of the task: their fidelity needs no label.
        let classes = if labeled {
            eval_classes(job, t, &eval)?
        } else {
            vec![0; eval.len()]
        };
        let (rows, dim) = reader.rows(&eval, pixels)?;
        append(
            &mut test,
            rows,
            classes.iter().map(|c| offset + c).collect(),
            dim,
        );
    }
    let val = test.clone();
    Ok(Splits {
        side: job.data.image_side(),
        train,
        val,
        test,
    })
}

fn append(set: &mut ImageSet, rows: Vec<f32>, labels: Vec<usize>, dim: usize) {
    set.dim = dim;
    set.pixels.extend(rows);
    set.labels.extend(labels);
}

/// What a dry run learns of one task's data without preprocessing it all.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskData {
    pub task: String,
    /// Inputs of `merge_data` (or the built-in train split's rows of the task).
    pub merge_rows: usize,
    /// Inputs of `eval_data` (or the built-in test split's), or held-out merge inputs.
    pub eval_rows: usize,
    /// Whether the eval inputs carry labels (else they are held-out merge inputs).
    pub labeled: bool,
}

/// Read every source of a `[[models]]` job as the workers will: the processors (equal across
/// the models), every record, the eval labels through `label2id`, and the first input of each
/// source preprocessed. The first problem is an error naming the file, row or key.
pub fn survey(job: &JobConfig) -> Result<Vec<TaskData>> {
    let (kind, processors) = processors(job)?;
    let mut out = Vec::new();
    for (t, task) in job.tasks.iter().enumerate() {
        let (merge, eval, labeled) = task_records(job, t, kind)?;
        let reader = reader(&processors, t);
        reader.rows(&merge[..1], true)?;
        if labeled {
            eval_classes(job, t, &eval)?;
        }
        reader.rows(&eval[..1], true)?;
        out.push(TaskData {
            task: task.name.clone(),
            merge_rows: merge.len(),
            eval_rows: eval.len(),
            labeled,
        });
    }
    Ok(out)
}
