//! The control-plane protocol between the coordinator and its workers, and the framing shared
//! with the worker-to-worker data plane.
//!
//! A frame is `[u32 LE length][payload]`. A control message's payload is `[u16 LE protocol
//! version][bincode 2 body]`; the version is read first, so a peer speaking another version gets
//! an error naming both versions instead of a garbled decode. Lengths are checked against a limit
//! before anything is allocated, so an oversized or hostile length cannot exhaust memory.

use crate::metrics::{Evaluation, LogRow, WorkerStats};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped whenever a message changes shape.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest control message accepted. Folded tensors travel one per message, so this bounds a
/// single tensor (64 M floats), not a model.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// ALPN of fsmerge's QUIC connections.
pub const ALPN: &[u8] = b"fsmerge/1";

/// Worker → coordinator, the first message on a control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The job token; a worker without it is refused.
    pub token: String,
    /// Rank and world size the worker resolved for itself (CLI, torchrun, Slurm), if any.
    pub rank: Option<u32>,
    pub world: Option<u32>,
    pub host: String,
    pub pid: u32,
    /// Where the worker accepts data-plane connections from its peers, and its certificate.
    pub data_addr: String,
    pub data_fingerprint: String,
}

/// How to reach one worker's data plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub rank: u32,
    pub host: String,
    pub data_addr: String,
    pub fingerprint: String,
}

/// Coordinator → worker once every worker has registered: the worker's part of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub rank: u32,
    pub world: u32,
    pub stage: u32,
    pub replica: u32,
    /// The validated job config (JSON of `JobConfig`), with absolute paths.
    pub job_json: String,
    /// The plan (JSON of `Plan`).
    pub plan_json: String,
    /// Directory of the original models and the job's work directory (features, checkpoints).
    pub models_dir: String,
    pub work_dir: String,
    pub peers: Vec<PeerInfo>,
    /// Phases (`local`, `global`) already checkpointed for this worker's stage: restored, not
    /// retrained.
    pub done_phases: Vec<String>,
    /// Phases that continue from a mid-phase checkpoint, with the step (the same for every
    /// stage of the phase).
    pub resume_steps: Vec<(String, u64)>,
    /// Teacher features of every stage are cached in the work directory.
    pub features_cached: bool,
    /// `quic` or `nccl`.
    pub backend: String,
    /// libtorch intra-op threads of the worker.
    pub threads: u32,
}

/// Every message of the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    /// The coordinator refuses a worker (bad token, rank taken, version, job full).
    Refused {
        reason: String,
    },
    Assign(Box<Assignment>),
    /// Worker → coordinator every heartbeat interval: alive, and where it is.
    Heartbeat {
        phase: String,
        step: u64,
        total: u64,
    },
    /// A stage finished (or restored) a training phase; replica 0 sends its log rows.
    PhaseDone {
        stage: u32,
        phase: String,
        seconds: f64,
        restored: bool,
        log: Vec<LogRow>,
    },
    /// An NCCL unique id of a communicator group, created by the group's first rank; the
    /// coordinator relays it to every worker.
    NcclId {
        group: u32,
        id: Vec<u8>,
    },
    /// One folded tensor of a stage (replica 0 of each stage sends them), for assembly.
    Folded {
        stage: u32,
        tensor: NamedTensor,
    },
    /// The stage sent all `count` of its folded tensors.
    FoldedDone {
        stage: u32,
        count: u32,
    },
    /// A model evaluated on the workers (the last stage of replica 0 sends it).
    Evaluated(Box<Evaluation>),
    Stats(WorkerStats),
    /// The worker failed; the coordinator fails the job with this message.
    Failed {
        phase: String,
        msg: String,
    },
    /// Coordinator → workers: stop now (another worker failed).
    Abort {
        reason: String,
    },
    /// Coordinator → workers: the job is complete, exit.
    Shutdown,
    /// Worker → worker, first message on a data-plane connection.
    PeerHello {
        token: String,
        rank: u32,
    },
}

/// A named f32 tensor on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: Vec<f32>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Decoding an unauthenticated hello may claim (allocate) at most this much.
fn hello_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_HELLO_BYTES>()
}

/// Encode a message as a payload (version + body), without the length prefix.
pub fn encode(msg: &Message) -> Result<Vec<u8>> {
    let mut out = PROTOCOL_VERSION.to_le_bytes().to_vec();
    let body = bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| Error::Protocol(format!("encoding a message: {e}")))?;
    out.extend_from_slice(&body);
    if out.len() > MAX_MESSAGE_BYTES {
        return Err(Error::Protocol(format!(
            "message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
            out.len()
        )));
    }
    Ok(out)
}

/// Decode a payload. Wrong version, malformed body and trailing bytes are errors, never panics.
pub fn decode(payload: &[u8]) -> Result<Message> {
    decode_with(payload, bincode_config())
}

fn decode_with(payload: &[u8], config: impl bincode::config::Config) -> Result<Message> {
    if payload.len() < 2 {
        return Err(Error::Protocol(format!(
            "message of {} bytes is too short for its version",
            payload.len()
        )));
    }
    let version = u16::from_le_bytes([payload[0], payload[1]]);
    if version != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "peer speaks protocol version {version}, this fsmerge speaks {PROTOCOL_VERSION}"
        )));
    }
    let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(&payload[2..], config)
        .map_err(|e| Error::Protocol(format!("malformed message: {e}")))?;
    if used != payload.len() - 2 {
        return Err(Error::Protocol(format!(
            "{} trailing bytes after a message",
            payload.len() - 2 - used
        )));
    }
    Ok(msg)
}

/// Write one length-prefixed frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| Error::Protocol(format!("frame of {} bytes", payload.len())))?;
    w.write_all(&len.to_le_bytes()).await.map_err(io_err)?;
    w.write_all(payload).await.map_err(io_err)?;
    Ok(())
}

/// Read one length-prefixed frame of at most `max` bytes; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>> {
    read_frame_with(r, max, 1 << 20).await
}

/// `read_frame` of a frame whose size the reader chose (a data-plane transfer of `len`
/// bytes): its buffer is allocated at once.
pub async fn read_expected_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<Option<Vec<u8>>> {
    read_frame_with(r, len, len).await
}

/// `read_frame`, allocating at most `prealloc` bytes before the data arrives.
async fn read_frame_with<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    prealloc: usize,
) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await.map_err(io_err)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(Error::Protocol("stream ended inside a frame length".into()))
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(Error::Protocol(format!(
            "frame of {len} bytes exceeds the limit of {max}"
        )));
    }
    // The buffer grows with the data that arrives: a length claimed by a peer that then sends
    // nothing costs no memory.
    let mut buf = Vec::with_capacity(len.min(prealloc));
    let got = r
        .take(len as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| Error::Protocol(format!("reading a frame of {len} bytes: {e}")))?;
    if got != len {
        return Err(Error::Protocol(format!(
            "stream ended inside a frame of {len} bytes (after {got})"
        )));
    }
    Ok(Some(buf))
}

/// Largest first message of a connection (`Hello`, `PeerHello`): read before the sender is
/// authenticated, so an unauthenticated peer can make us buffer and decode only this much.
pub const MAX_HELLO_BYTES: usize = 64 << 10;

/// Receive the first message of a connection, of at most `MAX_HELLO_BYTES`.
pub async fn recv_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>> {
    match read_frame(r, MAX_HELLO_BYTES).await? {
        None => Ok(None),
        Some(payload) => decode_with(&payload, hello_config()).map(Some),
    }
}

impl Message {
    /// The message's kind, for logs about a peer that is not trusted (never its content).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Refused { .. } => "refused",
            Message::Assign(_) => "assign",
            Message::Heartbeat { .. } => "heartbeat",
            Message::PhaseDone { .. } => "phase-done",
            Message::NcclId { .. } => "nccl-id",
            Message::Folded { .. } => "folded",
            Message::FoldedDone { .. } => "folded-done",
            Message::Evaluated(_) => "evaluated",
            Message::Stats(_) => "stats",
            Message::Failed { .. } => "failed",
            Message::Abort { .. } => "abort",
            Message::Shutdown => "shutdown",
            Message::PeerHello { .. } => "peer-hello",
        }
    }
}

/// Send one control message.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<()> {
    write_frame(w, &encode(msg)?).await
}

/// Receive one control message; `Ok(None)` when the peer closed the stream cleanly.
pub async fn recv<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>> {
    match read_frame(r, MAX_MESSAGE_BYTES).await? {
        None => Ok(None),
        Some(payload) => decode(&payload).map(Some),
    }
}

fn io_err(e: std::io::Error) -> Error {
    // quinn puts the reason (timed out, closed by the peer, reset…) in the error's source.
    let mut msg = e.to_string();
    let mut cause = e.get_ref().and_then(|inner| inner.source());
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    Error::Protocol(format!("connection: {msg}"))
}

/// A peer-supplied string made safe to log: control characters (a newline would forge a log
/// line) escaped, at most `max` characters kept.
pub fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn printable_escapes_control_characters_and_caps_length() {
        assert_eq!(printable("node1", 255), "node1");
        assert_eq!(printable("a\nINFO forged", 255), "a\\nINFO forged");
        assert_eq!(printable("\u{1b}[31m", 255), "\\u{1b}[31m");
        assert_eq!(printable(&"x".repeat(10), 4), "xxxx…");
    }

    fn sample() -> Message {
        Message::Folded {
            stage: 1,
            tensor: NamedTensor {
                name: "body.1.weight".into(),
                shape: vec![2, 2],
                data: vec![1.0, -2.0, 3.5, 0.0],
            },
        }
    }

    #[test]
    fn roundtrip() {
        let m = sample();
        assert_eq!(decode(&encode(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn wrong_version_is_named() {
        let mut p = encode(&Message::Shutdown).unwrap();
        p[0] = 9;
        let e = decode(&p).unwrap_err().to_string();
        assert!(
            e.contains("version 9") && e.contains(&format!("speaks {PROTOCOL_VERSION}")),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_trailing_are_errors() {
        let p = encode(&sample()).unwrap();
        for cut in 0..p.len() {
            assert!(decode(&p[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        let mut long = p.clone();
        long.push(0);
        assert!(decode(&long).unwrap_err().to_string().contains("trailing"));
    }

    #[tokio::test]
    async fn frames_enforce_the_limit_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = a.write_all(&u32::MAX.to_le_bytes()).await;
        });
        let e = read_frame(&mut b, 1024).await.unwrap_err().to_string();
        assert!(e.contains("exceeds the limit"), "{e}");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_and_clean_end_is_none() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_le_bytes()).await.unwrap();
        a.write_all(&[1, 2, 3]).await.unwrap();
        drop(a);
        assert!(read_frame(&mut b, 1024).await.is_err());
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_frame(&mut b, 1024).await.unwrap().is_none());
    }

    /// Inputs the fuzz test runs; the closing note reports this figure.
    const FUZZ_CASES: u32 = 20_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(FUZZ_CASES))]
        /// Arbitrary bytes (with a valid version, so the body decoder is exercised) never panic.
        #[test]
        fn decoder_survives_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
            p.extend_from_slice(&body);
            let _ = decode(&p);
        }

        /// Valid messages with bytes flipped or cut never panic.
        #[test]
        fn decoder_survives_mutations(pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut p = encode(&sample()).unwrap();
            let i = pos.index(p.len());
            p[i] = byte;
            let c = cut.index(p.len() + 1);
            let _ = decode(&p[..c]);
        }
    }
}
