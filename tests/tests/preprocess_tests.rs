//! Image preprocessing against transformers: fsmerge's port of the slow `ViTImageProcessor`
//! (decode, Pillow's `convert`, Pillow's resize, rescale, normalize) on the `pixel_values` that
//! transformers computes for the same PNG files under many `preprocessor_config.json` variants,
//! Pillow's resize alone bit for bit for all six filters, and refused configs and images.

use fsmerge_common::checkpoint::{read_tensors, HostTensor};
use fsmerge_tests::python_fixture;
use fsmerge_worker::data::preprocess::image::{decode, pixels, ImageProcessor};
use fsmerge_worker::data::preprocess::resize::{resize, Filter};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture's output (images, configs, expected values), written once per test process.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("image_processor_parity");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        python_fixture("image_processor_parity.py", &[&dir]);
        dir
    })
}

/// `cases.json` and every expected tensor named in it.
fn cases() -> (Value, BTreeMap<String, HostTensor>) {
    let dir = fixture();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let file = dir.join("expected.safetensors");
    let names = fsmerge_common::checkpoint::tensor_names(&file).unwrap();
    (cases, read_tensors(&file, &names).unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn vit_image_processor_matches_transformers_on_png() {
    let (cases, expected) = cases();
    let dir = fixture();
    let images: Vec<(String, Vec<u8>)> = cases["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap().to_string();
            let bytes = std::fs::read(dir.join("images").join(&n)).unwrap();
            (n, bytes)
        })
        .collect();
    let mut worst = 0f32;
    for (k, cfg) in cases["configs"].as_array().unwrap().iter().enumerate() {
        let proc = ImageProcessor::load(&dir.join(cfg["dir"].as_str().unwrap())).unwrap();
        let channels = cfg["channels"].as_u64().unwrap() as usize;
        let mut cfg_worst = 0f32;
        for (j, (name, bytes)) in images.iter().enumerate() {
            let img = decode(bytes, name).unwrap();
            let got = proc.process(&img, channels, name).unwrap();
            let want = &expected[&format!("cfg{k}/img{j}")];
            assert_eq!(
                got.len(),
                want.data.len(),
                "cfg{k} {name}: {:?}",
                want.shape
            );
            let d = max_abs_diff(&got, &want.data);
            assert!(d <= 1e-5, "cfg{k} {name}: max abs diff {d}");
            cfg_worst = cfg_worst.max(d);
        }
        let resize = if proc.do_resize {
            let f = proc.resample.pil_code();
            format!("{}x{} resample {f}", proc.height, proc.width)
        } else {
            "no resize".to_string()
        };
        println!("cfg{k} ({channels} ch, {resize}): max abs diff {cfg_worst:e}");
        worst = worst.max(cfg_worst);
    }
    println!("all configs: max abs diff {worst:e}");
}

#[test]
fn resize_is_bit_exact_with_pillow_for_every_filter() {
    let (cases, expected) = cases();
    let dir = fixture();
    let mut per_filter = [0usize; 6];
    for case in cases["resizes"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let file = case["image"].as_str().unwrap();
        let img = decode(&std::fs::read(dir.join("images").join(file)).unwrap(), file).unwrap();
        let src = pixels(&img, 3, file).unwrap();
        let code = case["filter"].as_i64().unwrap();
        let out = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let size = (img.width() as usize, img.height() as usize);
        let got = resize(&src, size, 3, out, Filter::from_pil(code).unwrap()).unwrap();
        let got: Vec<f32> = got.iter().map(|&v| f32::from(v)).collect();
        let d = max_abs_diff(&got, &expected[name].data);
        assert_eq!(d, 0.0, "{name}: max abs diff {d} (u8 levels)");
        per_filter[code as usize] += 1;
    }
    assert!(per_filter.iter().all(|&n| n > 0), "{per_filter:?}");
    println!("bit-exact resizes per filter 0..=5: {per_filter:?}");
}

/// `preprocessor_config.json` with `json` in a fresh folder; the error of loading it.
fn load_error(json: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("preprocessor_config.json"), json).unwrap();
    let e = ImageProcessor::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("preprocessor_config.json"), "{e}");
    e
}

#[test]
fn bad_preprocessor_configs_are_refused_by_name() {
    let e = load_error(r#"{"image_processor_type": "CLIPImageProcessor"}"#);
    assert!(
        e.contains("image_processor_type") && e.contains("CLIPImageProcessor"),
        "{e}"
    );
    let e = load_error(r#"{"size": {"shortest_edge": 224}}"#);
    assert!(e.contains("`size`") && e.contains("shortest_edge"), "{e}");
    let e = load_error(r#"{"resample": 9}"#);
    assert!(e.contains("`resample`"), "{e}");
    let e = load_error(r#"{"image_std": "big"}"#);
    assert!(e.contains("`image_std`"), "{e}");
    let e = load_error("{not json");
    assert!(e.contains("not valid JSON"), "{e}");
    let missing = tempfile::tempdir().unwrap();
    let e = ImageProcessor::load(missing.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("preprocessor_config.json"), "{e}");

    // A mean of the wrong length: refused for the model's channel count, naming file and key.
    let tmp = tempfile::tempdir().unwrap();
    let json = r#"{"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]}"#;
    std::fs::write(tmp.path().join("preprocessor_config.json"), json).unwrap();
    let proc = ImageProcessor::load(tmp.path()).unwrap();
    let e = proc.check_channels(3).unwrap_err().to_string();
    assert!(
        e.contains("preprocessor_config.json") && e.contains("`image_mean` has 2 values"),
        "{e}"
    );
    let img = decode(
        &std::fs::read(fixture().join("images/img0.png")).unwrap(),
        "x",
    )
    .unwrap();
    let e = proc.process(&img, 3, "img0.png").unwrap_err().to_string();
    assert!(
        e.contains("`image_mean` has 2 values for a 3-channel model"),
        "{e}"
    );
}

#[test]
fn undecodable_image_is_an_error_naming_its_origin() {
    let e = decode(b"not a png", "train.parquet row 17")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.parquet row 17") && e.contains("decode"),
        "{e}"
    );
}
