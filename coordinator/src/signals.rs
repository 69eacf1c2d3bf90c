//! SIGINT and SIGTERM (Ctrl-C, `scancel`, a job scheduler's stop) end the process cleanly: the
//! staged output of the run in progress and its rendezvous file (which holds the job token) are
//! removed, one error line says why, and the exit code is 128 + the signal's number.

use tokio::signal::unix::{signal, SignalKind};

/// Start the thread that waits for the signals.
pub fn clean_up_on_signals() {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!("no signal handling: {e}");
                    return;
                }
            };
            rt.block_on(async {
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    tracing::warn!("no signal handling: cannot listen for SIGINT/SIGTERM");
                    return;
                };
                let (name, code) = tokio::select! {
                    _ = int.recv() => ("SIGINT", 130),
                    _ = term.recv() => ("SIGTERM", 143),
                };
                let removed = fsmerge_common::fsio::remove_registered();
                eprintln!("error: stopped by {name}; removed {removed} staged path(s) of this run");
                std::process::exit(code);
            });
        });
    if let Err(e) = spawned {
        tracing::warn!("no signal handling: {e}");
    }
}
