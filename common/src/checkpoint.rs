//! Checkpoint IO without libtorch: safetensors files (memory-mapped, read lazily) holding the
//! MLP layout, and the small JSON config beside each file. Every error names the file and, where
//! there is one, the tensor.

use crate::{fsio, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A dense f32 tensor in host memory (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
}

/// The JSON config of one original MLP (`<task>.json` beside `<task>.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    pub format: String,
    pub input_dim: usize,
    pub hidden: Vec<usize>,
    pub task: String,
    /// Dataset labels this model's head predicts, in head order.
    pub classes: Vec<usize>,
    #[serde(default)]
    pub seed: u64,
}

pub const MLP_FORMAT: &str = "fsmerge-mlp-v1";
pub const MERGED_FORMAT: &str = "fsmerge-merged-mlp-v1";

/// The JSON config of a merged MLP: one body, one head per task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergedConfig {
    pub format: String,
    pub input_dim: usize,
    pub hidden: Vec<usize>,
    pub tasks: Vec<MergedTask>,
    pub method: String,
    pub variant: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergedTask {
    pub name: String,
    pub classes: Vec<usize>,
}

/// Tensor names of the MLP layout.
pub fn body_weight(l: usize) -> String {
    format!("body.{l}.weight")
}
pub fn body_bias(l: usize) -> String {
    format!("body.{l}.bias")
}
pub fn head_weight(task: Option<&str>) -> String {
    task.map_or("head.weight".to_string(), |t| format!("heads.{t}.weight"))
}
pub fn head_bias(task: Option<&str>) -> String {
    task.map_or("head.bias".to_string(), |t| format!("heads.{t}.bias"))
}

/// Paths of one model inside a models directory.
pub fn model_paths(dir: &Path, task: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{task}.safetensors")),
        dir.join(format!("{task}.json")),
    )
}

/// `path` is a regular file (a link to one is fine: Hugging Face's cache links its blobs).
pub fn regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Checkpoint {
            file: path.to_path_buf(),
            msg: "not a regular file".into(),
        });
    }
    Ok(())
}

/// A regular file, memory-mapped read-only.
fn map_file(file: &Path) -> Result<memmap2::Mmap> {
    regular_file(file)?;
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    // SAFETY: the file is opened read-only and not modified while mapped by this process.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(file, e))
}

fn not_safetensors(file: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::Checkpoint {
        file: file.to_path_buf(),
        msg: format!("not a valid safetensors file ({e})"),
    }
}

/// The names of the tensors in a safetensors file (from its header), sorted: the header is
/// read into a hash map, so its own order would differ from run to run.
pub fn tensor_names(file: &Path) -> Result<Vec<String>> {
    let mmap = map_file(file)?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| not_safetensors(file, e))?;
    let mut names: Vec<String> = meta.tensors().into_keys().collect();
    names.sort();
    Ok(names)
}

/// Every tensor's shape in a safetensors file, from its header, with the file checked whole
/// (every tensor's bytes present, in bounds); no tensor data is read.
pub fn tensor_shapes(file: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    shapes_in(&map_file(file)?, file)
}

/// `tensor_shapes` of a safetensors file's content `bytes` (`file` names it in errors).
pub fn shapes_in(bytes: &[u8], file: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| not_safetensors(file, e))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

/// Read every named tensor from a safetensors file (memory-mapped; only these tensors are copied).
pub fn read_tensors(file: &Path, names: &[String]) -> Result<BTreeMap<String, HostTensor>> {
    tensors_in(&map_file(file)?, file, names)
}

/// `read_tensors` from a safetensors file's content `bytes` (`file` names it in errors).
pub fn tensors_in(
    bytes: &[u8],
    file: &Path,
    names: &[String],
) -> Result<BTreeMap<String, HostTensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| not_safetensors(file, e))?;
    let mut out = BTreeMap::new();
    for name in names {
        let view = st.tensor(name).map_err(|_| Error::Tensor {
            file: file.to_path_buf(),
            tensor: name.clone(),
            msg: "missing".into(),
        })?;
        // Half-precision checkpoints are read exactly into f32; `merge.precision` decides
        // what the worker keeps.
        let Some(dtype) = crate::precision::Precision::of_safetensors(view.dtype()) else {
            return Err(Error::Tensor {
                file: file.to_path_buf(),
                tensor: name.clone(),
                msg: format!("dtype {:?}, expected F32, BF16 or F16", view.dtype()),
            });
        };
        let data = dtype.decode(view.data());
        if let Some(v) = data.iter().find(|v| !v.is_finite()) {
            return Err(Error::Tensor {
                file: file.to_path_buf(),
                tensor: name.clone(),
                msg: format!("holds a non-finite value ({v}): the model is broken, not mergeable"),
            });
        }
        out.insert(name.clone(), HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Write named tensors to a safetensors file atomically.
pub fn write_tensors(file: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Tensor {
                    file: file.to_path_buf(),
                    tensor: n.clone(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let serialized =
        safetensors::tensor::serialize(views, &None).map_err(|e| Error::Checkpoint {
            file: file.to_path_buf(),
            msg: e.to_string(),
        })?;
    fsio::write_atomic(file, &serialized)
}

pub fn read_json<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    parse_json(&text, file)
}

/// `read_json` of a file's content `text` (`file` names it in errors).
pub fn parse_json<T: serde::de::DeserializeOwned>(text: &str, file: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Checkpoint {
        file: file.to_path_buf(),
        msg: format!("bad JSON config: {e}"),
    })
}

pub fn write_json<T: Serialize>(file: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Compute(e.to_string()))?;
    fsio::write_atomic(file, text.as_bytes())
}

/// One original MLP as read from disk, shapes checked against its JSON config.
#[derive(Debug, Clone)]
pub struct MlpCheckpoint {
    pub config: MlpConfig,
    pub file: PathBuf,
    /// (weight [out, in], bias [out]) per body layer.
    pub body: Vec<(HostTensor, HostTensor)>,
    pub head: (HostTensor, HostTensor),
}

/// The layers `layers` (and, if asked, the head) of one original MLP: what a worker of one stage
/// reads. Only those tensors are read from the memory-mapped file.
#[derive(Debug, Clone)]
pub struct MlpPart {
    pub config: MlpConfig,
    pub file: PathBuf,
    pub layers: std::ops::Range<usize>,
    /// (weight [out, in], bias [out]) per body layer of `layers`.
    pub body: Vec<(HostTensor, HostTensor)>,
    pub head: Option<(HostTensor, HostTensor)>,
}

impl MlpPart {
    pub fn load(
        dir: &Path,
        task: &str,
        layers: std::ops::Range<usize>,
        head: bool,
    ) -> Result<Self> {
        let (st, js) = model_paths(dir, task);
        let config: MlpConfig = read_json(&js)?;
        if config.format != MLP_FORMAT {
            return Err(Error::Checkpoint {
                file: js,
                msg: format!("format `{}`, expected `{MLP_FORMAT}`", config.format),
            });
        }
        if layers.end > config.hidden.len() || layers.start > layers.end {
            return Err(Error::Checkpoint {
                file: js,
                msg: format!(
                    "layers {layers:?} requested but the model has {} layers",
                    config.hidden.len()
                ),
            });
        }
        let mut names = Vec::new();
        for l in layers.clone() {
            names.push(body_weight(l));
            names.push(body_bias(l));
        }
        if head {
            names.push(head_weight(None));
            names.push(head_bias(None));
        }
        let mut t = read_tensors(&st, &names)?;
        let mut take = |name: String, shape: Vec<usize>| -> Result<HostTensor> {
            let v = t.remove(&name).ok_or_else(|| Error::Tensor {
                file: st.clone(),
                tensor: name.clone(),
                msg: "missing".into(),
            })?;
            if v.shape != shape {
                return Err(Error::Tensor {
                    file: st.clone(),
                    tensor: name,
                    msg: format!("shape {:?}, but {} says {:?}", v.shape, js.display(), shape),
                });
            }
            Ok(v)
        };
        let fan_in = |l: usize| {
            if l == 0 {
                config.input_dim
            } else {
                config.hidden[l - 1]
            }
        };
        let mut body = Vec::new();
        for l in layers.clone() {
            let w = config.hidden[l];
            body.push((
                take(body_weight(l), vec![w, fan_in(l)])?,
                take(body_bias(l), vec![w])?,
            ));
        }
        let head = if head {
            let c = config.classes.len();
            let last = *config.hidden.last().unwrap_or(&config.input_dim);
            Some((
                take(head_weight(None), vec![c, last])?,
                take(head_bias(None), vec![c])?,
            ))
        } else {
            None
        };
        Ok(Self {
            config,
            file: st,
            layers,
            body,
            head,
        })
    }

    /// Bytes of the tensors held.
    pub fn bytes(&self) -> u64 {
        let n: usize = self
            .body
            .iter()
            .chain(self.head.iter())
            .map(|(w, b)| w.data.len() + b.data.len())
            .sum();
        (n * 4) as u64
    }
}

impl MlpCheckpoint {
    pub fn load(dir: &Path, task: &str) -> Result<Self> {
        let (_, js) = model_paths(dir, task);
        let config: MlpConfig = read_json(&js)?;
        let part = MlpPart::load(dir, task, 0..config.hidden.len(), true)?;
        let head = part.head.ok_or_else(|| Error::Checkpoint {
            file: part.file.clone(),
            msg: "no head".into(),
        })?;
        Ok(Self {
            config: part.config,
            file: part.file,
            body: part.body,
            head,
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let (st, js) = model_paths(dir, &self.config.task);
        let mut t = BTreeMap::new();
        for (l, (w, b)) in self.body.iter().enumerate() {
            t.insert(body_weight(l), w.clone());
            t.insert(body_bias(l), b.clone());
        }
        t.insert(head_weight(None), self.head.0.clone());
        t.insert(head_bias(None), self.head.1.clone());
        write_tensors(&st, &t)?;
        write_json(&js, &self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(task: &str, hidden: Vec<usize>) -> MlpCheckpoint {
        let input_dim = 4;
        let mut body = Vec::new();
        let mut fan_in = input_dim;
        for &w in &hidden {
            body.push((
                HostTensor::new(vec![w, fan_in], vec![0.5; w * fan_in]),
                HostTensor::new(vec![w], vec![0.1; w]),
            ));
            fan_in = w;
        }
        MlpCheckpoint {
            config: MlpConfig {
                format: MLP_FORMAT.into(),
                input_dim,
                hidden,
                task: task.into(),
                classes: vec![0, 1],
                seed: 0,
            },
            file: PathBuf::new(),
            body,
            head: (
                HostTensor::new(vec![2, fan_in], vec![1.0; 2 * fan_in]),
                HostTensor::new(vec![2], vec![0.0; 2]),
            ),
        }
    }

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let m = tiny("a", vec![3, 3]);
        m.save(dir.path()).unwrap();
        let r = MlpCheckpoint::load(dir.path(), "a").unwrap();
        assert_eq!(r.body, m.body);
        assert_eq!(r.head, m.head);
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        tiny("a", vec![3]).save(dir.path()).unwrap();
        let (st, _) = model_paths(dir.path(), "a");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 7]).unwrap();
        let e = MlpCheckpoint::load(dir.path(), "a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.safetensors"), "{e}");
    }

    #[test]
    fn shapes_come_from_the_header_of_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        tiny("a", vec![3, 5]).save(dir.path()).unwrap();
        let (st, _) = model_paths(dir.path(), "a");
        let shapes = tensor_shapes(&st).unwrap();
        assert_eq!(shapes["body.1.weight"], vec![5, 3]);
        assert_eq!(shapes["head.weight"], vec![2, 5]);
        // The header alone is intact, the data is not: still an error naming the file.
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 4]).unwrap();
        let e = tensor_shapes(&st).unwrap_err().to_string();
        assert!(e.contains("a.safetensors"), "{e}");
    }
}
