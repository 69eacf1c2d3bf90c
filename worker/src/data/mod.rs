//! Datasets: Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist`), the UCI
//! optical digits (sklearn's `digits.csv.gz`) and the text tasks (`text`). Pixels are
//! normalized; the official training set is split into train and a seeded validation share;
//! tasks are subsets of classes.

pub mod augment;
pub mod input_cache;
pub mod merge_set;
pub mod models;
pub mod preprocess;
pub mod rows;
pub mod sources;
pub mod text;
pub mod wordpiece;

use crate::data::rows::{ImageSet, Splits};
use crate::data::wordpiece::WordPiece;
use fsmerge_common::config::{DataConfig, Dataset, JobConfig};
use fsmerge_common::workdir::WorkDir;
use fsmerge_common::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The split of train/val does not depend on the job seed: every seed sees the same held-out data.
const SPLIT_SEED: u64 = 0x5eed_da7a;

/// Where a dataset is looked for when the config gives no `data.path`.
pub fn default_path(dataset: Dataset) -> PathBuf {
    match dataset {
        Dataset::FashionMnist => PathBuf::from("/usr/share/datasets/fashion-mnist"),
        Dataset::Digits => PathBuf::from("data/digits.csv.gz"),
        Dataset::SpamNames => PathBuf::from("data"),
        Dataset::Models => PathBuf::new(),
    }
}

/// The splits of the job's data: its built-in dataset, or each `[[models]]` entry's own;
/// `pixels` false: labels only (as `load_labels`).
pub fn load_job(job: &JobConfig, pixels: bool) -> Result<Splits> {
    match job.data.dataset {
        Dataset::Models => models::load(job, pixels),
        _ => load_with(&job.data, pixels),
    }
}

/// `load_job` with every row's values, a `[[models]]` job's through the input cache in `work`
/// (preprocessed once per job, not on every worker start or resume).
pub fn load_job_cached(job: &JobConfig, work: &WorkDir) -> Result<Splits> {
    match job.data.dataset {
        Dataset::Models => {
            input_cache::load_or_build(job, work, || models::load(job, true)).map(|(s, _)| s)
        }
        _ => load_with(&job.data, true),
    }
}

pub fn load(cfg: &DataConfig) -> Result<Splits> {
    load_with(cfg, true)
}

/// The splits' labels alone, every row of width 0 (Fashion-MNIST's images are not read): what
/// a pipeline stage that never reads the rows needs to count its evaluation chunks and score
/// them. Text keeps its token ids (every BERT stage reads its rows' attention mask).
pub fn load_labels(cfg: &DataConfig) -> Result<Splits> {
    load_with(cfg, false)
}

fn load_with(cfg: &DataConfig, pixels: bool) -> Result<Splits> {
    let path = cfg
        .path
        .clone()
        .unwrap_or_else(|| default_path(cfg.dataset));
    let (side, train_full, test) = match cfg.dataset {
        Dataset::FashionMnist => {
            let train = read_idx_pair(&path, "train", pixels)?;
            let test = read_idx_pair(&path, "t10k", pixels)?;
            (28, train, test)
        }
        Dataset::Digits => {
            let mut all = read_digits(&path)?;
            if !pixels {
                all = ImageSet {
                    pixels: Vec::new(),
                    labels: all.labels,
                    dim: 0,
                };
            }
            let (test, train) = split(&all, cfg.test_fraction, SPLIT_SEED ^ 1);
            (8, train, test)
        }
        Dataset::Models => {
            return Err(Error::Data {
                path,
                msg: "`[[models]]` data is read with the job (`load_job`)".into(),
            })
        }
        Dataset::SpamNames => {
            let vocab = WordPiece::load_first(&cfg.vocab, cfg.vocab_size)?;
            let all = text::load(&path, &vocab, cfg.max_tokens)?;
            let (test, train) = split(&all, cfg.test_fraction, SPLIT_SEED ^ 1);
            (0, train, test)
        }
    };
    let (val, train) = split(&train_full, cfg.val_fraction, SPLIT_SEED);
    Ok(Splits {
        side,
        train,
        val,
        test,
    })
}

/// Seeded split: returns (share, rest), both in original order.
fn split(set: &ImageSet, share: f64, seed: u64) -> (ImageSet, ImageSet) {
    let mut idx: Vec<usize> = (0..set.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let k = ((set.len() as f64) * share).round() as usize;
    let (mut a, mut b) = (idx[..k].to_vec(), idx[k..].to_vec());
    a.sort_unstable();
    b.sort_unstable();
    (set.select(&a), set.select(&b))
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            msg: format!("not a readable gzip file ({e})"),
        })?;
    Ok(out)
}

/// Parse an IDX file: `00 00 08 ndim`, ndim big-endian u32 sizes, then u8 data.
fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        msg,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 8 {
        return Err(bad("not an unsigned-byte IDX file (bad magic)".into()));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap_or([0; 4])) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() != header + n {
        return Err(bad(format!(
            "IDX says {dims:?} ({n} bytes) but holds {} bytes",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

const FMNIST_MEAN: f32 = 0.2860;

const FMNIST_STD: f32 = 0.3530;

/// An IDX image/label file pair; with `pixels` false only the labels are read (rows of
/// width 0).
fn read_idx_pair(dir: &Path, prefix: &str, pixels: bool) -> Result<ImageSet> {
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (ldims, lbytes) = parse_idx(&lp, &read_gz(&lp)?)?;
    if !pixels {
        if let Some(l) = lbytes.iter().find(|&&l| l > 9) {
            return Err(Error::Data {
                path: lp,
                msg: format!("label {l} out of range 0..10"),
            });
        }
        return Ok(ImageSet {
            pixels: Vec::new(),
            labels: lbytes.iter().map(|&l| l as usize).collect(),
            dim: 0,
        });
    }
    let (idims, ibytes) = parse_idx(&ip, &read_gz(&ip)?)?;
    if idims.len() != 3 || idims[1] != 28 || idims[2] != 28 {
        return Err(Error::Data {
            path: ip,
            msg: format!("expected N×28×28 images, got {idims:?}"),
        });
    }
    if ldims != [idims[0]] {
        return Err(Error::Data {
            path: lp,
            msg: format!(
                "{} labels for {} images",
                ldims.first().unwrap_or(&0),
                idims[0]
            ),
        });
    }
    if let Some(l) = lbytes.iter().find(|&&l| l > 9) {
        return Err(Error::Data {
            path: lp,
            msg: format!("label {l} out of range 0..10"),
        });
    }
    let pixels = ibytes
        .iter()
        .map(|&p| (p as f32 / 255.0 - FMNIST_MEAN) / FMNIST_STD)
        .collect();
    Ok(ImageSet {
        pixels,
        labels: lbytes.iter().map(|&l| l as usize).collect(),
        dim: 28 * 28,
    })
}

const DIGITS_MEAN: f32 = 0.305;

const DIGITS_STD: f32 = 0.380;

fn read_digits(path: &Path) -> Result<ImageSet> {
    let text = String::from_utf8(read_gz(path)?).map_err(|_| Error::Data {
        path: path.to_path_buf(),
        msg: "not UTF-8 text".into(),
    })?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Data {
                path: path.to_path_buf(),
                msg: format!("line {}: {e}", i + 1),
            })?;
        if vals.len() != 65 {
            return Err(Error::Data {
                path: path.to_path_buf(),
                msg: format!("line {}: {} columns, expected 65", i + 1, vals.len()),
            });
        }
        let label = vals[64];
        if !(0.0..10.0).contains(&label) || label.fract() != 0.0 {
            return Err(Error::Data {
                path: path.to_path_buf(),
                msg: format!("line {}: label {label} is not a digit", i + 1),
            });
        }
        pixels.extend(
            vals[..64]
                .iter()
                .map(|v| (v / 16.0 - DIGITS_MEAN) / DIGITS_STD),
        );
        labels.push(label as usize);
    }
    if labels.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: "no rows".into(),
        });
    }
    Ok(ImageSet {
        pixels,
        labels,
        dim: 64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_parse_and_errors() {
        let mut b = vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3];
        let (d, v) = parse_idx(Path::new("x"), &b).unwrap();
        assert_eq!((d, v), (vec![3], vec![1, 2, 3]));
        b.pop();
        assert!(parse_idx(Path::new("x"), &b)
            .unwrap_err()
            .to_string()
            .contains("x"));
        assert!(parse_idx(Path::new("x"), &[1, 2]).is_err());
    }

    #[test]
    fn split_is_disjoint_and_seeded() {
        let set = ImageSet {
            pixels: (0..100).map(|v| v as f32).collect(),
            labels: (0..100).map(|v| v % 10).collect(),
            dim: 1,
        };
        let (a, b) = split(&set, 0.15, 3);
        let (a2, _) = split(&set, 0.15, 3);
        assert_eq!(a.len(), 15);
        assert_eq!(b.len(), 85);
        assert_eq!(a.pixels, a2.pixels);
        assert!(a.pixels.iter().all(|p| !b.pixels.contains(p)));
    }
}
