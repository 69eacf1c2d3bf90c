//! The distributed runtime for real: a coordinator and 2 or 4 worker processes on loopback
//! QUIC, against the single-process job (`fsmerge merge`, the same coordinator and worker code
//! in one process), plus faults: a SIGKILLed worker, `--resume`, bad credentials and messages.

use fsmerge_common::checkpoint::read_json;
use fsmerge_common::metrics::Metrics;
use fsmerge_common::wire::{self, Hello, Message, NamedTensor};
use fsmerge_common::workdir::{Manifest, RendezvousFile, WorkDir};
use fsmerge_tests::{
    digits_config, fsmerge, launch, launch_with_fault, max_rel_diff, stderr, wait_for,
};
use std::path::Path;
use std::time::{Duration, Instant};

/// Overrides shared by every run here: a short job, no baselines, originals in `models`.
fn sets(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("train.models_dir=\"{}\"", dir.join("models").display()),
        "baselines.methods=[]".to_string(),
        "merge.epochs=10".to_string(),
        "merge.global_epochs=10".to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

fn single_process(dir: &Path, name: &str, extra: &[&str]) -> Metrics {
    let out = dir.join(name);
    let mut args = vec![
        "merge".to_string(),
        digits_config(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(sets(dir, extra));
    let o = fsmerge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    read_json(&out.join("metrics.json")).unwrap()
}

fn fs_merge_scores(m: &Metrics) -> (String, String) {
    let r = m.results.iter().find(|r| r.method == "fs-merge").unwrap();
    (
        format!("{:.2}", 100.0 * r.mean_task_acc),
        format!("{:.2}", 100.0 * r.joint_acc.unwrap()),
    )
}

#[test]
fn distributed_runs_equal_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    for mode in ["local", "global"] {
        let mode_set = format!("merge.mode=\"{mode}\"");
        let reference = single_process(dir, &format!("single-{mode}"), &[&mode_set]);
        for (stages, replicas) in [(2, 1), (1, 2), (2, 2)] {
            let name = format!("{mode}-{stages}x{replicas}");
            let run = launch(
                dir,
                &name,
                stages,
                replicas,
                &sets(dir, &[&mode_set]),
                false,
            );
            let out = run.out.clone();
            let log = run.log.clone();
            assert!(
                run.finish(Duration::from_secs(180)),
                "{name}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            let diff = max_rel_diff(
                &out.join("merged.safetensors"),
                &dir.join(format!("single-{mode}/merged.safetensors")),
            );
            println!("{name}: folded weights differ by {diff:.2e} (relative)");
            assert!(diff <= 1e-4, "{name}: folded weights differ by {diff:e}");
            let m: Metrics = read_json(&out.join("metrics.json")).unwrap();
            assert_eq!(fs_merge_scores(&m), fs_merge_scores(&reference), "{name}");
            assert_eq!(m.workers.len(), stages * replicas, "{name}: worker stats");
            let plan = &m.plan;
            assert_eq!(plan["stages"].as_array().unwrap().len(), stages);
            assert_eq!(plan["replicas"].as_u64().unwrap() as usize, replicas);
        }
    }
}

#[test]
fn killed_worker_fails_the_job_fast_and_resume_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let long = ["merge.epochs=60", "merge.global_epochs=60"];
    // The uninterrupted reference (same plan, embedded workers).
    single_process(dir, "reference", &[long[0], long[1], "cluster.stages=2"]);
    let s = sets(dir, &long);
    let mut run = launch(dir, "job", 2, 1, &s, false);
    let work = WorkDir::new(dir.join("job.work"));
    // Kill stage 1's worker once some phase has been checkpointed.
    let until = Instant::now() + Duration::from_secs(120);
    let finished_before = loop {
        if let Ok(Some(m)) = work.read_manifest() {
            if !m.done.is_empty() {
                break m.done;
            }
        }
        assert!(
            Instant::now() < until,
            "no phase finished: {}",
            run.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    run.workers[1].kill().unwrap();
    let killed = Instant::now();
    let status = wait_for(&mut run.coordinator, Duration::from_secs(60), "coordinator");
    let took = killed.elapsed();
    let log = run.log_text();
    assert!(
        !status.success(),
        "the coordinator succeeded without worker 1"
    );
    assert!(
        took < Duration::from_secs(15),
        "failure took {took:?}: {log}"
    );
    assert!(
        log.contains("worker rank 1 (host") && log.contains("phase"),
        "the error must name the worker and its phase: {log}"
    );
    let _ = run.workers[0].wait();
    assert!(!run.out.exists(), "a failed job left an output directory");

    let resumed = launch(dir, "job", 2, 1, &s, true);
    let resumed_log_path = resumed.log.clone();
    assert!(resumed.finish(Duration::from_secs(180)));
    let log = std::fs::read_to_string(resumed_log_path).unwrap();
    let manifest: Manifest = work.read_manifest().unwrap().unwrap();
    assert_eq!(manifest.runs, 2);
    for d in &finished_before {
        assert!(
            manifest.done.contains(d),
            "{d:?} was retrained: {:?}",
            manifest.done
        );
        assert!(
            log.contains(&format!(
                "stage {}: phase `{}` restored from its checkpoint",
                d.stage, d.phase
            )),
            "{log}"
        );
    }
    resumed_equals_reference(dir);
}

/// The resumed job `job` wrote what the uninterrupted `reference` did: merged tensors within
/// 1e-6 relative and the same FS-Merge scores. Returns the largest relative difference.
fn resumed_equals_reference(dir: &Path) -> f64 {
    let diff = max_rel_diff(
        &dir.join("job/merged.safetensors"),
        &dir.join("reference/merged.safetensors"),
    );
    assert!(diff <= 1e-6, "resumed output differs by {diff:e}");
    let a: Metrics = read_json(&dir.join("job/metrics.json")).unwrap();
    let b: Metrics = read_json(&dir.join("reference/metrics.json")).unwrap();
    assert_eq!(fs_merge_scores(&a), fs_merge_scores(&b));
    diff
}

/// SIGKILL a worker in the middle of the global phase, once both stages hold a mid-phase
/// checkpoint; `--resume` continues the phase from that step (not from its start) and ends
/// exactly where an uninterrupted run does.
#[test]
fn a_worker_killed_mid_phase_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let long = [
        "merge.global_epochs=120",
        "cluster.checkpoint_every_steps=40",
    ];
    single_process(dir, "reference", &[long[0], long[1], "cluster.stages=2"]);
    let s = sets(dir, &long);
    let mut run = launch(dir, "job", 2, 1, &s, false);
    let work = WorkDir::new(dir.join("job.work"));
    let latest = |stage| {
        work.read_partial(stage, "global")
            .ok()
            .flatten()
            .and_then(|r| r.steps.last().map(|p| p.step))
            .unwrap_or(0)
    };
    let until = Instant::now() + Duration::from_secs(120);
    while latest(0) < 80 || latest(1) < 80 {
        assert!(
            Instant::now() < until,
            "no global checkpoint: {}",
            run.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    run.workers[1].kill().unwrap();
    let status = wait_for(&mut run.coordinator, Duration::from_secs(60), "coordinator");
    assert!(
        !status.success(),
        "the coordinator succeeded without worker 1"
    );
    let _ = run.workers[0].wait();
    let manifest: Manifest = work.read_manifest().unwrap().unwrap();
    assert!(
        !manifest.is_done(1, "global"),
        "the global phase finished before the kill; lengthen it"
    );

    let resumed = launch(dir, "job", 2, 1, &s, true);
    let log_path = resumed.log.clone();
    assert!(resumed.finish(Duration::from_secs(180)));
    let log = std::fs::read_to_string(log_path).unwrap();
    let step: u64 = log
        .split("phase `global` continues from its checkpoint at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the global phase did not continue mid-way: {log}"));
    assert!(step >= 80, "continued from step {step}");
    let worker1 = std::fs::read_to_string(dir.join("job.worker1.log")).unwrap();
    assert!(
        worker1.contains(&format!("continues from its checkpoint at step {step} of")),
        "{worker1}"
    );
    let diff = resumed_equals_reference(dir);
    for stage in 0..2 {
        let left = work.read_partial(stage, "global").unwrap();
        assert!(left.is_none(), "stage {stage}: mid-phase checkpoints left");
    }
    eprintln!("resumed the global phase at step {step}; merged tensors differ by {diff:e}");
}

/// Send raw bytes on a fresh QUIC connection to the coordinator.
async fn raw_client(rdv: &RendezvousFile, payload: Vec<u8>) {
    let (ep, conn) = client(rdv, Duration::from_secs(5)).await;
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    let _ = tx.write_all(&payload).await;
    let _ = tx.finish();
    // Whatever the coordinator answers (a refusal or nothing), it must not crash.
    let _ = tokio::time::timeout(Duration::from_secs(2), rx.read_to_end(1 << 20)).await;
    conn.close(0u32.into(), b"test");
    ep.wait_idle().await;
}

/// A QUIC connection to the coordinator (kept open by the caller), idle for at most `idle`.
async fn client(rdv: &RendezvousFile, idle: Duration) -> (quinn::Endpoint, quinn::Connection) {
    use fsmerge_common::transport::{self, Timeouts};
    let t = Timeouts {
        idle,
        keep_alive: Duration::from_secs(1),
    };
    let ep = transport::client().unwrap();
    let addr = transport::resolve_addr(&rdv.coordinator).unwrap();
    let conn = transport::connect(&ep, addr, &rdv.fingerprint, t)
        .await
        .unwrap();
    (ep, conn)
}

/// A message as the wire frames it.
fn framed(m: &Message) -> Vec<u8> {
    let payload = wire::encode(m).unwrap();
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend(payload);
    f
}

/// A process's peak resident set (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// A coordinator of the digits job (local mode, `stages` stages) waiting for its workers, its
/// log in `<dir>/coordinator.log`; the originals are trained first, so it listens at once.
fn listening_coordinator(
    dir: &Path,
    stages: usize,
) -> (std::process::Child, WorkDir, RendezvousFile) {
    single_process(dir, "warmup", &["merge.mode=\"local\""]);
    let work = WorkDir::new(dir.join("job.work"));
    let coordinator = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .args(["coordinator", &digits_config(), "--out"])
        .arg(dir.join("job"))
        .args(["--listen", "127.0.0.1:0"])
        .args(sets(
            dir,
            &["merge.mode=\"local\"", &format!("cluster.stages={stages}")],
        ))
        .current_dir(fsmerge_tests::root())
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while !work.rendezvous().exists() {
        assert!(Instant::now() < until, "no rendezvous file");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let rdv = WorkDir::read_rendezvous(&work.rendezvous()).unwrap();
    (coordinator, work, rdv)
}

#[test]
fn bad_clients_are_refused_and_the_job_still_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (mut coordinator, work, rdv) = listening_coordinator(dir, 2);

    // A worker with a wrong token is refused and says so.
    let o = fsmerge(&[
        "worker",
        "--coordinator",
        &rdv.coordinator,
        "--fingerprint",
        &rdv.fingerprint,
        "--token",
        "0123456789abcdef0123456789abcdef",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("wrong job token"), "{}", stderr(&o));
    // A worker expecting another certificate refuses the coordinator.
    let o = fsmerge(&[
        "worker",
        "--coordinator",
        &rdv.coordinator,
        "--fingerprint",
        &"ab".repeat(32),
        "--token",
        &rdv.token,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fingerprint"), "{}", stderr(&o));
    // Garbage, an oversized length, a truncated frame, a wrong version, a well-formed 10 MB
    // message before any hello, and a hello whose host forges a log line; one more client
    // connects and stays silent through the whole job.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let silent = rt.block_on(client(&rdv, Duration::from_secs(60)));
    let mut wrong_version = vec![20, 0, 0, 0, 99, 0];
    wrong_version.extend([0u8; 18]);
    let peak_before = peak_rss_mib(coordinator.id());
    for payload in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        u32::MAX.to_le_bytes().to_vec(),
        vec![100, 0, 0, 0, 1, 0, 7],
        wrong_version,
        framed(&Message::Folded {
            stage: 0,
            tensor: NamedTensor {
                name: "x".into(),
                shape: vec![2_500_000],
                data: vec![1.0; 2_500_000],
            },
        }),
        framed(&Message::Hello(Hello {
            token: "0".repeat(32),
            rank: None,
            world: None,
            host: "evil\nINFO forged line".into(),
            pid: 1,
            data_addr: "127.0.0.1:1".into(),
            data_fingerprint: "00".into(),
        })),
    ] {
        rt.block_on(raw_client(&rdv, payload));
    }
    let growth = peak_rss_mib(coordinator.id()) - peak_before;
    assert!(
        growth < 32.0,
        "a 10 MB unauthenticated message grew the coordinator's peak RSS by {growth:.0} MiB"
    );
    assert!(
        coordinator.try_wait().unwrap().is_none(),
        "the coordinator died"
    );
    // The real workers still get in and the job completes.
    let workers: Vec<_> = (0..2)
        .map(|i| {
            std::process::Command::new(fsmerge_tests::fsmerge_bin())
                .args(["worker", "--rendezvous"])
                .arg(work.rendezvous())
                .current_dir(fsmerge_tests::root())
                .env("RUST_LOG", "info")
                .stderr(std::fs::File::create(dir.join(format!("worker{i}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let status = wait_for(&mut coordinator, Duration::from_secs(120), "coordinator");
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    let worker_logs: Vec<String> = (0..2)
        .map(|i| std::fs::read_to_string(dir.join(format!("worker{i}.log"))).unwrap_or_default())
        .collect();
    assert!(status.success(), "{log}\n{worker_logs:#?}");
    assert!(log.contains("refused"), "{log}");
    assert!(log.contains("exceeds the limit"), "{log}");
    assert!(log.contains("evil\\nINFO forged line"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("INFO forged")),
        "a peer forged a log line: {log}"
    );
    drop(silent);
    for mut w in workers {
        assert!(wait_for(&mut w, Duration::from_secs(30), "worker").success());
    }
}

/// A client holding the job token registers as the only worker and sends a folded tensor
/// whose shape disagrees with its data: the coordinator fails the job naming the stage and
/// tensor, exits non-zero and writes no output.
#[test]
fn an_authenticated_worker_sending_a_misshaped_tensor_fails_the_job_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (mut coordinator, work, rdv) = listening_coordinator(dir, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_ep, _conn) = rt.block_on(async {
        let (ep, conn) = client(&rdv, Duration::from_secs(30)).await;
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        let hello = Message::Hello(Hello {
            token: rdv.token.clone(),
            rank: None,
            world: None,
            host: "impostor".into(),
            pid: 1,
            data_addr: "127.0.0.1:1".into(),
            data_fingerprint: "00".into(),
        });
        wire::send(&mut tx, &hello).await.unwrap();
        let first = wire::recv(&mut rx).await.unwrap().unwrap();
        assert_eq!(first.kind(), "assign");
        let bad = Message::Folded {
            stage: 0,
            tensor: NamedTensor {
                name: "classifier.weight".into(),
                shape: vec![2, 2],
                data: vec![1.0; 3],
            },
        };
        wire::send(&mut tx, &bad).await.unwrap();
        (ep, conn)
    });
    let status = wait_for(&mut coordinator, Duration::from_secs(60), "coordinator");
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("stage 0 sent tensor `classifier.weight` of shape [2, 2] with 3 values"),
        "{log}"
    );
    assert!(!dir.join("job").exists(), "a failed job wrote its output");
    assert!(!work.rendezvous().exists(), "rendezvous file left");
    let staging: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".job"))
        .collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
}

#[test]
fn nccl_backend_without_gpu_or_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = vec![
        "merge".to_string(),
        digits_config(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(sets(dir.path(), &["cluster.backend=\"nccl\""]));
    let o = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .args(&args)
        .current_dir(fsmerge_tests::root())
        .env("FSMERGE_NCCL_LIB", "/nonexistent/libnccl.so.2")
        .output()
        .unwrap();
    let err = stderr(&o);
    if tch::Cuda::is_available() {
        return; // A GPU machine: deploy/gpu-check.sh covers the real backend.
    }
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("needs a CUDA device") || err.contains("cannot load NCCL"),
        "{err}"
    );
    assert!(!out.exists());
    let o = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .arg("doctor")
        .env("FSMERGE_NCCL_LIB", "/nonexistent/libnccl.so.2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("NCCL: not usable: collective: cannot load NCCL `/nonexistent/libnccl.so.2`"),
        "{text}"
    );
}

#[test]
fn doctor_resolves_slurm_and_torchrun_variables() {
    let o = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .arg("doctor")
        .env("SLURM_PROCID", "5")
        .env("SLURM_NTASKS", "8")
        .env("SLURM_LOCALID", "1")
        .env("SLURM_JOB_NODELIST", "gpu[07-08,11]")
        .env("SLURM_JOB_ID", "4242")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(text.contains("libtorch: 2.11.0"), "{text}");
    assert!(
        text.contains("rank 5 (slurm)") && text.contains("world 8 (slurm)"),
        "{text}"
    );
    assert!(text.contains("coordinator gpu07:19242 (slurm)"), "{text}");
    let o = std::process::Command::new(fsmerge_tests::fsmerge_bin())
        .args(["doctor", "--rank", "2"])
        .env("RANK", "3")
        .env("WORLD_SIZE", "4")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "9")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("rank 2 (cli)") && text.contains("world 4 (torchrun)"),
        "{text}"
    );
    assert!(text.contains("coordinator 127.0.0.1:9"), "{text}");
}

/// A worker that stalls inside an all-reduce while its heartbeats go on (an injected fault) is
/// caught by its replica's watchdog: the job fails within the collective timeout, naming the
/// collective, the stalled peer and the step; every process exits and nothing is written.
#[test]
fn a_stalled_collective_is_caught_by_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let s = sets(
        dir,
        &[
            "cluster.collective_timeout_secs=2",
            "merge.epochs=60",
            "merge.global_epochs=60",
        ],
    );
    let fault = (1, "FSMERGE_FAULT_STALL", "all-reduce:5");
    let mut run = launch_with_fault(dir, "job", (1, 2), &s, fault);
    let worker1_log = dir.join("job.worker1.log");
    let until = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&worker1_log)
        .unwrap_or_default()
        .contains("stalling in all-reduce #5")
    {
        assert!(Instant::now() < until, "no stall: {}", run.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let stalled = Instant::now();
    let status = wait_for(&mut run.coordinator, Duration::from_secs(60), "coordinator");
    let took = stalled.elapsed();
    let log = run.log_text();
    assert!(!status.success(), "the job succeeded with a stalled worker");
    assert!(
        log.contains("watchdog: all-reduce #5 in the replica group")
            && log.contains("peer worker rank 1 (")
            && log.contains(" step "),
        "the error must name the collective, the stalled peer and the step: {log}"
    );
    assert!(took < Duration::from_secs(12), "detection took {took:?}");
    eprintln!("watchdog: stall detected and the job failed {took:.1?} after it began");
    for (r, w) in run.workers.iter_mut().enumerate() {
        wait_for(w, Duration::from_secs(30), &format!("worker {r}"));
    }
    assert!(!run.out.exists(), "a failed job left an output directory");
}
