//! Hugging Face model folders: `config.json` and the weights, from one `model.safetensors` or
//! shards listed in `model.safetensors.index.json`, read lazily (each shard memory-mapped, only
//! the requested tensors copied). Missing files, fields or tensors are errors naming them.

use crate::checkpoint::{parse_json, read_tensors, regular_file, HostTensor};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fields of a ViT `config.json` that the forward pass needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VitConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn yes() -> bool {
    true
}

/// What every supported encoder needs: the expected `model_type`, exact GELU, and a hidden
/// size that splits evenly over the heads.
fn check_encoder(
    expected: &str,
    model_type: &str,
    act: &str,
    [hidden, heads, layers, intermediate]: [usize; 4],
) -> std::result::Result<(), String> {
    if model_type != expected {
        return Err(format!(
            "model_type `{model_type}` is not supported here (expected `{expected}`)"
        ));
    }
    if act != "gelu" {
        return Err(format!(
            "hidden_act `{act}` is not supported (expected `gelu`)"
        ));
    }
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ));
    }
    check_sizes(&[
        (hidden, "hidden_size", 1 << 16),
        (layers, "num_hidden_layers", 1024),
        (intermediate, "intermediate_size", 1 << 18),
    ])
}

/// Every `(value, field, max)` is between 1 and its max: sizes from a config file are bounded
/// before any arithmetic or allocation uses them.
fn check_sizes(sizes: &[(usize, &str, usize)]) -> std::result::Result<(), String> {
    for &(v, field, max) in sizes {
        if v == 0 || v > max {
            return Err(format!("{field} {v} is not between 1 and {max}"));
        }
    }
    Ok(())
}

impl VitConfig {
    /// The config of a small ViT for side×side single-channel images (`fsmerge train`).
    pub fn for_images(shape: &crate::config::VitShape, side: usize) -> Self {
        Self {
            model_type: "vit".into(),
            hidden_size: shape.width,
            num_hidden_layers: shape.layers,
            num_attention_heads: shape.heads,
            intermediate_size: shape.mlp_dim,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            image_size: side,
            patch_size: shape.patch_size,
            num_channels: 1,
            qkv_bias: true,
            architectures: vec!["ViTForImageClassification".into()],
        }
    }

    /// Read and check `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::parse(&text, &file)
    }

    /// Parse and check a `config.json`'s content `text` (`file` names it in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let cfg: VitConfig = parse_json(text, file)?;
        let err = |msg: String| Error::Checkpoint {
            file: file.to_path_buf(),
            msg,
        };
        check_encoder(
            "vit",
            &cfg.model_type,
            &cfg.hidden_act,
            [
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_hidden_layers,
                cfg.intermediate_size,
            ],
        )
        .map_err(err)?;
        check_sizes(&[
            (cfg.image_size, "image_size", 1 << 14),
            (cfg.num_channels, "num_channels", 64),
        ])
        .map_err(err)?;
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(err(format!(
                "image_size {} is not a multiple of patch_size {}",
                cfg.image_size, cfg.patch_size
            )));
        }
        Ok(cfg)
    }
}

/// Where each tensor of a model folder lives.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    pub dir: PathBuf,
    /// Tensor name → file.
    pub map: BTreeMap<String, PathBuf>,
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl WeightFiles {
    /// Index `dir`: `model.safetensors.index.json` if present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            return Self::from_index(dir, &index, &text);
        }
        let single = dir.join("model.safetensors");
        let map = crate::checkpoint::tensor_names(&single)?
            .into_iter()
            .map(|t| (t, single.clone()))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            map,
        })
    }

    /// The weights of `dir` as its index file `index` (content `text`) lists them: every shard
    /// a regular file inside `dir`.
    pub fn from_index(dir: &Path, index: &Path, text: &str) -> Result<Self> {
        let idx: Index = parse_json(text, index)?;
        let mut map = BTreeMap::new();
        for (tensor, file) in idx.weight_map {
            map.insert(tensor, shard_path(dir, index, &file)?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            map,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The shape of tensor `name` from its file's safetensors header (no data is read; the
    /// file is checked whole); None when the model has no such tensor.
    pub fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(file) = self.map.get(name) else {
            return Ok(None);
        };
        Ok(crate::checkpoint::tensor_shapes(file)?.remove(name))
    }

    /// Every tensor's shape, from the headers (each file read once, checked whole).
    pub fn shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        let files: std::collections::BTreeSet<&PathBuf> = self.map.values().collect();
        let mut out = BTreeMap::new();
        for file in files {
            for (name, shape) in crate::checkpoint::tensor_shapes(file)? {
                if self.map.get(&name) == Some(file) {
                    out.insert(name, shape);
                }
            }
        }
        Ok(out)
    }

    /// Read the named tensors, each from its own file.
    pub fn read(&self, names: &[String]) -> Result<BTreeMap<String, HostTensor>> {
        let mut by_file: BTreeMap<&PathBuf, Vec<String>> = BTreeMap::new();
        for n in names {
            let file = self.map.get(n).ok_or_else(|| Error::Tensor {
                file: self.dir.clone(),
                tensor: n.clone(),
                msg: "missing from the model's weights".into(),
            })?;
            by_file.entry(file).or_default().push(n.clone());
        }
        let mut out = BTreeMap::new();
        for (file, names) in by_file {
            out.extend(read_tensors(file, &names)?);
        }
        Ok(out)
    }
}

/// A shard named by `index`: a plain file name inside the model folder `dir` (no `..`, no
/// separator, not absolute), naming a regular file (not a FIFO or a device).
fn shard_path(dir: &Path, index: &Path, file: &str) -> Result<PathBuf> {
    let plain = !file.is_empty()
        && !file.contains(['/', '\\'])
        && file != "."
        && file != ".."
        && Path::new(file).components().count() == 1;
    if !plain {
        return Err(Error::Checkpoint {
            file: index.to_path_buf(),
            msg: format!("shard {file:?} is not a file name inside the model folder"),
        });
    }
    let path = dir.join(file);
    regular_file(&path)?;
    Ok(path)
}

/// The fields of a BERT `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
}

fn two() -> usize {
    2
}

impl BertConfig {
    /// The config of a small BERT `fsmerge train` builds for text of `max_tokens` tokens over a
    /// vocabulary of `vocab_size` pieces.
    pub fn for_text(
        shape: &crate::config::BertShape,
        vocab_size: usize,
        max_tokens: usize,
    ) -> Self {
        Self {
            model_type: "bert".into(),
            hidden_size: shape.width,
            num_hidden_layers: shape.layers,
            num_attention_heads: shape.heads,
            intermediate_size: shape.mlp_dim,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            vocab_size,
            max_position_embeddings: max_tokens,
            type_vocab_size: 2,
        }
    }

    /// Read and check `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::parse(&text, &file)
    }

    /// Parse and check a `config.json`'s content `text` (`file` names it in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let cfg: BertConfig = parse_json(text, file)?;
        let err = |msg: String| Error::Checkpoint {
            file: file.to_path_buf(),
            msg,
        };
        check_encoder(
            "bert",
            &cfg.model_type,
            &cfg.hidden_act,
            [
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_hidden_layers,
                cfg.intermediate_size,
            ],
        )
        .map_err(err)?;
        check_sizes(&[
            (cfg.vocab_size, "vocab_size", 1 << 22),
            (
                cfg.max_position_embeddings,
                "max_position_embeddings",
                1 << 20,
            ),
            (cfg.type_vocab_size, "type_vocab_size", 1 << 10),
        ])
        .map_err(err)?;
        Ok(cfg)
    }
}
