//! `merge.precision`: the floating-point type the frozen originals and their cached features
//! are stored and run in, and the merged model is written in (M/U, their gradients, the
//! optimiser state and the fold stay fp32). By default the originals' own (`torch_dtype` in
//! their `config.json`), so a bf16 checkpoint merges into a bf16 checkpoint.

use crate::config::JobConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    /// Its name in an HF `config.json` (`torch_dtype`).
    pub fn torch_dtype(self) -> &'static str {
        match self {
            Self::Fp32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::Fp16 => "float16",
        }
    }

    /// Its name in a safetensors header.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::Fp32 => safetensors::Dtype::F32,
            Self::Bf16 => safetensors::Dtype::BF16,
            Self::Fp16 => safetensors::Dtype::F16,
        }
    }

    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Self::Fp32 => 4,
            Self::Bf16 | Self::Fp16 => 2,
        }
    }

    /// The precision of a safetensors dtype, None for one fsmerge does not read.
    pub fn of_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(Self::Fp32),
            safetensors::Dtype::BF16 => Some(Self::Bf16),
            safetensors::Dtype::F16 => Some(Self::Fp16),
            _ => None,
        }
    }

    /// `v` in this precision, little-endian (rounded to nearest even).
    pub fn encode(self, v: f32, out: &mut Vec<u8>) {
        match self {
            Self::Fp32 => out.extend_from_slice(&v.to_le_bytes()),
            Self::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Self::Fp16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        }
    }

    /// The values of little-endian `bytes` in this precision, as f32 (exact).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::Fp32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Self::Fp16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    /// The precision an HF model folder `dir` declares (`torch_dtype`, or `dtype` as newer
    /// `transformers` write it); fp32 when it declares none. One fsmerge cannot run is an error
    /// naming the file.
    pub fn of_model(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        if !file.is_file() {
            // fsmerge's own MLP checkpoints have no HF config: fp32.
            return Ok(Self::Fp32);
        }
        let v: serde_json::Value = crate::checkpoint::read_json(&file)?;
        let declared = ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| v.get(k).and_then(|d| d.as_str()));
        match declared {
            None | Some("float32") => Ok(Self::Fp32),
            Some("bfloat16") => Ok(Self::Bf16),
            Some("float16") => Ok(Self::Fp16),
            Some(other) => Err(Error::Checkpoint {
                file,
                msg: format!(
                    "torch_dtype `{other}` is not supported (float32, bfloat16 or float16); set merge.precision to choose one"
                ),
            }),
        }
    }

    /// The job's precision: `merge.precision`, else the first original's.
    pub fn for_job(job: &JobConfig, models_dir: &Path) -> Result<Self> {
        match job.merge.precision {
            Some(p) => Ok(p),
            None => Self::of_model(&job.original_dir(models_dir, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precisions_round_trip_their_own_values() {
        for p in [Precision::Bf16, Precision::Fp16] {
            let mut bytes = Vec::new();
            for v in [1.0f32, -0.5, 3.140625, 0.0] {
                p.encode(v, &mut bytes);
            }
            assert_eq!(bytes.len(), 4 * p.bytes());
            assert_eq!(p.decode(&bytes), vec![1.0, -0.5, 3.140625, 0.0]);
        }
        let mut b = Vec::new();
        Precision::Bf16.encode(1.0 + 1.0 / 512.0, &mut b);
        assert_eq!(
            Precision::Bf16.decode(&b),
            vec![1.0],
            "rounds to bf16's 8 bits"
        );
    }

    #[test]
    fn a_model_folder_declares_its_precision() {
        let dir = tempfile::tempdir().unwrap();
        let write = |v: &str| std::fs::write(dir.path().join("config.json"), v).unwrap();
        write(r#"{"torch_dtype": "bfloat16"}"#);
        assert_eq!(Precision::of_model(dir.path()).unwrap(), Precision::Bf16);
        write(r#"{"dtype": "float16"}"#);
        assert_eq!(Precision::of_model(dir.path()).unwrap(), Precision::Fp16);
        write(r#"{}"#);
        assert_eq!(Precision::of_model(dir.path()).unwrap(), Precision::Fp32);
        write(r#"{"torch_dtype": "int8"}"#);
        let e = Precision::of_model(dir.path()).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("int8"), "{e}");
    }
}
