//! A job's work directory (`<output>.work/`), beside its output: what a distributed run shares
//! through the file system and what `--resume` needs. Holds the rendezvous file (coordinator
//! address, certificate fingerprint, job token; readable by the owner only), a `[[models]]`
//! job's preprocessed inputs, the teacher-feature cache per stage, one checkpoint per finished (stage, phase), and the manifest that lists
//! them. Every file is written atomically.

use crate::fsio::write_atomic_private;
use crate::metrics::LogRow;
use crate::plan::Plan;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct WorkDir {
    pub root: PathBuf,
}

/// How workers find and trust the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RendezvousFile {
    /// `host:port` the coordinator listens on.
    pub coordinator: String,
    /// SHA-256 of the coordinator's certificate.
    pub fingerprint: String,
    pub token: String,
}

/// One finished phase of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneEntry {
    pub stage: usize,
    pub phase: String,
    /// Which start of the job (1 = first, 2 = first resume, …) trained it.
    pub run: u32,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub job: String,
    pub seed: u64,
    pub plan: Plan,
    /// Starts of the job so far.
    pub runs: u32,
    /// Every stage's teacher features are cached.
    pub features: bool,
    pub done: Vec<DoneEntry>,
}

impl Manifest {
    pub fn is_done(&self, stage: usize, phase: &str) -> bool {
        self.done
            .iter()
            .any(|d| d.stage == stage && d.phase == phase)
    }
}

/// The mid-phase checkpoints of one (stage, phase), newest last (at most two are kept, so
/// that stages interrupted between two checkpoints still share one step to resume from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialRecord {
    /// The training loop's label: a checkpoint of another loop is not restored.
    pub label: String,
    pub steps: Vec<PartialStep>,
}

/// One mid-phase checkpoint: optimiser steps done, each run's Adam step count and log so far;
/// the tensors (parameters, Adam moments) are in `WorkDir::partial_tensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialStep {
    pub step: u64,
    pub adam_steps: Vec<i32>,
    pub logs: Vec<Vec<LogRow>>,
}

/// Log and timing of a finished phase, stored beside its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub stage: usize,
    pub phase: String,
    pub seconds: f64,
    pub log: Vec<LogRow>,
}

impl WorkDir {
    /// The work directory of the output directory `out`.
    pub fn of_output(out: &Path) -> Self {
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("job");
        Self {
            root: out.with_file_name(format!("{name}.work")),
        }
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn rendezvous(&self) -> PathBuf {
        self.root.join("rendezvous.json")
    }
    pub fn manifest(&self) -> PathBuf {
        self.root.join("manifest.json")
    }
    pub fn features(&self, stage: usize) -> PathBuf {
        self.root
            .join("features")
            .join(format!("stage{stage}.safetensors"))
    }
    /// A `[[models]]` job's preprocessed inputs, under the fingerprint `key` of what they
    /// were made from.
    pub fn inputs(&self, key: &str) -> PathBuf {
        self.root.join("inputs").join(format!("{key}.safetensors"))
    }
    /// (tensors, record) of a stage's finished phase.
    pub fn checkpoint(&self, stage: usize, phase: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join("checkpoints");
        (
            dir.join(format!("stage{stage}-{phase}.safetensors")),
            dir.join(format!("stage{stage}-{phase}.json")),
        )
    }

    /// The record of the mid-phase checkpoints of (stage, phase).
    pub fn partial(&self, stage: usize, phase: &str) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("stage{stage}-{phase}.partial.json"))
    }

    /// The tensors of the mid-phase checkpoint of (stage, phase) after `step` steps.
    pub fn partial_tensors(&self, stage: usize, phase: &str, step: u64) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("stage{stage}-{phase}.step{step}.safetensors"))
    }

    /// The mid-phase checkpoints of (stage, phase), if any.
    pub fn read_partial(&self, stage: usize, phase: &str) -> Result<Option<PartialRecord>> {
        let p = self.partial(stage, phase);
        if !p.exists() {
            return Ok(None);
        }
        crate::checkpoint::read_json(&p).map(Some)
    }

    pub fn read_manifest(&self) -> Result<Option<Manifest>> {
        let p = self.manifest();
        if !p.exists() {
            return Ok(None);
        }
        crate::checkpoint::read_json(&p).map(Some)
    }

    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        crate::checkpoint::write_json(&self.manifest(), m)
    }

    /// Write the rendezvous file, readable by its owner only (it holds the job token).
    pub fn write_rendezvous(&self, r: &RendezvousFile) -> Result<()> {
        let path = self.rendezvous();
        let bytes =
            serde_json::to_vec_pretty(r).map_err(|e| Error::Compute(format!("rendezvous: {e}")))?;
        // The file holds the job token: owner-only from its creation on, and gone with the job
        // (`cluster::run` removes it; a signal too).
        write_atomic_private(&path, &bytes)?;
        crate::fsio::remove_on_signal(&path);
        Ok(())
    }

    pub fn read_rendezvous(path: &Path) -> Result<RendezvousFile> {
        crate::checkpoint::read_json(path)
    }
}
