//! `fsmerge worker`: find the coordinator and the job's credentials, then run a worker until the
//! job ends. Address, token and certificate fingerprint come from the flags, then
//! `$FSMERGE_TOKEN` / `$FSMERGE_FINGERPRINT`, then the rendezvous file the coordinator writes
//! (`--rendezvous` or `$FSMERGE_RENDEZVOUS`), which a worker waits for when started first.
//! Rank and world come from the flags, torchrun or Slurm (logged with their source); without
//! them the coordinator assigns a rank.

use anyhow::{bail, Context, Result};
use fsmerge_common::discovery::{resolve, Given};
use fsmerge_common::workdir::{RendezvousFile, WorkDir};
use fsmerge_worker::dist::runtime;
use fsmerge_worker::dist::runtime::WorkerOptions;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Default)]
pub struct WorkerArgs {
    /// `host:port` of the coordinator [default: the rendezvous file's, then torchrun's
    /// MASTER_ADDR:MASTER_PORT, then the first Slurm host].
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The coordinator's rendezvous file (`<out>.work/rendezvous.json`) [env: FSMERGE_RENDEZVOUS].
    #[arg(long)]
    pub rendezvous: Option<PathBuf>,
    /// The job token [env: FSMERGE_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the coordinator's certificate [env: FSMERGE_FINGERPRINT].
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// This worker's rank [default: RANK or SLURM_PROCID, else assigned by the coordinator].
    #[arg(long)]
    pub rank: Option<usize>,
    /// Number of workers [default: WORLD_SIZE or SLURM_NTASKS].
    #[arg(long)]
    pub world: Option<usize>,
    /// Seconds to wait for the rendezvous file to appear.
    #[arg(long, default_value_t = 300.0)]
    pub wait: f64,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Read the rendezvous file, waiting up to `wait` seconds for the coordinator to write it.
pub fn read_rendezvous(path: &std::path::Path, wait: f64) -> Result<RendezvousFile> {
    if !(0.0..=7.0 * 86400.0).contains(&wait) {
        bail!("--wait must be between 0 and 604800 seconds, got {wait}");
    }
    let until = Instant::now() + Duration::from_secs_f64(wait);
    loop {
        if path.exists() {
            return WorkDir::read_rendezvous(path)
                .with_context(|| format!("reading the rendezvous file {}", path.display()));
        }
        if Instant::now() > until {
            bail!(
                "the rendezvous file {} did not appear within {wait} s: is the coordinator running with the same output directory?",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    let rdv_path = args
        .rendezvous
        .clone()
        .or_else(|| env("FSMERGE_RENDEZVOUS").map(PathBuf::from));
    let token = args.token.clone().or_else(|| env("FSMERGE_TOKEN"));
    let fingerprint = args
        .fingerprint
        .clone()
        .or_else(|| env("FSMERGE_FINGERPRINT"));
    let file = match (&rdv_path, &token, &fingerprint) {
        (Some(p), None, _) | (Some(p), _, None) => Some(read_rendezvous(p, args.wait)?),
        (Some(p), _, _) if args.coordinator.is_none() => Some(read_rendezvous(p, args.wait)?),
        _ => None,
    };
    let cli = Given {
        rank: args.rank,
        world: args.world,
        coordinator: args
            .coordinator
            .clone()
            .or_else(|| file.as_ref().map(|f| f.coordinator.clone())),
    };
    let r = resolve(&cli, &Given::default(), &|k| std::env::var(k).ok())?;
    tracing::info!("worker: {}", r.describe());
    let coordinator = r.coordinator.as_ref().map(|c| c.value.clone()).context(
        "no coordinator address: pass --coordinator HOST:PORT or --rendezvous FILE, or launch under torchrun or Slurm",
    )?;
    let token = token
        .or_else(|| file.as_ref().map(|f| f.token.clone()))
        .context("no job token: pass --token, set FSMERGE_TOKEN, or pass --rendezvous FILE")?;
    let fingerprint = fingerprint
        .or_else(|| file.as_ref().map(|f| f.fingerprint.clone()))
        .context(
            "no certificate fingerprint for the coordinator: pass --fingerprint, set FSMERGE_FINGERPRINT, or pass --rendezvous FILE",
        )?;
    let opts = WorkerOptions {
        coordinator,
        token,
        fingerprint,
        rank: r.rank.as_ref().map(|x| x.value as u32),
        world: r.world.as_ref().map(|x| x.value as u32),
        local_rank: r.local_rank.as_ref().map_or(0, |x| x.value),
        embedded: false,
        timeouts: crate::cluster::worker_control_timeouts(),
    };
    runtime::run(&opts)?;
    Ok(())
}
