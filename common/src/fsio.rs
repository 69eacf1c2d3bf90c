//! Atomic output: files are written to a temporary name, fsynced and renamed, and a job's output
//! is staged in a hidden directory that is removed unless the job commits it, so a failed job
//! leaves nothing half-written behind.

use crate::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// `write_atomic` for a secret (a job token): the file is readable by its owner only from the
/// moment it exists.
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Paths to remove if the process is stopped by a signal: staging folders and the rendezvous
/// file (it holds the job token) of a run in progress.
static ON_SIGNAL: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn on_signal() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove `path` (file or folder) if the process is interrupted before `forget_on_signal`.
pub fn remove_on_signal(path: &Path) {
    on_signal().push(path.to_path_buf());
}

/// `path` is committed or removed: a signal no longer touches it.
pub fn forget_on_signal(path: &Path) {
    on_signal().retain(|p| p != path);
}

/// Remove every path registered with `remove_on_signal` (the signal handler's last act);
/// returns how many were there.
pub fn remove_registered() -> usize {
    let paths = std::mem::take(&mut *on_signal());
    let mut removed = 0;
    for p in paths {
        let gone = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        removed += usize::from(gone.is_ok());
    }
    removed
}

/// End the process now with `code`, from any thread, after flushing stdout and stderr: no
/// atexit handlers or static destructors run. `std::process::exit` runs them, and libtorch's
/// tearing down its thread pools while another thread still trains in them crashed the
/// process (SIGSEGV instead of the signal's exit code) when a signal came mid-training.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; nothing of this process runs after it.
    unsafe { libc::_exit(code) }
}

/// A directory that collects a job's outputs and moves them into the final directory only on
/// `commit`. Dropped without commit, it deletes itself and, if the final directory did not
/// exist before, that too.
pub struct Staging {
    staging: PathBuf,
    target: PathBuf,
    target_existed: bool,
    committed: bool,
}

impl Staging {
    pub fn new(target: &Path) -> Result<Self> {
        let target_existed = target.exists();
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        remove_stale(parent, name);
        let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        }
        fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        remove_on_signal(&staging);
        Ok(Self {
            staging,
            target: target.to_path_buf(),
            target_existed,
            committed: false,
        })
    }

    /// Where to write a file that will appear as `target/name` on commit.
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move every staged entry into the target directory (each move is a rename).
    pub fn commit(mut self) -> Result<PathBuf> {
        fs::create_dir_all(&self.target).map_err(|e| Error::io(&self.target, e))?;
        let entries = fs::read_dir(&self.staging).map_err(|e| Error::io(&self.staging, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.staging, e))?;
            let dest = self.target.join(entry.file_name());
            if dest.is_dir() {
                fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
            }
            fs::rename(entry.path(), &dest).map_err(|e| Error::io(&dest, e))?;
        }
        fs::remove_dir_all(&self.staging).map_err(|e| Error::io(&self.staging, e))?;
        forget_on_signal(&self.staging);
        self.committed = true;
        Ok(self.target.clone())
    }
}

/// Remove the staging folders of `name` that a killed run left in `parent` (their process is
/// gone), saying so.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.staging-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && fs::remove_dir_all(entry.path()).is_ok() {
            tracing::warn!(
                "removed {}, left by a run (pid {pid}) that was killed",
                entry.path().display()
            );
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
            forget_on_signal(&self.staging);
            if !self.target_existed {
                let _ = fs::remove_dir(&self.target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_killed_runs_staging_is_removed_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        // No process has pid u32::MAX - 1; the one of this test is alive.
        let dead = dir.path().join(format!(".out.staging-{}", u32::MAX - 1));
        let mine = dir.path().join(".other.staging-1");
        fs::create_dir_all(dead.join("merged")).unwrap();
        fs::create_dir_all(&mine).unwrap();
        let st = Staging::new(&dir.path().join("out")).unwrap();
        assert!(!dead.exists(), "a dead run's staging is left");
        assert!(mine.exists(), "another target's staging was touched");
        drop(st);
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_owner_only_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.json");
        write_atomic_private(&p, b"token").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"token");
    }

    #[test]
    fn uncommitted_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("run");
        {
            let s = Staging::new(&target).unwrap();
            write_atomic(&s.path("a.json"), b"{}").unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn commit_moves_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("run");
        let s = Staging::new(&target).unwrap();
        write_atomic(&s.path("a.json"), b"{}").unwrap();
        s.commit().unwrap();
        assert_eq!(fs::read(target.join("a.json")).unwrap(), b"{}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
