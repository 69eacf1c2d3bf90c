//! SIGINT and SIGTERM (Ctrl-C, `scancel`, a job scheduler's stop) end the process cleanly: the
//! staged output of the run in progress and its rendezvous file (which holds the job token) are
//! removed, one error line says why, and the exit code is 128 + the signal's number.

use tokio::signal::unix::{signal, SignalKind};

/// Listen for the signals, then wait for them on a thread of their own. The handlers are
/// installed before this returns, so no staged path can exist while a signal would still kill
/// the process outright (registering them on the new thread raced with the run's first
/// staging folder under load).
pub fn clean_up_on_signals() {
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
    let listening = rt.block_on(async {
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    });
    let (Ok(mut int), Ok(mut term)) = listening else {
        tracing::warn!("no signal handling: cannot listen for SIGINT/SIGTERM");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let (name, code) = tokio::select! {
                    _ = int.recv() => ("SIGINT", 130),
                    _ = term.recv() => ("SIGTERM", 143),
                };
                let removed = fsmerge_common::fsio::remove_registered();
                eprintln!("error: stopped by {name}; removed {removed} staged path(s) of this run");
                fsmerge_common::fsio::exit_now(code);
            });
        });
    if let Err(e) = spawned {
        tracing::warn!("no signal handling: {e}");
    }
}
