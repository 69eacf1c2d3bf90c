//! A stage's teacher features on disk (`<out>.work/features/stage<s>.safetensors`), so a
//! resumed job skips computing and moving them, and stage 0's starting point, the merge inputs.
//! A stage that keeps its features on disk (`FeaturesAt::Disk`) computes them straight into
//! that file, memory-mapped, and trains from the map.

use crate::core::tensor::{precision_of, to_tch};
use crate::dist::stage::StageData;
use fsmerge_common::checkpoint::{read_tensors, HostTensor};
use fsmerge_common::config::JobConfig;
use fsmerge_common::mapped::MappedTensors;
use fsmerge_common::precision::Precision;
use fsmerge_common::{Error, Result};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

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

/// Cache a stage's teacher features (atomic write), each tensor copied straight into the
/// mapped file in its own precision: no host copy of gigabytes of features beside them.
pub fn save(path: &Path, d: &StageData) -> Result<()> {
    let dims = |t: &Tensor| t.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
    let task = d.task.to_kind(Kind::Float);
    let mut tensors = vec![("input".to_string(), &d.input), ("task".to_string(), &task)];
    tensors.extend((d.feats.iter().enumerate()).map(|(j, f)| (format!("feat{j}"), f)));
    let layout: Vec<(String, Vec<usize>, Precision)> = (tensors.iter())
        .map(|(name, t)| (name.clone(), dims(t), precision_of(t.kind())))
        .collect();
    let mut file = MappedTensors::create(path, &layout, false)?;
    for (name, t) in &tensors {
        let mut to = mapped(&file, name)?;
        tch::no_grad(|| to.copy_(&t.to_device(Device::Cpu)));
    }
    file.commit()
}

/// The names of a stage's tensors in its feature file.
fn names(layers: usize) -> Vec<String> {
    let mut names = vec!["input".to_string(), "task".to_string()];
    names.extend((0..layers).map(|j| format!("feat{j}")));
    names
}

/// A tensor over the bytes of `name` in `file`, no copy.
fn mapped(file: &MappedTensors, name: &str) -> Result<Tensor> {
    let (shape, precision, ptr) = file.slot(name)?;
    let size: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let kind = crate::core::tensor::kind_of(precision);
    // SAFETY: the slot holds shape.product() values of `kind`, aligned to them; the StageData
    // built on it keeps `file` alive as long as its tensors.
    unsafe { Tensor::f_from_blob(ptr, &size, &[], kind, Device::Cpu) }.map_err(|e| Error::Tensor {
        file: file.path().to_path_buf(),
        tensor: name.to_string(),
        msg: e.to_string(),
    })
}

/// A stage's features in a new file at `path`, mapped and zero: the stage input of shape
/// `input` (in its precision), the tasks `task` (written), and the features of shapes `feats`
/// in `precision`, to be filled in place; `scratch`: a file without a name, private to this
/// worker (a replica other than 0). `MappedTensors::commit` names it once filled.
pub fn create_mapped(
    path: &Path,
    input: (&[i64], Precision),
    feats: &[Vec<i64>],
    precision: Precision,
    task: &Tensor,
    scratch: bool,
) -> Result<(StageData, MappedTensors)> {
    let dims = |s: &[i64]| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    let rows = task.size()[0];
    let mut shapes = vec![
        ("input".to_string(), dims(input.0), input.1),
        ("task".to_string(), vec![rows as usize], Precision::Fp32),
    ];
    shapes
        .extend((feats.iter().enumerate()).map(|(j, f)| (format!("feat{j}"), dims(f), precision)));
    let file = MappedTensors::create(path, &shapes, scratch)?;
    let mut t = mapped(&file, "task")?;
    tch::no_grad(|| t.copy_(&task.to_kind(Kind::Float)));
    let data = StageData {
        input: mapped(&file, "input")?,
        feats: (0..feats.len())
            .map(|j| mapped(&file, &format!("feat{j}")))
            .collect::<Result<_>>()?,
        task: task.to_kind(Kind::Int64),
        backing: None,
        recompute: false,
        local: None,
    };
    Ok((data, file))
}

/// Read a stage's cached teacher features (`layers` of them), checked against the stage: `n`
/// models, and on a stage after the first the stream's per-sample shape `stream`; read into
/// memory in the stage's `precision`, or with `map` mapped from the file as it was written.
/// A cache that disagrees (another job's, or damaged) is an error naming the file and tensor.
pub fn load(
    path: &Path,
    layers: usize,
    n: usize,
    (stream, precision): (Option<&[i64]>, Precision),
    map: bool,
) -> Result<StageData> {
    let data = if map {
        let file = MappedTensors::open(path)?;
        let input = mapped(&file, "input")?;
        let task = mapped(&file, "task")?.to_kind(Kind::Int64);
        let feats = (0..layers)
            .map(|j| mapped(&file, &format!("feat{j}")))
            .collect::<Result<_>>()?;
        StageData {
            input,
            feats,
            task,
            backing: Some(Arc::new(file)),
            recompute: false,
            local: None,
        }
    } else {
        let mut data = read(path, layers)?;
        let kind = crate::core::tensor::kind_of(precision);
        for f in &mut data.feats {
            *f = f.to_kind(kind);
        }
        if stream.is_some() {
            data.input = data.input.to_kind(kind);
        }
        data
    };
    check(path, &data, n, stream)?;
    Ok(data)
}

/// The cached features read into memory.
fn read(path: &Path, layers: usize) -> Result<StageData> {
    let mut t = read_tensors(path, &names(layers))?;
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
    Ok(StageData::new(input, feats, task))
}

/// Check cached features against the stage (see `load`).
fn check(path: &Path, data: &StageData, n: usize, stream: Option<&[i64]>) -> Result<()> {
    let StageData {
        input, feats, task, ..
    } = data;
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
    Ok(())
}
