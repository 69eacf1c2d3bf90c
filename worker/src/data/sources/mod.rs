//! A user's data as records (an encoded image or a text, an optional label, and where the
//! record came from, for error messages), read from a `DataSource`: an ImageFolder, Parquet,
//! JSON Lines or CSV. Decoding and preprocessing are the model's (`data::preprocess`); labels
//! are mapped to class ids through the model's `label2id` (`class_ids`).

pub mod imagefolder;
pub mod parquet;
pub mod table;

use fsmerge_common::data_source::{DataFormat, DataSource};
use fsmerge_common::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the model reads: images (ViT) or texts (BERT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Image,
    Text,
}

/// One input: an encoded image file (PNG, JPEG) or a text.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Image(Vec<u8>),
    Text(String),
}

/// A label as the data gives it: a class id or a class name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    Id(i64),
    Name(String),
}

/// One row of a data source.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub input: Input,
    pub label: Option<Label>,
    /// The file (and row) it came from, as errors name it.
    pub origin: String,
}

/// Every record of `src` (at most `src.limit`), in file order, for a model reading `kind`.
/// No record is an error naming the source.
pub fn read(src: &DataSource, kind: InputKind) -> Result<Vec<Record>> {
    let limit = src.limit.unwrap_or(fsmerge_common::data_source::MAX_ROWS);
    let records = match (src.format, kind) {
        (DataFormat::Imagefolder, InputKind::Image) => {
            imagefolder::read(&PathBuf::from(&src.path), limit)?
        }
        (DataFormat::Imagefolder, InputKind::Text) => {
            return Err(bad(
                src,
                "an imagefolder holds images; this model reads texts",
            ))
        }
        (DataFormat::Parquet, kind) => parquet::read(&files(src)?, src, kind, limit)?,
        (DataFormat::Jsonl | DataFormat::Csv, InputKind::Text) => {
            table::read(&files(src)?, src, limit)?
        }
        (DataFormat::Jsonl | DataFormat::Csv, InputKind::Image) => {
            return Err(bad(
                src,
                "JSON Lines and CSV sources hold texts; this model reads images",
            ))
        }
    };
    if records.is_empty() {
        return Err(bad(src, "no rows"));
    }
    Ok(records)
}

fn bad(src: &DataSource, msg: &str) -> Error {
    Error::Data {
        path: PathBuf::from(&src.path),
        msg: msg.to_string(),
    }
}

/// Every file `src` is read from: an image folder's images, else the files of `files`.
pub fn input_files(src: &DataSource) -> Result<Vec<PathBuf>> {
    match src.format {
        DataFormat::Imagefolder => imagefolder::files(Path::new(&src.path)),
        _ => files(src),
    }
}

/// The files `src.path` names (a file or a glob), sorted; none is an error.
pub fn files(src: &DataSource) -> Result<Vec<PathBuf>> {
    let pattern = &src.path;
    let paths = glob::glob(pattern).map_err(|e| bad(src, &format!("bad glob pattern: {e}")))?;
    let mut out = Vec::new();
    for p in paths {
        let p = p.map_err(|e| Error::io(e.path(), std::io::Error::other(e.to_string())))?;
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(bad(src, "no file matches"));
    }
    Ok(out)
}

/// The class id of every record, through the model's `label2id` (names) and its class count
/// (ids); `model` names the model's `config.json` in errors. An unlabeled record is an error:
/// call this only for data that must be labeled (`eval_data`).
pub fn class_ids(
    records: &[Record],
    label2id: &BTreeMap<String, usize>,
    classes: usize,
    model: &std::path::Path,
) -> Result<Vec<usize>> {
    records
        .iter()
        .map(|r| {
            let bad = |msg: String| Error::Data {
                path: PathBuf::from(&r.origin),
                msg,
            };
            match &r.label {
                None => Err(bad("no label".into())),
                Some(Label::Name(n)) => label2id.get(n).copied().ok_or_else(|| {
                    bad(format!(
                        "label `{n}` is not in the model's label2id ({}): {:?}",
                        model.display(),
                        label2id.keys().collect::<Vec<_>>()
                    ))
                }),
                Some(Label::Id(i)) => usize::try_from(*i)
                    .ok()
                    .filter(|&i| i < classes)
                    .ok_or_else(|| {
                        bad(format!(
                            "label {i} is not a class of the model ({classes} classes, {})",
                            model.display()
                        ))
                    }),
            }
        })
        .collect()
}
