//! Texts with labels in JSON Lines (one object per line) or CSV (a header row): the text
//! column, and the label column when the files have it (an integer is a class id, anything
//! else a class name).

use super::{Input, Label, Record};
use fsmerge_common::data_source::{DataFormat, DataSource};
use fsmerge_common::{Error, Result};
use std::path::{Path, PathBuf};

/// The rows of `files` (at most `limit`), file by file.
pub fn read(files: &[PathBuf], src: &DataSource, limit: usize) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for file in files {
        if out.len() == limit {
            break;
        }
        let left = limit - out.len();
        match src.format {
            DataFormat::Csv => csv_rows(file, src, left, &mut out)?,
            _ => jsonl_rows(file, src, left, &mut out)?,
        }
    }
    Ok(out)
}

fn bad(file: &Path, msg: String) -> Error {
    Error::Data {
        path: file.to_path_buf(),
        msg,
    }
}

fn jsonl_rows(file: &Path, src: &DataSource, limit: usize, out: &mut Vec<Record>) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let mut taken = 0;
    for (i, line) in text.lines().enumerate() {
        if taken == limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let row = i + 1;
        let obj: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad(file, format!("line {row}: not a JSON object ({e})")))?;
        let text = match obj.get(&src.text_column) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(bad(
                    file,
                    format!("line {row}: column `{}` is not a string", src.text_column),
                ))
            }
            None => {
                return Err(bad(
                    file,
                    format!("line {row}: no column `{}`", src.text_column),
                ))
            }
        };
        let label = match obj.get(&src.label_column) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(Label::Name(s.clone())),
            Some(v) => Some(v.as_i64().map(Label::Id).ok_or_else(|| {
                bad(
                    file,
                    format!("line {row}: label {v} is neither an integer nor a name"),
                )
            })?),
        };
        out.push(Record {
            input: Input::Text(text),
            label,
            origin: format!("{} line {row}", file.display()),
        });
        taken += 1;
    }
    Ok(())
}

fn csv_rows(file: &Path, src: &DataSource, limit: usize, out: &mut Vec<Record>) -> Result<()> {
    let mut reader = csv::Reader::from_path(file).map_err(|e| bad(file, e.to_string()))?;
    let header = reader
        .headers()
        .map_err(|e| bad(file, format!("header: {e}")))?
        .clone();
    let column = |name: &str| header.iter().position(|h| h == name);
    let text_at = column(&src.text_column).ok_or_else(|| {
        bad(
            file,
            format!(
                "no column `{}` (columns: {:?})",
                src.text_column,
                header.iter().collect::<Vec<_>>()
            ),
        )
    })?;
    let label_at = column(&src.label_column);
    for (i, rec) in reader.records().take(limit).enumerate() {
        // Line numbers count the header.
        let row = i + 2;
        let rec = rec.map_err(|e| bad(file, format!("row {row}: {e}")))?;
        let text = rec.get(text_at).unwrap_or_default().to_string();
        let label = label_at
            .and_then(|j| rec.get(j))
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().map_or(Label::Name(v.to_string()), Label::Id));
        out.push(Record {
            input: Input::Text(text),
            label,
            origin: format!("{} line {row}", file.display()),
        });
    }
    Ok(())
}
