//! Pillow's `Image.resize(size, resample)` for 8-bit images, bit for bit. `transformers`' slow
//! image processors resize through Pillow, so a model was trained on Pillow's exact pixels; this
//! port of `libImaging/Resample.c` (two separable passes of fixed-point convolution, 22
//! fractional bits, rounded to `u8` between the passes) and of the nearest-neighbour path of
//! `libImaging/Geometry.c` (`ImagingScaleAffine`) gives the same bytes, so fsmerge feeds a model
//! what `transformers` would. Images are interleaved (HWC) `u8` with any number of channels.

use fsmerge_common::{Error, Result};

/// A Pillow resampling filter (`PIL.Image.Resampling`), by the number Pillow gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// 0: nearest neighbour (Pillow's affine scale, not a convolution).
    Nearest,
    /// 1: Lanczos, support 3.
    Lanczos,
    /// 2: bilinear (triangle), support 1.
    Bilinear,
    /// 3: bicubic with a = −0.5, support 2.
    Bicubic,
    /// 4: box, support 0.5.
    Box,
    /// 5: Hamming-windowed sinc, support 1.
    Hamming,
}

impl Filter {
    /// The filter Pillow numbers `code` (0–5), or `None`.
    pub fn from_pil(code: i64) -> Option<Filter> {
        Some(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    /// Pillow's number for this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    /// The kernel's support (half-width) at scale 1; `None` for nearest.
    fn support(self) -> Option<f64> {
        match self {
            Filter::Nearest => None,
            Filter::Box => Some(0.5),
            Filter::Bilinear | Filter::Hamming => Some(1.0),
            Filter::Bicubic => Some(2.0),
            Filter::Lanczos => Some(3.0),
        }
    }

    /// The kernel, exactly as Resample.c evaluates it (same operation order, same constants).
    fn weight(self, x: f64) -> f64 {
        use std::f64::consts::PI;
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                (x * PI).sin() / (x * PI)
            }
        };
        match self {
            Filter::Nearest => 0.0,
            Filter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    // Pillow writes the window's constants as C floats (0.54f, 0.46f).
                    let x = x * PI;
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of the fixed-point coefficients (Pillow: 32 − 8 − 2).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output coordinate's taps: the first input index and its fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Resample.c's `precompute_coeffs` over the whole input (`box` = 0..in_size) followed by
/// `normalize_coeffs_8bpc`: the taps of each of the `out_size` outputs.
fn coefficients(in_size: usize, out_size: usize, filter: Filter, support: f64) -> Vec<Taps> {
    // Pillow's box is a C float; (in1 − in0) is a float before the division in double.
    let scale = f64::from(in_size as f32) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ss = 1.0 / filterscale;
    let one = f64::from(1u32 << PRECISION_BITS);
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let raw: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                start: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// Resample.c's `clip8`: drop the fraction bits and saturate to `u8`. Pillow accumulates in
/// a C `int`; the sums fit (255 · Σ|w| < 2³¹), so i32 gives its exact results.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's rounding offset, where every accumulation starts.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass: `(w, h)` → `(out_w, h)` into `out`; all channels of a pixel in one sweep
/// of its taps (the common channel counts compiled with a fixed count, which the compiler
/// unrolls).
fn horizontal(
    src: &[u8],
    (w, h): (usize, usize),
    c: usize,
    out_w: usize,
    f: Filter,
    out: &mut Vec<u8>,
) {
    let taps = coefficients(w, out_w, f, f.support().unwrap_or(0.0));
    out.clear();
    out.resize(out_w * h * c, 0);
    match c {
        1 => horizontal_n::<1>(src, (w, h), out_w, &taps, out),
        2 => horizontal_n::<2>(src, (w, h), out_w, &taps, out),
        3 => horizontal_n::<3>(src, (w, h), out_w, &taps, out),
        4 => horizontal_n::<4>(src, (w, h), out_w, &taps, out),
        _ => {
            // Any other count: one channel at a time.
            let mut done = vec![0u8; out_w * h];
            for ch in 0..c {
                let plane: Vec<u8> = src.iter().skip(ch).step_by(c).copied().collect();
                horizontal_n::<1>(&plane, (w, h), out_w, &taps, &mut done);
                for (o, &v) in out.iter_mut().skip(ch).step_by(c).zip(&done) {
                    *o = v;
                }
            }
        }
    }
}

fn horizontal_n<const C: usize>(
    src: &[u8],
    (w, h): (usize, usize),
    out_w: usize,
    taps: &[Taps],
    out: &mut [u8],
) {
    // Every output's taps padded with zero weights to one length k (a zero weight adds exactly
    // nothing), so that up to 8 taps the tap loop has a length the compiler knows and unrolls.
    // Taps lie inside the row, so k ≤ w.
    let k = taps.iter().map(|t| t.weights.len()).max().unwrap_or(0);
    let taps = padded(taps, k, w);
    macro_rules! fixed {
        ($($k:literal)*) => {
            match k {
                $($k => return horizontal_fixed::<C, $k>(src, w, out_w, &taps, out),)*
                _ => {}
            }
        };
    }
    fixed!(1 2 3 4 5 6 7 8);
    for (row, dst) in src
        .chunks_exact(w * C)
        .zip(out.chunks_exact_mut(out_w * C))
        .take(h)
    {
        for ((start, weights), px) in taps.iter().zip(dst.chunks_exact_mut(C)) {
            convolve::<C>(&row[start * C..][..k * C], weights, px);
        }
    }
}

/// The taps of `taps`, each `k` long: its first input index moved left where the row ends
/// before `start + k` (the row is at least `k` wide), zero weights around its own.
fn padded(taps: &[Taps], k: usize, w: usize) -> Vec<(usize, Vec<i32>)> {
    taps.iter()
        .map(|t| {
            let start = t.start.min(w - k);
            let mut weights = vec![0; k];
            let at = t.start - start;
            weights[at..at + t.weights.len()].copy_from_slice(&t.weights);
            (start, weights)
        })
        .collect()
}

/// `horizontal_n` with every output's taps `K` long (`padded`).
fn horizontal_fixed<const C: usize, const K: usize>(
    src: &[u8],
    w: usize,
    out_w: usize,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    let taps: Vec<(usize, [i32; K])> = (taps.iter())
        .map(|(start, weights)| (*start, std::array::from_fn(|i| weights[i])))
        .collect();
    for (row, dst) in src.chunks_exact(w * C).zip(out.chunks_exact_mut(out_w * C)) {
        for ((start, weights), px) in taps.iter().zip(dst.chunks_exact_mut(C)) {
            convolve::<C>(&row[start * C..][..K * C], weights, px);
        }
    }
}

/// One output pixel `px`: the tap `weights` over the input pixels `from` (C channels each),
/// summed from Pillow's rounding offset and clipped.
#[inline(always)]
fn convolve<const C: usize>(from: &[u8], weights: &[i32], px: &mut [u8]) {
    let mut acc = [HALF; C];
    for (&wt, pixel) in weights.iter().zip(from.chunks_exact(C)) {
        for k in 0..C {
            acc[k] += i32::from(pixel[k]) * wt;
        }
    }
    for k in 0..C {
        px[k] = clip8(acc[k]);
    }
}

/// Vertical pass: `(w, h)` → `(w, out_h)` into `out`; each output row sums whole input rows
/// (contiguous, so the inner loop vectorizes).
fn vertical(
    src: &[u8],
    (w, h): (usize, usize),
    c: usize,
    out_h: usize,
    f: Filter,
    out: &mut Vec<u8>,
) {
    let taps = coefficients(h, out_h, f, f.support().unwrap_or(0.0));
    let stride = w * c;
    out.clear();
    out.resize(out_h * stride, 0);
    let mut acc = vec![0i32; stride];
    for (t, dst) in taps.iter().zip(out.chunks_exact_mut(stride)) {
        acc.fill(HALF);
        for (i, &wt) in t.weights.iter().enumerate() {
            let row = &src[(t.start + i) * stride..][..stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * wt;
            }
        }
        for (o, &a) in dst.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// Pillow's nearest-neighbour resize (`ImagingScaleAffine`): the source position of each
/// output pixel is accumulated in double (`x0 = scale/2`, then `+= scale`) and truncated; a
/// position that falls outside the input (never, in practice) leaves the pixel 0.
fn nearest(
    src: &[u8],
    (w, h): (usize, usize),
    c: usize,
    (ow, oh): (usize, usize),
    out: &mut Vec<u8>,
) {
    let table = |in_size: usize, out_size: usize| -> Vec<Option<usize>> {
        let step = f64::from(in_size as f32) / out_size as f64;
        let mut pos = step * 0.5;
        (0..out_size)
            .map(|_| {
                let i = if pos < 0.0 { -1 } else { pos as i64 };
                pos += step;
                usize::try_from(i).ok().filter(|&i| i < in_size)
            })
            .collect()
    };
    let (xs, ys) = (table(w, ow), table(h, oh));
    out.clear();
    out.resize(ow * oh * c, 0);
    for (yy, y) in ys.iter().enumerate() {
        let Some(y) = y else { continue };
        for (xx, x) in xs.iter().enumerate() {
            if let Some(x) = x {
                let from = (y * w + x) * c;
                out[(yy * ow + xx) * c..][..c].copy_from_slice(&src[from..from + c]);
            }
        }
    }
}

/// Resize an interleaved `u8` image of `size` = (width, height) with `channels` channels to
/// `out` = (width, height) exactly as Pillow's `Image.resize(out, filter)` does (no box, no
/// `reducing_gap`). Like Pillow: an unchanged size is a copy; a dimension that does not change
/// is not resampled; the horizontal pass runs first, except for an image over 100 times taller
/// than wide that shrinks vertically, which Pillow resizes vertically first.
pub fn resize(
    src: &[u8],
    size: (usize, usize),
    channels: usize,
    out: (usize, usize),
    filter: Filter,
) -> Result<Vec<u8>> {
    let mut buffers = Buffers::default();
    resize_into(src, size, channels, out, filter, &mut buffers)?;
    Ok(buffers.out)
}

/// Reusable buffers of `resize_into` (kept across images by a thread, so no pass allocates or
/// faults in fresh pages); the resized image is left in `out`.
#[derive(Default)]
pub struct Buffers {
    between: Vec<u8>,
    pub out: Vec<u8>,
}

/// `resize` into `buffers.out`.
pub fn resize_into(
    src: &[u8],
    size: (usize, usize),
    channels: usize,
    out: (usize, usize),
    filter: Filter,
    buffers: &mut Buffers,
) -> Result<()> {
    let (w, h) = size;
    if w == 0 || h == 0 || out.0 == 0 || out.1 == 0 || channels == 0 {
        return Err(Error::Compute(format!(
            "resize: empty image ({w}×{h}×{channels} to {}×{})",
            out.0, out.1
        )));
    }
    if src.len() != w * h * channels {
        return Err(Error::Compute(format!(
            "resize: {} bytes for a {w}×{h}×{channels} image",
            src.len()
        )));
    }
    let Buffers { between, out: dst } = buffers;
    if size == out {
        dst.clear();
        dst.extend_from_slice(src);
        return Ok(());
    }
    if filter == Filter::Nearest {
        nearest(src, size, channels, out, dst);
        return Ok(());
    }
    let (ow, oh) = out;
    let tall = h > w * 100 && oh < h;
    // The passes that run, in Pillow's order (true: horizontal to `ow`, false: vertical to `oh`).
    let passes: Vec<bool> = if tall {
        vec![false, true]
    } else {
        vec![true, false]
    };
    let passes: Vec<bool> = (passes.into_iter())
        .filter(|&horizontal| if horizontal { ow != w } else { oh != h })
        .collect();
    let run = |horizontal_pass: bool, from: &[u8], (w, h), to: &mut Vec<u8>| {
        if horizontal_pass {
            horizontal(from, (w, h), channels, ow, filter, to);
            (ow, h)
        } else {
            vertical(from, (w, h), channels, oh, filter, to);
            (w, oh)
        }
    };
    match passes.as_slice() {
        [first, second] => {
            let size = run(*first, src, size, between);
            run(*second, between, size, dst);
        }
        [only] => {
            run(*only, src, size, dst);
        }
        _ => {
            dst.clear();
            dst.extend_from_slice(src);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_codes_round_trip() {
        for code in 0..6 {
            assert_eq!(Filter::from_pil(code).map(Filter::pil_code), Some(code));
        }
        assert_eq!(Filter::from_pil(6), None);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 5 * 3 * 2];
        for code in 0..6 {
            let f = Filter::from_pil(code).unwrap();
            let out = resize(&src, (5, 3), 2, (11, 2), f).unwrap();
            assert!(out.iter().all(|&v| v == 77), "{f:?}");
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        assert!(resize(&[0u8; 5], (2, 2), 1, (3, 3), Filter::Bilinear).is_err());
    }
}
