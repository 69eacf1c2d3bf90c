//! Rendezvous discovery: works out rank, world size, local rank and coordinator address for one
//! process, per field, from CLI → config → torchrun env → Slurm env → single-process default,
//! and records which source won so the log can explain a surprising value.

use crate::{Error, Result};
use std::fmt;

/// Port for an address given without one, and for Slurm jobs without a numeric job id;
/// torchrun's c10d default, so mixed launches agree.
pub const DEFAULT_PORT: u16 = 29400;

/// This machine's host name, for the coordinator's advertised address and for messages:
/// `$FSMERGE_HOST` if set, else the kernel's. Not `$HOSTNAME`: `srun` copies the batch shell's
/// environment to every node, so there it names the first node on all of them.
pub fn this_host() -> String {
    std::env::var("FSMERGE_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Where a resolved value came from; logged so a wrong rank can be traced to its launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cli,
    Config,
    Torchrun,
    Slurm,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format!("{self:?}").to_lowercase())
    }
}

/// What the CLI and the config say (None = not given).
#[derive(Debug, Clone, Default)]
pub struct Given {
    pub rank: Option<usize>,
    pub world: Option<usize>,
    pub coordinator: Option<String>,
}

/// A value together with the source that supplied it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Resolved<T> {
    pub value: T,
    pub source: Source,
}

/// Everything a process knows about its place in the job before it contacts the coordinator.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rendezvous {
    /// None when no source gives one: the coordinator then assigns ranks.
    pub rank: Option<Resolved<usize>>,
    /// None when a coordinator is known but no source gives a size: the coordinator decides.
    pub world: Option<Resolved<usize>>,
    /// From LOCAL_RANK or SLURM_LOCALID; picks the GPU on a multi-GPU node.
    pub local_rank: Option<Resolved<usize>>,
    /// "host:port" (IPv6 hosts in brackets).
    pub coordinator: Option<Resolved<String>>,
    /// SLURM_JOB_ID, kept for logs and run names.
    pub job_id: Option<String>,
}

/// A candidate value, its source and the name (CLI, config, env variable) errors quote.
type Pick<T> = (T, Source, &'static str);

fn done<T>(p: Option<Pick<T>>) -> Option<Resolved<T>> {
    p.map(|(value, source, _)| Resolved { value, source })
}

fn err(msg: impl Into<String>) -> Error {
    Error::Rendezvous(msg.into())
}

fn valid_port(p: &str) -> Option<u16> {
    p.parse::<u16>().ok().filter(|&p| p != 0)
}

/// Port for a Slurm job: 15000 + last four digits of a numeric job id (as PyTorch Lightning), so that concurrent jobs
/// sharing a node rarely collide while every task of one job agrees; DEFAULT_PORT otherwise.
fn slurm_port(job_id: Option<&str>) -> u16 {
    match job_id {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
            15000 + id[id.len().saturating_sub(4)..].parse::<u16>().unwrap_or(0)
        }
        _ => DEFAULT_PORT,
    }
}

/// Normalises a CLI/config coordinator to "host:port" (DEFAULT_PORT when none is given); IPv6
/// hosts must be bracketed, otherwise the port could not be told apart from the address.
fn parse_coordinator(s: &str, origin: &str) -> Result<String> {
    let bad = |why: &str| err(format!("coordinator {s:?} from {origin}: {why}"));
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !s.ends_with(']') => (h, Some(p)),
        _ => (s, None),
    };
    let host_ok = match host.strip_prefix('[') {
        Some(h) => h
            .strip_suffix(']')
            .is_some_and(|h| !h.is_empty() && !h.contains(['[', ']'])),
        None => !host.is_empty() && !host.contains([':', ']']),
    };
    if !host_ok {
        return Err(bad("want host, host:port or [ipv6]:port"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => valid_port(p).ok_or_else(|| bad(&format!("bad port {p:?} (want 1-65535)")))?,
    };
    Ok(format!("{host}:{port}"))
}

/// Expand a Slurm node list such as `gpu[01-04,07],login1` into host names (zero padding kept),
/// in order. Uses the hostlist-parser crate.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    expand(list).map_err(err)
}

/// The most hosts a node list may name (the largest Slurm clusters have ~10,000 nodes); a list
/// naming more is refused before it is expanded, so a range like `n[0-99999999999]` cannot
/// exhaust memory.
const MAX_HOSTS: u64 = 1 << 20;

fn expand(list: &str) -> std::result::Result<Vec<String>, String> {
    let count = host_count(list);
    if count.is_none_or(|n| n > MAX_HOSTS) {
        let n = count.map_or("too many".to_string(), |n| n.to_string());
        return Err(format!(
            "bad node list {list:?}: it names {n} hosts (at most {MAX_HOSTS})"
        ));
    }
    hostlist_parser::parse(&split_padded_ranges(list)).map_err(|e| {
        let msg = e.to_string().trim().replace('\n', "; ");
        format!("bad node list {list:?}: {msg}")
    })
}

/// How many hosts `list` names (None: more than u64 holds). Malformed parts count as one host:
/// the parser names them afterwards.
fn host_count(list: &str) -> Option<u64> {
    let (mut total, mut item, mut inner, mut depth) = (0u64, 1u64, String::new(), 0usize);
    for c in list.chars().chain([',']) {
        match c {
            '[' => {
                depth += 1;
                inner.clear();
            }
            ']' if depth > 0 => {
                depth -= 1;
                let size = inner.split(',').try_fold(0u64, |acc, r| {
                    let bounds = r.split_once('-').and_then(|(a, b)| {
                        Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
                    });
                    let n = bounds.map_or(1, |(lo, hi)| {
                        hi.checked_sub(lo).map_or(1, |d| d.saturating_add(1))
                    });
                    acc.checked_add(n)
                })?;
                item = item.checked_mul(size.max(1))?;
            }
            ',' if depth == 0 => {
                total = total.checked_add(item)?;
                item = 1;
            }
            c if depth > 0 => inner.push(c),
            _ => {}
        }
    }
    Some(total)
}

/// hostlist-parser 0.1 expands `[098-102]` to `98..102`; Slurm keeps the lower bound's width.
/// Splitting zero-padded ranges at powers of ten (`098-099,100-102`) makes the crate pad right.
fn split_padded_ranges(list: &str) -> String {
    let (mut out, mut rest) = (String::new(), list);
    while let Some((head, tail)) = rest.split_once('[') {
        let Some((inner, after)) = tail.split_once(']') else {
            break;
        };
        let parts: Vec<String> = inner.split(',').map(split_range).collect();
        out.push_str(&format!("{head}[{}]", parts.join(",")));
        rest = after;
    }
    out + rest
}

fn split_range(tok: &str) -> String {
    let parsed = tok.split_once('-').and_then(|(a, b)| {
        let (a, b) = (a.trim(), b.trim());
        Some((a.len(), a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            .filter(|&(w, lo, hi)| a.starts_with('0') && w > 1 && lo <= hi)
    });
    let Some((w, mut start, hi)) = parsed else {
        return tok.to_string();
    };
    let mut pieces = vec![];
    loop {
        let next = 10u64.checked_pow(start.checked_ilog10().unwrap_or(0) + 1);
        let end = next.map_or(hi, |p| hi.min(p - 1));
        pieces.push(format!("{start:0w$}-{end:0w$}"));
        if end == hi {
            return pieces.join(",");
        }
        start = end + 1;
    }
}

/// Resolve from `cli`, `config` and the environment `env` (a lookup function so tests don't touch
/// the process environment; production passes |k| std::env::var(k).ok()).
pub fn resolve(
    cli: &Given,
    config: &Given,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Rendezvous> {
    use Source::*;
    // Empty (or blank) variables count as unset: launch scripts often export `VAR=`.
    let get = |k: &str| Some(env(k)?.trim().to_string()).filter(|v| !v.is_empty());
    let ours = |v: Option<usize>, s| v.map(|v| (v, s, if s == Cli { "CLI" } else { "config" }));
    // A malformed launcher variable is an error even when overridden: the environment is broken.
    let theirs = |var: &'static str, s| -> Result<Option<Pick<usize>>> {
        let Some(v) = get(var) else { return Ok(None) };
        let n = v
            .parse()
            .map_err(|_| err(format!("{var}={v:?} is not a non-negative integer")))?;
        Ok(Some((n, s, var)))
    };
    let t_world = theirs("WORLD_SIZE", Torchrun)?;
    let s_world = theirs("SLURM_NTASKS", Slurm)?;
    if let (None, None, Some(t), Some(s)) = (cli.world, config.world, &t_world, &s_world) {
        if t.0 != s.0 {
            return Err(err(format!(
                "WORLD_SIZE={} (torchrun) and SLURM_NTASKS={} (slurm) disagree; \
                 set the world size on the CLI or in the config",
                t.0, s.0
            )));
        }
    }
    let mut world = ours(cli.world, Cli)
        .or(ours(config.world, Config))
        .or(t_world)
        .or(s_world);
    let mut rank = (ours(cli.rank, Cli).or(ours(config.rank, Config)))
        .or(theirs("RANK", Torchrun)?)
        .or(theirs("SLURM_PROCID", Slurm)?);
    let mut local_rank = theirs("LOCAL_RANK", Torchrun)?.or(theirs("SLURM_LOCALID", Slurm)?);
    let port_err = |v| err(format!("MASTER_PORT={v:?} is not a port (1-65535)"));
    let master_port = get("MASTER_PORT").map(|v| valid_port(&v).ok_or_else(|| port_err(v)));
    let master_port = master_port.transpose()?;
    let job_id = get("SLURM_JOB_ID");
    let given = |g: &Given| g.coordinator.clone().filter(|c| !c.trim().is_empty());
    // The node list is parsed only when used, so an explicit coordinator works around a bad one.
    let slurm_list = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
        .into_iter()
        .find_map(|v| Some((v, get(v)?)));
    let coordinator: Option<Pick<String>> = if let Some(c) = given(cli) {
        Some((parse_coordinator(c.trim(), "CLI")?, Cli, "CLI"))
    } else if let Some(c) = given(config) {
        Some((parse_coordinator(c.trim(), "config")?, Config, "config"))
    } else if let Some(addr) = get("MASTER_ADDR") {
        // A bare IPv6 MASTER_ADDR is common; bracket it so the port stays unambiguous.
        let bracket = addr.matches(':').count() > 1 && !addr.starts_with('[');
        let host = if bracket { format!("[{addr}]") } else { addr };
        let addr = format!("{host}:{}", master_port.unwrap_or(DEFAULT_PORT));
        Some((
            parse_coordinator(&addr, "MASTER_ADDR")?,
            Torchrun,
            "MASTER_ADDR",
        ))
    } else if let Some((var, list)) = slurm_list {
        let hosts = expand(&list).map_err(|e| err(format!("{var}: {e}")))?;
        let port = master_port.unwrap_or_else(|| slurm_port(job_id.as_deref()));
        let host = hosts
            .first()
            .ok_or_else(|| err(format!("{var}={list:?} names no host")))?;
        Some((format!("{host}:{port}"), Slurm, var))
    } else {
        None
    };
    // Nothing says "distributed": run as a job of one.
    if world.is_none() && coordinator.is_none() {
        let default = |v| Some((v, Default, "the single-process default"));
        (world, rank, local_rank) = (default(1), rank.or(default(0)), local_rank.or(default(0)));
    }
    if let Some((w, _, w_from)) = world {
        if w == 0 {
            return Err(err(format!(
                "world size 0 from {w_from}: must be at least 1"
            )));
        }
        for (what, p) in [("rank", rank), ("local rank", local_rank)] {
            if let Some((v, _, from)) = p.filter(|p| p.0 >= w) {
                return Err(err(format!(
                    "{what} {v} (from {from}) is not below world size {w} (from {w_from})"
                )));
            }
        }
    }
    Ok(Rendezvous {
        rank: done(rank),
        world: done(world),
        local_rank: done(local_rank),
        coordinator: done(coordinator),
        job_id,
    })
}

impl Rendezvous {
    /// One log line naming each field's value and source, so a surprising rank can be traced, e.g.
    /// "rank 3 (slurm), world 8 (torchrun), local rank 1 (slurm), coordinator gpu01:29500 (config)".
    pub fn describe(&self) -> String {
        fn part<T: fmt::Display>(name: &str, r: &Option<Resolved<T>>, none: &str) -> String {
            r.as_ref().map_or(format!("{name} {none}"), |r| {
                format!("{name} {} ({})", r.value, r.source)
            })
        }
        let mut s = [
            part("rank", &self.rank, "unassigned (coordinator assigns)"),
            part("world", &self.world, "unknown (coordinator decides)"),
            part("local rank", &self.local_rank, "unknown"),
            part("coordinator", &self.coordinator, "none"),
        ]
        .join(", ");
        if let Some(id) = &self.job_id {
            s.push_str(&format!(", slurm job {id}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// "K=V;K2=V2" → map; a compact way to write a fake environment or a `Given`.
    fn kv(spec: &str) -> HashMap<String, String> {
        let pair = |s: &str| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        };
        spec.split(';').filter_map(pair).collect()
    }
    fn given(spec: &str) -> Given {
        let m = kv(spec);
        let num = |k: &str| m.get(k).map(|v| v.parse().unwrap());
        let coordinator = m.get("coord").cloned();
        Given {
            rank: num("rank"),
            world: num("world"),
            coordinator,
        }
    }
    /// A case reads "cli | config | env => expected".
    fn run(case: &str) -> (Result<Rendezvous>, &str) {
        let (input, want) = case.split_once(" => ").unwrap();
        let [cli, config, vars]: [&str; 3] =
            input.split(" | ").collect::<Vec<_>>().try_into().unwrap();
        let env = kv(vars);
        (
            resolve(&given(cli), &given(config), &|k| env.get(k).cloned()),
            want,
        )
    }

    #[test]
    fn precedence_per_field() {
        // describe() names every value with its source, so it doubles as the assertion.
        let cases = [
            " |  |  => rank 0 (default), world 1 (default), local rank 0 (default), coordinator none",
            " |  | RANK=2;WORLD_SIZE=4;LOCAL_RANK=1;MASTER_ADDR=n7;MASTER_PORT=29500 => rank 2 (torchrun), world 4 (torchrun), local rank 1 (torchrun), coordinator n7:29500 (torchrun)",
            " |  | SLURM_PROCID=3;SLURM_NTASKS=4;SLURM_LOCALID=0;SLURM_JOB_NODELIST=gpu[01-02];SLURM_JOB_ID=123456 => rank 3 (slurm), world 4 (slurm), local rank 0 (slurm), coordinator gpu01:18456 (slurm), slurm job 123456",
            " |  | RANK=2;SLURM_PROCID=3;WORLD_SIZE=4;SLURM_NTASKS=4;LOCAL_RANK=1;SLURM_LOCALID=0;MASTER_ADDR=m;SLURM_NODELIST=s => rank 2 (torchrun), world 4 (torchrun), local rank 1 (torchrun), coordinator m:29400 (torchrun)",
            " | coord=f | RANK=2;WORLD_SIZE=4;MASTER_ADDR=m => rank 2 (torchrun), world 4 (torchrun), local rank unknown, coordinator f:29400 (config)",
            " | rank=2;world=6;coord=f:2 | RANK=1;WORLD_SIZE=4;MASTER_ADDR=m => rank 2 (config), world 6 (config), local rank unknown, coordinator f:2 (config)",
            "rank=1;world=8;coord=c:1 | rank=2;world=6;coord=f:2 | RANK=3;WORLD_SIZE=4;MASTER_ADDR=m => rank 1 (cli), world 8 (cli), local rank unknown, coordinator c:1 (cli)",
            "world=8 | rank=2;world=6 | SLURM_PROCID=3;SLURM_LOCALID=0;MASTER_ADDR=10.0.0.1 => rank 2 (config), world 8 (cli), local rank 0 (slurm), coordinator 10.0.0.1:29400 (torchrun)",
            // A coordinator without a world size leaves rank and size to the coordinator.
            "coord=h |  | SLURM_JOB_ID=9 => rank unassigned (coordinator assigns), world unknown (coordinator decides), local rank unknown, coordinator h:29400 (cli), slurm job 9",
            "world=4 |  |  => rank unassigned (coordinator assigns), world 4 (cli), local rank unknown, coordinator none",
            // Empty values count as unset.
            "coord= |  | RANK=;WORLD_SIZE= ;MASTER_ADDR=;SLURM_JOB_ID= => rank 0 (default), world 1 (default), local rank 0 (default), coordinator none",
            // The CLI or config settles a torchrun/Slurm disagreement.
            " | world=8 | WORLD_SIZE=8;SLURM_NTASKS=2 => rank unassigned (coordinator assigns), world 8 (config), local rank unknown, coordinator none",
        ];
        for case in cases {
            let (got, want) = run(case);
            assert_eq!(got.unwrap().describe(), want, "{case}");
        }
    }

    #[test]
    fn slurm_coordinator_and_port() {
        for (id, port) in [
            (Some("118456"), 23456),
            (Some("42"), 15042),
            (Some("1a"), 29400),
            (None, 29400),
        ] {
            assert_eq!(slurm_port(id), port, "{id:?}");
        }
        let cases = [
            " |  | SLURM_NODELIST=b[3-4];SLURM_JOB_ID=7 => b3:15007",
            " |  | SLURM_JOB_NODELIST=a1;SLURM_NODELIST=b1 => a1:29400",
            " |  | SLURM_JOB_NODELIST=a;SLURM_JOB_ID=7;MASTER_PORT=12 => a:12",
            " |  | MASTER_ADDR=::1;MASTER_PORT=5 => [::1]:5",
            // An unparsable node list does not matter once the coordinator is given explicitly.
            "coord=h:1 |  | SLURM_NODELIST=x[ => h:1",
        ];
        for case in cases {
            let (got, want) = run(case);
            assert_eq!(got.unwrap().coordinator.unwrap().value, want, "{case}");
        }
    }

    #[test]
    fn hostlists() {
        let ex = |s: &str| expand_hostlist(s).unwrap();
        assert_eq!(
            ex("gpu[01-04,07]"),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
        );
        assert_eq!(ex("gpu[01-02],login1"), ["gpu01", "gpu02", "login1"]);
        assert_eq!(ex("a,b[1-2]"), ["a", "b1", "b2"]);
        assert_eq!(ex("node17"), ["node17"]);
        assert_eq!(ex("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(ex("n[098-100,7]"), ["n098", "n099", "n100", "n7"]);
        assert_eq!(ex("r[1-2]n[0-1]"), ["r1n0", "r1n1", "r2n0", "r2n1"]);
        assert_eq!(host_count("gpu[01-04,07],login1"), Some(6));
        assert_eq!(host_count("r[1-2]n[0-1]"), Some(4));
        for huge in [
            "n[0-99999999999]",
            "a[0-99999]b[0-99999]",
            "n[0-18446744073709551615]",
        ] {
            let msg = expand_hostlist(huge).expect_err(huge).to_string();
            assert!(msg.contains("hosts (at most 1048576)"), "{msg}");
        }
        for bad in ["gpu[01-04", "", "a,,b", "x[a]", "gpu]"] {
            let msg = expand_hostlist(bad).expect_err(bad).to_string();
            assert!(
                msg.starts_with(&format!("rendezvous: bad node list {bad:?}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn coordinator_forms() {
        let c = |s: &str| parse_coordinator(s, "config");
        assert_eq!(c("host").unwrap(), "host:29400");
        assert_eq!(c("host:5000").unwrap(), "host:5000");
        assert_eq!(c("[::1]:5000").unwrap(), "[::1]:5000");
        assert_eq!(c("[fe80::1]").unwrap(), "[fe80::1]:29400");
        for bad in [
            "h:abc", "h:70000", "h:0", "h:", ":5", "::1", "[::1", "[::1]5", "[]:1", "a]:1",
        ] {
            let msg = c(bad).expect_err(bad).to_string();
            assert!(msg.contains(&format!("{bad:?} from config")), "{msg}");
        }
    }

    #[test]
    fn errors_name_the_culprits() {
        let cases = [
            r#"coord=h:x |  |  => coordinator "h:x" from CLI: bad port "x""#,
            r#" |  | RANK=abc => RANK="abc" is not a non-negative integer"#,
            r#" |  | SLURM_NTASKS=-1 => SLURM_NTASKS="-1""#,
            r#" |  | LOCAL_RANK=1.5 => LOCAL_RANK="1.5""#,
            r#" |  | MASTER_ADDR=h;MASTER_PORT=http => MASTER_PORT="http""#,
            r#" |  | MASTER_ADDR=h:1 => coordinator "h:1:29400" from MASTER_ADDR"#,
            r#" |  | SLURM_JOB_NODELIST=gpu[01- => SLURM_JOB_NODELIST: bad node list "gpu[01-""#,
            " |  | SLURM_PROCID=4;WORLD_SIZE=4;SLURM_NTASKS=4 => rank 4 (from SLURM_PROCID) is not below world size 4 (from WORLD_SIZE)",
            "rank=4 |  | WORLD_SIZE=4 => rank 4 (from CLI) is not below world size 4 (from WORLD_SIZE)",
            " | rank=2 |  => rank 2 (from config) is not below world size 1 (from the single-process default)",
            "world=0 |  |  => world size 0 from CLI",
            " |  | SLURM_NTASKS=0;MASTER_ADDR=h => world size 0 from SLURM_NTASKS",
            " |  | LOCAL_RANK=2;WORLD_SIZE=2 => local rank 2 (from LOCAL_RANK) is not below world size 2 (from WORLD_SIZE)",
            " |  | WORLD_SIZE=8;SLURM_NTASKS=2 => WORLD_SIZE=8 (torchrun) and SLURM_NTASKS=2 (slurm) disagree",
        ];
        for case in cases {
            let (got, want) = run(case);
            let msg = got.expect_err(case).to_string();
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }
}
