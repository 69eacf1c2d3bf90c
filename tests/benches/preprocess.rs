//! Image preprocessing throughput: fsmerge's decode + `ViTImageProcessor` (Rust, Pillow's
//! resampling) against transformers' slow `ViTImageProcessor` in Python (PIL decode + process)
//! on the same PNG files, measured side by side in one run. Python runs on one thread; fsmerge
//! is timed on one thread (same thread count) and on every core.
//!
//! `cargo bench -p fsmerge-tests --bench preprocess` (N images: `FSMERGE_BENCH_IMAGES`, 400).

use fsmerge_tests::python_fixture;
use fsmerge_worker::data::preprocess::image::{decode, ImageProcessor};
use fsmerge_worker::data::preprocess::parallel::{process_all, threads, Encoded};
use std::time::Instant;

fn main() {
    let n: usize = std::env::var("FSMERGE_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let dir = tempfile::tempdir().unwrap();
    let printed = python_fixture(
        "bench_processor.py",
        &[dir.path(), std::path::Path::new(&n.to_string())],
    );
    let python: f64 = printed
        .lines()
        .find_map(|l| l.strip_prefix("python: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("python's throughput");
    let p = ImageProcessor::load(dir.path()).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    files.sort();
    println!(
        "{} PNG images 320x240 -> 224x224 (bilinear, ImageNet mean/std), decoding included",
        files.len()
    );
    println!("transformers ViTImageProcessor (Python, 1 thread): {python:.1} images/s");
    // Where one thread's time goes: decoding alone, then resize + normalize of decoded images.
    let bytes: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let best_of_3 = |f: &dyn Fn()| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let decode_s = best_of_3(&|| {
        for b in &bytes {
            decode(b, "bench").unwrap();
        }
    });
    let decoded: Vec<_> = bytes.iter().map(|b| decode(b, "bench").unwrap()).collect();
    let process_s = best_of_3(&|| {
        for img in &decoded {
            p.process(img, 3, "bench").unwrap();
        }
    });
    println!(
        "one thread: decode {:.2} ms/image, resize + normalize {:.2} ms/image",
        1e3 * decode_s / files.len() as f64,
        1e3 * process_s / files.len() as f64
    );
    for t in [1, threads()] {
        let best = (0..3)
            .map(|_| {
                let start = Instant::now();
                // Reading the files is part of it, as PIL's open is in Python's time.
                let bytes: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                let encoded: Vec<Encoded> = bytes
                    .iter()
                    .zip(&names)
                    .map(|(b, o)| Encoded {
                        bytes: b,
                        origin: o,
                    })
                    .collect();
                let px = process_all(&p, 3, 3 * 224 * 224, &encoded, t).unwrap();
                assert_eq!(px.len(), files.len() * 3 * 224 * 224);
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let rate = files.len() as f64 / best;
        println!(
            "fsmerge ({t} thread(s)): {rate:.1} images/s = {:.2}x transformers",
            rate / python
        );
    }
}
