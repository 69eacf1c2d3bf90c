//! One job's conversation with its workers: accept and check their hellos (token, version,
//! rank), hand out the stages, then the event loop until the last folded tensor — heartbeats,
//! finished phases (recorded in the manifest), relayed NCCL ids, failures.

use crate::cluster::resume::done_phases;
use crate::job::Job;
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::metrics::{LogRow, WorkerStats};
use fsmerge_common::plan::Plan;
use fsmerge_common::transport::token_matches;
use fsmerge_common::wire::{self, Assignment, Hello, Message, PeerInfo};
use fsmerge_common::workdir::{DoneEntry, Manifest, WorkDir};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};

/// What the workers produced.
pub struct Outcome {
    /// Folded tensors by merged-checkpoint name.
    pub tensors: BTreeMap<String, HostTensor>,
    pub log: Vec<LogRow>,
    pub workers: Vec<WorkerStats>,
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
    let reason = match wire::recv(&mut rx).await {
        Ok(Some(Message::Hello(h))) if token_matches(&h.token, token) => {
            return Ok((
                Worker {
                    hello: h,
                    tx: Arc::new(Mutex::new(tx)),
                    conn,
                },
                rx,
            ))
        }
        Ok(Some(Message::Hello(h))) => format!("wrong job token from {} (pid {})", h.host, h.pid),
        Ok(Some(other)) => format!("expected a hello, got {other:?}"),
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
    async fn register(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<BTreeMap<u32, (Worker, quinn::RecvStream)>> {
        let cluster = &self.job.cfg.cluster;
        let deadline = Instant::now() + Duration::from_secs_f64(cluster.register_timeout_secs);
        let mut joined: BTreeMap<u32, (Worker, quinn::RecvStream)> = BTreeMap::new();
        while joined.len() < self.world {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match tokio::time::timeout(left, events.recv()).await {
                Ok(Some(ev)) => ev,
                _ => {
                    let missing: Vec<usize> = (0..self.world)
                        .filter(|r| !joined.contains_key(&(*r as u32)))
                        .collect();
                    bail!(
                        "only {} of {} workers registered within {} s (missing ranks {missing:?}); \
                         start them with `fsmerge worker --rendezvous {}`",
                        joined.len(),
                        self.world,
                        cluster.register_timeout_secs,
                        self.work.rendezvous().display()
                    );
                }
            };
            let Event::Joined(w, rx) = ev else { continue };
            let h = &w.hello;
            let taken = |r: &u32| joined.contains_key(r);
            let claim = match (h.world, h.rank) {
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
            };
            let rank = match claim {
                Ok(r) => r,
                Err(reason) => {
                    tracing::warn!("refused worker {} (pid {}): {reason}", h.host, h.pid);
                    let _ = send_to(&w, &Message::Refused { reason }).await;
                    continue;
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
        let peers: Vec<PeerInfo> = joined
            .iter()
            .map(|(&rank, (w, _))| PeerInfo {
                rank,
                host: w.hello.host.clone(),
                data_addr: w.hello.data_addr.clone(),
                fingerprint: w.hello.data_fingerprint.clone(),
            })
            .collect();
        let cfg = &self.job.cfg;
        let job_json = serde_json::to_string(&self.job.absolute_config()?)?;
        let plan_json = serde_json::to_string(self.plan)?;
        let threads = if cfg.cluster.worker_threads > 0 {
            cfg.cluster.worker_threads
        } else {
            cfg.threads
        };
        for (&rank, (w, _)) in &joined {
            let stage = rank as usize / self.plan.replicas;
            let a = Assignment {
                rank,
                world: self.world as u32,
                stage: stage as u32,
                replica: (rank as usize % self.plan.replicas) as u32,
                job_json: job_json.clone(),
                plan_json: plan_json.clone(),
                models_dir: absolute(&self.job.models_dir)?.display().to_string(),
                work_dir: absolute(&self.work.root)?.display().to_string(),
                peers: peers.clone(),
                done_phases: done_phases(self.manifest, stage, self.plan.stages.len()),
                features_cached: self.manifest.features,
                backend: format!("{:?}", cfg.cluster.backend).to_lowercase(),
                threads: threads as u32,
            };
            send_to(w, &Message::Assign(Box::new(a)))
                .await
                .with_context(|| format!("sending worker rank {rank} its stage"))?;
        }
        Ok(joined)
    }

    /// The event loop from assignment to the last folded tensor.
    async fn drive(
        &mut self,
        workers: &BTreeMap<u32, Worker>,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<Outcome> {
        let cluster = &self.job.cfg.cluster;
        let timeout = Duration::from_secs_f64(cluster.peer_timeout_secs);
        let stages = self.plan.stages.len();
        let mut seen: BTreeMap<u32, Seen> = workers
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
                    },
                )
            })
            .collect();
        let name = |r: u32, seen: &BTreeMap<u32, Seen>| {
            let host = workers.get(&r).map_or("?", |w| w.hello.host.as_str());
            let phase = seen.get(&r).map_or("?", |s| s.phase.as_str());
            format!("worker rank {r} (host {host}, phase {phase})")
        };
        let mut tensors = BTreeMap::new();
        let mut folded_stages = BTreeSet::new();
        // Log rows in job order: local phases by stage, then global (every stage reports the
        // same global losses; the last stage's rows are kept).
        let mut logs: BTreeMap<(u8, usize), Vec<LogRow>> = BTreeMap::new();
        let mut stats: BTreeMap<u32, WorkerStats> = BTreeMap::new();
        let mut last_report = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        // A worker's failure usually breaks its peers' links too; collect reports for a moment
        // and name the root cause (a failure that is not a broken link) first.
        let mut failures: Vec<String> = Vec::new();
        let mut failing_since: Option<Instant> = None;
        while folded_stages.len() < stages || stats.len() < self.world {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { bail!("event channel closed") };
                    match ev {
                        Event::Joined(w, _) => {
                            tracing::warn!("refused worker {} (pid {}): the job already has all its workers", w.hello.host, w.hello.pid);
                            let _ = send_to(&w, &Message::Refused { reason: "the job already has all its workers".into() }).await;
                        }
                        Event::Lost(r, why) => {
                            if !seen.get(&r).is_some_and(|s| s.finished) {
                                failures.push(format!("lost {}: {why}", name(r, &seen)));
                                failing_since.get_or_insert_with(Instant::now);
                            }
                        }
                        Event::Msg(r, msg) => {
                            if let Some(s) = seen.get_mut(&r) {
                                s.at = Instant::now();
                            }
                            match msg {
                                Message::Heartbeat { phase, step, total } => {
                                    if let Some(s) = seen.get_mut(&r) {
                                        s.phase = phase;
                                        s.step = step;
                                        s.total = total;
                                    }
                                }
                                Message::PhaseDone { stage, phase, seconds, restored, log } => {
                                    let stage = stage as usize;
                                    tracing::info!(
                                        "stage {stage}: phase `{phase}` {} ({seconds:.1} s, final loss {})",
                                        if restored { "restored from its checkpoint" } else { "finished" },
                                        log.last().map_or("-".to_string(), |l| format!("{:.4e}", l.loss))
                                    );
                                    if !restored && !self.manifest.is_done(stage, &phase) {
                                        self.manifest.done.push(DoneEntry { stage, phase: phase.clone(), run: self.manifest.runs, seconds });
                                        self.manifest.features = true;
                                        self.work.write_manifest(self.manifest)?;
                                    }
                                    match phase.as_str() {
                                        "global" if stage + 1 == stages => { logs.insert((1, stage), log); }
                                        "global" => {}
                                        // A transformer's local phase is one problem summed over
                                        // the stages (the shared residual merge): every stage
                                        // logs the same total loss, so stage 0's stands for all.
                                        "local" if stage > 0 && log.first().is_some_and(|r| r.phase == "local") => {}
                                        _ => { logs.insert((0, stage), log); }
                                    }
                                }
                                Message::NcclId { group, id } => {
                                    for w in workers.values() {
                                        send_to(w, &Message::NcclId { group, id: id.clone() }).await?;
                                    }
                                }
                                Message::Folded { stage, tensor } => {
                                    let shape = tensor.shape.iter().map(|&d| d as usize).collect();
                                    let t = HostTensor::new(shape, tensor.data);
                                    if tensors.insert(tensor.name.clone(), t).is_some() {
                                        bail!("stage {stage} sent tensor `{}` twice", tensor.name);
                                    }
                                }
                                Message::FoldedDone { stage, count } => {
                                    tracing::info!("stage {stage}: {count} folded tensors received");
                                    folded_stages.insert(stage);
                                }
                                Message::Stats(s) => {
                                    if let Some(x) = seen.get_mut(&r) {
                                        x.finished = true;
                                    }
                                    stats.insert(r, s);
                                }
                                Message::Failed { phase, msg } => {
                                    if let Some(s) = seen.get_mut(&r) {
                                        s.phase = phase;
                                    }
                                    failures.push(format!("{} failed: {msg}", name(r, &seen)));
                                    failing_since.get_or_insert_with(Instant::now);
                                }
                                other => tracing::warn!("{}: unexpected message {other:?}", name(r, &seen)),
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if failing_since.is_some_and(|t| t.elapsed() > FAILURE_GRACE) {
                        bail!(root_cause_first(failures));
                    }
                    if let Some((&r, s)) = seen.iter().find(|(_, s)| !s.finished && s.at.elapsed() > timeout) {
                        bail!(
                            "{} has been silent for {:.1} s (limit `cluster.peer_timeout_secs` = {}): it died or was cut off",
                            name(r, &seen),
                            s.at.elapsed().as_secs_f64(),
                            cluster.peer_timeout_secs
                        );
                    }
                    if last_report.elapsed() > Duration::from_secs(10) {
                        last_report = Instant::now();
                        let line: Vec<String> = seen.iter().map(|(r, s)| {
                            if s.total > 0 { format!("rank {r}: {} {}/{}", s.phase, s.step, s.total) } else { format!("rank {r}: {}", s.phase) }
                        }).collect();
                        tracing::info!("{}", line.join(" | "));
                    }
                }
            }
        }
        Ok(Outcome {
            tensors,
            log: logs.into_values().flatten().collect(),
            workers: stats.into_values().collect(),
        })
    }
}

/// How long the coordinator gathers failure reports before failing the job.
const FAILURE_GRACE: Duration = Duration::from_secs(1);

/// One message from several failure reports: the first that is not a broken link to a peer
/// (the likely cause), then the others.
fn root_cause_first(mut failures: Vec<String>) -> String {
    let secondary = |f: &String| f.contains(": peer worker rank");
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
