//! A user's data in the formats the Hub and `datasets` use (ImageFolder, Parquet with images as
//! `{bytes, path}` structs, Parquet/JSON Lines/CSV texts), written by Python (pyarrow, Pillow)
//! and read by fsmerge's sources; bad input named by file, row and column.

use fsmerge_common::data_source::{DataFormat, DataSource};
use fsmerge_common::Error;
use fsmerge_tests::python_fixture;
use fsmerge_worker::data::sources::{self, Input, InputKind, Label, Record};
use std::collections::BTreeMap;
use std::path::Path;

fn source(format: DataFormat, path: &Path) -> DataSource {
    DataSource {
        format,
        path: path.display().to_string(),
        image_column: "image".into(),
        text_column: "text".into(),
        label_column: "label".into(),
        limit: None,
    }
}

fn texts(records: &[Record]) -> Vec<(String, Option<Label>)> {
    records
        .iter()
        .map(|r| match &r.input {
            Input::Text(t) => (t.clone(), r.label.clone()),
            Input::Image(_) => panic!("{}: an image, not a text", r.origin),
        })
        .collect()
}

#[test]
fn every_format_reads_what_python_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    python_fixture("user_data_formats.py", &[out]);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("expected.json")).unwrap()).unwrap();
    let images = expected["images"].as_array().unwrap();

    // ImageFolder: class folders in name order, files sorted; labels are the folder names.
    let folder = sources::read(
        &source(DataFormat::Imagefolder, &out.join("images")),
        InputKind::Image,
    )
    .unwrap();
    assert_eq!(folder.len(), images.len());
    for r in &folder {
        let file = Path::new(&r.origin);
        let class = file
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(r.label, Some(Label::Name(class.into())));
        assert_eq!(r.input, Input::Image(std::fs::read(file).unwrap()));
    }

    // Parquet shards through a glob: the same PNG bytes, int labels, in row order.
    let parquet = sources::read(
        &source(DataFormat::Parquet, &out.join("parquet/train-*.parquet")),
        InputKind::Image,
    )
    .unwrap();
    assert_eq!(parquet.len(), images.len());
    for (r, want) in parquet.iter().zip(images) {
        let class = want["class"].as_str().unwrap();
        let file = out
            .join("images")
            .join(class)
            .join(want["file"].as_str().unwrap());
        assert_eq!(
            r.input,
            Input::Image(std::fs::read(&file).unwrap()),
            "{}",
            r.origin
        );
        assert_eq!(r.label, Some(Label::Id(want["label"].as_i64().unwrap())));
    }
    assert!(parquet[4]
        .origin
        .ends_with("train-00001-of-00002.parquet row 0"));

    // Texts: string labels (Parquet), int labels (JSON Lines), CSV with quotes and newlines.
    let ids: BTreeMap<String, i64> = serde_json::from_value(expected["label2id"].clone()).unwrap();
    let want: Vec<(String, Option<String>)> = expected["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["text"].as_str().unwrap().to_string(),
                t["label"].as_str().map(String::from),
            )
        })
        .collect();
    let by_name: Vec<_> = want
        .iter()
        .map(|(t, l)| (t.clone(), l.clone().map(Label::Name)))
        .collect();
    let by_id: Vec<_> = want
        .iter()
        .map(|(t, l)| (t.clone(), l.as_ref().map(|l| Label::Id(ids[l]))))
        .collect();
    let read = |format, file: &str| {
        texts(&sources::read(&source(format, &out.join(file)), InputKind::Text).unwrap())
    };
    assert_eq!(read(DataFormat::Parquet, "text.parquet"), by_name);
    assert_eq!(read(DataFormat::Jsonl, "texts.jsonl"), by_id);
    assert_eq!(read(DataFormat::Csv, "texts.csv"), by_name);

    // `limit` keeps the first rows.
    let mut first = source(DataFormat::Parquet, &out.join("parquet/*.parquet"));
    first.limit = Some(5);
    assert_eq!(sources::read(&first, InputKind::Image).unwrap().len(), 5);

    // Labels through a model's label2id.
    let label2id: BTreeMap<String, usize> = [("cat".to_string(), 0), ("dog".to_string(), 1)].into();
    let classes = sources::class_ids(&folder, &label2id, 2, Path::new("m/config.json")).unwrap();
    assert_eq!(classes, [0, 0, 0, 1, 1, 1]);
}

/// The error's text, which must name what is wrong.
fn error(src: &DataSource, kind: InputKind) -> String {
    let e: Error = sources::read(src, kind).expect_err("should fail");
    e.to_string()
}

#[test]
fn bad_sources_name_the_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    python_fixture("user_data_formats.py", &[out]);

    let mut s = source(DataFormat::Parquet, &out.join("parquet/*.parquet"));
    s.image_column = "img".into();
    let e = error(&s, InputKind::Image);
    assert!(
        e.contains("train-00000-of-00002.parquet") && e.contains("no column `img`"),
        "{e}"
    );

    let s = source(DataFormat::Parquet, &out.join("text.parquet"));
    let e = error(&s, InputKind::Image);
    assert!(e.contains("no column `image`"), "{e}");

    let mut s = source(DataFormat::Csv, &out.join("texts.csv"));
    s.text_column = "body".into();
    let e = error(&s, InputKind::Text);
    assert!(
        e.contains("texts.csv") && e.contains("no column `body`"),
        "{e}"
    );

    let mut s = source(DataFormat::Jsonl, &out.join("texts.jsonl"));
    s.text_column = "body".into();
    let e = error(&s, InputKind::Text);
    assert!(
        e.contains("texts.jsonl") && e.contains("line 1: no column `body`"),
        "{e}"
    );

    let s = source(DataFormat::Parquet, &out.join("nothing-*.parquet"));
    assert!(error(&s, InputKind::Image).contains("no file matches"));

    let s = source(DataFormat::Parquet, &out.join("texts.csv"));
    let e = error(&s, InputKind::Text);
    assert!(
        e.contains("texts.csv") && e.contains("not a readable Parquet file"),
        "{e}"
    );

    let s = source(DataFormat::Imagefolder, &out.join("images"));
    assert!(error(&s, InputKind::Text).contains("holds images"));

    std::fs::create_dir(out.join("empty")).unwrap();
    let s = source(DataFormat::Imagefolder, &out.join("empty"));
    assert!(error(&s, InputKind::Image).contains("no rows"));

    let bad_json = out.join("bad.jsonl");
    std::fs::write(&bad_json, "{\"text\": \"ok\"}\n{not json\n").unwrap();
    let e = error(&source(DataFormat::Jsonl, &bad_json), InputKind::Text);
    assert!(
        e.contains("bad.jsonl") && e.contains("line 2: not a JSON object"),
        "{e}"
    );

    // A label the model does not know names the row and the model's config.
    let records = sources::read(
        &source(DataFormat::Csv, &out.join("texts.csv")),
        InputKind::Text,
    )
    .unwrap();
    let label2id: BTreeMap<String, usize> = [("ham".to_string(), 0)].into();
    let e = sources::class_ids(&records, &label2id, 2, Path::new("m/config.json"))
        .expect_err("spam is unknown")
        .to_string();
    assert!(
        e.contains("texts.csv line 2") && e.contains("label `spam`") && e.contains("m/config.json"),
        "{e}"
    );
    let ids = [Record {
        input: Input::Text("x".into()),
        label: Some(Label::Id(7)),
        origin: "f.jsonl line 9".into(),
    }];
    let e = sources::class_ids(&ids, &label2id, 2, Path::new("m/config.json"))
        .expect_err("7 is out of range")
        .to_string();
    assert!(e.contains("f.jsonl line 9") && e.contains("label 7"), "{e}");
}
