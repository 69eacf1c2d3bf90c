//! The GPU backend: NCCL through cudarc's bindings, on the device pointers of tch CUDA tensors,
//! on the default stream.
//!
//! The library is loaded at run time (cudarc's `dynamic-loading`), so fsmerge builds and runs
//! without CUDA. pip's NCCL ships only `libnccl.so.2`, a name cudarc's own search does not try,
//! so the library is opened by that name (or `$FSMERGE_NCCL_LIB`) through `sys::Lib::new`; a
//! missing library or GPU is an error saying what was looked for.
//!
//! Bootstrap: the group's first rank creates the unique id (`unique_id`), the coordinator relays
//! its 128 bytes to the other members, and every member calls `NcclGroup::new`.
//!
//! Watchdog: instead of blocking in a device synchronize, a worker polls the stream (the CUDA
//! runtime's `cudaStreamQuery`, found in the libcudart libtorch loaded) and NCCL's asynchronous
//! error; past the deadline it aborts the communicator (`ncclCommAbort`) and fails, naming the
//! collective, as PyTorch's NCCL watchdog does.

use super::watchdog::{stall_if_injected, Watchdog};
use super::Collective;
use cudarc::nccl::sys;
use fsmerge_common::{Error, Result};
use std::ffi::CStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Name of pip's NCCL library (nvidia-nccl-cu*).
pub const DEFAULT_LIB: &str = "libnccl.so.2";

fn lib_name() -> String {
    std::env::var("FSMERGE_NCCL_LIB").unwrap_or_else(|_| DEFAULT_LIB.to_string())
}

/// The loaded library, shared by every communicator of the process.
pub fn library() -> Result<Arc<sys::Lib>> {
    static LIB: OnceLock<std::result::Result<Arc<sys::Lib>, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let name = lib_name();
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        unsafe { sys::Lib::new(&name) }.map(Arc::new).map_err(|e| {
            format!(
                "cannot load NCCL `{name}` ({e}); install the nvidia-nccl wheel that matches \
                     torch, add its lib folder to LD_LIBRARY_PATH, or set FSMERGE_NCCL_LIB, or \
                     use `cluster.backend = \"quic\"`"
            )
        })
    })
    .clone()
    .map_err(Error::Collective)
}

fn check(lib: &sys::Lib, r: sys::ncclResult_t, what: &str) -> Result<()> {
    if r == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
    let msg = unsafe { CStr::from_ptr((lib.ncclGetErrorString)(r)) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Collective(format!("NCCL {what}: {msg} ({r:?})")))
}

/// NCCL's version, e.g. 22704 for 2.27.4.
pub fn version() -> Result<i32> {
    let lib = library()?;
    let mut v = 0;
    // SAFETY: writes one int.
    check(&lib, unsafe { (lib.ncclGetVersion)(&mut v) }, "version")?;
    Ok(v)
}

/// The CUDA device a worker with local rank `local_rank` uses: one GPU per worker.
pub fn device_for(local_rank: usize) -> Result<Device> {
    let count = tch::Cuda::device_count();
    if count <= 0 || !tch::Cuda::is_available() {
        return Err(Error::Collective(
            "the NCCL backend needs a CUDA device, and libtorch sees none \
             (no GPU, no driver, or a CPU-only torch)"
                .into(),
        ));
    }
    Ok(Device::Cuda(local_rank % count as usize))
}

/// A new unique id (called by the group's first rank; that process must stay alive).
pub fn unique_id() -> Result<Vec<u8>> {
    let lib = library()?;
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: writes the 128-byte id.
    check(
        &lib,
        unsafe { (lib.ncclGetUniqueId)(&mut id) },
        "get unique id",
    )?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// `cudaStreamQuery`: 0 when the stream's work is done, 600 (`cudaErrorNotReady`) while not.
type StreamQuery = unsafe extern "C" fn(sys::cudaStream_t) -> i32;
const CUDA_SUCCESS: i32 = 0;
const CUDA_NOT_READY: i32 = 600;

/// The CUDA runtime's stream query: from the libcudart libtorch_cuda already loaded (the
/// process's global symbols), else by name. None: no watchdog, a plain synchronize.
fn stream_query() -> Option<StreamQuery> {
    static QUERY: OnceLock<Option<StreamQuery>> = OnceLock::new();
    *QUERY.get_or_init(|| {
        let this = libloading::os::unix::Library::this();
        // SAFETY: the symbol has cudaStreamQuery's C signature; the library stays loaded for
        // the process's life (libtorch_cuda needs it, and the handle is leaked).
        let found = unsafe { this.get::<StreamQuery>(b"cudaStreamQuery\0") }.map(|f| *f);
        std::mem::forget(this);
        let found = found.ok().or_else(|| {
            ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
                .iter()
                .find_map(|name| {
                    // SAFETY: loading the CUDA runtime runs its initialisers only.
                    let lib = unsafe { libloading::Library::new(name) }.ok()?;
                    // SAFETY: as above.
                    let f = unsafe { lib.get::<StreamQuery>(b"cudaStreamQuery\0") }.ok()?;
                    let f = *f;
                    std::mem::forget(lib);
                    Some(f)
                })
        });
        if found.is_none() {
            tracing::warn!("cudaStreamQuery not found: NCCL collectives run without a watchdog");
        }
        found
    })
}

/// One NCCL communicator.
pub struct NcclGroup {
    lib: Arc<sys::Lib>,
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    device: Device,
    allreduce: (f64, u64),
    /// "pipeline" or "replica group", for the watchdog's errors.
    label: &'static str,
    watchdog: Watchdog,
    /// Operations issued so far, to say which one stalled.
    ops: u64,
    /// Set by the watchdog: an aborted communicator must not be destroyed.
    aborted: bool,
}

// SAFETY: a communicator may be used from any thread as long as calls are not concurrent, which
// `&mut self` on every collective guarantees.
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Join the group `id` as `rank` of `size` on `device` (a CUDA device); `label` names the
    /// group in the watchdog's errors.
    pub fn new(
        id: &[u8],
        (rank, size): (usize, usize),
        device: Device,
        (label, watchdog): (&'static str, Watchdog),
    ) -> Result<Self> {
        let lib = library()?;
        let Device::Cuda(index) = device else {
            return Err(Error::Collective(format!(
                "the NCCL backend needs a CUDA device, got {device:?}"
            )));
        };
        if id.len() != 128 {
            return Err(Error::Collective(format!(
                "an NCCL unique id has 128 bytes, got {}",
                id.len()
            )));
        }
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, &s) in uid.internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        // Make the device current for NCCL's init (it allocates on the current device).
        let _ = Tensor::zeros([1], (Kind::Float, device));
        tch::Cuda::synchronize(index as i64);
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: comm is written by NCCL; the id came from ncclGetUniqueId.
        let r = unsafe { (lib.ncclCommInitRank)(&mut comm, size as i32, uid, rank as i32) };
        check(&lib, r, "communicator init")?;
        Ok(Self {
            lib,
            comm,
            rank,
            size,
            device,
            allreduce: (0.0, 0),
            label,
            watchdog,
            ops: 0,
            aborted: false,
        })
    }

    /// Count a new operation and name it ("all-reduce #12 in the replica group").
    fn next_op(&mut self, op: &str) -> String {
        self.ops += 1;
        format!("NCCL {op} #{} in the {}", self.ops, self.label)
    }

    /// Wait for the operation `what` (moving `bytes`) to complete within the watchdog's
    /// deadline, polling the stream and NCCL's asynchronous error; on expiry or an NCCL error
    /// the communicator is aborted, so that no rank stays blocked in it.
    fn wait(&mut self, what: &str, bytes: usize) -> Result<()> {
        let Some(query) = stream_query() else {
            self.sync();
            return Ok(());
        };
        let deadline = self.watchdog.deadline(bytes);
        let start = Instant::now();
        let mut nap = Duration::from_micros(10);
        loop {
            // SAFETY: queries the legacy default stream, where the operation was enqueued.
            match unsafe { query(null_stream()) } {
                CUDA_SUCCESS => return Ok(()),
                CUDA_NOT_READY => {}
                e => return Err(Error::Collective(format!("{what}: CUDA error {e}"))),
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: writes one result code of a live communicator.
            let r = unsafe { (self.lib.ncclCommGetAsyncError)(self.comm, &mut async_error) };
            check(&self.lib, r, what)?;
            if async_error != sys::ncclResult_t::ncclSuccess {
                self.abort();
                return check(&self.lib, async_error, what);
            }
            if start.elapsed() > deadline {
                self.abort();
                return Err(Error::Collective(format!(
                    "watchdog: {what} did not complete within {deadline:.1?}: a member of the \
                     group is stalled (cluster.collective_timeout_secs); communicator aborted"
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }

    fn abort(&mut self) {
        // SAFETY: the communicator is live; after the abort it is never used again.
        unsafe {
            (self.lib.ncclCommAbort)(self.comm);
        }
        self.aborted = true;
    }

    fn cuda_f32(&self, t: &Tensor, what: &str) -> Result<()> {
        if t.device() != self.device || t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(Error::Collective(format!(
                "{what}: NCCL needs a contiguous f32 tensor on {:?}, got {:?} on {:?}",
                self.device,
                t.kind(),
                t.device()
            )));
        }
        Ok(())
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }
}

fn null_stream() -> sys::cudaStream_t {
    std::ptr::null_mut()
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn device(&self) -> Device {
        self.device
    }

    fn allreduce_time(&self) -> (f64, u64) {
        self.allreduce
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        self.cuda_f32(t, "all-reduce")?;
        let what = self.next_op("all-reduce");
        stall_if_injected("all-reduce");
        let clock = std::time::Instant::now();
        let p = t.data_ptr();
        // SAFETY: in-place all-reduce over numel floats of a live CUDA tensor.
        let r = unsafe {
            (self.lib.ncclAllReduce)(
                p,
                p,
                t.numel(),
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                null_stream(),
            )
        };
        check(&self.lib, r, "all-reduce")?;
        self.wait(&what, t.numel() * 4)?;
        self.allreduce.0 += clock.elapsed().as_secs_f64();
        self.allreduce.1 += 1;
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        self.cuda_f32(t, "broadcast")?;
        let what = self.next_op("broadcast");
        let p = t.data_ptr();
        // SAFETY: in-place broadcast over numel floats of a live CUDA tensor.
        let r = unsafe {
            (self.lib.ncclBroadcast)(
                p,
                p,
                t.numel(),
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                null_stream(),
            )
        };
        check(&self.lib, r, "broadcast")?;
        self.wait(&what, t.numel() * 4)
    }

    fn send(&mut self, t: &Tensor, peer: usize) -> Result<()> {
        self.cuda_f32(t, "send")?;
        let what = self.next_op(&format!("send to member {peer}"));
        // SAFETY: sends numel floats of a live CUDA tensor.
        let r = unsafe {
            (self.lib.ncclSend)(
                t.data_ptr(),
                t.numel(),
                sys::ncclDataType_t::ncclFloat32,
                peer as i32,
                self.comm,
                null_stream(),
            )
        };
        check(&self.lib, r, "send")?;
        self.wait(&what, t.numel() * 4)
    }

    fn recv(&mut self, t: &mut Tensor, peer: usize) -> Result<()> {
        self.cuda_f32(t, "recv")?;
        let what = self.next_op(&format!("receive from member {peer}"));
        // SAFETY: receives numel floats into a live CUDA tensor.
        let r = unsafe {
            (self.lib.ncclRecv)(
                t.data_ptr(),
                t.numel(),
                sys::ncclDataType_t::ncclFloat32,
                peer as i32,
                self.comm,
                null_stream(),
            )
        };
        check(&self.lib, r, "recv")?;
        self.wait(&what, t.numel() * 4)
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if self.aborted {
            return;
        }
        // SAFETY: the communicator is live and used by no other call.
        unsafe {
            (self.lib.ncclCommDestroy)(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the library the error says what was looked for; without a GPU it says so.
    #[test]
    fn missing_library_or_gpu_is_a_clear_error() {
        match library() {
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.contains("cannot load NCCL") && m.contains("libnccl"),
                    "{m}"
                );
            }
            Ok(_) => {
                if !tch::Cuda::is_available() {
                    let m = device_for(0).unwrap_err().to_string();
                    assert!(m.contains("needs a CUDA device"), "{m}");
                    let dog = ("test group", Watchdog::new(1.0));
                    let m = NcclGroup::new(&[0; 128], (0, 1), Device::Cpu, dog)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    assert!(m.contains("needs a CUDA device"), "{m}");
                }
            }
        }
    }
}
