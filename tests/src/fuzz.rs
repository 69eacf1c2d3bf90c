//! A mutation fuzzer for the readers of untrusted input (no nightly toolchain here, so no
//! cargo-fuzz): valid seed inputs are mutated at the byte level (bit flips, interesting
//! integers, cuts, splices) and, for text, at the token level (numbers swapped for extremes,
//! structure characters, duplicated lines), then fed to the real reader. An error is the
//! expected answer; a panic is a bug. Inputs a reader accepts join a small pool that later
//! inputs are mutated from, so mutations reach past the first checks.
//!
//! Targets: `wire` (control messages: payload decoding, framed hello and message streams),
//! `safetensors` (headers and tensor reads), `hf-index` (a sharded model's index against a real
//! folder), `hf-config` (a ViT's `config.json` checked against its weights, as the coordinator
//! does before any work; BERT's parser too) and `toml` (the job config with `--set` overrides).

use fsmerge_common::config::{Arch, JobConfig};
use fsmerge_common::hf::{BertConfig, VitConfig, WeightFiles};
use fsmerge_common::{checkpoint, wire};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const TARGETS: [&str; 5] = ["wire", "safetensors", "hf-index", "hf-config", "toml"];

/// What one run of a target found.
pub struct Report {
    pub target: &'static str,
    pub inputs: u64,
    /// Inputs the reader accepted (the rest were errors).
    pub accepted: u64,
    /// Each panic's message with the input that caused it.
    pub panics: Vec<(String, Vec<u8>)>,
    pub slowest: Duration,
    pub seconds: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<12} {:>9} inputs, {:>8} accepted, {} panics, slowest {:.1?}, {:.0} inputs/s",
            self.target,
            self.inputs,
            self.accepted,
            self.panics.len(),
            self.slowest,
            self.inputs as f64 / self.seconds.max(1e-9)
        )
    }
}

/// One reader under test.
trait Target {
    /// Valid inputs to start from.
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Text inputs get token-level mutations too.
    fn is_text(&self) -> bool;
    /// Feed one input; true when the reader accepted it.
    fn feed(&mut self, input: &[u8]) -> bool;
}

/// xorshift64*: deterministic for a seed, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const INTERESTING_INTS: [u64; 16] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
    64 << 10,
    256 << 20,
    4096,
];

const STRUCTURE: &[u8] = b"{}[]\",:=\n\\.-+ 0'#";

const INTERESTING_TOKENS: [&str; 24] = [
    "0",
    "-1",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "1e999",
    "18446744073709551616",
    "4294967296",
    "9223372036854775807",
    "\"\"",
    "null",
    "[]",
    "{}",
    "true",
    "\"../../x\"",
    "\"/etc/passwd\"",
    "\"a\\u0000b\"",
    "1e-320",
    "0.5",
    "[1, 2]",
    "99999999999999999999999999",
    "\"\\n\"",
    "{ a = 1 }",
];

/// Apply 1–6 random mutations to `input`; `others` are splice donors.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, others: &[Vec<u8>], text: bool) {
    for _ in 0..1 + rng.below(6) {
        let len = input.len();
        let at = rng.below(len + 1);
        let op = rng.below(if text { 12 } else { 9 });
        match op {
            0 if len > 0 => input[at.min(len - 1)] ^= 1 << rng.below(8),
            1 if len > 0 => input[at.min(len - 1)] = rng.next() as u8,
            2 => input.insert(at, *rng.pick(STRUCTURE)),
            3 => {
                let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let end = (at + 1 + rng.below(32)).min(len);
                input.drain(at.min(len - 1)..end);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let copy = input[start..end].to_vec();
                input.splice(at..at, copy);
            }
            6 => {
                let v = *rng.pick(&INTERESTING_INTS);
                let width = *rng.pick(&[1usize, 2, 4, 8]);
                let bytes = &v.to_le_bytes()[..width];
                let end = (at + width).min(len);
                input.splice(at..end, bytes.iter().copied());
            }
            7 => input.truncate(at),
            8 if !others.is_empty() => {
                let donor = rng.pick(others);
                if !donor.is_empty() {
                    let start = rng.below(donor.len());
                    let end = (start + 1 + rng.below(64)).min(donor.len());
                    input.splice(at..at, donor[start..end].iter().copied());
                }
            }
            9 => replace_token(rng, input, at),
            10 => {
                let token = rng.pick(&INTERESTING_TOKENS).as_bytes();
                input.splice(at..at, token.iter().copied());
            }
            11 => duplicate_line(rng, input),
            _ => {}
        }
    }
}

/// Replace the number or word around `at` with an interesting token.
fn replace_token(rng: &mut Rng, input: &mut Vec<u8>, at: usize) {
    let word = |b: u8| b.is_ascii_alphanumeric() || b"._-+".contains(&b);
    let mut start = at.min(input.len());
    while start > 0 && word(input[start - 1]) {
        start -= 1;
    }
    let mut end = at.min(input.len());
    while end < input.len() && word(input[end]) {
        end += 1;
    }
    let token = rng.pick(&INTERESTING_TOKENS).as_bytes();
    input.splice(start..end, token.iter().copied());
}

/// Copy one line of the input after another one (repeated keys, tables, tensors).
fn duplicate_line(rng: &mut Rng, input: &mut Vec<u8>) {
    let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if lines.is_empty() {
        return;
    }
    let line = rng.pick(&lines).to_vec();
    let at = rng.below(lines.len());
    let mut out = Vec::with_capacity(input.len() + line.len() + 1);
    for (i, l) in lines.iter().enumerate() {
        out.extend_from_slice(l);
        out.push(b'\n');
        if i == at {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }
    *input = out;
}

/// Run `target` on `n` inputs from `seed`; `scratch` is a folder the file-based targets may
/// write in.
pub fn run(target: &str, n: u64, seed: u64, scratch: &Path) -> Result<Report, String> {
    let mut t: Box<dyn Target> = match target {
        "wire" => Box::new(Wire::new()?),
        "safetensors" => Box::new(Safetensors::new(scratch)?),
        "hf-index" => Box::new(HfIndex::new(scratch)?),
        "hf-config" => Box::new(HfConfig::new(scratch)?),
        "toml" => Box::new(Toml::new()?),
        other => return Err(format!("no fuzz target `{other}` (targets: {TARGETS:?})")),
    };
    let name = TARGETS
        .iter()
        .find(|&&x| x == target)
        .copied()
        .unwrap_or("?");
    let seeds = t.seeds();
    if seeds.is_empty() {
        return Err(format!("{target}: no seeds"));
    }
    let text = t.is_text();
    let mut rng = Rng::new(seed);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut report = Report {
        target: name,
        inputs: 0,
        accepted: 0,
        panics: Vec::new(),
        slowest: Duration::ZERO,
        seconds: 0.0,
    };
    let quiet = QuietPanics::install();
    let clock = Instant::now();
    for i in 0..n {
        let base = if pool.is_empty() || rng.below(2) == 0 {
            rng.pick(&seeds)
        } else {
            rng.pick(&pool)
        };
        let mut input = base.clone();
        // Every seed also goes in unmutated once: the readers must accept them.
        if i >= seeds.len() as u64 {
            mutate(&mut rng, &mut input, &seeds, text);
        } else {
            input = seeds[i as usize].clone();
        }
        let started = Instant::now();
        let fed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.feed(&input)));
        report.slowest = report.slowest.max(started.elapsed());
        report.inputs += 1;
        match fed {
            Ok(true) => {
                report.accepted += 1;
                if pool.len() < 256 {
                    pool.push(input);
                } else {
                    let k = rng.below(pool.len());
                    pool[k] = input;
                }
            }
            Ok(false) if i < seeds.len() as u64 => {
                return Err(format!("{target}: seed {i} was refused"));
            }
            Ok(false) => {}
            Err(_) => report.panics.push((quiet.last_message(), input)),
        }
    }
    report.seconds = clock.elapsed().as_secs_f64();
    Ok(report)
}

/// Panics caught by the fuzzer are counted, not printed; the hook keeps the last message.
struct QuietPanics {
    last: std::sync::Arc<std::sync::Mutex<String>>,
}

impl QuietPanics {
    fn install() -> Self {
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let keep = last.clone();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut l) = keep.lock() {
                *l = info.to_string();
            }
        }));
        Self { last }
    }
    fn last_message(&self) -> String {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        let _ = std::panic::take_hook();
    }
}

/// Control messages: a payload decoded as a whole, and the same bytes read as a stream of
/// frames, first as an unauthenticated hello, then as messages.
struct Wire {
    rt: tokio::runtime::Runtime,
}

impl Wire {
    fn new() -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { rt })
    }
}

fn sample_messages() -> Vec<wire::Message> {
    use wire::*;
    let peer = PeerInfo {
        rank: 1,
        host: "node-2".into(),
        data_addr: "10.0.0.2:4000".into(),
        fingerprint: "ab".repeat(32),
    };
    vec![
        Message::Hello(Hello {
            token: "t".repeat(64),
            rank: Some(1),
            world: Some(2),
            host: "node-2".into(),
            pid: 4242,
            data_addr: "10.0.0.2:4000".into(),
            data_fingerprint: "ab".repeat(32),
        }),
        Message::Refused {
            reason: "wrong job token".into(),
        },
        Message::Assign(Box::new(Assignment {
            rank: 1,
            world: 2,
            stage: 1,
            replica: 0,
            job_json: "{\"name\":\"job\"}".into(),
            plan_json: "{\"stages\":[]}".into(),
            models_dir: "/m".into(),
            work_dir: "/w".into(),
            peers: vec![peer],
            done_phases: vec!["local".into()],
            resume_steps: vec![("global".into(), 500)],
            features_cached: true,
            backend: "quic".into(),
            threads: 4,
        })),
        Message::Heartbeat {
            phase: "global".into(),
            step: 12,
            total: 960,
        },
        Message::PhaseDone {
            stage: 0,
            phase: "local".into(),
            seconds: 1.5,
            restored: false,
            log: vec![fsmerge_common::metrics::LogRow {
                phase: "local".into(),
                step: 1,
                loss: 0.5,
                lr: 1e-3,
            }],
        },
        Message::NcclId {
            group: 2,
            id: vec![7; 128],
        },
        Message::Folded {
            stage: 1,
            tensor: NamedTensor {
                name: "vit.encoder.layer.0.output.dense.weight".into(),
                shape: vec![2, 3],
                data: vec![1.0, -2.0, 3.5, 0.0, 1e-9, 7.0],
            },
        },
        Message::FoldedDone {
            stage: 1,
            count: 40,
        },
        Message::Stats(Default::default()),
        Message::Failed {
            phase: "global step 3/960".into(),
            msg: "watchdog".into(),
        },
        Message::Abort {
            reason: "worker 1 failed".into(),
        },
        Message::Shutdown,
        Message::PeerHello {
            token: "t".repeat(64),
            rank: 3,
        },
    ]
}

impl Target for Wire {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        for m in sample_messages() {
            let Ok(payload) = wire::encode(&m) else {
                continue;
            };
            let mut framed = (payload.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(&payload);
            seeds.push(payload);
            seeds.push(framed);
        }
        seeds
    }
    fn is_text(&self) -> bool {
        false
    }
    fn feed(&mut self, input: &[u8]) -> bool {
        let whole = wire::decode(input).is_ok();
        let streamed = self.rt.block_on(async {
            let mut hello = input;
            let first = wire::recv_hello(&mut hello).await;
            let mut rest = input;
            let mut read = 0;
            while let Ok(Some(_)) = wire::recv(&mut rest).await {
                read += 1;
            }
            matches!(first, Ok(Some(_))) || read > 0
        });
        whole || streamed
    }
}

/// A small safetensors file of three tensors, written by fsmerge's own writer.
fn safetensors_seed(scratch: &Path) -> Result<Vec<u8>, String> {
    use checkpoint::HostTensor;
    let file = scratch.join("seed.safetensors");
    let tensors = [
        ("a.weight", vec![2, 3]),
        ("a.bias", vec![3]),
        ("b", vec![1, 1, 2]),
    ]
    .into_iter()
    .map(|(n, shape): (&str, Vec<usize>)| {
        let count = shape.iter().product::<usize>();
        let data = (0..count).map(|i| i as f32 * 0.5 - 1.0).collect();
        (n.to_string(), HostTensor::new(shape, data))
    })
    .collect();
    checkpoint::write_tensors(&file, &tensors).map_err(|e| e.to_string())?;
    std::fs::read(&file).map_err(|e| e.to_string())
}

/// Safetensors content: its header checked whole, then every tensor it names read.
struct Safetensors {
    seed: Vec<u8>,
    name: PathBuf,
}

impl Safetensors {
    fn new(scratch: &Path) -> Result<Self, String> {
        Ok(Self {
            seed: safetensors_seed(scratch)?,
            name: PathBuf::from("fuzz.safetensors"),
        })
    }
}

impl Target for Safetensors {
    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![self.seed.clone()]
    }
    fn is_text(&self) -> bool {
        false
    }
    fn feed(&mut self, input: &[u8]) -> bool {
        let Ok(shapes) = checkpoint::shapes_in(input, &self.name) else {
            return false;
        };
        let names: Vec<String> = shapes.into_keys().collect();
        checkpoint::tensors_in(input, &self.name, &names).is_ok()
    }
}

/// A sharded model's index, resolved against a real folder holding two valid shards (and a
/// subfolder), then every shard's header read.
struct HfIndex {
    dir: PathBuf,
}

impl HfIndex {
    fn new(scratch: &Path) -> Result<Self, String> {
        let dir = scratch.join("sharded");
        std::fs::create_dir_all(dir.join("sub")).map_err(|e| e.to_string())?;
        let seed = safetensors_seed(scratch)?;
        for shard in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            std::fs::write(dir.join(shard), &seed).map_err(|e| e.to_string())?;
        }
        Ok(Self { dir })
    }
}

impl Target for HfIndex {
    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![br#"{
  "metadata": {"total_size": 40},
  "weight_map": {
    "a.weight": "model-00001-of-00002.safetensors",
    "a.bias": "model-00001-of-00002.safetensors",
    "b": "model-00002-of-00002.safetensors"
  }
}"#
        .to_vec()]
    }
    fn is_text(&self) -> bool {
        true
    }
    fn feed(&mut self, input: &[u8]) -> bool {
        let text = String::from_utf8_lossy(input);
        let index = self.dir.join("model.safetensors.index.json");
        match WeightFiles::from_index(&self.dir, &index, &text) {
            Ok(files) => files.shapes().is_ok(),
            Err(_) => false,
        }
    }
}

/// A ViT's `config.json`, checked against its real weights by the family (as the coordinator
/// checks the originals before any work); every input also goes through BERT's parser.
struct HfConfig {
    job: JobConfig,
    models: PathBuf,
    config_file: PathBuf,
    seeds: Vec<Vec<u8>>,
}

impl HfConfig {
    fn new(scratch: &Path) -> Result<Self, String> {
        use fsmerge_worker::families::vit::model::Vit;
        let config = crate::root().join("configs/digits-vit.toml");
        let job = JobConfig::load(&config).map_err(|e| e.to_string())?;
        let models = scratch.join("models");
        let side = job.data.image_side();
        let cfg = VitConfig::for_images(&job.model.vit, side);
        for task in &job.tasks {
            let labels: Vec<String> = task.classes.iter().map(|c| c.to_string()).collect();
            Vit::init(cfg.clone(), labels.len())
                .save(&models.join(&task.name), &labels)
                .map_err(|e| e.to_string())?;
        }
        let config_file = models.join(&job.tasks[0].name).join("config.json");
        let vit = std::fs::read(&config_file).map_err(|e| e.to_string())?;
        let bert = serde_json::to_vec_pretty(&serde_json::json!({
            "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "vocab_size": 1000, "max_position_embeddings": 64,
            "type_vocab_size": 2
        }))
        .map_err(|e| e.to_string())?;
        Ok(Self {
            job,
            models,
            config_file,
            seeds: vec![vit, bert],
        })
    }
}

impl Target for HfConfig {
    fn seeds(&self) -> Vec<Vec<u8>> {
        self.seeds.clone()
    }
    fn is_text(&self) -> bool {
        true
    }
    fn feed(&mut self, input: &[u8]) -> bool {
        let text = String::from_utf8_lossy(input);
        let bert = BertConfig::parse(&text, &self.config_file).is_ok();
        if std::fs::write(&self.config_file, input).is_err() {
            return false;
        }
        let family = fsmerge_worker::family::family(Arch::Vit);
        let vit = family.check(&self.job, &self.models).is_ok()
            && family.unit_costs(&self.job, &self.models).is_ok();
        bert || vit
    }
}

/// The job config: every config shipped in `configs/`, with `--set` overrides drawn from the
/// input's last line.
struct Toml {
    seeds: Vec<Vec<u8>>,
    path: PathBuf,
}

impl Toml {
    fn new() -> Result<Self, String> {
        let dir = crate::root().join("configs");
        let mut seeds = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|x| x == "toml") {
                let mut text = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
                text.extend_from_slice(b"\n#set merge.epochs=3");
                seeds.push(text);
            }
        }
        seeds.sort();
        Ok(Self {
            seeds,
            path: PathBuf::from("fuzz.toml"),
        })
    }
}

impl Target for Toml {
    fn seeds(&self) -> Vec<Vec<u8>> {
        self.seeds.clone()
    }
    fn is_text(&self) -> bool {
        true
    }
    fn feed(&mut self, input: &[u8]) -> bool {
        let text = String::from_utf8_lossy(input);
        // `#set a=b;c=d` lines are the overrides (a comment to the TOML parser).
        let overrides: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#set "))
            .flat_map(|l| l.split(';'))
            .map(str::to_string)
            .collect();
        JobConfig::parse(&text, &self.path, &overrides).is_ok()
    }
}
