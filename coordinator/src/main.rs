//! `fsmerge`: merge neural networks trained from different initializations on different tasks
//! with FS-Merge. Subcommands: `train` (the original models), `merge` (the whole job with
//! embedded workers), `coordinator` and `worker` (the same job over worker processes, on one
//! machine or a cluster), `summarize` (mean ± spread over runs) and `doctor` (what this machine
//! and launch environment provide).

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod cluster;
mod cmd;
mod job;
mod report;
mod signals;

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
    /// Override any config value: `--set merge.lr=3e-3 --set cluster.stages=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Train the original models of the config's tasks (each from its own seed).
    Train(JobArgs),
    /// Run the merge job with its workers inside this process: train missing originals, run the
    /// baselines and FS-Merge, write the merged model, metrics.json and results.md.
    Merge {
        #[command(flatten)]
        job: JobArgs,
        /// Continue an interrupted job: finished stages and phases are restored from
        /// `<out>.work/`, not retrained.
        #[arg(long)]
        resume: bool,
    },
    /// Run the merge job as the coordinator of `cluster.stages × cluster.replicas` worker
    /// processes (`fsmerge worker`), writing the same outputs as `merge`.
    Coordinator {
        #[command(flatten)]
        job: JobArgs,
        /// Address to listen on [default: the port of `cluster.coordinator`, torchrun's
        /// MASTER_PORT or Slurm's job port, on all interfaces; else a free port]. The address
        /// workers should dial is written to `<out>.work/rendezvous.json`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        resume: bool,
    },
    /// Dry run: read the models' configs and headers and the data, print the plan and each
    /// worker's memory estimate; exit 0, or with the first problem.
    Check(JobArgs),
    /// Join a job as a worker.
    Worker(cmd::worker::WorkerArgs),
    /// Mean and spread of the results of several runs (e.g. seeds) of the same job.
    Summarize {
        /// Run directories holding metrics.json.
        runs: Vec<PathBuf>,
    },
    /// Print libtorch, CUDA and NCCL status, the resolved rank/world/coordinator, and whether
    /// the coordinator answers.
    Doctor(cmd::doctor::DoctorArgs),
}

fn main() -> ExitCode {
    report::progress::init_logging();
    let cli = Cli::parse();
    signals::clean_up_on_signals();
    let result = match cli.command {
        Command::Train(args) => {
            job::Job::open(&args).and_then(|j| job::originals::ensure_originals(&j, true))
        }
        Command::Merge { job, resume } => job::Job::open(&job)
            .and_then(|j| job::merge::run(&j, &cluster::Launch::Embedded, resume)),
        Command::Coordinator {
            job,
            listen,
            resume,
        } => job::Job::open(&job).and_then(|j| {
            let listen = match listen {
                Some(l) => l,
                None => cluster::default_listen(&j.cfg)?,
            };
            job::merge::run(&j, &cluster::Launch::External { listen }, resume)
        }),
        Command::Check(args) => cmd::check::run(&args),
        Command::Worker(args) => cmd::worker::run(&args),
        Command::Summarize { runs } => cmd::summarize::run(&runs),
        Command::Doctor(args) => cmd::doctor::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
