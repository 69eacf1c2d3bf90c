//! A `[[models]]` job's preprocessed inputs, cached in the work directory beside the teacher
//! features, so that images are decoded and preprocessed once per job rather than on every
//! worker start and every `--resume`. The file is named by a fingerprint of everything the
//! inputs depend on — the `[[models]]` entries and `[data]`, each data file's path, size and
//! modification time, each model's processor files, fsmerge's version — so a changed input
//! is preprocessed again, never read stale.

use crate::data::rows::{ImageSet, Splits};
use crate::data::sources;
use fsmerge_common::checkpoint::{read_tensors, write_tensors, HostTensor};
use fsmerge_common::config::JobConfig;
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;

/// Files of a model folder that decide its preprocessing.
const PROCESSOR_FILES: [&str; 3] = [
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// The job's splits from the cache when it holds them for exactly these inputs, else from
/// `build` (then cached; a failed write is only a warning: the job has its inputs). The
/// second value says whether the cache served them.
pub fn load_or_build(
    job: &JobConfig,
    work: &WorkDir,
    build: impl FnOnce() -> Result<Splits>,
) -> Result<(Splits, bool)> {
    let file = work.inputs(&fingerprint(job)?);
    if file.is_file() {
        tracing::info!(
            "inputs: preprocessed inputs read from the cache {}",
            file.display()
        );
        return Ok((read(job, &file)?, true));
    }
    let splits = build()?;
    match write(&file, &splits) {
        Ok(()) => tracing::info!("inputs: preprocessed and cached in {}", file.display()),
        Err(e) => tracing::warn!("could not cache the preprocessed inputs: {e}"),
    }
    Ok((splits, false))
}

/// A hex digest of everything the preprocessed inputs depend on.
fn fingerprint(job: &JobConfig) -> Result<String> {
    let mut h = std::hash::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut h);
    let json = |v: serde_json::Result<String>| v.map_err(|e| Error::Compute(e.to_string()));
    json(serde_json::to_string(&job.models))?.hash(&mut h);
    json(serde_json::to_string(&job.data))?.hash(&mut h);
    for m in &job.models {
        for src in std::iter::once(&m.merge_data).chain(&m.eval_data) {
            for f in sources::input_files(src)? {
                let meta = std::fs::metadata(&f).map_err(|e| Error::io(&f, e))?;
                let modified = (meta.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                (f, meta.len(), modified.map(|d| d.as_nanos())).hash(&mut h);
            }
        }
        for name in PROCESSOR_FILES {
            let p = m.path.join(name);
            std::fs::read(&p).ok().hash(&mut h);
        }
    }
    Ok(format!("{:016x}", h.finish()))
}

/// Tensor names of a split in the cache file.
fn names(split: &str) -> [String; 2] {
    [format!("{split}.rows"), format!("{split}.labels")]
}

fn write(file: &Path, splits: &Splits) -> Result<()> {
    let mut t = BTreeMap::new();
    for (split, set) in [("train", &splits.train), ("test", &splits.test)] {
        let [rows, labels] = names(split);
        let n = set.labels.len();
        t.insert(rows, HostTensor::new(vec![n, set.dim], set.pixels.clone()));
        let ids = set.labels.iter().map(|&c| c as f32).collect();
        t.insert(labels, HostTensor::new(vec![n], ids));
    }
    write_tensors(file, &t)?;
    // Only the job's current inputs are kept (another worker's file being written starts with
    // a dot).
    if let Some(dir) = file.parent() {
        for e in std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .flatten()
        {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p != *file && !name.starts_with('.') && name.ends_with(".safetensors") {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(())
}

fn read(job: &JobConfig, file: &Path) -> Result<Splits> {
    let all: Vec<String> = ["train", "test"].into_iter().flat_map(names).collect();
    let mut t = read_tensors(file, &all)?;
    let mut set = |split: &str| -> Result<ImageSet> {
        let [rows, labels] = names(split);
        let (Some(rows), Some(labels)) = (t.remove(&rows), t.remove(&labels)) else {
            return Err(Error::Checkpoint {
                file: file.to_path_buf(),
                msg: format!("no `{split}` inputs"),
            });
        };
        Ok(ImageSet {
            dim: rows.shape.get(1).copied().unwrap_or(0),
            pixels: rows.data,
            labels: labels.data.iter().map(|&c| c as usize).collect(),
        })
    };
    let (train, test) = (set("train")?, set("test")?);
    Ok(Splits {
        side: job.data.image_side(),
        train,
        val: test.clone(),
        test,
    })
}
