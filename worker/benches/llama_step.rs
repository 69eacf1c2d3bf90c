//! Benchmark: one global FS-Merge training step of the Llama SuperNet (batch 64 texts of 64
//! tokens, 4 query / 2 key-value heads, diagonal_and_low_rank rank 12, AdamW + OneCycle; n = 2
//! and n = 4 by default), fsmerge's literal branch form and its default (training through the
//! fold) against the literal n-branch SuperNet in PyTorch eager as the authors' code runs its
//! ViT/BERT SuperNets (bench/llama_reference_step.py), side by side in one run with the same
//! thread count.
//!
//! `cargo bench -p fsmerge-worker --bench llama_step` (after `source deploy/env.sh`).
//! Environment: FSMERGE_BENCH_THREADS (default 1), FSMERGE_BENCH_STEPS (default 20),
//! FSMERGE_BENCH_ROUNDS (alternating rounds, default 3), FSMERGE_BENCH_NS (default "2,4"),
//! FSMERGE_BENCH_WIDTH / _MLP / _LAYERS / _HEADS / _KV_HEADS / _TOKENS / _VOCAB (default: the
//! spam-names Llama, 64 / 128 / 4 / 4 / 2 / 64 / 30522), FSMERGE_PYTHON (default: python of the
//! active venv).

use fsmerge_common::config::{Init, LlamaShape, MuType, StepForm};
use fsmerge_worker::families::llama::merge::config_for_text;
use fsmerge_worker::families::llama::model::Llama;
use fsmerge_worker::families::llama::supernet::LlamaSuperNet;
use fsmerge_worker::train::optim::{AdamW, Schedule};
use std::time::Instant;
use tch::{Kind, Tensor};
use util::{env_usize, measuring, median, pytorch_step_ms};

mod util;

const BATCH: i64 = 64;
const RANK: usize = 12;
const WARMUP: usize = 5;

struct Shape {
    llama: LlamaShape,
    tokens: usize,
    vocab: usize,
}

impl Shape {
    fn from_env() -> Self {
        Self {
            llama: LlamaShape {
                width: env_usize("FSMERGE_BENCH_WIDTH", 64),
                mlp_dim: env_usize("FSMERGE_BENCH_MLP", 128),
                layers: env_usize("FSMERGE_BENCH_LAYERS", 4),
                heads: env_usize("FSMERGE_BENCH_HEADS", 4),
                kv_heads: env_usize("FSMERGE_BENCH_KV_HEADS", 2),
                rope_theta: 10000.0,
                ..LlamaShape::default()
            },
            tokens: env_usize("FSMERGE_BENCH_TOKENS", 64),
            vocab: env_usize("FSMERGE_BENCH_VOCAB", 30522),
        }
    }
}

/// Median milliseconds of a full step (forward, backward, AdamW, schedule) in `form`.
fn time_form(shape: &Shape, n: usize, form: StepForm, steps: usize) -> f64 {
    tch::manual_seed(0);
    let cfg = config_for_text(&shape.llama, shape.vocab);
    let models: Vec<Llama> = (0..n).map(|_| Llama::init(cfg.clone())).collect();
    let refs: Vec<&Llama> = models.iter().collect();
    let sn =
        LlamaSuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, RANK).expect("supernet");
    let t = shape.tokens as i64;
    let ids = Tensor::randint_low(
        1,
        shape.vocab as i64,
        [BATCH, t],
        (Kind::Int64, tch::Device::Cpu),
    );
    let mask = ids.ones_like();
    let target = Tensor::randn(
        [n as i64, BATCH, t, shape.llama.width as i64],
        (Kind::Float, tch::Device::Cpu),
    );
    let params = sn.params();
    let mut opt = AdamW::new(&params, 1e-3);
    let total = (steps + WARMUP) as u64;
    let schedule = Schedule::OneCycle {
        max_lr: 1e-4,
        total_steps: total,
    };
    let mut times = Vec::with_capacity(steps);
    for step in 0..total {
        let t0 = Instant::now();
        let pred = sn.forward(&ids, &mask, form);
        let loss = (pred - &target).square().mean(None);
        let (lr, beta1) = schedule.at(step);
        opt.step(&loss, lr, beta1).expect("step");
        if step as usize >= WARMUP {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    median(times)
}

fn time_pytorch(shape: &Shape, n: usize, threads: usize, steps: usize) -> Result<f64, String> {
    let l = &shape.llama;
    let args = [
        ("--n", n),
        ("--batch", BATCH as usize),
        ("--tokens", shape.tokens),
        ("--rank", RANK),
        ("--width", l.width),
        ("--mlp", l.mlp_dim),
        ("--layers", l.layers),
        ("--heads", l.heads),
        ("--kv", l.kv_heads),
        ("--vocab", shape.vocab),
        ("--threads", threads),
        ("--steps", steps),
        ("--warmup", WARMUP),
    ];
    let args: Vec<String> = args
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect();
    pytorch_step_ms("llama_reference_step.py", &args)
}

fn main() {
    if !measuring() {
        println!("llama_step: run with `cargo bench` to measure");
        return;
    }
    let threads = env_usize("FSMERGE_BENCH_THREADS", 1);
    let steps = env_usize("FSMERGE_BENCH_STEPS", 20);
    let rounds = env_usize("FSMERGE_BENCH_ROUNDS", 3);
    let ns: Vec<usize> = std::env::var("FSMERGE_BENCH_NS")
        .unwrap_or_else(|_| "2,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let shape = Shape::from_env();
    tch::set_num_threads(threads as i32);
    let l = &shape.llama;
    println!(
        "global Llama FS-Merge step: batch {BATCH} × {} tokens, vocab {}, width {}, mlp {}, {} blocks, {} heads / {} kv heads, diagonal_and_low_rank r={RANK}, {threads} thread(s), median of {steps}",
        shape.tokens, shape.vocab, l.width, l.mlp_dim, l.layers, l.heads, l.kv_heads
    );
    for n in ns {
        // Alternate the three measurements in rounds so that a slow spell hits every form alike.
        let (mut py, mut literal, mut fold) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            match time_pytorch(&shape, n, threads, steps) {
                Ok(ms) => py.push(ms),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
            literal.push(time_form(&shape, n, StepForm::Literal, steps));
            fold.push(time_form(&shape, n, StepForm::Fold, steps));
            println!(
                "n={n} round {round}: pytorch {:.2} ms, literal {:.2} ms, fold {:.2} ms",
                py[round], literal[round], fold[round]
            );
        }
        let (py, literal, fold) = (median(py), median(literal), median(fold));
        println!("n={n} pytorch eager (literal n-branch): {py:8.2} ms/step");
        println!(
            "n={n} fsmerge literal branch form:      {literal:8.2} ms/step  ratio {:.3} (target ≤ 1.0)",
            literal / py
        );
        println!(
            "n={n} fsmerge through the fold:         {fold:8.2} ms/step  ratio {:.3} (target ≤ 0.5 at n = 2, falling with n)",
            fold / py
        );
    }
}
