//! The compute of fsmerge on tch (libtorch): datasets and augmentation, the original MLPs, the
//! FS-Merge SuperNet with its merge/unmerge (M/U) matrices, local and global training, folding,
//! the baselines and evaluation. Everything here works on one stage of the plan; the
//! coordinator decides how stages are laid out.

pub mod augment;
pub mod baselines;
pub mod bert;
pub mod bert_baselines;
pub mod bert_merge;
pub mod bert_stage;
pub mod bert_supernet;
pub mod collective;
pub mod data;
pub mod dist_train;
pub mod eval;
pub mod feature_cache;
pub mod merge_data;
pub mod mlp;
pub mod mu;
pub mod optim;
pub mod progress;
pub mod runtime;
pub mod stage;
pub mod supernet;
pub mod tensor;
pub mod text_data;
pub mod train_merge;
pub mod vit;
pub mod vit_baselines;
pub mod vit_merge;
pub mod vit_stage;
pub mod vit_supernet;
pub mod wordpiece;

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
