//! LayerNorm: a model's own, n models' stacked (frozen), and the trainable one of a merged
//! network.

use crate::core::tensor::{f32, F32};
use fsmerge_common::config::Init;
use tch::Tensor;

pub struct LayerNorm {
    pub w: Tensor,
    pub b: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub(crate) fn init(d: i64, eps: f64) -> Self {
        Self {
            w: Tensor::ones([d], F32),
            b: Tensor::zeros([d], F32),
            eps,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().unwrap_or(&0);
        x.layer_norm([d], Some(&self.w), Some(&self.b), self.eps, false)
    }
}

/// One LayerNorm of every model, stacked [n, d].
pub struct FrozenLn {
    w: Tensor,
    b: Tensor,
}

impl FrozenLn {
    pub(crate) fn move_to(&mut self, device: tch::Device) {
        self.w = self.w.to_device(device);
        self.b = self.b.to_device(device);
    }
    /// Model i's LayerNorm, a view of the stacked tensors (no copy).
    pub(crate) fn model(&self, i: usize, eps: f64) -> LayerNorm {
        LayerNorm {
            w: self.w.get(i as i64),
            b: self.b.get(i as i64),
            eps,
        }
    }
    pub(crate) fn stack(lns: &[&LayerNorm]) -> Self {
        Self {
            w: Tensor::stack(&lns.iter().map(|l| l.w.detach()).collect::<Vec<_>>(), 0),
            b: Tensor::stack(&lns.iter().map(|l| l.b.detach()).collect::<Vec<_>>(), 0),
        }
    }
}

/// A trainable LayerNorm of the merged network (method.md §3.3: `first` copies model 1's,
/// `average` takes the mean, `random` starts at (1, 0)).
pub struct MergedLn {
    pub w: Tensor,
    pub b: Tensor,
    eps: f64,
}

impl MergedLn {
    pub(crate) fn new(f: &FrozenLn, init: Init, eps: f64) -> Self {
        let (fw, fb) = (f32(&f.w), f32(&f.b));
        let (w, b) = match init {
            Init::First => (fw.get(0).copy(), fb.get(0).copy()),
            Init::Average => (fw.mean_dim(0, false, None), fb.mean_dim(0, false, None)),
            Init::Random => (fw.get(0).ones_like(), fb.get(0).zeros_like()),
        };
        Self {
            w: w.set_requires_grad(true),
            b: b.set_requires_grad(true),
            eps,
        }
    }
    /// As a plain LayerNorm sharing these tensors (gradients flow through it).
    pub(crate) fn layer_norm(&self) -> LayerNorm {
        LayerNorm {
            w: self.w.shallow_clone(),
            b: self.b.shallow_clone(),
            eps: self.eps,
        }
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        self.layer_norm().forward(x)
    }
    pub(crate) fn params(&self) -> [Tensor; 2] {
        [self.w.shallow_clone(), self.b.shallow_clone()]
    }
    /// Move to `device` (the tensors stay leaves that require grad).
    pub(crate) fn move_to(&mut self, device: tch::Device) {
        for t in [&mut self.w, &mut self.b] {
            *t = t.detach().to_device(device).set_requires_grad(true);
        }
    }
}
