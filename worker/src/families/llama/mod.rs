//! Llama-family decoders (Llama, Mistral, Qwen2: RMSNorm, RoPE, grouped-query attention,
//! SwiGLU), issue 16's fourth family. So far: the HF config, the model's forward (checked
//! against transformers, `tests/tests/llama_tests.rs`) and the SuperNet with its exact fold;
//! the stage, the training of the originals and the `Family` implementation are still to come.

pub mod config;
pub mod model;
pub mod supernet;
