//! A job: its validated config and where its files go; the merge job (`merge`, one for every
//! family), the originals it trains when missing, its preparation and its result rows.

pub mod memory;
pub mod merge;
pub mod originals;
pub mod prepare;
pub mod rows;

use crate::JobArgs;
use anyhow::Result;
use fsmerge_common::config::JobConfig;
use std::path::{Path, PathBuf};

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

    /// The config as workers get it: the data and model paths made absolute (workers may run
    /// elsewhere, with another working directory, on a shared file system).
    pub fn absolute_config(&self) -> Result<JobConfig> {
        let mut cfg = self.cfg.clone();
        let here = std::env::current_dir()?;
        for m in &mut cfg.models {
            m.path = here.join(&m.path);
            for src in std::iter::once(&mut m.merge_data).chain(m.eval_data.as_mut()) {
                if !Path::new(&src.path).is_absolute() {
                    src.path = here.join(&src.path).display().to_string();
                }
            }
        }
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

    /// Whether each task has labeled evaluation data.
    pub fn labeled(&self) -> Vec<bool> {
        (0..self.cfg.tasks.len())
            .map(|t| self.cfg.labeled(t))
            .collect()
    }
}
