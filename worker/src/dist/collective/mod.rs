//! Collectives of the data plane behind one trait: a CPU backend (ring all-reduce and
//! point-to-point over direct worker-to-worker QUIC streams) and NCCL on CUDA tensors. A group
//! is an ordered set of workers; ranks here are positions in the group.
//!
//! Every call is blocking and must be made by every member in the same order (as in MPI/NCCL).
//! A dead, unreachable or stalled peer is an error naming it, never a hang: QUIC's idle timeout
//! and the watchdog (`watchdog.rs`, both backends) bound every wait.

pub mod nccl;
pub mod quic;
pub mod watchdog;

use fsmerge_common::Result;
use tch::Tensor;

pub trait Collective {
    /// This worker's position in the group.
    fn rank(&self) -> usize;
    /// Members of the group.
    fn size(&self) -> usize;
    /// Sum a flat f32 tensor over the group, in place; every member ends with the same values.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()>;
    /// Replace `t` on every member by the root's `t`.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Send an f32 tensor to `peer` (which must `recv` one of the same size).
    fn send(&mut self, t: &Tensor, peer: usize) -> Result<()>;
    /// Receive into `t` (its size says how much) from `peer`.
    fn recv(&mut self, t: &mut Tensor, peer: usize) -> Result<()>;
    /// Return once every member has called it.
    fn barrier(&mut self) -> Result<()> {
        let mut one = Tensor::ones([1], (tch::Kind::Float, self.device()));
        self.all_reduce_sum(&mut one)
    }
    /// Where this backend's tensors live.
    fn device(&self) -> tch::Device;
    /// Seconds spent in all-reduces so far, and how many there were.
    fn allreduce_time(&self) -> (f64, u64) {
        (0.0, 0)
    }
}

/// A group of one: every collective is the identity (the single-worker path).
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut Tensor, _: usize) -> Result<()> {
        Ok(())
    }
    fn send(&mut self, _: &Tensor, peer: usize) -> Result<()> {
        Err(fsmerge_common::Error::Collective(format!(
            "send to member {peer} of a group of one"
        )))
    }
    fn recv(&mut self, _: &mut Tensor, peer: usize) -> Result<()> {
        Err(fsmerge_common::Error::Collective(format!(
            "receive from member {peer} of a group of one"
        )))
    }
    fn device(&self) -> tch::Device {
        tch::Device::Cpu
    }
}

/// A group whose receives are timed: on a pipeline, the time a stage waits for its neighbours
/// (the pipeline bubble, plus the transfers) against the phase's wall time.
pub struct TimedRecv<'a> {
    pub inner: &'a mut dyn Collective,
    pub recv_seconds: f64,
}

impl Collective for TimedRecv<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        self.inner.all_reduce_sum(t)
    }
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        self.inner.broadcast(t, root)
    }
    fn send(&mut self, t: &Tensor, peer: usize) -> Result<()> {
        self.inner.send(t, peer)
    }
    fn recv(&mut self, t: &mut Tensor, peer: usize) -> Result<()> {
        let clock = std::time::Instant::now();
        let r = self.inner.recv(t, peer);
        self.recv_seconds += clock.elapsed().as_secs_f64();
        r
    }
    fn barrier(&mut self) -> Result<()> {
        self.inner.barrier()
    }
    fn device(&self) -> tch::Device {
        self.inner.device()
    }
    fn allreduce_time(&self) -> (f64, u64) {
        self.inner.allreduce_time()
    }
}
