//! One job's conversation with its workers: accept and check their hellos (token, version,
//! rank), hand out the stages, then the event loop until the last folded tensor — heartbeats,
//! finished phases (recorded in the manifest), relayed NCCL ids, failures.

use crate::cluster::resume::{done_phases, resume_steps};
use crate::job::Job;
use anyhow::{anyhow, bail, Context, Result};
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::metrics::{Evaluation, LogRow, WorkerStats};
use fsmerge_common::plan::Plan;
use fsmerge_common::transport::token_matches;
use fsmerge_common::wire::{self, Assignment, Hello, Message, NamedTensor, PeerInfo};
use fsmerge_common::workdir::{DoneEntry, Manifest, WorkDir};
use fsmerge_worker::family::MergedWriter;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};

/// What the workers produced.
pub struct Outcome {
    pub log: Vec<LogRow>,
    pub workers: Vec<WorkerStats>,
    /// The models the workers evaluated (originals, baselines, FS-Merge), in arrival order.
    pub evaluations: Vec<Evaluation>,
}

/// Seconds a worker has to send its hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

struct Worker {
    hello: Hello,
    tx: Arc<Mutex<quinn::SendStream>>,
    conn: quinn::Connection,
}

enum Event {
    Joined(Box<Worker>, quinn::RecvStream),
    Msg(u32, Message),
    Lost(u32, String),
}

/// The coordinator's view of one job run: what it hands out and where it records progress.
pub(crate) struct Session<'a> {
    pub job: &'a Job,
    pub plan: &'a Plan,
    pub token: &'a str,
    pub world: usize,
    pub work: &'a WorkDir,
    pub manifest: &'a mut Manifest,
    /// Where the stages' folded tensors go as they arrive.
    pub model: &'a mut dyn MergedWriter,
}

/// Accept connections forever, turning each valid hello into an `Event::Joined`.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    token: String,
    events: mpsc::UnboundedSender<Event>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let token = token.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            match tokio::time::timeout(HELLO_TIMEOUT, handshake(incoming, &token)).await {
                Ok(Ok((w, rx))) => {
                    let _ = events.send(Event::Joined(Box::new(w), rx));
                }
                Ok(Err(why)) => tracing::warn!("refused a connection from {from}: {why}"),
                Err(_) => tracing::warn!(
                    "refused a connection from {from}: no hello within {HELLO_TIMEOUT:?}"
                ),
            }
        });
    }
}

async fn handshake(
    incoming: quinn::Incoming,
    token: &str,
) -> std::result::Result<(Worker, quinn::RecvStream), String> {
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let reason = match wire::recv_hello(&mut rx).await {
        Ok(Some(Message::Hello(mut h))) if token_matches(&h.token, token) => {
            // The host is logged and shown in every message about this worker.
            h.host = wire::printable(&h.host, 255);
            return Ok((
                Worker {
                    hello: h,
                    tx: Arc::new(Mutex::new(tx)),
                    conn,
                },
                rx,
            ));
        }
        Ok(Some(Message::Hello(h))) => format!(
            "wrong job token from {} (pid {})",
            wire::printable(&h.host, 255),
            h.pid
        ),
        Ok(Some(other)) => format!("expected a hello, got a {} message", other.kind()),
        Ok(None) => return Err("closed before its hello".into()),
        Err(e) => e.to_string(),
    };
    let _ = wire::send(
        &mut tx,
        &Message::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = tx.finish();
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.close(1u32.into(), b"refused");
    Err(reason)
}

/// Forward every message of worker `rank` to the event loop.
async fn read_loop(rank: u32, mut rx: quinn::RecvStream, events: mpsc::UnboundedSender<Event>) {
    loop {
        match wire::recv(&mut rx).await {
            Ok(Some(m)) => {
                if events.send(Event::Msg(rank, m)).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = events.send(Event::Lost(rank, "closed its connection".into()));
                return;
            }
            Err(e) => {
                let _ = events.send(Event::Lost(rank, e.to_string()));
                return;
            }
        }
    }
}

async fn send_to(w: &Worker, msg: &Message) -> fsmerge_common::Result<()> {
    wire::send(&mut *w.tx.lock().await, msg).await
}

/// Liveness and position of one registered worker.
struct Seen {
    at: Instant,
    phase: String,
    step: u64,
    total: u64,
    finished: bool,
    /// Reported its own failure: its closing connection adds nothing.
    failed: bool,
}

/// The workers registered so far, by rank, with the streams their messages arrive on.
type Joined = BTreeMap<u32, (Worker, quinn::RecvStream)>;

/// What every worker's assignment shares, computed once for all of them.
struct Common {
    peers: Vec<PeerInfo>,
    job_json: String,
    plan_json: String,
    threads: usize,
    resume_steps: Vec<(String, u64)>,
}

/// The event loop's state from assignment to the last folded tensor, so each event's handling
/// can live in its own method.
struct Drive<'w> {
    workers: &'w BTreeMap<u32, Worker>,
    stages: usize,
    world: usize,
    /// `cluster.peer_timeout_secs`, as given (for the message) and as a duration.
    peer_timeout_secs: f64,
    timeout: Duration,
    seen: BTreeMap<u32, Seen>,
    folded_stages: BTreeSet<u32>,
    /// Log rows in job order: local phases by stage, then global (every stage reports the
    /// same global losses; the last stage's rows are kept).
    logs: BTreeMap<(u8, usize), Vec<LogRow>>,
    stats: BTreeMap<u32, WorkerStats>,
    evaluations: Vec<Evaluation>,
    last_report: Instant,
    /// A worker's failure usually breaks its peers' links too; reports are collected for a
    /// moment and the root cause (a failure that is not a broken link) is named first.
    failures: Vec<String>,
    failing_since: Option<Instant>,
}

impl<'w> Drive<'w> {
    /// Every worker starts in phase `setup`, seen now, so the silence timeout counts from here.
    fn new(
        workers: &'w BTreeMap<u32, Worker>,
        stages: usize,
        world: usize,
        peer_timeout_secs: f64,
    ) -> Self {
        let timeout = Duration::from_secs_f64(peer_timeout_secs);
        let seen = workers
            .keys()
            .map(|&r| {
                (
                    r,
                    Seen {
                        at: Instant::now(),
                        phase: "setup".into(),
                        step: 0,
                        total: 0,
                        finished: false,
                        failed: false,
                    },
                )
            })
            .collect();
        Drive {
            workers,
            stages,
            world,
            peer_timeout_secs,
            timeout,
            seen,
            folded_stages: BTreeSet::new(),
            logs: BTreeMap::new(),
            stats: BTreeMap::new(),
            evaluations: Vec::new(),
            last_report: Instant::now(),
            failures: Vec::new(),
            failing_since: None,
        }
    }

    /// The job is over once every stage sent its folded tensors and every worker its stats.
    fn complete(&self) -> bool {
        self.folded_stages.len() >= self.stages && self.stats.len() >= self.world
    }

    /// How messages name a worker: rank, host and the phase it was last seen in.
    fn name(&self, r: u32) -> String {
        let host = self.workers.get(&r).map_or("?", |w| w.hello.host.as_str());
        let phase = self.seen.get(&r).map_or("?", |s| s.phase.as_str());
        format!("worker rank {r} (host {host}, phase {phase})")
    }

    /// Any message proves the worker alive, for the silence timeout.
    fn touch(&mut self, r: u32) {
        if let Some(s) = self.seen.get_mut(&r) {
            s.at = Instant::now();
        }
    }

    /// A heartbeat tells where the worker is, for the progress line and failure messages.
    fn on_heartbeat(&mut self, r: u32, phase: String, step: u64, total: u64) {
        if let Some(s) = self.seen.get_mut(&r) {
            s.phase = wire::printable(&phase, 64);
            s.step = step;
            s.total = total;
        }
    }

    /// A lost connection is a failure unless the worker had already sent its stats or its own
    /// failure report.
    fn on_lost(&mut self, r: u32, why: String) {
        if !self.seen.get(&r).is_some_and(|s| s.finished || s.failed) {
            let failure = format!("lost {}: {why}", self.name(r));
            self.fail(failure);
        }
    }

    /// A worker's own failure report, named with the phase it failed in.
    fn on_failed(&mut self, r: u32, phase: String, msg: String) {
        if let Some(s) = self.seen.get_mut(&r) {
            s.phase = wire::printable(&phase, 64);
            s.failed = true;
        }
        let failure = format!("{} failed: {}", self.name(r), wire::printable(&msg, 4096));
        self.fail(failure);
    }

    /// Collect a failure; the grace period for further reports starts at the first one.
    fn fail(&mut self, failure: String) {
        self.failures.push(failure);
        self.failing_since.get_or_insert_with(Instant::now);
    }

    /// Keep a finished phase's loss rows in job order, once per distinct loss curve.
    fn keep_log(&mut self, stage: usize, phase: &str, log: Vec<LogRow>) {
        match phase {
            "global" if stage + 1 == self.stages => {
                self.logs.insert((1, stage), log);
            }
            "global" => {}
            // A transformer's local phase is one problem summed over the stages (the shared
            // residual merge): every stage logs the same total loss, so stage 0's stands for all.
            "local" if stage > 0 && log.first().is_some_and(|r| r.phase == "local") => {}
            _ => {
                self.logs.insert((0, stage), log);
            }
        }
    }

    /// Every worker needs a group's NCCL id, and only the coordinator reaches them all.
    async fn relay_nccl_id(&self, group: u32, id: Vec<u8>) -> Result<()> {
        for w in self.workers.values() {
            send_to(
                w,
                &Message::NcclId {
                    group,
                    id: id.clone(),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Store a folded tensor for assembly; a name sent twice is a bug on the worker side.
    /// A stage has sent all its folded tensors.
    fn on_folded_done(&mut self, stage: u32, count: u32) {
        tracing::info!("stage {stage}: {count} folded tensors received");
        self.folded_stages.insert(stage);
    }

    /// A worker's stats are its last word: losing it afterwards is no failure.
    fn on_stats(&mut self, r: u32, s: WorkerStats) {
        if let Some(x) = self.seen.get_mut(&r) {
            x.finished = true;
        }
        self.stats.insert(r, s);
    }

    /// The periodic checks: fail once the failure grace is over or a worker fell silent, and
    /// log the progress line.
    fn on_tick(&mut self) -> Result<()> {
        if self
            .failing_since
            .is_some_and(|t| t.elapsed() > FAILURE_GRACE)
        {
            bail!(root_cause_first(std::mem::take(&mut self.failures)));
        }
        self.check_silence()?;
        self.report_progress();
        Ok(())
    }

    /// A worker that has not finished and sent nothing within the peer timeout is taken as dead.
    fn check_silence(&self) -> Result<()> {
        let silent = self
            .seen
            .iter()
            .find(|(_, s)| !s.finished && s.at.elapsed() > self.timeout);
        if let Some((&r, s)) = silent {
            bail!(
                "{} has been silent for {:.1} s (limit `cluster.peer_timeout_secs` = {}): it died or was cut off",
                self.name(r),
                s.at.elapsed().as_secs_f64(),
                self.peer_timeout_secs
            );
        }
        Ok(())
    }

    /// Every 10 s, one line with each rank's phase and step, so a long run shows it is moving.
    fn report_progress(&mut self) {
        if self.last_report.elapsed() > Duration::from_secs(10) {
            self.last_report = Instant::now();
            let line: Vec<String> = self
                .seen
                .iter()
                .map(|(r, s)| {
                    if s.total > 0 {
                        format!("rank {r}: {} {}/{}", s.phase, s.step, s.total)
                    } else {
                        format!("rank {r}: {}", s.phase)
                    }
                })
                .collect();
            tracing::info!("{}", line.join(" | "));
        }
    }

    /// What the workers produced, once the loop is complete.
    fn into_outcome(self) -> Outcome {
        Outcome {
            log: self.logs.into_values().flatten().collect(),
            workers: self.stats.into_values().collect(),
            evaluations: self.evaluations,
        }
    }
}

/// The workers' addresses and fingerprints, so they can reach and verify each other.
fn peers(joined: &Joined) -> Vec<PeerInfo> {
    joined
        .iter()
        .map(|(&rank, (w, _))| PeerInfo {
            rank,
            host: w.hello.host.clone(),
            data_addr: w.hello.data_addr.clone(),
            fingerprint: w.hello.data_fingerprint.clone(),
        })
        .collect()
}

/// Log a finished (or restored) phase with its time and final loss.
fn announce_phase(stage: usize, phase: &str, seconds: f64, restored: bool, log: &[LogRow]) {
    tracing::info!(
        "stage {stage}: phase `{phase}` {} ({seconds:.1} s, final loss {})",
        if restored {
            "restored from its checkpoint"
        } else {
            "finished"
        },
        log.last()
            .map_or("-".to_string(), |l| format!("{:.4e}", l.loss))
    );
}

/// The job already has all its workers: tell a late one so it exits instead of waiting.
async fn refuse_late(w: &Worker) {
    tracing::warn!(
        "refused worker {} (pid {}): the job already has all its workers",
        w.hello.host,
        w.hello.pid
    );
    let _ = send_to(
        w,
        &Message::Refused {
            reason: "the job already has all its workers".into(),
        },
    )
    .await;
}

impl Session<'_> {
    pub async fn serve(mut self, endpoint: &quinn::Endpoint) -> Result<Outcome> {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let acceptor = tokio::spawn(accept_loop(
            endpoint.clone(),
            self.token.to_string(),
            events_tx.clone(),
        ));
        let workers = self.register(&mut events).await;
        let workers = match workers {
            Ok(w) => w,
            Err(e) => {
                acceptor.abort();
                return Err(e);
            }
        };
        let mut by_rank: BTreeMap<u32, Worker> = BTreeMap::new();
        for (rank, (w, rx)) in workers {
            tokio::spawn(read_loop(rank, rx, events_tx.clone()));
            by_rank.insert(rank, w);
        }
        let result = self.drive(&by_rank, &mut events).await;
        acceptor.abort();
        match &result {
            Ok(_) => {
                for w in by_rank.values() {
                    let _ = send_to(w, &Message::Shutdown).await;
                }
            }
            Err(e) => {
                let reason = format!("{e:#}");
                for w in by_rank.values() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        send_to(
                            w,
                            &Message::Abort {
                                reason: reason.clone(),
                            },
                        ),
                    )
                    .await;
                }
            }
        }
        // Let the last messages leave before the endpoint closes.
        for w in by_rank.values() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = w.tx.lock().await.finish();
                w.conn.closed().await
            })
            .await;
        }
        result
    }

    /// Wait until every rank of the plan has a worker, assigning ranks to workers that bring
    /// none; refuse conflicting ones.
    async fn register(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) -> Result<Joined> {
        let cluster = &self.job.cfg.cluster;
        let deadline = Instant::now() + Duration::from_secs_f64(cluster.register_timeout_secs);
        let mut joined = Joined::new();
        while joined.len() < self.world {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(ev)) = tokio::time::timeout(left, events.recv()).await else {
                return Err(self.not_registered(&joined));
            };
            let Event::Joined(w, rx) = ev else { continue };
            self.admit(w, rx, &mut joined).await;
        }
        self.send_assignments(&joined).await?;
        Ok(joined)
    }

    /// The registration deadline passed: say which ranks are missing and how to start them.
    fn not_registered(&self, joined: &Joined) -> anyhow::Error {
        let missing: Vec<usize> = (0..self.world)
            .filter(|r| !joined.contains_key(&(*r as u32)))
            .collect();
        anyhow!(
            "only {} of {} workers registered within {} s (missing ranks {missing:?}); \
             start them with `fsmerge worker --rendezvous {}`",
            joined.len(),
            self.world,
            self.job.cfg.cluster.register_timeout_secs,
            self.work.rendezvous().display()
        )
    }

    /// Register a joining worker under the rank it may claim, or refuse it and tell it why.
    async fn admit(&self, w: Box<Worker>, rx: quinn::RecvStream, joined: &mut Joined) {
        let h = &w.hello;
        let rank = match self.claim_rank(h, joined) {
            Ok(r) => r,
            Err(reason) => {
                tracing::warn!("refused worker {} (pid {}): {reason}", h.host, h.pid);
                let _ = send_to(&w, &Message::Refused { reason }).await;
                return;
            }
        };
        tracing::info!(
            "worker rank {rank} registered: {} (pid {}), data plane {}",
            h.host,
            h.pid,
            h.data_addr
        );
        joined.insert(rank, (*w, rx));
    }

    /// The rank a hello may have: the one it asks for, else the lowest free one; the reason
    /// for refusing it when its world or rank does not fit the plan and the ranks taken.
    fn claim_rank(&self, h: &Hello, joined: &Joined) -> Result<u32, String> {
        let taken = |r: &u32| joined.contains_key(r);
        match (h.world, h.rank) {
            (Some(n), _) if n as usize != self.world => Err(format!(
                "it expects a world of {n} workers, the plan has {} ({} stage(s) × {} replica(s))",
                self.world,
                self.plan.stages.len(),
                self.plan.replicas
            )),
            (_, Some(r)) if r as usize >= self.world => {
                Err(format!("rank {r} is outside the world of {}", self.world))
            }
            (_, Some(r)) if taken(&r) => Err(format!("rank {r} is already taken")),
            (_, Some(r)) => Ok(r),
            (_, None) => Ok((0..self.world as u32).find(|r| !taken(r)).unwrap_or(0)),
        }
    }

    /// Send every registered worker its assignment, in rank order.
    async fn send_assignments(&self, joined: &Joined) -> Result<()> {
        let cfg = &self.job.cfg;
        let common = Common {
            peers: peers(joined),
            job_json: serde_json::to_string(&self.job.absolute_config()?)?,
            plan_json: serde_json::to_string(self.plan)?,
            threads: if cfg.cluster.worker_threads > 0 {
                cfg.cluster.worker_threads
            } else {
                cfg.threads
            },
            resume_steps: resume_steps(self.work, self.manifest, self.plan.stages.len())?,
        };
        for (&rank, (w, _)) in joined {
            let a = self.assignment(rank, &common)?;
            send_to(w, &Message::Assign(Box::new(a)))
                .await
                .with_context(|| format!("sending worker rank {rank} its stage"))?;
        }
        Ok(())
    }

    /// One worker's assignment: its stage and replica, the job, and the phases already done.
    fn assignment(&self, rank: u32, common: &Common) -> Result<Assignment> {
        let stage = rank as usize / self.plan.replicas;
        Ok(Assignment {
            rank,
            world: self.world as u32,
            stage: stage as u32,
            replica: (rank as usize % self.plan.replicas) as u32,
            job_json: common.job_json.clone(),
            plan_json: common.plan_json.clone(),
            models_dir: absolute(&self.job.models_dir)?.display().to_string(),
            work_dir: absolute(&self.work.root)?.display().to_string(),
            peers: common.peers.clone(),
            done_phases: done_phases(self.manifest, stage, self.plan.stages.len()),
            resume_steps: common.resume_steps.clone(),
            features_cached: self.manifest.features,
            backend: format!("{:?}", self.job.cfg.cluster.backend).to_lowercase(),
            threads: common.threads as u32,
        })
    }

    /// The event loop from assignment to the last folded tensor.
    async fn drive(
        &mut self,
        workers: &BTreeMap<u32, Worker>,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<Outcome> {
        let cluster = &self.job.cfg.cluster;
        let stages = self.plan.stages.len();
        let mut st = Drive::new(workers, stages, self.world, cluster.peer_timeout_secs);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !st.complete() {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { bail!("event channel closed") };
                    self.on_event(&mut st, ev).await?;
                }
                _ = tick.tick() => st.on_tick()?,
            }
        }
        Ok(st.into_outcome())
    }

    /// Dispatch one event of the loop: a late worker, a lost connection or a message.
    async fn on_event(&mut self, st: &mut Drive<'_>, ev: Event) -> Result<()> {
        match ev {
            Event::Joined(w, _) => refuse_late(&w).await,
            Event::Lost(r, why) => st.on_lost(r, why),
            Event::Msg(r, msg) => self.on_message(st, r, msg).await?,
        }
        Ok(())
    }

    /// Handle one message of worker `r`; any message also counts as a sign of life.
    async fn on_message(&mut self, st: &mut Drive<'_>, r: u32, msg: Message) -> Result<()> {
        st.touch(r);
        match msg {
            Message::Heartbeat { phase, step, total } => st.on_heartbeat(r, phase, step, total),
            Message::PhaseDone {
                stage,
                phase,
                seconds,
                restored,
                log,
            } => {
                let stage = stage as usize;
                announce_phase(stage, &phase, seconds, restored, &log);
                self.record_phase(stage, &phase, seconds, restored)?;
                st.keep_log(stage, &phase, log);
            }
            Message::NcclId { group, id } => st.relay_nccl_id(group, id).await?,
            Message::Folded { stage, tensor } => self.on_folded(stage, tensor)?,
            Message::FoldedDone { stage, count } => st.on_folded_done(stage, count),
            Message::Evaluated(e) => st.evaluations.push(*e),
            Message::Stats(s) => st.on_stats(r, s),
            Message::Failed { phase, msg } => st.on_failed(r, phase, msg),
            other => tracing::warn!("{}: unexpected {} message", st.name(r), other.kind()),
        }
        Ok(())
    }

    /// One folded tensor of stage `stage`, written at once; one whose shape disagrees with its
    /// data, that the merged model lacks, or that came twice fails the job naming it.
    fn on_folded(&mut self, stage: u32, tensor: NamedTensor) -> Result<()> {
        let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if count != Some(tensor.data.len()) {
            bail!(
                "stage {stage} sent tensor `{}` of shape {shape:?} with {} values",
                tensor.name,
                tensor.data.len()
            );
        }
        let name = tensor.name;
        self.model
            .add(name.clone(), HostTensor::new(shape, tensor.data))
            .with_context(|| format!("stage {stage}'s folded tensor `{name}`"))
    }

    /// Record a newly finished phase in the manifest, so a rerun of the job skips it.
    fn record_phase(
        &mut self,
        stage: usize,
        phase: &str,
        seconds: f64,
        restored: bool,
    ) -> Result<()> {
        if !restored && !self.manifest.is_done(stage, phase) {
            self.manifest.done.push(DoneEntry {
                stage,
                phase: phase.to_string(),
                run: self.manifest.runs,
                seconds,
            });
            self.manifest.features = true;
            self.work.write_manifest(self.manifest)?;
        }
        Ok(())
    }
}

/// How long the coordinator gathers failure reports before failing the job.
const FAILURE_GRACE: Duration = Duration::from_secs(1);

/// One message from several failure reports: the first that is not a broken link to a peer
/// (the likely cause; a watchdog's report on a stalled peer is one), then the others.
fn root_cause_first(mut failures: Vec<String>) -> String {
    let secondary = |f: &String| f.contains(": peer worker rank") && !f.contains("watchdog:");
    failures.sort_by_key(secondary);
    let mut msg = failures.first().cloned().unwrap_or_default();
    for other in &failures[1..] {
        msg.push_str(&format!("\n  also: {other}"));
    }
    msg
}

fn absolute(p: &std::path::Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_cause_comes_first() {
        let m = root_cause_first(vec![
            "worker rank 1 (host a, phase global) failed: peer worker rank 0 (a): connection lost"
                .into(),
            "worker rank 0 (host a, phase global) failed: training diverged".into(),
        ]);
        assert!(m.starts_with("worker rank 0"), "{m}");
        assert!(m.contains("also: worker rank 1"), "{m}");
    }
}
