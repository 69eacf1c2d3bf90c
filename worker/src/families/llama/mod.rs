//! Llama-family decoders (Llama, Mistral, Qwen2: RMSNorm, RoPE, grouped-query attention,
//! SwiGLU), issue 16's fourth family. So far: the HF config and the model's forward, checked
//! against transformers (`tests/tests/llama_tests.rs`); the SuperNet, its fold, the stage and
//! the `Family` implementation are still to come.

pub mod config;
pub mod model;
