//! Hub dataset files in Parquet: an image column stored as `datasets` stores images (a struct
//! `{bytes, path}` holding the encoded PNG or JPEG) or a text column, and an optional label
//! column (an integer class id, as `ClassLabel` is stored, or a class name). Only the needed
//! columns are read.

use super::{Input, InputKind, Label, Record};
use fsmerge_common::data_source::DataSource;
use fsmerge_common::{Error, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use std::path::{Path, PathBuf};

/// The rows of `files` (at most `limit`), file by file.
pub fn read(
    files: &[PathBuf],
    src: &DataSource,
    kind: InputKind,
    limit: usize,
) -> Result<Vec<Record>> {
    let input_column = match kind {
        InputKind::Image => &src.image_column,
        InputKind::Text => &src.text_column,
    };
    let mut out = Vec::new();
    for file in files {
        if out.len() == limit {
            break;
        }
        read_file(file, input_column, &src.label_column, kind, limit, &mut out)?;
    }
    Ok(out)
}

fn bad(file: &Path, msg: String) -> Error {
    Error::Data {
        path: file.to_path_buf(),
        msg,
    }
}

fn read_file(
    file: &Path,
    input_column: &str,
    label_column: &str,
    kind: InputKind,
    limit: usize,
    out: &mut Vec<Record>,
) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let reader = SerializedFileReader::new(f)
        .map_err(|e| bad(file, format!("not a readable Parquet file ({e})")))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    let pick = |name: &str| fields.iter().find(|f| f.name() == name).cloned();
    let input = pick(input_column).ok_or_else(|| {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        bad(
            file,
            format!("no column `{input_column}` (columns: {names:?})"),
        )
    })?;
    let mut projected = vec![input];
    projected.extend(pick(label_column));
    let projection = Type::group_type_builder(schema.name())
        .with_fields(projected)
        .build()
        .map_err(|e| bad(file, e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| bad(file, e.to_string()))?;
    for (i, row) in rows.enumerate() {
        if out.len() == limit {
            break;
        }
        let origin = format!("{} row {i}", file.display());
        let row = row.map_err(|e| bad(file, format!("row {i}: {e}")))?;
        out.push(record(&row, input_column, label_column, kind, origin)?);
    }
    Ok(())
}

fn record(
    row: &Row,
    input_column: &str,
    label_column: &str,
    kind: InputKind,
    origin: String,
) -> Result<Record> {
    let bad = |msg: String| Error::Data {
        path: PathBuf::from(&origin),
        msg,
    };
    let get = |name: &str| {
        row.get_column_iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, f)| f)
    };
    let input = match (kind, get(input_column)) {
        (InputKind::Text, Some(Field::Str(s))) => Input::Text(s.clone()),
        (InputKind::Image, Some(Field::Group(g))) => {
            let bytes = g
                .get_column_iter()
                .find(|(n, _)| n.as_str() == "bytes")
                .map(|(_, f)| f);
            match bytes {
                Some(Field::Bytes(b)) => Input::Image(b.data().to_vec()),
                _ => {
                    return Err(bad(format!(
                        "column `{input_column}` has no image bytes (a `{{bytes, path}}` struct \
                         with `bytes` set is expected)"
                    )))
                }
            }
        }
        (InputKind::Image, Some(Field::Bytes(b))) => Input::Image(b.data().to_vec()),
        (_, other) => {
            let what = match kind {
                InputKind::Image => "an image struct {bytes, path}",
                InputKind::Text => "a string",
            };
            return Err(bad(format!(
                "column `{input_column}` is {}, not {what}",
                other.map_or("null".to_string(), |f| format!("{f}")),
            )));
        }
    };
    let label = match get(label_column) {
        None | Some(Field::Null) => None,
        Some(Field::Str(s)) => Some(Label::Name(s.clone())),
        Some(f) => Some(Label::Id(integer(f).ok_or_else(|| {
            bad(format!(
                "label column `{label_column}` holds {f}, neither an integer nor a name"
            ))
        })?)),
    };
    Ok(Record {
        input,
        label,
        origin,
    })
}

fn integer(f: &Field) -> Option<i64> {
    match *f {
        Field::Byte(v) => Some(v.into()),
        Field::Short(v) => Some(v.into()),
        Field::Int(v) => Some(v.into()),
        Field::Long(v) => Some(v),
        Field::UByte(v) => Some(v.into()),
        Field::UShort(v) => Some(v.into()),
        Field::UInt(v) => Some(v.into()),
        Field::ULong(v) => i64::try_from(v).ok(),
        _ => None,
    }
}
