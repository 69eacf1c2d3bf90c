//! Checks of the originals against the job, made before any work: a classifier with one output
//! per class of its task, a width that `merge.rank` fits, and weights whose shapes are the ones
//! their `config.json` implies.

use crate::core::encoder_block::{Layout, Part};
use fsmerge_common::config::TaskConfig;
use fsmerge_common::hf::WeightFiles;
use fsmerge_common::{Error, Result};
use std::path::Path;

/// The tensors of encoder block `l` (HF names from `layout`) of width `d` and MLP width `h`,
/// with their shapes.
pub fn block_shapes(l: usize, layout: &Layout, d: usize, h: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for &(name, part) in layout {
        let (w, b) = match part {
            Part::Q | Part::K | Part::V | Part::Out => (vec![d, d], vec![d]),
            Part::Fc1 => (vec![h, d], vec![h]),
            Part::Fc2 => (vec![d, h], vec![d]),
            Part::LnAttn | Part::LnMlp => (vec![d], vec![d]),
        };
        out.push((format!("encoder.layer.{l}.{name}.weight"), w));
        out.push((format!("encoder.layer.{l}.{name}.bias"), b));
    }
    out
}

/// The encoder's tensors in the HF folder `dir` have the shapes its `config.json` implies
/// (`expected`, names with or without `prefix`), from the safetensors headers alone, and no
/// block (`{blocks}{l}.…`: `encoder.layer.`, `model.layers.`) lies beyond `layers`: a
/// checkpoint whose config disagrees with its weights is an
/// error naming the tensor, before any tensor op.
pub fn check_shapes(
    dir: &Path,
    files: &WeightFiles,
    prefix: &str,
    expected: &[(String, Vec<usize>)],
    (blocks, layers): (&str, usize),
) -> Result<()> {
    let shapes = files.shapes()?;
    let pre = match expected.first() {
        Some((n, _)) if shapes.contains_key(&format!("{prefix}{n}")) => prefix,
        _ => "",
    };
    for (name, shape) in expected {
        let full = format!("{pre}{name}");
        let msg = match shapes.get(&full) {
            None => "missing from the model's weights".to_string(),
            Some(s) if s != shape => format!("shape {s:?}, but config.json implies {shape:?}"),
            Some(_) => continue,
        };
        return Err(Error::Tensor {
            file: dir.to_path_buf(),
            tensor: full,
            msg,
        });
    }
    let beyond = format!("{pre}{blocks}{layers}.");
    if let Some(name) = shapes.keys().find(|k| k.starts_with(&beyond)) {
        return Err(Error::Tensor {
            file: dir.to_path_buf(),
            tensor: name.clone(),
            msg: format!("a block beyond config.json's num_hidden_layers {layers}"),
        });
    }
    Ok(())
}

/// Check that `merge.rank` fits the models' (smallest) width.
pub fn check_rank(rank: usize, width: usize) -> Result<()> {
    if rank > width {
        return Err(Error::field(
            "merge.rank",
            format!("{rank} is larger than the models' width {width}"),
        ));
    }
    Ok(())
}

/// Check that task `task`'s original in `dir` has a classifier with one output per class.
pub fn check_classifier(dir: &Path, task: &TaskConfig, outputs: Option<usize>) -> Result<()> {
    if outputs != Some(task.classes.len()) {
        return Err(Error::Tensor {
            file: dir.to_path_buf(),
            tensor: "classifier.weight".into(),
            msg: format!(
                "task `{}` has {} classes but the model's classifier has {:?} outputs",
                task.name,
                task.classes.len(),
                outputs
            ),
        });
    }
    Ok(())
}
