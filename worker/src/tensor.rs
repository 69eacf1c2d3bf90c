//! Conversions between host tensors (checkpoint IO) and tch tensors, and small helpers.

use fsmerge_common::checkpoint::HostTensor;
use fsmerge_common::{Error, Result};
use tch::{Device, Kind, Tensor};

pub const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

pub fn to_tch(t: &HostTensor) -> Tensor {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&t.data).reshape(&shape)
}

pub fn to_host(t: &Tensor) -> Result<HostTensor> {
    let t = t.detach().to_kind(Kind::Float).contiguous();
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
