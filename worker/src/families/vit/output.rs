//! What the coordinator needs of the ViT family without its weights: the originals checked
//! from their configs and safetensors headers, and the merged model written as the stages send
//! it, one `ViTForImageClassification` whose classifier stacks every task's head.

use crate::core::checks::{block_shapes, check_classifier, check_rank, check_shapes};
use crate::core::merged_output::{HfClassifierWriter, HfLayout};
use crate::families::vit::model::{config_json, EMBEDDING_NAMES, VIT_BLOCK};
use crate::family::MergedWriter;
use fsmerge_common::config::JobConfig;
use fsmerge_common::hf::{VitConfig, WeightFiles};
use fsmerge_common::{Error, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// Every task's original has a classifier with one output per class of its task and reads
/// images of the data's size and channels; `merge.rank` fits the width.
pub fn check(job: &JobConfig, models_dir: &Path) -> Result<()> {
    let side = job.data.image_side();
    let mut width = usize::MAX;
    for (task, dir) in job.tasks.iter().zip(job.original_dirs(models_dir)) {
        let cfg = VitConfig::load(&dir)?;
        let files = WeightFiles::open(&dir)?;
        check_shapes(
            &dir,
            &files,
            "vit.",
            &expected_shapes(&cfg),
            ("encoder.layer.", cfg.num_hidden_layers),
        )?;
        let outputs = files
            .shape("classifier.weight")?
            .and_then(|s| s.first().copied());
        check_classifier(&dir, task, outputs)?;
        let channels = job.data.channels();
        if cfg.image_size != side || cfg.num_channels != channels {
            return Err(Error::Checkpoint {
                file: dir.join("config.json"),
                msg: format!(
                    "image_size {} with {} channels; the data has {side}×{side} images of {channels} channel(s)",
                    cfg.image_size, cfg.num_channels
                ),
            });
        }
        width = width.min(cfg.hidden_size);
    }
    check_rank(job.merge.rank, width)
}

/// The encoder tensors of a ViT of `cfg` (HF names without the `vit.` prefix) and their
/// shapes.
fn expected_shapes(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
    let tokens = (cfg.image_size / p).pow(2) + 1;
    let [w, b, cls, pos] = EMBEDDING_NAMES.map(String::from);
    let mut out = vec![
        (w, vec![d, c, p, p]),
        (b, vec![d]),
        (cls, vec![1, 1, d]),
        (pos, vec![1, tokens, d]),
    ];
    for l in 0..cfg.num_hidden_layers {
        out.extend(block_shapes(l, &VIT_BLOCK, d, cfg.intermediate_size));
    }
    out.push(("layernorm.weight".into(), vec![d]));
    out.push(("layernorm.bias".into(), vec![d]));
    out
}

/// The encoder tensors of a ViT of `cfg` (merged names, no `vit.` prefix).
fn encoder_names(cfg: &VitConfig) -> BTreeSet<String> {
    expected_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// `merged/`: config.json + the weights (one classifier of every task's classes) and
/// `merged/fsmerge.json` (each task's slice of the logits).
pub fn writer(job: &JobConfig, models_dir: &Path, out: &Path) -> Result<Box<dyn MergedWriter>> {
    let cfg = VitConfig::load(&job.original_dir(models_dir, 0))?;
    let layout = HfLayout {
        prefix: "vit.",
        head: ("classifier", true),
        encoder: encoder_names(&cfg),
        config: Box::new(move |labels| config_json(&cfg, labels, true)),
        class_name: |c| format!("class {c}"),
        input: "square grey images, normalised as fsmerge's data loader does",
        processor_files: &["preprocessor_config.json"],
    };
    Ok(Box::new(HfClassifierWriter::new(
        out, job, models_dir, layout,
    )?))
}
