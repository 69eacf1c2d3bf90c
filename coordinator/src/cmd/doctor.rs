//! `fsmerge doctor`: what this machine and launch environment give a job — libtorch, CUDA,
//! NCCL (and why not), the resolved rank/world/coordinator with their sources, and whether the
//! coordinator answers a QUIC handshake.

use anyhow::Result;
use fsmerge_common::discovery::{resolve, Given};
use fsmerge_common::transport::{self, Timeouts};
use fsmerge_worker::dist::collective::nccl;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Clone)]
pub struct DoctorArgs {
    /// A job config whose `[cluster]` section to take into account.
    pub config: Option<PathBuf>,
    /// `host:port` of a coordinator to check.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// A coordinator's rendezvous file (address and certificate fingerprint).
    #[arg(long)]
    pub rendezvous: Option<PathBuf>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub world: Option<usize>,
}

/// The torch version of the libtorch this process loaded, from `torch/version.py` beside it.
fn libtorch_version() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(PathBuf::from);
    let Some(lib) = lib else {
        return "unknown (libtorch_cpu.so not found among the loaded libraries)".into();
    };
    let version_py = lib
        .parent()
        .and_then(|d| d.parent())
        .map(|torch| torch.join("version.py"));
    let version = version_py
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("__version__"))
                .and_then(|l| l.split(['\'', '"']).nth(1).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{version} ({})", lib.display())
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    println!("fsmerge {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch: {}", libtorch_version());
    let cuda = tch::Cuda::is_available();
    println!(
        "CUDA: {}",
        if cuda {
            format!(
                "{} device(s), cuDNN {}",
                tch::Cuda::device_count(),
                if tch::Cuda::cudnn_is_available() {
                    "available"
                } else {
                    "not available"
                }
            )
        } else {
            "no device visible to libtorch".into()
        }
    );
    match nccl::version() {
        Ok(v) => println!(
            "NCCL: found {} ({}.{}.{})",
            nccl::DEFAULT_LIB,
            v / 10000,
            (v / 100) % 100,
            v % 100
        ),
        Err(e) => println!("NCCL: not usable: {e}"),
    }
    let config = match &args.config {
        Some(p) => Some(fsmerge_common::config::JobConfig::load_with(p, &[])?),
        None => None,
    };
    let file = args
        .rendezvous
        .as_ref()
        .map(|p| crate::cmd::worker::read_rendezvous(p, 0.0))
        .transpose()?;
    let cli = Given {
        rank: args.rank,
        world: args.world,
        coordinator: args
            .coordinator
            .clone()
            .or_else(|| file.as_ref().map(|f| f.coordinator.clone())),
    };
    let from_config = Given {
        coordinator: config.as_ref().and_then(|c| c.cluster.coordinator.clone()),
        world: config.as_ref().map(|c| c.cluster.world()),
        ..Given::default()
    };
    match resolve(&cli, &from_config, &|k| std::env::var(k).ok()) {
        Ok(r) => {
            println!("rendezvous: {}", r.describe());
            if let Some(c) = &r.coordinator {
                println!(
                    "coordinator {}: {}",
                    c.value,
                    reachability(&c.value, file.as_ref())
                );
            }
        }
        Err(e) => println!("rendezvous: {e}"),
    }
    // What any fsmerge process holds before it does anything (libtorch, CUDA libraries).
    println!(
        "peak RSS: {:.0} MiB",
        fsmerge_common::metrics::peak_rss_mib()
    );
    Ok(())
}

/// Try a QUIC handshake. Without the fingerprint the handshake is refused by our own pin, which
/// still proves that a QUIC server answered.
fn reachability(addr: &str, file: Option<&fsmerge_common::workdir::RendezvousFile>) -> String {
    let Ok(sock) = transport::resolve_addr(addr) else {
        return "cannot resolve".into();
    };
    let expected = file
        .map_or("unknown", |f| f.fingerprint.as_str())
        .to_string();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return format!("cannot check ({e})"),
    };
    let t = Timeouts {
        idle: Duration::from_secs(3),
        keep_alive: Duration::from_secs(1),
    };
    rt.block_on(async {
        let ep = match transport::client() {
            Ok(ep) => ep,
            Err(e) => return format!("cannot check ({e})"),
        };
        let attempt = tokio::time::timeout(
            Duration::from_secs(4),
            transport::connect(&ep, sock, &expected, t),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                conn.close(0u32.into(), b"doctor");
                "reachable (QUIC handshake done, certificate fingerprint matches)".into()
            }
            Ok(Err(e)) if e.to_string().contains("fingerprint") || e.to_string().contains("certificate") => {
                "reachable (a QUIC server answered; its certificate was not checked against a rendezvous file)".into()
            }
            Ok(Err(e)) => format!("not reachable: {e}"),
            Err(_) => "not reachable: no answer within 4 s".into(),
        }
    })
}
