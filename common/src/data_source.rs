//! Where a model's own data is, in the formats the Hub and `datasets` use: an ImageFolder
//! (`<root>/<class name>/*.png|jpg`), Parquet files (an image column stored as
//! `{bytes, path}`, or a text column; a label column), JSON Lines or CSV (text + label).
//! `path` may be a glob (sharded files). This is the schema; the worker reads it.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The file format of a data source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Imagefolder,
    Parquet,
    Jsonl,
    Csv,
}

/// One data source of a model (`merge_data` or `eval_data` in `[[models]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub format: DataFormat,
    /// A folder (imagefolder) or a file or glob (`data/train-*.parquet`); relative paths are
    /// relative to the working directory.
    pub path: String,
    /// Parquet: the image column (`{bytes, path}` structs, as `datasets` writes images).
    #[serde(default = "default_image_column")]
    pub image_column: String,
    /// Parquet, JSON Lines, CSV: the text column.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// The label column (class ids, or class names mapped through the model's `label2id`);
    /// absent from the files: unlabeled data, which `merge_data` may be.
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// Use at most this many rows (the first ones, in file order).
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_image_column() -> String {
    "image".into()
}
fn default_text_column() -> String {
    "text".into()
}
fn default_label_column() -> String {
    "label".into()
}

/// The most rows a source may contribute (FS-Merge needs hundreds per task).
pub const MAX_ROWS: usize = 10_000_000;

impl DataSource {
    /// Check the fields that do not need the files; `field` names the source in errors
    /// (`models[0].merge_data`).
    pub fn check(&self, field: &str) -> Result<()> {
        if self.path.trim().is_empty() {
            return Err(Error::field(format!("{field}.path"), "is empty"));
        }
        for (name, v) in [
            ("image_column", &self.image_column),
            ("text_column", &self.text_column),
            ("label_column", &self.label_column),
        ] {
            if v.trim().is_empty() {
                return Err(Error::field(format!("{field}.{name}"), "is empty"));
            }
        }
        if self.format == DataFormat::Imagefolder && self.path.contains(['*', '?', '[']) {
            return Err(Error::field(
                format!("{field}.path"),
                "an imagefolder is one folder, not a glob",
            ));
        }
        match self.limit {
            Some(0) => Err(Error::field(format!("{field}.limit"), "must be at least 1")),
            Some(n) if n > MAX_ROWS => Err(Error::field(
                format!("{field}.limit"),
                format!("must be at most {MAX_ROWS}, got {n}"),
            )),
            _ => Ok(()),
        }
    }
}
