//! The compute of fsmerge on tch (libtorch). `core`, `train` and `data` know no model family;
//! each family (`families/*`) builds on them and implements the `Family` trait (`family`), which
//! is all the distributed runtime (`dist`) and the coordinator see of it. Everything here works
//! on one stage of the plan; the coordinator decides how stages are laid out.

pub mod core;
pub mod data;
pub mod dist;
pub mod families;
pub mod family;
pub mod train;

pub use fsmerge_common::{Error, Result};

/// Set libtorch's intra-op threads (0 = all cores) and disable inter-op parallelism so runs are
/// deterministic for a given thread count.
pub fn set_threads(threads: usize) {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    tch::set_num_threads(n as i32);
}
