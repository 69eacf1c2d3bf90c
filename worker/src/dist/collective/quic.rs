//! The CPU backend: direct QUIC connections between the workers that exchange data (replicas
//! of a stage, neighbouring stages), a ring all-reduce and point-to-point sends over them.
//!
//! Each pair of linked workers shares one bidirectional stream; the lower rank dials, presents
//! the job token, and the higher rank checks it. Since both sides issue their collectives in the
//! same order, one ordered stream per direction is all the matching a pair needs. Data frames
//! are raw little-endian f32 behind the wire module's length prefix.

use super::watchdog::{stall_if_injected, Watchdog};
use super::Collective;
use fsmerge_common::transport::{self, token_matches, Timeouts};
use fsmerge_common::wire::{self, Message, PeerInfo};
use fsmerge_common::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tokio::sync::Mutex;

/// One linked peer: the two halves of the pair's stream.
pub struct Link {
    /// "worker rank R (host H)", for errors.
    pub name: String,
    tx: Mutex<quinn::SendStream>,
    rx: Mutex<quinn::RecvStream>,
    /// Keeps the connection open as long as the link lives.
    _conn: quinn::Connection,
}

impl Link {
    /// The link over a pair's stream, named after the peer so its errors say who failed.
    fn new(
        p: &PeerInfo,
        conn: quinn::Connection,
        tx: quinn::SendStream,
        rx: quinn::RecvStream,
    ) -> Self {
        Self {
            name: peer_name(p),
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
            _conn: conn,
        }
    }

    /// Send one frame within `deadline`; `what` names the collective for the watchdog's error.
    async fn send(&self, bytes: &[u8], deadline: Duration, what: &str) -> Result<()> {
        let mut tx = self.tx.lock().await;
        tokio::time::timeout(deadline, wire::write_frame(&mut *tx, bytes))
            .await
            .map_err(|_| {
                self.err(format!(
                    "watchdog: {what} could not send {} bytes within {deadline:.1?}: the peer \
                     is not reading (cluster.collective_timeout_secs)",
                    bytes.len()
                ))
            })?
            .map_err(|e| self.err(e))
    }

    /// Receive one frame of `len` bytes within `deadline`.
    async fn recv(&self, len: usize, deadline: Duration, what: &str) -> Result<Vec<u8>> {
        let mut rx = self.rx.lock().await;
        let got = tokio::time::timeout(deadline, wire::read_expected_frame(&mut *rx, len))
            .await
            .map_err(|_| {
                self.err(format!(
                    "watchdog: {what} received nothing within {deadline:.1?}: the peer is alive \
                     but stalled (cluster.collective_timeout_secs)"
                ))
            })?
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err("closed the connection"))?;
        if got.len() != len {
            return Err(self.err(format!("sent {} bytes, expected {len}", got.len())));
        }
        Ok(got)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Peer {
            peer: self.name.clone(),
            msg: e.to_string(),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        tracing::debug!("link to {} closed", self.name);
    }
}

fn peer_name(p: &PeerInfo) -> String {
    format!("worker rank {} ({})", p.rank, p.host)
}

/// Open the links from `me` to every rank in `needed`: dial the higher ranks, accept the lower
/// ones (refusing and logging anything without the token), within `deadline`.
pub async fn connect_mesh(
    endpoint: &quinn::Endpoint,
    me: u32,
    token: &str,
    peers: &[PeerInfo],
    needed: &BTreeSet<u32>,
    timeouts: Timeouts,
    deadline: Duration,
) -> Result<BTreeMap<u32, Arc<Link>>> {
    let mut links = dial_higher(endpoint, me, token, peers, needed, timeouts).await?;
    links.extend(accept_lower(endpoint, me, token, peers, needed, deadline).await?);
    Ok(links)
}

/// The coordinator's entry for rank `r`: without one there is no address to dial or name to give.
fn peer_info(peers: &[PeerInfo], r: u32) -> Result<&PeerInfo> {
    peers
        .iter()
        .find(|p| p.rank == r)
        .ok_or_else(|| Error::Rendezvous(format!("the coordinator sent no address for rank {r}")))
}

/// Dial every needed rank above `me`, in rank order: the lower rank of a pair is the one that
/// dials.
async fn dial_higher(
    endpoint: &quinn::Endpoint,
    me: u32,
    token: &str,
    peers: &[PeerInfo],
    needed: &BTreeSet<u32>,
    timeouts: Timeouts,
) -> Result<BTreeMap<u32, Arc<Link>>> {
    let mut links = BTreeMap::new();
    for &r in needed.iter().filter(|&&r| r > me) {
        let p = peer_info(peers, r)?;
        links.insert(r, Arc::new(dial(endpoint, me, token, p, timeouts).await?));
    }
    Ok(links)
}

/// Connect to `p` (checking its certificate), open the pair's one stream and present the job
/// token as rank `me`, so that `p` can tell this worker from a stranger.
async fn dial(
    endpoint: &quinn::Endpoint,
    me: u32,
    token: &str,
    p: &PeerInfo,
    timeouts: Timeouts,
) -> Result<Link> {
    let addr = transport::resolve_addr(&p.data_addr)?;
    let conn = transport::connect(endpoint, addr, &p.fingerprint, timeouts)
        .await
        .map_err(|e| Error::Peer {
            peer: peer_name(p),
            msg: e.to_string(),
        })?;
    let (mut tx, rx) = conn.open_bi().await.map_err(|e| Error::Peer {
        peer: peer_name(p),
        msg: format!("opening a stream: {e}"),
    })?;
    let hello = Message::PeerHello {
        token: token.to_string(),
        rank: me,
    };
    wire::send(&mut tx, &hello).await?;
    tracing::debug!(
        "rank {me}: dialed {} at {} (connection {})",
        peer_name(p),
        conn.remote_address(),
        conn.stable_id()
    );
    Ok(Link::new(p, conn, tx, rx))
}

/// Seconds a data-plane connection has to present its hello: a stranger that connects and
/// stays silent is dropped after this, while the others are served meanwhile.
const PEER_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept connections until every needed rank below `me` has presented the token: handshakes
/// run concurrently, each bounded by `PEER_HELLO_TIMEOUT`; strangers, wrong tokens and
/// unexpected ranks are refused and logged, and `deadline` bounds the whole wait.
async fn accept_lower(
    endpoint: &quinn::Endpoint,
    me: u32,
    token: &str,
    peers: &[PeerInfo],
    needed: &BTreeSet<u32>,
    deadline: Duration,
) -> Result<BTreeMap<u32, Arc<Link>>> {
    let mut links = BTreeMap::new();
    let mut waiting: BTreeSet<u32> = needed.iter().copied().filter(|&r| r < me).collect();
    let until = Instant::now() + deadline;
    let mut handshakes = tokio::task::JoinSet::new();
    while !waiting.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        tokio::select! {
            incoming = tokio::time::timeout(left, endpoint.accept()) => {
                let incoming = incoming
                    .map_err(|_| {
                        Error::Rendezvous(format!(
                            "worker rank {me}: ranks {waiting:?} did not connect within {deadline:?}"
                        ))
                    })?
                    .ok_or_else(|| Error::Rendezvous("data endpoint closed".into()))?;
                let from = incoming.remote_address();
                let token = token.to_string();
                handshakes.spawn(async move {
                    let hello = tokio::time::timeout(
                        PEER_HELLO_TIMEOUT,
                        receive_hello(incoming, &token),
                    );
                    (from, hello.await)
                });
            }
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                let Ok((from, hello)) = done else { continue };
                match hello {
                    Ok(Ok((conn, tx, rx, rank))) if waiting.remove(&rank) => {
                        let p = peer_info(peers, rank)?;
                        tracing::debug!(
                            "rank {me}: accepted {} from {} (connection {})",
                            peer_name(p),
                            conn.remote_address(),
                            conn.stable_id()
                        );
                        links.insert(rank, Arc::new(Link::new(p, conn, tx, rx)));
                    }
                    Ok(Ok((conn, _, _, rank))) => {
                        tracing::warn!(
                            "refused a data connection from {from}: rank {rank} is not expected here"
                        );
                        conn.close(1u32.into(), b"unexpected rank");
                    }
                    Ok(Err(why)) => {
                        tracing::warn!("refused a data connection from {from}: {}", wire::printable(&why, 256))
                    }
                    Err(_) => tracing::warn!(
                        "dropped a data connection from {from}: no hello within {PEER_HELLO_TIMEOUT:?}"
                    ),
                }
            }
        }
    }
    handshakes.abort_all();
    Ok(links)
}

/// An accepted connection with its stream and the rank its hello claims.
type Greeted = (quinn::Connection, quinn::SendStream, quinn::RecvStream, u32);

/// The accepting side of the hello: finish the handshake, take the dialer's stream and admit it
/// only if its first message is a hello with the job token; the error says why it was refused.
async fn receive_hello(incoming: quinn::Incoming, token: &str) -> Result<Greeted, String> {
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    match wire::recv_hello(&mut rx).await.map_err(|e| e.to_string())? {
        Some(Message::PeerHello { token: t, rank }) if token_matches(&t, token) => {
            Ok((conn, tx, rx, rank))
        }
        Some(Message::PeerHello { .. }) => Err("wrong job token".to_string()),
        _ => Err("no peer hello".to_string()),
    }
}

/// Time spent in all-reduces, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommTime {
    pub allreduce_seconds: f64,
    pub allreduce_calls: u64,
}

/// A group over QUIC links: member i is world rank `members[i]`.
pub struct QuicGroup {
    me: usize,
    /// Link per member (None for this worker).
    links: Vec<Option<Arc<Link>>>,
    rt: tokio::runtime::Handle,
    /// "pipeline" or "replica group", for the watchdog's errors.
    label: &'static str,
    watchdog: Watchdog,
    /// Operations issued so far, to say which one stalled.
    ops: u64,
    pub time: CommTime,
    /// All-reduces up to this many bytes per member use one all-to-all round, larger ones the
    /// ring.
    pub direct_bytes: usize,
}

impl QuicGroup {
    /// `members` are world ranks in group order; `links` must hold every other member.
    pub fn new(
        me_world: u32,
        members: &[u32],
        links: &BTreeMap<u32, Arc<Link>>,
        rt: tokio::runtime::Handle,
        (label, watchdog): (&'static str, Watchdog),
    ) -> Result<Self> {
        let me = members.iter().position(|&r| r == me_world).ok_or_else(|| {
            Error::Collective(format!("rank {me_world} is not in group {members:?}"))
        })?;
        let links = members
            .iter()
            .map(|&r| {
                if r == me_world {
                    Ok(None)
                } else {
                    links.get(&r).cloned().map(Some).ok_or_else(|| {
                        Error::Collective(format!("no link from rank {me_world} to rank {r}"))
                    })
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            me,
            links,
            rt,
            label,
            watchdog,
            ops: 0,
            time: CommTime::default(),
            direct_bytes: DIRECT_BYTES,
        })
    }

    /// Count a new operation and name it ("all-reduce #12 in the replica group").
    fn next_op(&mut self, op: &str) -> String {
        self.ops += 1;
        format!("{op} #{} in the {}", self.ops, self.label)
    }

    fn link(&self, member: usize) -> Result<Arc<Link>> {
        self.links
            .get(member)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::Collective(format!("no link to group member {member}")))
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
        .map_err(|e| Error::Collective(format!("tensor to host: {e}")))
}

fn write_back(t: &mut Tensor, v: &[f32]) {
    let src = Tensor::from_slice(v)
        .view(t.size().as_slice())
        .to_device(t.device());
    tch::no_grad(|| t.copy_(&src));
}

/// Chunk c of a buffer of `len` split into `parts` near-equal pieces.
fn chunk(len: usize, parts: usize, c: usize) -> std::ops::Range<usize> {
    (c * len / parts)..((c + 1) * len / parts)
}

/// Largest all-reduce (bytes sent per member) done as one all-to-all round instead of a ring.
const DIRECT_BYTES: usize = 4 << 20;

impl QuicGroup {
    /// Send `buf` to every other member and receive theirs, concurrently; returns every
    /// member's buffer in member order (this member's own included).
    fn exchange(&self, buf: &[f32], what: &str) -> Result<Vec<Vec<f32>>> {
        let bytes = Arc::new(to_bytes(buf));
        let len = buf.len() * 4;
        let deadline = self.watchdog.deadline(len * (self.size() - 1));
        let got = self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (m, link) in self.links.iter().enumerate() {
                let Some(link) = link else { continue };
                let (l, b, w) = (link.clone(), bytes.clone(), what.to_string());
                set.spawn(async move { l.send(&b, deadline, &w).await.map(|()| None) });
                let (l, w) = (link.clone(), what.to_string());
                set.spawn(async move { l.recv(len, deadline, &w).await.map(|v| Some((m, v))) });
            }
            let mut got = Vec::new();
            while let Some(done) = set.join_next().await {
                let r = done.map_err(|e| Error::Collective(format!("exchange task: {e}")))?;
                if let Some(x) = r? {
                    got.push(x);
                }
            }
            Ok::<_, Error>(got)
        })?;
        let mut all: Vec<Vec<f32>> = vec![Vec::new(); self.size()];
        all[self.me] = buf.to_vec();
        for (m, v) in got {
            all[m] = from_bytes(&v);
        }
        Ok(all)
    }
}

impl Collective for QuicGroup {
    fn rank(&self) -> usize {
        self.me
    }
    fn size(&self) -> usize {
        self.links.len()
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn allreduce_time(&self) -> (f64, u64) {
        (self.time.allreduce_seconds, self.time.allreduce_calls)
    }

    /// Small buffers (the usual M/U gradients: latency, not bandwidth, is the cost) go in one
    /// round: every member sends its buffer to every other and adds all of them in member
    /// order. Large ones take the ring: n−1 reduce-scatter steps, then n−1 all-gather steps,
    /// each sending one chunk to the next member while receiving one from the previous. Either
    /// way every member ends with bit-identical sums.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        let what = self.next_op("all-reduce");
        stall_if_injected("all-reduce");
        let clock = Instant::now();
        let mut buf = host_f32(t)?;
        let len = buf.len();
        if len * 4 * (n - 1) <= self.direct_bytes {
            let all = self.exchange(&buf, &what)?;
            buf.iter_mut().enumerate().for_each(|(i, x)| {
                *x = all.iter().map(|b| b[i]).fold(0.0, |acc, v| acc + v);
            });
            write_back(t, &buf);
            self.time.allreduce_seconds += clock.elapsed().as_secs_f64();
            self.time.allreduce_calls += 1;
            return Ok(());
        }
        let next = self.link((self.me + 1) % n)?;
        let prev = self.link((self.me + n - 1) % n)?;
        for step in 0..n - 1 {
            let send_c = chunk(len, n, (self.me + n - step) % n);
            let recv_c = chunk(len, n, (self.me + 2 * n - step - 1) % n);
            let out = to_bytes(&buf[send_c]);
            let deadline = self.watchdog.deadline(out.len());
            let (sent, got) = self.rt.block_on(async {
                tokio::join!(
                    next.send(&out, deadline, &what),
                    prev.recv(recv_c.len() * 4, deadline, &what)
                )
            });
            sent?;
            for (x, y) in buf[recv_c].iter_mut().zip(from_bytes(&got?)) {
                *x += y;
            }
        }
        for step in 0..n - 1 {
            let send_c = chunk(len, n, (self.me + 1 + n - step) % n);
            let recv_c = chunk(len, n, (self.me + n - step) % n);
            let out = to_bytes(&buf[send_c]);
            let deadline = self.watchdog.deadline(out.len());
            let (sent, got) = self.rt.block_on(async {
                tokio::join!(
                    next.send(&out, deadline, &what),
                    prev.recv(recv_c.len() * 4, deadline, &what)
                )
            });
            sent?;
            buf[recv_c].copy_from_slice(&from_bytes(&got?));
        }
        write_back(t, &buf);
        self.time.allreduce_seconds += clock.elapsed().as_secs_f64();
        self.time.allreduce_calls += 1;
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let what = self.next_op("broadcast");
        let deadline = self.watchdog.deadline(t.numel() * 4);
        if self.me == root {
            let bytes = to_bytes(&host_f32(t)?);
            for m in (0..self.size()).filter(|&m| m != root) {
                let link = self.link(m)?;
                self.rt.block_on(link.send(&bytes, deadline, &what))?;
            }
            Ok(())
        } else {
            let link = self.link(root)?;
            let got = self
                .rt
                .block_on(link.recv(t.numel() * 4, deadline, &what))?;
            write_back(t, &from_bytes(&got));
            Ok(())
        }
    }

    fn send(&mut self, t: &Tensor, peer: usize) -> Result<()> {
        let what = self.next_op("send");
        let link = self.link(peer)?;
        let bytes = to_bytes(&host_f32(t)?);
        let deadline = self.watchdog.deadline(bytes.len());
        self.rt.block_on(link.send(&bytes, deadline, &what))
    }

    fn recv(&mut self, t: &mut Tensor, peer: usize) -> Result<()> {
        let what = self.next_op("receive");
        let link = self.link(peer)?;
        let len = t.numel() * 4;
        let got = self
            .rt
            .block_on(link.recv(len, self.watchdog.deadline(len), &what))?;
        write_back(t, &from_bytes(&got));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsmerge_common::transport::Identity;

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(5),
        keep_alive: Duration::from_millis(500),
    };

    const TOKEN: &str = "t0k3n";

    /// Data endpoints on localhost, their identities, and the peer list the coordinator would
    /// send for them.
    struct Mesh {
        ids: Vec<Identity>,
        eps: Vec<quinn::Endpoint>,
        peers: Vec<PeerInfo>,
    }

    fn mesh(rt: &tokio::runtime::Runtime, n: usize) -> Mesh {
        let ids: Vec<Identity> = (0..n).map(|_| Identity::generate().unwrap()).collect();
        let eps: Vec<quinn::Endpoint> = ids
            .iter()
            .map(|id| {
                rt.block_on(async {
                    transport::server("127.0.0.1:0".parse().unwrap(), id, T).unwrap()
                })
            })
            .collect();
        let peers: Vec<PeerInfo> = (0..n)
            .map(|r| PeerInfo {
                rank: r as u32,
                host: "localhost".into(),
                data_addr: eps[r].local_addr().unwrap().to_string(),
                fingerprint: ids[r].fingerprint.clone(),
            })
            .collect();
        Mesh { ids, eps, peers }
    }

    /// Worker `me` of three: links up, all-reduces (me + 1) * [1..=7], rank 0 sends [42, -1] to
    /// rank 1 (which checks it); returns the all-reduced values. It keeps its links until every
    /// worker is `done`: dropping a connection discards data still in flight (a worker keeps its
    /// links until the coordinator's shutdown).
    fn worker(
        me: u32,
        ep: &quinn::Endpoint,
        peers: &[PeerInfo],
        handle: tokio::runtime::Handle,
        done: &std::sync::Barrier,
    ) -> Vec<f32> {
        if me < 2 {
            // Let the strangers reach rank 2 first.
            std::thread::sleep(Duration::from_millis(1500));
        }
        let needed: BTreeSet<u32> = (0..3).filter(|&r| r != me).collect();
        let links = handle
            .block_on(connect_mesh(
                ep,
                me,
                TOKEN,
                peers,
                &needed,
                T,
                Duration::from_secs(20),
            ))
            .unwrap();
        let dog = ("test group", Watchdog::new(20.0));
        let mut g = QuicGroup::new(me, &[0, 1, 2], &links, handle, dog).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32, 2., 3., 4., 5., 6., 7.]) * (me + 1) as f64;
        g.all_reduce_sum(&mut t).unwrap();
        let got = Vec::<f32>::try_from(&t).unwrap();
        if me == 0 {
            g.send(&Tensor::from_slice(&[42.0f32, -1.0]), 1).unwrap();
        }
        if me == 1 {
            let mut r = Tensor::zeros([2], (Kind::Float, Device::Cpu));
            g.recv(&mut r, 0).unwrap();
            assert_eq!(Vec::<f32>::try_from(&r).unwrap(), vec![42.0, -1.0]);
        }
        g.barrier().unwrap();
        done.wait();
        got
    }

    /// Strangers on `target`'s data endpoint: one connects and stays silent (returned, so it
    /// stays open), one sends garbage bytes, one a hello with a wrong token, each framed as the
    /// wire module frames them.
    async fn strangers_knock(target: std::net::SocketAddr, fp: String) -> quinn::Connection {
        let ep = transport::client().unwrap();
        let silent = transport::connect(&ep, target, &fp, T).await.unwrap();
        for payload in [
            b"garbage!".to_vec(),
            wire::encode(&Message::PeerHello {
                token: "wrong".into(),
                rank: 0,
            })
            .map(|p| {
                let mut f = (p.len() as u32).to_le_bytes().to_vec();
                f.extend(p);
                f
            })
            .unwrap(),
        ] {
            let conn = transport::connect(&ep, target, &fp, T).await.unwrap();
            let (mut tx, _rx) = conn.open_bi().await.unwrap();
            tx.write_all(&payload).await.unwrap();
            let _ = tx.finish();
            let _ = conn.closed().await;
        }
        silent
    }

    /// Three workers link up while a silent connection, garbage and a wrong token knock on
    /// rank 2's door (the silent one does not hold the others up: handshakes run side by side);
    /// then the ring all-reduce sums exactly and point-to-point delivers.
    #[test]
    fn mesh_refuses_strangers_and_the_ring_sums() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let m = mesh(&rt, 3);
        let done = Arc::new(std::sync::Barrier::new(3));
        let handles: Vec<_> = (0..3u32)
            .map(|me| {
                let done = done.clone();
                let ep = m.eps[me as usize].clone();
                let peers = m.peers.clone();
                let handle = rt.handle().clone();
                std::thread::spawn(move || worker(me, &ep, &peers, handle, &done))
            })
            .collect();
        // Strangers first: garbage bytes and a wrong token, on rank 2's data endpoint.
        let target = m.eps[2].local_addr().unwrap();
        let strangers = rt.spawn(strangers_knock(target, m.ids[2].fingerprint.clone()));
        let started = Instant::now();
        for h in handles {
            let got = h.join().unwrap();
            assert_eq!(got, vec![6.0, 12., 18., 24., 30., 36., 42.]);
        }
        assert!(
            started.elapsed() < PEER_HELLO_TIMEOUT,
            "a silent stranger held the mesh up for {:?}",
            started.elapsed()
        );
        let silent = rt.block_on(strangers).unwrap();
        drop(silent);
    }
}
