//! A stage's teacher features on disk (`<out>.work/features/stage<s>.safetensors`), so a
//! resumed job skips computing and moving them, and stage 0's starting point, the merge inputs.

use crate::core::tensor::{to_host, to_tch};
use crate::dist::stage::StageData;
use fsmerge_common::checkpoint::{read_tensors, write_tensors, HostTensor};
use fsmerge_common::config::JobConfig;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Stage 0's start: the merge inputs and their tasks, built from the data exactly as the
/// single-process job builds them.
pub fn merge_inputs(
    job: &JobConfig,
    splits: &crate::data::rows::Splits,
) -> Result<(Tensor, Tensor)> {
    let m = &job.merge;
    let set = crate::data::merge_set::build(
        splits,
        &job.tasks,
        m.n_originals,
        m.n_augmented,
        &m.augment,
        job.seed,
    )?;
    Ok((set.x, set.task))
}

/// Cache a stage's teacher features (atomic write).
pub fn save(path: &Path, d: &StageData) -> Result<()> {
    let mut t = BTreeMap::new();
    t.insert("input".to_string(), to_host(&d.input)?);
    t.insert("task".to_string(), to_host(&d.task.to_kind(Kind::Float))?);
    for (j, f) in d.feats.iter().enumerate() {
        t.insert(format!("feat{j}"), to_host(f)?);
    }
    write_tensors(path, &t)
}

/// Read a stage's cached teacher features (`layers` of them), checked against the stage: `n`
/// models, and on a stage after the first the stream's per-sample shape `stream`. A cache that
/// disagrees (another job's, or damaged) is an error naming the file and tensor.
pub fn load(path: &Path, layers: usize, n: usize, stream: Option<&[i64]>) -> Result<StageData> {
    let mut names = vec!["input".to_string(), "task".to_string()];
    names.extend((0..layers).map(|j| format!("feat{j}")));
    let mut t = read_tensors(path, &names)?;
    let mut take = |name: &str| -> Result<HostTensor> {
        t.remove(name).ok_or_else(|| Error::Tensor {
            file: path.to_path_buf(),
            tensor: name.to_string(),
            msg: "missing from the feature cache".into(),
        })
    };
    let input = to_tch(&take("input")?);
    let task = to_tch(&take("task")?).to_kind(Kind::Int64);
    let feats: Vec<Tensor> = (0..layers)
        .map(|j| take(&format!("feat{j}")).map(|h| to_tch(&h)))
        .collect::<Result<_>>()?;
    let bad = |tensor: &str, msg: String| Error::Tensor {
        file: path.to_path_buf(),
        tensor: tensor.to_string(),
        msg,
    };
    let rows = task.size().first().copied().unwrap_or(0);
    if task.dim() != 1 || (rows > 0 && task.max().int64_value(&[]) >= n as i64) {
        return Err(bad(
            "task",
            format!("not the tasks of {n} models' rows: {:?}", task.size()),
        ));
    }
    match stream {
        Some(dims) => {
            let want: Vec<i64> = [n as i64, rows].iter().chain(dims).copied().collect();
            if input.size() != want {
                return Err(bad(
                    "input",
                    format!("shape {:?}, the stage reads {want:?}", input.size()),
                ));
            }
        }
        None if input.size().first() != Some(&rows) => {
            return Err(bad(
                "input",
                format!("shape {:?} for {rows} rows", input.size()),
            ));
        }
        None => {}
    }
    for (j, f) in feats.iter().enumerate() {
        if f.size().len() < 2 || f.size()[..2] != [n as i64, rows] {
            return Err(bad(
                &format!("feat{j}"),
                format!("shape {:?}, expected [{n}, {rows}, ..]", f.size()),
            ));
        }
    }
    Ok(StageData { input, feats, task })
}
