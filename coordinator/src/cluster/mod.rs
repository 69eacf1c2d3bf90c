//! The coordinator's side of FS-Merge training: prepare the work directory, listen on QUIC,
//! publish the rendezvous file, start embedded workers if asked, and run the job's `Session`
//! with its workers until every stage has sent its folded tensors.
//!
//! The embedded default (`fsmerge merge`) runs the same code with its workers as threads of
//! this process, connected over loopback QUIC.

pub mod resume;
pub mod session;

use crate::cluster::resume::open_work;
use crate::cluster::session::{Outcome, Session};
use crate::job::Job;
use anyhow::Result;
use fsmerge_common::plan::Plan;
use fsmerge_common::transport::{self, Identity, Timeouts};
use fsmerge_common::workdir::RendezvousFile;
use fsmerge_worker::dist::runtime::WorkerOptions;
use fsmerge_worker::family::MergedWriter;
use std::net::SocketAddr;
use std::time::Duration;

/// Where the workers come from.
#[derive(Debug, Clone)]
pub enum Launch {
    /// Worker threads in this process (`fsmerge merge`).
    Embedded,
    /// Worker processes started separately (`fsmerge worker`), listening on `listen`.
    External { listen: SocketAddr },
}

/// Where `fsmerge coordinator` listens when `--listen` is not given: on every interface, at the
/// port of the coordinator address resolved from the config, torchrun or Slurm (logged with its
/// source), else at a free port.
pub fn default_listen(cfg: &fsmerge_common::config::JobConfig) -> Result<SocketAddr> {
    use fsmerge_common::discovery::{resolve, Given};
    let config = Given {
        coordinator: cfg.cluster.coordinator.clone(),
        ..Given::default()
    };
    let r = resolve(&Given::default(), &config, &|k| std::env::var(k).ok())?;
    let port = match &r.coordinator {
        Some(c) => {
            tracing::info!("coordinator address {} (from {:?})", c.value, c.source);
            c.value
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .unwrap_or(fsmerge_common::discovery::DEFAULT_PORT)
        }
        None => 0,
    };
    Ok(SocketAddr::from(([0, 0, 0, 0], port)))
}

/// Token of the job: `$FSMERGE_TOKEN` (a launcher that starts workers itself can share it that
/// way), else a fresh random one.
fn job_token() -> String {
    std::env::var("FSMERGE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(transport::random_token)
}

/// Run FS-Merge training on the workers of `plan`.
/// The stages' folded tensors go to `model` as they arrive.
pub fn run(
    job: &Job,
    plan: &Plan,
    launch: &Launch,
    resume: bool,
    model: &mut dyn MergedWriter,
) -> Result<Outcome> {
    let cluster = &job.cfg.cluster;
    let world = plan.stages.len() * plan.replicas;
    let (work, mut manifest) = open_work(job, plan, resume)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let id = Identity::generate()?;
    let token = job_token();
    let timeouts = Timeouts {
        idle: Duration::from_secs_f64(cluster.peer_timeout_secs),
        keep_alive: Duration::from_secs_f64(cluster.heartbeat_secs),
    };
    let bind = match launch {
        Launch::Embedded => "127.0.0.1:0".parse()?,
        Launch::External { listen } => *listen,
    };
    let endpoint = rt.block_on(async { transport::server(bind, &id, timeouts) })?;
    let local = endpoint.local_addr()?;
    let advertised = if local.ip().is_unspecified() {
        format!(
            "{}:{}",
            fsmerge_common::discovery::this_host(),
            local.port()
        )
    } else {
        local.to_string()
    };
    work.write_rendezvous(&RendezvousFile {
        coordinator: advertised.clone(),
        fingerprint: id.fingerprint.clone(),
        token: token.clone(),
    })?;
    tracing::info!(
        "coordinator listening on {advertised} (certificate {}); waiting for {world} worker(s)",
        &id.fingerprint[..16]
    );
    if let Launch::External { .. } = launch {
        tracing::info!(
            "start the workers with: fsmerge worker --rendezvous {}",
            work.rendezvous().display()
        );
    }
    let mut threads = Vec::new();
    if let Launch::Embedded = launch {
        for r in 0..world {
            let opts = WorkerOptions {
                coordinator: advertised.clone(),
                token: token.clone(),
                fingerprint: id.fingerprint.clone(),
                rank: Some(r as u32),
                world: Some(world as u32),
                local_rank: r,
                embedded: true,
                timeouts: worker_control_timeouts(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("worker-{r}"))
                    .spawn(move || {
                        if let Err(e) = fsmerge_worker::dist::runtime::run(&opts) {
                            tracing::error!("embedded worker {r}: {e}");
                        }
                    })?,
            );
        }
    }
    let session = Session {
        job,
        plan,
        token: &token,
        world,
        work: &work,
        manifest: &mut manifest,
        model,
    };
    let result = rt.block_on(session.serve(&endpoint));
    endpoint.close(0u32.into(), b"job over");
    let _ = std::fs::remove_file(work.rendezvous());
    fsmerge_common::fsio::forget_on_signal(&work.rendezvous());
    if result.is_ok() {
        for (r, t) in threads.into_iter().enumerate() {
            if t.join().is_err() {
                tracing::error!("embedded worker {r} panicked after the job completed");
            }
        }
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Timeouts of a worker's control connection: long, so the coordinator's (from the config)
/// are the ones that apply (QUIC uses the smaller idle timeout of the two sides).
pub fn worker_control_timeouts() -> Timeouts {
    Timeouts {
        idle: Duration::from_secs(600),
        keep_alive: Duration::from_secs(1),
    }
}
