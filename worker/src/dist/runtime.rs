//! A worker: registers with the coordinator over QUIC, receives its stage, links to the peers
//! it exchanges data with, computes or restores the stage's teacher features, trains its phases
//! (checkpointing each), folds its layers and sends them back.
//!
//! Two tokio tasks run beside the compute thread: one sends heartbeats (with the current phase
//! and step), one reads the coordinator's messages (abort, shutdown, relayed NCCL ids). A worker
//! that loses the coordinator, or is told to abort, exits at once with an error.

use crate::core::tensor::{assign, to_host, to_tch};
use crate::dist::collective::nccl::{self, NcclGroup};
use crate::dist::collective::quic::{connect_mesh, QuicGroup};
use crate::dist::collective::watchdog::Watchdog;
use crate::dist::collective::{Collective, Solo, TimedRecv};
use crate::dist::distill::{distill, kd_tensors};
use crate::dist::evaluate::{evaluate, first_or_average, EvalPart, EvalRows, SplitLogits};
use crate::dist::pipeline::Collectives;
use crate::dist::pipeline::FeatureSink;
use crate::dist::stage::{materialized, StageData, WorkerStage};
use crate::dist::{feature_cache, pipeline};
use crate::family::{family, StageSpec};
use crate::train::progress::{LogRow, Progress};
use crate::train::resume;
use crate::train::settings::TrainSettings;
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::checkpoint::{read_json, read_tensors, write_json, write_tensors};
use fsmerge_common::config::{Backend, Baseline, JobConfig, Mode};
use fsmerge_common::metrics::{peak_rss_mib, Evaluation, WorkerStats};
use fsmerge_common::plan::{FeaturesAt, Plan};
use fsmerge_common::transport::{self, Identity, Timeouts};
use fsmerge_common::wire::{self, Assignment, Hello, Message, NamedTensor};
use fsmerge_common::workdir::{PhaseRecord, WorkDir};
use fsmerge_common::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// How to reach and trust the coordinator, and what this worker knows about itself.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `host:port` of the coordinator.
    pub coordinator: String,
    pub token: String,
    pub fingerprint: String,
    /// Rank and world size from the CLI, torchrun or Slurm (None: the coordinator assigns).
    pub rank: Option<u32>,
    pub world: Option<u32>,
    /// Local rank (selects the GPU of an NCCL worker).
    pub local_rank: usize,
    /// Runs inside the coordinator's process (`fsmerge merge`): failures are reported, the
    /// process is not exited.
    pub embedded: bool,
    /// Liveness of the control connection.
    pub timeouts: Timeouts,
}

/// Where the worker is, for heartbeats and failure messages.
#[derive(Debug, Clone, Default)]
struct Beat {
    phase: String,
    step: u64,
    total: u64,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct BeatProgress(Shared<Beat>);

impl Progress for BeatProgress {
    fn start(&self, phase: &str, total: u64) {
        *lock(&self.0) = Beat {
            phase: phase.to_string(),
            step: 0,
            total,
        };
        tracing::debug!("{phase}: {total} steps");
    }
    fn step(&self, _: &str, step: u64, _: f64, _: f64) {
        lock(&self.0).step = step;
    }
    fn finish(&self, phase: &str) {
        tracing::debug!("{phase}: done");
    }
}

/// The control connection's sending half, shared by the compute thread and the heartbeat task.
#[derive(Clone)]
struct Control {
    tx: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    rt: tokio::runtime::Handle,
}

impl Control {
    fn send(&self, msg: &Message) -> Result<()> {
        let tx = self.tx.clone();
        self.rt
            .block_on(async move { wire::send(&mut *tx.lock().await, msg).await })
    }
}

/// Run one worker to the end of the job.
pub fn run(opts: &WorkerOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Compute(format!("tokio runtime: {e}")))?;
    let id = Identity::generate()?;
    // Embedded workers talk over loopback only; a worker process serves its peers on every
    // interface (which one reaches them is the cluster's business).
    let bind: std::net::SocketAddr = if opts.embedded {
        (std::net::Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = rt.block_on(async { transport::server(bind, &id, opts.timeouts) })?;
    let host = fsmerge_common::discovery::this_host();
    let (conn, tx, rx, assignment) = register(&rt, opts, &id, &endpoint, &host)?;
    let control = Control {
        tx: Arc::new(tokio::sync::Mutex::new(tx)),
        rt: rt.handle().clone(),
    };
    let beat: Shared<Beat> = Arc::new(Mutex::new(Beat {
        phase: "setup".into(),
        ..Beat::default()
    }));
    let (nccl_tx, nccl_rx) = std::sync::mpsc::channel::<(u32, Vec<u8>)>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let rank = assignment.rank;
    let job: JobConfig = serde_json::from_str(&assignment.job_json)
        .map_err(|e| Error::Protocol(format!("job config from the coordinator: {e}")))?;
    let heartbeat = Duration::from_secs_f64(job.cluster.heartbeat_secs);
    rt.spawn(heartbeats(control.clone(), beat.clone(), heartbeat));
    rt.spawn(listen(rx, rank, opts.embedded, nccl_tx, done_tx));
    let ctx = Ctx {
        a: &assignment,
        job: &job,
        control: &control,
        beat: &beat,
        rt: rt.handle(),
        endpoint: &endpoint,
        opts,
        host,
    };
    // A panic in the compute (a libtorch error surfaces as one) is this worker's failure, with
    // its message, reported like any other error: not a lost connection.
    let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.work(&nccl_rx)))
        .unwrap_or_else(|payload| Err(Error::Compute(format!("panic: {}", panic_text(&payload)))));
    match work {
        Ok(_links) => {
            // `_links` (the collectives) stay open until the coordinator's shutdown: closing a
            // QUIC connection discards data still in flight to a peer that has not read it yet.
            // Wait for the coordinator to confirm the job is complete (it may still need us
            // alive, e.g. as the owner of an NCCL id).
            let _ = done_rx.recv_timeout(Duration::from_secs(120));
            endpoint.close(0u32.into(), b"done");
            // Let the close reach the peers before the runtime goes away.
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            });
            Ok(())
        }
        Err(e) => {
            // The phase and, inside a training phase, the step: where a stall happened.
            let phase = match lock(&beat).clone() {
                b if b.total > 0 => format!("{} step {}/{}", b.phase, b.step, b.total),
                b => b.phase,
            };
            tracing::error!("worker rank {rank} failed in phase {phase}: {e}");
            let _ = control.send(&Message::Failed {
                phase,
                msg: e.to_string(),
            });
            // Make sure the report leaves before the process does.
            rt.block_on(async {
                let _ = control.tx.lock().await.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            });
            Err(e)
        }
    }
}

/// The message of a panic's payload (a `&str` or a `String`; anything else is named as such).
fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Connect to the coordinator, say hello (token, rank, data-plane address and certificate)
/// and receive this worker's assignment; a refusal is an error naming the coordinator.
fn register(
    rt: &tokio::runtime::Runtime,
    opts: &WorkerOptions,
    id: &Identity,
    endpoint: &quinn::Endpoint,
    host: &str,
) -> Result<(
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    Assignment,
)> {
    let coordinator = |msg: String| Error::Peer {
        peer: format!("coordinator {}", opts.coordinator),
        msg,
    };
    let coord = transport::resolve_addr(&opts.coordinator)?;
    let conn = rt
        .block_on(transport::connect(
            endpoint,
            coord,
            &opts.fingerprint,
            opts.timeouts,
        ))
        .map_err(|e| coordinator(e.to_string()))?;
    let local_ip = conn
        .local_ip()
        .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    let port = endpoint
        .local_addr()
        .map_err(|e| Error::Compute(format!("data endpoint: {e}")))?
        .port();
    let hello = Message::Hello(Hello {
        token: opts.token.clone(),
        rank: opts.rank,
        world: opts.world,
        host: host.to_string(),
        pid: std::process::id(),
        data_addr: std::net::SocketAddr::new(local_ip, port).to_string(),
        data_fingerprint: id.fingerprint.clone(),
    });
    let (tx, mut rx) = rt.block_on(async {
        let (mut tx, rx) = conn
            .open_bi()
            .await
            .map_err(|e| coordinator(e.to_string()))?;
        wire::send(&mut tx, &hello).await?;
        Ok::<_, Error>((tx, rx))
    })?;
    let assignment = match rt.block_on(wire::recv(&mut rx))? {
        Some(Message::Assign(a)) => *a,
        Some(Message::Refused { reason }) => return Err(coordinator(format!("refused: {reason}"))),
        Some(other) => {
            return Err(coordinator(format!(
                "unexpected first message: {}",
                other.kind()
            )))
        }
        None => return Err(coordinator("closed the connection".into())),
    };
    Ok((conn, tx, rx, assignment))
}

/// Send a heartbeat with the current phase and step every `every`, until the connection fails.
async fn heartbeats(control: Control, beat: Shared<Beat>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let b = lock(&beat).clone();
        let msg = Message::Heartbeat {
            phase: b.phase,
            step: b.step,
            total: b.total,
        };
        if wire::send(&mut *control.tx.lock().await, &msg)
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Read the coordinator's messages: relay NCCL ids, signal the shutdown; on an abort or a lost
/// connection, stop (a worker process exits at once).
async fn listen(
    mut rx: quinn::RecvStream,
    rank: u32,
    embedded: bool,
    nccl: std::sync::mpsc::Sender<(u32, Vec<u8>)>,
    done: std::sync::mpsc::Sender<()>,
) {
    loop {
        match wire::recv(&mut rx).await {
            Ok(Some(Message::Abort { reason })) => {
                tracing::error!("worker rank {rank}: aborted by the coordinator: {reason}");
                if !embedded {
                    std::process::exit(1);
                }
                break;
            }
            Ok(Some(Message::Shutdown)) => {
                let _ = done.send(());
                break;
            }
            Ok(Some(Message::NcclId { group, id })) => {
                let _ = nccl.send((group, id));
            }
            Ok(Some(other)) => {
                tracing::warn!(
                    "worker rank {rank}: ignoring an unexpected {} message",
                    other.kind()
                )
            }
            Ok(None) | Err(_) => {
                tracing::error!(
                    "worker rank {rank}: lost the connection to the coordinator; stopping"
                );
                if !embedded {
                    std::process::exit(1);
                }
                break;
            }
        }
    }
}

/// Seconds and optimiser steps of each phase a worker ran or restored.
#[derive(Default)]
struct Timings {
    seconds: BTreeMap<String, f64>,
    steps: BTreeMap<String, u64>,
    load_seconds: f64,
    features_seconds: f64,
    pipeline_wait_seconds: f64,
}

struct Ctx<'a> {
    a: &'a Assignment,
    job: &'a JobConfig,
    control: &'a Control,
    beat: &'a Shared<Beat>,
    rt: &'a tokio::runtime::Handle,
    endpoint: &'a quinn::Endpoint,
    opts: &'a WorkerOptions,
    host: String,
}

impl Ctx<'_> {
    fn set_phase(&self, phase: &str) {
        *lock(self.beat) = Beat {
            phase: phase.to_string(),
            ..Beat::default()
        };
    }

    /// The worker's job; returns its collectives, which must outlive the job (see `run`).
    fn work(
        &self,
        nccl_ids: &std::sync::mpsc::Receiver<(u32, Vec<u8>)>,
    ) -> Result<[Box<dyn Collective>; 2]> {
        let a = self.a;
        let plan: Plan = serde_json::from_str(&a.plan_json)
            .map_err(|e| Error::Protocol(format!("plan from the coordinator: {e}")))?;
        crate::set_threads(a.threads as usize);
        let (stage_i, replica) = (a.stage as usize, a.replica as usize);
        let (stages, replicas) = (plan.stages.len(), plan.replicas);
        let rank_of = |s: usize, r: usize| (s * replicas + r) as u32;
        let pipe_members: Vec<u32> = (0..stages).map(|s| rank_of(s, replica)).collect();
        let replica_members: Vec<u32> = (0..replicas).map(|r| rank_of(stage_i, r)).collect();
        let work = WorkDir::new(&a.work_dir);
        tracing::info!(
            "worker rank {} of {} on {}: stage {stage_i} (units {:?}), replica {replica}, {} backend",
            a.rank,
            a.world,
            self.host,
            plan.stages[stage_i].units,
            a.backend
        );

        self.set_phase("connect");
        let (mut pipe, mut reps, device) =
            self.groups(&pipe_members, &replica_members, nccl_ids)?;
        pipe.barrier()?;
        reps.barrier()?;

        self.set_phase("load");
        let clock = Instant::now();
        let (mut stage, rows, mut eval) = self.load_stage(&plan, device, &work)?;
        let load_seconds = clock.elapsed().as_secs_f64();
        if let Some(eval) = &mut eval {
            self.set_phase("evaluate");
            self.evaluate_originals(stage.as_ref(), eval, pipe.as_mut())?;
        }
        self.set_phase("features");
        let at = plan.stages[stage_i].features;
        let clock = Instant::now();
        let mut data = self.features(stage.as_ref(), rows, pipe.as_mut(), (device, at), &work)?;
        let features_seconds = clock.elapsed().as_secs_f64();
        // What reads every row's features before training: RegMean, KD, the inner-feature
        // targets; recomputed features are materialized for them, then dropped.
        let b = &self.job.baselines.methods;
        let whole = b.contains(&Baseline::Regmean)
            || b.contains(&Baseline::Kd)
            || !self.job.merge.inner_layers.is_empty();
        let full = if whole {
            materialized(stage.as_ref(), &data)
        } else {
            None
        };
        let all = full.as_ref().unwrap_or(&data);
        if let Some(eval) = &eval {
            self.evaluate_regmean(stage.as_ref(), all, eval, pipe.as_mut())?;
        }
        self.evaluate_kd(
            stage.as_ref(),
            all,
            [pipe.as_mut(), reps.as_mut()],
            eval.as_ref(),
            stages,
        )?;
        stage.prepare(all)?;
        drop(full);
        let timings = Timings {
            load_seconds,
            features_seconds,
            ..self.train(
                stage.as_mut(),
                &mut data,
                [pipe.as_mut(), reps.as_mut()],
                (&work, eval.as_ref()),
                stages,
            )?
        };
        self.set_phase("fold");
        if let Some(eval) = &eval {
            let clock = Instant::now();
            let folded = stage.fold()?;
            let written = written_as(stage.precision());
            let tensors = folded
                .iter()
                .map(|(n, t)| (n.clone(), written(&to_tch(t).to_device(device))));
            let part = stage.merged_part(tensors.collect())?;
            self.evaluate("fs-merge", part.as_ref(), eval, pipe.as_mut(), clock)?;
            self.send_folded(folded)?;
        }
        self.send_stats(
            stage.as_ref(),
            device,
            [pipe.as_ref(), reps.as_ref()],
            timings,
        )?;
        self.set_phase("done");
        Ok([pipe, reps])
    }

    /// The stage of this worker, with its M/U on `device`; the merge rows when it reads them
    /// (stage 0 computing teacher features; every stage of some families); the evaluation rows
    /// when it evaluates (the pipeline of replica 0).
    #[allow(clippy::type_complexity)]
    fn load_stage(
        &self,
        plan: &Plan,
        device: Device,
        work: &WorkDir,
    ) -> Result<(
        Box<dyn WorkerStage>,
        Option<(Tensor, Tensor)>,
        Option<EvalRows>,
    )> {
        let (a, job) = (self.a, self.job);
        let stage_i = a.stage as usize;
        let family = family(job.model.arch);
        let needs_rows = (stage_i == 0 && !a.features_cached) || family.every_stage_reads_rows();
        let evaluates = a.replica == 0;
        // A stage that never reads rows evaluates from its labels alone.
        let splits = if needs_rows || (evaluates && stage_i == 0) {
            Some(crate::data::load_job_cached(job, work)?)
        } else if evaluates {
            Some(crate::data::load_job(job, false)?)
        } else {
            None
        };
        let rows = match &splits {
            Some(splits) if needs_rows => Some(feature_cache::merge_inputs(job, splits)?),
            _ => None,
        };
        let eval = splits
            .filter(|_| evaluates)
            .map(|s| EvalRows::new(job, &s).to_device(device));
        let mut stage = family.load_stage(&StageSpec {
            job,
            models_dir: Path::new(&a.models_dir),
            units: plan.stages[stage_i].units.clone(),
            rows: rows.as_ref().map(|(x, _)| x),
        })?;
        stage.to_device(device);
        Ok((stage, rows, eval))
    }

    /// Evaluate the originals (their rows and the ensemble; their logits become the reference
    /// of every later model's fidelity) and the baselines merged from them alone (`first`,
    /// `average`), while the stage still holds the originals.
    fn evaluate_originals(
        &self,
        stage: &dyn WorkerStage,
        eval: &mut EvalRows,
        pipe: &mut dyn Collective,
    ) -> Result<()> {
        let clock = Instant::now();
        let part = stage.originals_part();
        if let Some(logits) = self.evaluate("originals", part.as_ref(), eval, pipe, clock)? {
            eval.set_reference(logits);
        }
        for &b in &self.job.baselines.methods {
            if matches!(b, Baseline::First | Baseline::Average) {
                let clock = Instant::now();
                let merged = first_or_average(stage.original_tensors()?, b == Baseline::Average);
                let part = stage.merged_part(merged)?;
                self.evaluate(b.name(), part.as_ref(), eval, pipe, clock)?;
            }
        }
        Ok(())
    }

    /// Evaluate RegMean when the job asks for it: it needs the teacher streams, and the
    /// originals that `prepare` drops.
    fn evaluate_regmean(
        &self,
        stage: &dyn WorkerStage,
        data: &StageData,
        eval: &EvalRows,
        pipe: &mut dyn Collective,
    ) -> Result<()> {
        let b = &self.job.baselines;
        if !b.methods.contains(&Baseline::Regmean) {
            return Ok(());
        }
        self.set_phase("evaluate");
        let clock = Instant::now();
        let part = stage.merged_part(stage.regmean(data, b.regmean_alpha)?)?;
        self.evaluate(Baseline::Regmean.name(), part.as_ref(), eval, pipe, clock)?;
        Ok(())
    }

    /// After the local phase, for a family with a shared residual merge: the rows of the local
    /// SuperNet as trained and of the model it folds into.
    fn evaluate_local(
        &self,
        stage: &dyn WorkerStage,
        eval: &EvalRows,
        pipe: &mut dyn Collective,
    ) -> Result<()> {
        let Some(chain) = stage.local_chain_part() else {
            return Ok(());
        };
        self.set_phase("evaluate");
        let clock = Instant::now();
        self.evaluate("local supernet", chain.as_ref(), eval, pipe, clock)?;
        let device = pipe.device();
        let written = written_as(stage.precision());
        let folded = (stage.fold()?.into_iter())
            .map(|(n, t)| (n, written(&to_tch(&t).to_device(device))))
            .collect();
        let part = stage.merged_part(folded)?;
        self.evaluate("local folded", part.as_ref(), eval, pipe, clock)?;
        Ok(())
    }

    /// KD when the job asks for it: model 1's units distilled as a pipeline over the stages
    /// (every replica takes its share of each batch), then evaluated by replica 0's pipeline
    /// (`eval`). It needs the teacher features and the originals that `prepare` drops.
    fn evaluate_kd(
        &self,
        stage: &dyn WorkerStage,
        data: &StageData,
        groups: [&mut dyn Collective; 2],
        eval: Option<&EvalRows>,
        stages: usize,
    ) -> Result<()> {
        let job = self.job;
        if !job.baselines.methods.contains(&Baseline::Kd) {
            return Ok(());
        }
        self.set_phase("kd");
        let clock = Instant::now();
        let s = TrainSettings::kd(&job.merge, job.seed);
        let micro = if stages > 1 {
            job.cluster.micro_batches
        } else {
            1
        };
        let [pipe, replicas] = groups;
        let progress = BeatProgress(self.beat.clone());
        let scale = job.baselines.kd_target_scale;
        let groups = Collectives { pipe, replicas };
        let d = distill(stage, data, (&s, scale), groups, micro, &progress)?;
        if let Some(eval) = eval {
            let tasks: Vec<String> = job.tasks.iter().map(|t| t.name.clone()).collect();
            let part = stage.merged_part(kd_tensors(&d, stage.original_tensors()?, &tasks))?;
            self.evaluate_logged(Baseline::Kd.name(), part.as_ref(), eval, pipe, clock, d.log)?;
        }
        Ok(())
    }

    /// Run `part` (this stage's part of the model `method`) over the evaluation rows down the
    /// pipeline; the last stage reports the scores and the seconds since `clock`, and returns
    /// the logits.
    fn evaluate(
        &self,
        method: &str,
        part: &dyn EvalPart,
        eval: &EvalRows,
        pipe: &mut dyn Collective,
        clock: Instant,
    ) -> Result<Option<SplitLogits>> {
        self.evaluate_logged(method, part, eval, pipe, clock, Vec::new())
    }

    /// `evaluate` of a method that trained, with its training log.
    fn evaluate_logged(
        &self,
        method: &str,
        part: &dyn EvalPart,
        eval: &EvalRows,
        pipe: &mut dyn Collective,
        clock: Instant,
        log: Vec<LogRow>,
    ) -> Result<Option<SplitLogits>> {
        let Some(([test, val], logits)) = evaluate(part, eval, pipe)? else {
            return Ok(None);
        };
        self.control.send(&Message::Evaluated(Box::new(Evaluation {
            method: method.to_string(),
            seconds: clock.elapsed().as_secs_f64(),
            test,
            val,
            log,
        })))?;
        Ok(Some(logits))
    }

    /// The stage's teacher features: from the cache when the coordinator says they exist, else
    /// computed down the pipeline (stage 0 from the merge rows) and cached by replica 0; kept
    /// where the plan says (`at`): in memory, or in the cache file, memory-mapped (a replica
    /// other than 0 maps a private scratch file).
    fn features(
        &self,
        stage: &dyn WorkerStage,
        rows: Option<(Tensor, Tensor)>,
        pipe: &mut dyn Collective,
        (device, at): (Device, FeaturesAt),
        work: &WorkDir,
    ) -> Result<StageData> {
        let a = self.a;
        let stage_i = a.stage as usize;
        let cache = work.features(stage_i);
        let on_disk = at == FeaturesAt::Disk;
        let recompute = at == FeaturesAt::Recompute;
        let data = if a.features_cached {
            let stream = (stage_i > 0).then(|| stage.stream_dims());
            // Recomputed features: the cache holds the stage input alone.
            let layers = if recompute { 0 } else { stage.feature_count() };
            let at = (stream.as_deref(), stage.precision());
            let mut data = feature_cache::load(&cache, layers, stage.n(), at, on_disk)?;
            data.recompute = recompute;
            data
        } else {
            let start = rows
                .filter(|_| stage_i == 0)
                .map(|(x, task)| (x.to_device(device), task.to_device(device)));
            let sink = match at {
                FeaturesAt::Disk => FeatureSink::Disk {
                    path: &cache,
                    scratch: a.replica != 0,
                },
                FeaturesAt::Memory => FeatureSink::Memory,
                FeaturesAt::Recompute => FeatureSink::Recompute,
            };
            let d = pipeline::flow_features(stage, pipe, start, sink)?;
            if a.replica == 0 && !on_disk {
                feature_cache::save(&cache, &d)?;
            }
            d
        };
        if on_disk {
            tracing::info!(
                "worker rank {}: teacher features of stage {stage_i} on disk, memory-mapped ({})",
                a.rank,
                cache.display()
            );
        }
        Ok(data.to_device(device))
    }

    /// The job's training phases on this stage (local, then global, as the mode says), each
    /// run or restored by `phase`; `groups` is [pipeline, replicas]; the local phase's rows are
    /// evaluated when `eval` is given.
    fn train(
        &self,
        stage: &mut dyn WorkerStage,
        data: &mut StageData,
        groups: [&mut dyn Collective; 2],
        (work, eval): (&WorkDir, Option<&EvalRows>),
        stages: usize,
    ) -> Result<Timings> {
        let (a, job) = (self.a, self.job);
        let [pipe, reps] = groups;
        let m = &job.merge;
        let settings = TrainSettings::of(m, job.seed);
        let progress = BeatProgress(self.beat.clone());
        let mut t = Timings::default();
        if matches!(m.mode, Mode::Local | Mode::LocalThenGlobal) {
            self.phase(work, stage, "local", &mut t, || {
                stage.train_local(data, &settings, pipe, reps, &progress)
            })?;
            self.set_phase("hand-over");
            stage.hand_over(pipe)?;
            if let Some(eval) = eval {
                self.evaluate_local(stage, eval, pipe)?;
            }
        }
        if matches!(m.mode, Mode::Global | Mode::LocalThenGlobal) {
            let freed = data.keep_global_only(a.stage == 0, stage.is_last());
            tracing::debug!(
                "worker rank {}: freed {:.1} MB of teacher streams the global phase does not read",
                a.rank,
                freed as f64 / 1e6
            );
            let s = TrainSettings {
                seed: stage.global_seed(settings.seed),
                ..settings.global_phase(m)
            };
            let micro = if stages > 1 {
                job.cluster.micro_batches
            } else {
                1
            };
            let mut timed = TimedRecv {
                inner: pipe,
                recv_seconds: 0.0,
            };
            self.phase(work, stage, "global", &mut t, || {
                let schedule = pipeline::Schedule {
                    micro_batches: micro,
                    checkpoint: m.checkpoint_activations,
                };
                pipeline::train_global(stage, data, &s, &mut timed, reps, schedule, &progress)
            })?;
            t.pipeline_wait_seconds = timed.recv_seconds;
        }
        Ok(t)
    }

    /// Send the folded stage to the coordinator, tensor by tensor, then the count.
    fn send_folded(&self, folded: Vec<(String, HostTensor)>) -> Result<()> {
        let a = self.a;
        let count = folded.len() as u32;
        for (name, t) in folded {
            self.control.send(&Message::Folded {
                stage: a.stage,
                tensor: NamedTensor {
                    name,
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    data: t.data,
                },
            })?;
        }
        self.control.send(&Message::FoldedDone {
            stage: a.stage,
            count,
        })
    }

    /// Send this worker's statistics (its last message of the job).
    fn send_stats(
        &self,
        stage: &dyn WorkerStage,
        device: Device,
        groups: [&dyn Collective; 2],
        t: Timings,
    ) -> Result<()> {
        let a = self.a;
        let (pa, pc) = groups[0].allreduce_time();
        let (ra, rc) = groups[1].allreduce_time();
        self.control.send(&Message::Stats(WorkerStats {
            rank: a.rank,
            host: self.host.clone(),
            stage: a.stage,
            replica: a.replica,
            device: match device {
                Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".into(),
            },
            phase_steps: t.steps,
            peak_rss_mib: peak_rss_mib(),
            weight_bytes: stage.weight_bytes(),
            step_seconds: t.seconds.values().sum(),
            phase_seconds: t.seconds,
            allreduce_seconds: pa + ra,
            allreduce_calls: pc + rc,
            load_seconds: t.load_seconds,
            features_seconds: t.features_seconds,
            pipeline_wait_seconds: t.pipeline_wait_seconds,
        }))
    }

    /// Run phase `phase` of the stage, or restore it from its checkpoint if the coordinator says
    /// it is finished; replica 0 checkpoints it and reports it.
    fn phase(
        &self,
        work: &WorkDir,
        stage: &dyn WorkerStage,
        phase: &str,
        timings: &mut Timings,
        train: impl FnOnce() -> Result<Vec<LogRow>>,
    ) -> Result<()> {
        let a = self.a;
        let (st, js) = work.checkpoint(a.stage as usize, phase);
        self.set_phase(phase);
        let (record, restored) = if a.done_phases.iter().any(|p| p == phase) {
            let names: Vec<String> = stage.named_params().into_iter().map(|(n, _)| n).collect();
            let mut t = read_tensors(&st, &names)?;
            let mut values = Vec::new();
            let mut params = Vec::new();
            for (name, p) in stage.named_params() {
                let v = t.remove(&name).ok_or_else(|| Error::Tensor {
                    file: st.clone(),
                    tensor: name.clone(),
                    msg: "missing from the checkpoint".into(),
                })?;
                values.push(to_tch(&v).to_device(p.device()));
                params.push(p);
            }
            assign(&params, &values)?;
            let record: PhaseRecord = read_json(&js)?;
            tracing::info!(
                "worker rank {}: stage {} {phase} restored from {} (not retrained)",
                a.rank,
                a.stage,
                st.display()
            );
            (record, true)
        } else {
            let clock = Instant::now();
            let scope = resume::Scope {
                work: work.clone(),
                stage: a.stage as usize,
                phase: phase.to_string(),
                every: self.job.cluster.checkpoint_every_steps,
                writer: a.replica == 0,
                from_step: a
                    .resume_steps
                    .iter()
                    .find(|(p, _)| p == phase)
                    .map_or(0, |&(_, step)| step),
            };
            let log = resume::scoped(scope, train)?;
            let record = PhaseRecord {
                stage: a.stage as usize,
                phase: phase.to_string(),
                seconds: clock.elapsed().as_secs_f64(),
                log,
            };
            if a.replica == 0 {
                let mut tensors = BTreeMap::new();
                for (name, p) in stage.named_params() {
                    tensors.insert(name, to_host(&p)?);
                }
                write_json(&js, &record)?;
                write_tensors(&st, &tensors)?;
                resume::discard(work, a.stage as usize, phase)?;
            }
            (record, false)
        };
        timings.seconds.insert(phase.to_string(), record.seconds);
        timings
            .steps
            .insert(phase.to_string(), record.log.len() as u64);
        if a.replica == 0 {
            self.control.send(&Message::PhaseDone {
                stage: a.stage,
                phase: phase.to_string(),
                seconds: record.seconds,
                restored,
                log: record.log,
            })?;
        }
        Ok(())
    }

    /// The pipeline group (same replica index, every stage) and the replica group (same stage),
    /// on the configured backend, and the device tensors live on.
    #[allow(clippy::type_complexity)]
    fn groups(
        &self,
        pipe_members: &[u32],
        replica_members: &[u32],
        nccl_ids: &std::sync::mpsc::Receiver<(u32, Vec<u8>)>,
    ) -> Result<(Box<dyn Collective>, Box<dyn Collective>, Device)> {
        let a = self.a;
        let job = self.job;
        match job.cluster.backend {
            Backend::Quic => {
                let needed: BTreeSet<u32> = pipe_members
                    .iter()
                    .chain(replica_members)
                    .copied()
                    .filter(|&r| r != a.rank)
                    .collect();
                // Longer than the coordinator's heartbeat deadline, so that when a worker dies
                // the coordinator names it before its peers report a broken link.
                let peer_timeouts = Timeouts {
                    idle: Duration::from_secs_f64(1.5 * job.cluster.peer_timeout_secs),
                    keep_alive: Duration::from_secs_f64(job.cluster.heartbeat_secs),
                };
                let links = self.rt.block_on(connect_mesh(
                    self.endpoint,
                    a.rank,
                    &self.opts.token,
                    &a.peers,
                    &needed,
                    peer_timeouts,
                    Duration::from_secs_f64(job.cluster.register_timeout_secs),
                ))?;
                let watchdog = Watchdog::new(job.cluster.collective_timeout_secs);
                let group = |members: &[u32], label| -> Result<Box<dyn Collective>> {
                    if members.len() == 1 {
                        Ok(Box::new(Solo))
                    } else {
                        Ok(Box::new(QuicGroup::new(
                            a.rank,
                            members,
                            &links,
                            self.rt.clone(),
                            (label, watchdog),
                        )?))
                    }
                };
                Ok((
                    group(pipe_members, "pipeline")?,
                    group(replica_members, "replica group")?,
                    Device::Cpu,
                ))
            }
            Backend::Nccl => {
                let device = nccl::device_for(self.opts.local_rank)?;
                let replicas = replica_members.len() as u32;
                // Group ids: pipelines 0..R (by replica), replica groups R.. (by stage).
                let pipe_id = a.replica;
                let rep_id = replicas + a.stage;
                let mut ids: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
                for (gid, members) in [(pipe_id, pipe_members), (rep_id, replica_members)] {
                    if members[0] == a.rank {
                        let id = nccl::unique_id()?;
                        self.control.send(&Message::NcclId {
                            group: gid,
                            id: id.clone(),
                        })?;
                        ids.insert(gid, id);
                    }
                }
                let deadline =
                    Instant::now() + Duration::from_secs_f64(job.cluster.register_timeout_secs);
                while !(ids.contains_key(&pipe_id) && ids.contains_key(&rep_id)) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let (g, id) = nccl_ids.recv_timeout(left).map_err(|_| {
                        Error::Collective("no NCCL unique id arrived from the coordinator".into())
                    })?;
                    ids.entry(g).or_insert(id);
                }
                let watchdog = Watchdog::new(job.cluster.collective_timeout_secs);
                let group = |gid: u32, members: &[u32], label| -> Result<Box<dyn Collective>> {
                    let me = members.iter().position(|&r| r == a.rank).unwrap_or(0);
                    Ok(Box::new(NcclGroup::new(
                        &ids[&gid],
                        (me, members.len()),
                        device,
                        (label, watchdog),
                    )?))
                };
                Ok((
                    group(pipe_id, pipe_members, "pipeline")?,
                    group(rep_id, replica_members, "replica group")?,
                    device,
                ))
            }
        }
    }
}

/// A folded tensor as the merged model holds it once written in `precision` (rounded, then
/// computed with in fp32): what the reported accuracy is measured on.
fn written_as(precision: fsmerge_common::precision::Precision) -> impl Fn(&Tensor) -> Tensor {
    let kind = crate::core::tensor::kind_of(precision);
    move |t: &Tensor| t.to_kind(kind).to_kind(tch::Kind::Float)
}
