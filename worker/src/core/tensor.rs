//! Conversions between host tensors (checkpoint IO) and tch tensors, and small helpers.

use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::{Error, Result};
use tch::{Device, Kind, Tensor};

pub const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

/// The tch kind of a precision.
pub fn kind_of(p: fsmerge_common::precision::Precision) -> Kind {
    use fsmerge_common::precision::Precision;
    match p {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
    }
}

/// The precision of a tch kind (fp32 for any kind that is not half).
pub fn precision_of(kind: Kind) -> fsmerge_common::precision::Precision {
    use fsmerge_common::precision::Precision;
    match kind {
        Kind::BFloat16 => Precision::Bf16,
        Kind::Half => Precision::Fp16,
        _ => Precision::Fp32,
    }
}

/// `t` in fp32, what everything trained computes in (no copy when it already is): frozen
/// weights and features may be stored in half precision (`merge.precision`).
pub fn f32(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Float {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float)
    }
}

/// Bytes of `t`'s values.
pub fn bytes_of(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

pub fn to_tch(t: &HostTensor) -> Tensor {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&t.data).reshape(&shape)
}

pub fn to_host(t: &Tensor) -> Result<HostTensor> {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<f32>::try_from(t.flatten(0, -1))
        .map_err(|e| Error::Compute(format!("tensor to host: {e}")))?;
    Ok(HostTensor::new(shape, data))
}

/// Maximum of |a - b| / max(|b|), the relative error used by the exactness tests.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

/// Overwrite `params` in place with `values` (same shapes), outside autograd.
pub fn assign(params: &[Tensor], values: &[Tensor]) -> Result<()> {
    if params.len() != values.len() {
        return Err(Error::Compute(format!(
            "{} values for {} parameters",
            values.len(),
            params.len()
        )));
    }
    tch::no_grad(|| {
        for (p, v) in params.iter().zip(values) {
            if p.size() != v.size() {
                return Err(Error::Compute(format!(
                    "value of shape {:?} for a parameter of shape {:?}",
                    v.size(),
                    p.size()
                )));
            }
            let mut p = p.shallow_clone();
            p.copy_(v);
        }
        Ok(())
    })
}

/// All tensors flattened into one f32 buffer (one all-reduce per step).
pub fn flatten_all(ts: &[Tensor]) -> Tensor {
    Tensor::cat(&ts.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)
}

/// Split a flat buffer back into tensors shaped like `like`.
pub fn unflatten_like(flat: &Tensor, like: &[Tensor]) -> Vec<Tensor> {
    let mut at = 0i64;
    like.iter()
        .map(|t| {
            let n = t.numel() as i64;
            let part = flat.narrow(0, at, n).view(t.size().as_slice());
            at += n;
            part
        })
        .collect()
}

/// Trainable tensors named by group and position (`layer2.m.0`, `m_pre.0`, `block3.7`, …): the
/// names in phase checkpoints, the same for a pipeline stage and the whole SuperNet.
pub fn named_groups(groups: Vec<(String, Vec<Tensor>)>) -> Vec<(String, Tensor)> {
    groups
        .into_iter()
        .flat_map(|(group, params)| {
            params
                .into_iter()
                .enumerate()
                .map(move |(i, p)| (format!("{group}.{i}"), p))
        })
        .collect()
}

/// Rows per forward pass when features are computed over a whole set.
pub(crate) const CHUNK: i64 = 512;

/// Apply `f` to `x` in chunks of rows and concatenate the results along `dim`.
pub fn chunked(x: &Tensor, dim: i64, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(CHUNK as usize)
        .map(|s| f(&x.narrow(0, s, CHUNK.min(n - s))))
        .collect();
    Tensor::cat(&parts, dim)
}

/// Write an HF folder's weights `named` into `dir`, one tensor at a time to host memory, in
/// safetensors shards of at most `max_shard_bytes` (`fsmerge_common::hf_writer`).
pub fn write_hf_weights(
    dir: &std::path::Path,
    named: Vec<(String, &Tensor)>,
    max_shard_bytes: u64,
) -> Result<()> {
    let mut w = fsmerge_common::hf_writer::ShardedWriter::new(dir, max_shard_bytes)?;
    for (name, t) in named {
        w.add(name, to_host(t)?)?;
    }
    w.finish().map(|_| ())
}
