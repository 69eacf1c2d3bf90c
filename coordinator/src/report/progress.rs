//! Progress reporting: bars on a terminal, periodic `tracing` lines when stderr is not a
//! terminal (batch jobs under Slurm hide bars).

use fsmerge_worker::train::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

pub struct Reporter {
    tty: bool,
    state: Mutex<State>,
}

struct State {
    bar: Option<ProgressBar>,
    total: u64,
    last_line: Instant,
    started: Instant,
}

/// Seconds between log lines in non-terminal mode.
const LINE_EVERY: Duration = Duration::from_secs(10);

impl Reporter {
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(State {
                bar: None,
                total: 0,
                last_line: Instant::now(),
                started: Instant::now(),
            }),
        }
    }
}

impl Progress for Reporter {
    fn start(&self, phase: &str, total: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        s.total = total;
        s.started = Instant::now();
        s.last_line = Instant::now();
        if self.tty {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:>18} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(phase.to_string());
            s.bar = Some(bar);
        } else {
            tracing::info!("{phase}: {total} steps");
        }
    }

    fn step(&self, phase: &str, step: u64, loss: f64, lr: f64) {
        let Ok(mut s) = self.state.lock() else { return };
        if let Some(bar) = &s.bar {
            bar.set_position(step);
            if step.is_multiple_of(10) || step == s.total {
                bar.set_message(format!("loss {loss:.4e} lr {lr:.2e}"));
            }
        } else if s.last_line.elapsed() >= LINE_EVERY {
            s.last_line = Instant::now();
            tracing::info!(
                "{phase}: step {step}/{} loss {loss:.4e} lr {lr:.2e}",
                s.total
            );
        }
    }

    fn finish(&self, phase: &str) {
        let Ok(mut s) = self.state.lock() else { return };
        if let Some(bar) = s.bar.take() {
            bar.finish_and_clear();
        }
        tracing::info!(
            "{phase}: done in {:.1} s",
            s.started.elapsed().as_secs_f64()
        );
    }
}
