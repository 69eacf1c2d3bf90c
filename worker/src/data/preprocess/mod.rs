//! Each model's own preprocessing of a user's data, as `transformers` does it: images through
//! the model's `preprocessor_config.json` (`image`), texts through its `tokenizer.json`
//! (`text`).

pub mod image;
pub mod parallel;
pub mod resize;
pub mod text;
