//! `fsmerge`: merge neural networks trained from different initializations on different tasks
//! with FS-Merge. Subcommands: `train` (the original models), `merge` (the whole job: originals
//! if missing, baselines, FS-Merge, report) and `summarize` (mean ± spread over runs).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod job;
mod merge;
mod progress;
mod report;
mod summarize;
mod train;

#[derive(Parser)]
#[command(
    name = "fsmerge",
    version,
    about = "Foldable SuperNet Merge (FS-Merge) of models with different initializations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that run a job.
#[derive(clap::Args, Clone)]
pub struct JobArgs {
    /// The job config (TOML), e.g. configs/fmnist-mlp.toml.
    pub config: PathBuf,
    /// Output directory [default: runs/<config name>, or runs/<name>-seed<S> with --seed].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override the config's seed (changes originals, merge data and M/U init).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the config's libtorch thread count (0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Override any config value: `--set merge.lr=3e-3 --set merge.mode=global`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Train the original models of the config's tasks (each from its own seed).
    Train(JobArgs),
    /// Run the merge job: train missing originals, run the baselines and FS-Merge, write the
    /// merged model, metrics.json and results.md.
    Merge(JobArgs),
    /// Mean and spread of the results of several runs (e.g. seeds) of the same job.
    Summarize {
        /// Run directories holding metrics.json.
        runs: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    progress::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => job::Job::open(&args).and_then(|j| {
            let splits = fsmerge_worker::data::load(&j.cfg.data)?;
            train::ensure_originals(&j, &splits, true)
        }),
        Command::Merge(args) => job::Job::open(&args).and_then(|j| merge::run(&j)),
        Command::Summarize { runs } => summarize::run(&runs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
