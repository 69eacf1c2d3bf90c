//! What every model family uses and no family owns: tensors and linear maps, the M/U
//! parametrisations, frozen and merged layers, LayerNorm and attention, the transformer
//! SuperNets' shared parts, the reconstruction loss, the shared pieces of the baselines, and
//! evaluation.

pub mod attention;
pub mod baselines;
pub mod checks;
pub mod encoder_block;
pub mod eval;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod merged_linear;
pub mod merged_output;
pub mod mu;
pub mod tensor;
pub mod transformer;
