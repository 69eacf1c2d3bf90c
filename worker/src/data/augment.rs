//! Augmentation of merge inputs (method.md §10, adapted to small grayscale images): random
//! shift by reflect-padding and cropping, optional horizontal flip, Gaussian noise, then
//! Mixup/CutMix over a batch of images of the same task (timm's `batch` mode: one λ per batch,
//! each image mixed with its mirror in the batch). Runs on the host with a seeded RNG, so the
//! merge data depends only on the seed.

use fsmerge_common::config::AugmentConfig;
use rand::Rng;
use rand_distr::{Beta, Distribution, Normal};

fn reflect(i: isize, n: isize) -> usize {
    let mut i = i;
    if i < 0 {
        i = -i;
    }
    if i >= n {
        i = 2 * n - 2 - i;
    }
    i.clamp(0, n - 1) as usize
}

/// Shift, flip and noise one `side`×`side` image.
pub fn perturb(img: &[f32], side: usize, cfg: &AugmentConfig, rng: &mut impl Rng) -> Vec<f32> {
    let s = cfg.shift as isize;
    let (dy, dx) = if s > 0 {
        (rng.gen_range(-s..=s), rng.gen_range(-s..=s))
    } else {
        (0, 0)
    };
    let flip = cfg.flip && rng.gen_bool(0.5);
    let n = side as isize;
    let noise = Normal::new(0.0, cfg.noise_std.max(0.0)).ok();
    let mut out = vec![0.0; side * side];
    for y in 0..n {
        for x in 0..n {
            let sx = if flip { n - 1 - x } else { x };
            let v = img[reflect(y + dy, n) * side + reflect(sx + dx, n)];
            let eps = match &noise {
                Some(d) if cfg.noise_std > 0.0 => d.sample(rng) as f32,
                _ => 0.0,
            };
            out[(y * n + x) as usize] = v + eps;
        }
    }
    out
}

/// Mixup or CutMix a batch in place (each image with its mirror position in the batch).
pub fn mix_batch(batch: &mut [Vec<f32>], side: usize, cfg: &AugmentConfig, rng: &mut impl Rng) {
    let b = batch.len();
    if b < 2 {
        return;
    }
    let cutmix =
        cfg.cutmix_alpha > 0.0 && (cfg.mixup_alpha <= 0.0 || rng.gen_bool(cfg.switch_prob));
    let alpha = if cutmix {
        cfg.cutmix_alpha
    } else {
        cfg.mixup_alpha
    };
    let Ok(beta) = Beta::new(alpha, alpha) else {
        return;
    };
    let lam: f64 = beta.sample(rng);
    let source: Vec<Vec<f32>> = batch.iter().rev().cloned().collect();
    if cutmix {
        let ratio = (1.0 - lam).sqrt();
        let (ch, cw) = (
            (side as f64 * ratio) as isize,
            (side as f64 * ratio) as isize,
        );
        let (cy, cx) = (
            rng.gen_range(0..side) as isize,
            rng.gen_range(0..side) as isize,
        );
        let n = side as isize;
        let (y0, y1) = ((cy - ch / 2).clamp(0, n), (cy + ch / 2).clamp(0, n));
        let (x0, x1) = ((cx - cw / 2).clamp(0, n), (cx + cw / 2).clamp(0, n));
        for (img, src) in batch.iter_mut().zip(&source) {
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = (y * n + x) as usize;
                    img[p] = src[p];
                }
            }
        }
    } else {
        let lam = lam as f32;
        for (img, src) in batch.iter_mut().zip(&source) {
            for (v, s) in img.iter_mut().zip(src) {
                *v = lam * *v + (1.0 - lam) * s;
            }
        }
    }
}

/// `count` augmented images from `originals` (rows of side²): passes over the originals in a
/// fresh random order, each chunk of `mix_batch` perturbed then mixed, until `count` are made.
pub fn augmented(
    originals: &[Vec<f32>],
    side: usize,
    count: usize,
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(count);
    if originals.is_empty() {
        return out;
    }
    while out.len() < count {
        let mut order: Vec<usize> = (0..originals.len()).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
        for chunk in order.chunks(cfg.mix_batch) {
            let mut batch: Vec<Vec<f32>> = chunk
                .iter()
                .map(|&i| perturb(&originals[i], side, cfg, rng))
                .collect();
            mix_batch(&mut batch, side, cfg, rng);
            out.extend(batch);
        }
    }
    out.truncate(count);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shift_without_noise_keeps_values_and_seed_repeats() {
        let cfg = AugmentConfig {
            noise_std: 0.0,
            ..Default::default()
        };
        let img: Vec<f32> = (0..64).map(|v| v as f32).collect();
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let a = perturb(&img, 8, &cfg, &mut r1);
        assert_eq!(a, perturb(&img, 8, &cfg, &mut r2));
        assert!(a.iter().all(|v| img.contains(v)));
    }

    #[test]
    fn augmented_count_and_mixing() {
        let cfg = AugmentConfig {
            mix_batch: 4,
            ..Default::default()
        };
        let originals: Vec<Vec<f32>> = (0..6).map(|i| vec![i as f32; 16]).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let out = augmented(&originals, 4, 25, &cfg, &mut rng);
        assert_eq!(out.len(), 25);
        assert!(out
            .iter()
            .all(|v| v.len() == 16 && v.iter().all(|x| x.is_finite())));
    }
}
