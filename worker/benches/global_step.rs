//! Benchmark: one global FS-Merge training step of the MLP SuperNet (n = 2, batch 128,
//! 784-256-256-256, diagonal_and_low_rank rank 12, AdamW + OneCycle), fsmerge's literal branch
//! form and its default (training through the fold) against the same step in PyTorch eager
//! (bench/reference_step.py), side by side in one run with the same thread count.
//!
//! `cargo bench -p fsmerge-worker --bench global_step` (after `source deploy/env.sh`).
//! Environment: FSMERGE_BENCH_THREADS (default 1), FSMERGE_BENCH_STEPS (default 200),
//! FSMERGE_BENCH_ROUNDS (alternating rounds, default 3),
//! FSMERGE_BENCH_N (models, default 2), FSMERGE_PYTHON (default: python of the active venv).

use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_worker::core::tensor::F32;
use fsmerge_worker::families::mlp::model::Mlp;
use fsmerge_worker::families::mlp::supernet::SuperNet;
use fsmerge_worker::train::optim::{AdamW, Schedule};
use std::time::Instant;
use tch::Tensor;
use util::{env_usize, measuring, median, pytorch_step_ms};

mod util;

const DIMS: [usize; 4] = [784, 256, 256, 256];
const BATCH: i64 = 128;
const RANK: usize = 12;
const WARMUP: usize = 20;

/// Median milliseconds of a full step (forward, backward, AdamW, schedule) in `form`.
fn time_form(n: usize, form: StepForm, steps: usize) -> f64 {
    tch::manual_seed(0);
    let models: Vec<Mlp> = (0..n).map(|_| Mlp::init(DIMS[0], &DIMS[1..], 5)).collect();
    let refs: Vec<&Mlp> = models.iter().collect();
    let sn = SuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, RANK).expect("supernet");
    let x = Tensor::randn([BATCH, DIMS[0] as i64], F32);
    let target = Tensor::randn([n as i64, BATCH, DIMS[3] as i64], F32);
    let params = sn.params();
    let mut opt = AdamW::new(&params, 1e-3);
    let total = (steps + WARMUP) as u64;
    let schedule = Schedule::OneCycle {
        max_lr: 1e-3,
        total_steps: total,
    };
    let mut times = Vec::with_capacity(steps);
    for step in 0..total {
        let t0 = Instant::now();
        let pred = match form {
            StepForm::Fold => sn.forward_fold(&x),
            StepForm::Literal => sn.forward_literal(&x),
        };
        let loss = (pred - &target).square().mean(None);
        let (lr, beta1) = schedule.at(step);
        opt.step(&loss, lr, beta1).expect("step");
        if step as usize >= WARMUP {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn time_pytorch(n: usize, threads: usize, steps: usize) -> Result<f64, String> {
    let dims = DIMS
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        ("--n", n.to_string()),
        ("--batch", BATCH.to_string()),
        ("--rank", RANK.to_string()),
        ("--dims", dims),
        ("--threads", threads.to_string()),
        ("--steps", steps.to_string()),
        ("--warmup", WARMUP.to_string()),
    ];
    let args: Vec<String> = args
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
    pytorch_step_ms("reference_step.py", &args)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; keep that cheap.
    if !measuring() {
        println!("global_step: run with `cargo bench` to measure");
        return;
    }
    let threads = env_usize("FSMERGE_BENCH_THREADS", 1);
    let steps = env_usize("FSMERGE_BENCH_STEPS", 200);
    let n = env_usize("FSMERGE_BENCH_N", 2);
    tch::set_num_threads(threads as i32);
    println!("global FS-Merge step: n={n}, batch {BATCH}, dims {DIMS:?}, diagonal_and_low_rank r={RANK}, {threads} thread(s), median of {steps}");
    // This machine is noisy: alternate the three measurements in rounds and report the median
    // of each, so that a slow spell hits every form alike.
    let rounds = env_usize("FSMERGE_BENCH_ROUNDS", 3);
    let (mut py, mut literal, mut fold) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        match time_pytorch(n, threads, steps) {
            Ok(ms) => py.push(ms),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        literal.push(time_form(n, StepForm::Literal, steps));
        fold.push(time_form(n, StepForm::Fold, steps));
        println!(
            "round {round}: pytorch {:.3} ms, literal {:.3} ms, fold {:.3} ms",
            py[round], literal[round], fold[round]
        );
    }
    let (py, literal, fold) = (median(py), median(literal), median(fold));
    println!("pytorch eager (literal n-branch): {py:8.3} ms/step");
    println!(
        "fsmerge literal branch form:      {literal:8.3} ms/step  ratio {:.3} (target ≤ 1.0)",
        literal / py
    );
    println!(
        "fsmerge through the fold:         {fold:8.3} ms/step  ratio {:.3} (target ≤ 0.5)",
        fold / py
    );
}
