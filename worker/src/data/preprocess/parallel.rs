//! Many encoded images decoded and preprocessed on several threads at once (decoding
//! dominates: a PNG or JPEG decode costs more than the resize), in input order.

use crate::data::preprocess::image::{decode, ImageProcessor};
use fsmerge_common::{Error, Result};

/// One encoded image and where it came from (for errors).
pub struct Encoded<'a> {
    pub bytes: &'a [u8],
    pub origin: &'a str,
}

/// CHW pixels of every image (each `dim` values), in input order, in one buffer that the
/// `threads` threads fill in place.
pub fn process_all(
    p: &ImageProcessor,
    channels: usize,
    dim: usize,
    images: &[Encoded],
    threads: usize,
) -> Result<Vec<f32>> {
    let mut out = vec![0f32; images.len() * dim];
    let chunk = images.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(chunk)
            .zip(out.chunks_mut(chunk * dim.max(1)))
            .map(|(part, dst)| {
                s.spawn(move || {
                    for (e, slot) in part.iter().zip(dst.chunks_mut(dim.max(1))) {
                        p.process_into(&decode(e.bytes, e.origin)?, channels, e.origin, slot)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join().unwrap_or_else(|_| {
                Err(Error::Compute(
                    "an image preprocessing thread panicked".into(),
                ))
            })
        })
    })?;
    Ok(out)
}

/// Threads for preprocessing: every core the machine has.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
