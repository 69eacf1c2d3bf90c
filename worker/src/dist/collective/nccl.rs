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

use super::Collective;
use cudarc::nccl::sys;
use fsmerge_common::{Error, Result};
use std::ffi::CStr;
use std::sync::{Arc, OnceLock};
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

/// One NCCL communicator.
pub struct NcclGroup {
    lib: Arc<sys::Lib>,
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    device: Device,
    allreduce: (f64, u64),
}

// SAFETY: a communicator may be used from any thread as long as calls are not concurrent, which
// `&mut self` on every collective guarantees.
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Join the group `id` as `rank` of `size` on `device` (a CUDA device).
    pub fn new(id: &[u8], rank: usize, size: usize, device: Device) -> Result<Self> {
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
        })
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
        self.sync();
        self.allreduce.0 += clock.elapsed().as_secs_f64();
        self.allreduce.1 += 1;
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        self.cuda_f32(t, "broadcast")?;
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
        self.sync();
        Ok(())
    }

    fn send(&mut self, t: &Tensor, peer: usize) -> Result<()> {
        self.cuda_f32(t, "send")?;
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
        self.sync();
        Ok(())
    }

    fn recv(&mut self, t: &mut Tensor, peer: usize) -> Result<()> {
        self.cuda_f32(t, "recv")?;
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
        self.sync();
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
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
                    let m = NcclGroup::new(&[0; 128], 0, 1, Device::Cpu)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    assert!(m.contains("needs a CUDA device"), "{m}");
                }
            }
        }
    }
}
