//! A job: its validated config and where its files go; and the merge job's steps (prepare →
//! plan → originals → baselines → FS-Merge → assemble → report), today one module per family
//! (`mlp`, `vit`, `bert`) over shared checks, rows and preparation.

pub mod bert;
pub mod checks;
pub mod mlp;
pub mod originals;
pub mod prepare;
pub mod rows;
pub mod vit;

use crate::JobArgs;
use anyhow::Result;
use fsmerge_common::config::JobConfig;
use std::path::PathBuf;

pub struct Job {
    pub cfg: JobConfig,
    /// Output directory of the merge (metrics, merged model, report).
    pub out: PathBuf,
    /// Directory of the original models.
    pub models_dir: PathBuf,
}

impl Job {
    pub fn open(args: &JobArgs) -> Result<Self> {
        let mut overrides = args.set.clone();
        if let Some(seed) = args.seed {
            overrides.push(format!("seed={seed}"));
        }
        if let Some(threads) = args.threads {
            overrides.push(format!("threads={threads}"));
        }
        let cfg = JobConfig::load_with(&args.config, &overrides)?;
        let out = args.out.clone().unwrap_or_else(|| match args.seed {
            Some(s) => PathBuf::from("runs").join(format!("{}-seed{s}", cfg.name)),
            None => PathBuf::from("runs").join(&cfg.name),
        });
        let models_dir = cfg
            .train
            .models_dir
            .clone()
            .unwrap_or_else(|| out.join("originals"));
        fsmerge_worker::set_threads(cfg.threads);
        tracing::info!(
            "job `{}`: seed {}, {} threads, output {}, originals {}",
            cfg.name,
            cfg.seed,
            tch::get_num_threads(),
            out.display(),
            models_dir.display()
        );
        Ok(Self {
            cfg,
            out,
            models_dir,
        })
    }

    /// The config as workers get it: the data path made absolute (workers may run elsewhere,
    /// with another working directory, on a shared file system).
    pub fn absolute_config(&self) -> Result<JobConfig> {
        let mut cfg = self.cfg.clone();
        let path = cfg
            .data
            .path
            .clone()
            .unwrap_or_else(|| fsmerge_worker::data::default_path(cfg.data.dataset));
        cfg.data.path = Some(if path.is_absolute() {
            path
        } else {
            std::env::current_dir()?.join(path)
        });
        Ok(cfg)
    }

    pub fn task_names(&self) -> Vec<String> {
        self.cfg.tasks.iter().map(|t| t.name.clone()).collect()
    }
}

/// Run the merge job of `job`'s model family: FS-Merge on the workers `launch` gives (threads
/// of this process for `fsmerge merge`, processes for `fsmerge coordinator`).
pub fn run(job: &Job, launch: &crate::cluster::Launch, resume: bool) -> Result<()> {
    use fsmerge_common::config::Arch;
    match job.cfg.model.arch {
        Arch::Mlp => mlp::run(job, launch, resume),
        Arch::Vit => vit::run(job, launch, resume),
        Arch::Bert => bert::run(job, launch, resume),
    }
}
