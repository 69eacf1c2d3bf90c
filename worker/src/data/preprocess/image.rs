//! A ViT model's image preprocessing, read from its `preprocessor_config.json` and computed as
//! `transformers`' slow `ViTImageProcessor` computes it: the image converted to the model's
//! channels as Pillow's `convert` does, resized with Pillow's filters (`resize`), rescaled in
//! f64 then cast to f32, normalized in f32, channels first. A model was trained on exactly these
//! values, so fsmerge reproduces them (within 1e-5 of `pixel_values` on PNG input; JPEG decoders
//! differ by a few levels) instead of approximating them.

use std::path::{Path, PathBuf};

use ::image::DynamicImage;
use fsmerge_common::{Error, Result};
use serde_json::{Map, Value};

use super::resize::{resize_into, Buffers, Filter};
use std::borrow::Cow;

/// Per channel (a, b): a map x ↦ a·x + b between two processors' pixel values.
pub type ChannelAffine = Vec<(f64, f64)>;

/// The file a model folder's image preprocessing is read from.
pub const CONFIG_FILE: &str = "preprocessor_config.json";

/// A per-channel statistic (`image_mean`, `image_std`): one value for every channel, or one each.
#[derive(Debug, Clone, PartialEq)]
pub enum PerChannel {
    /// A single number, used for every channel.
    All(f64),
    /// One number per channel.
    Each(Vec<f64>),
}

impl PerChannel {
    /// The values for `channels` channels, as f32 (numpy casts them to the image's dtype).
    fn values(&self, channels: usize) -> Option<Vec<f32>> {
        match self {
            PerChannel::All(v) => Some(vec![*v as f32; channels]),
            PerChannel::Each(v) if v.len() == channels => {
                Some(v.iter().map(|&x| x as f32).collect())
            }
            PerChannel::Each(_) => None,
        }
    }
}

/// The settings of a slow `ViTImageProcessor` (`preprocessor_config.json`), with its defaults.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    /// The file the settings came from (named in errors).
    pub path: PathBuf,
    /// `do_resize` (default true): resize to `height` × `width`.
    pub do_resize: bool,
    /// `size.height` (default 224).
    pub height: usize,
    /// `size.width` (default 224).
    pub width: usize,
    /// `resample` (default 2, bilinear).
    pub resample: Filter,
    /// `do_rescale` (default true): multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// `rescale_factor` (default 1/255).
    pub rescale_factor: f64,
    /// `do_normalize` (default true): `(x − image_mean) / image_std`.
    pub do_normalize: bool,
    /// `image_mean` (default 0.5 for every channel).
    pub image_mean: PerChannel,
    /// `image_std` (default 0.5 for every channel).
    pub image_std: PerChannel,
    /// `do_convert_rgb`, as written; the model's channel count decides the conversion.
    pub do_convert_rgb: Option<bool>,
}

fn data_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl ImageProcessor {
    /// Read `model_dir/preprocessor_config.json`.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(data_err(
                &path,
                "missing: the model needs its image processor's settings (`save_pretrained` of its ViTImageProcessor writes them)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&path, &text)
    }

    /// Parse the content `json` of the preprocessor config `path` (named in errors). Keys fsmerge
    /// does not use are ignored; a key it uses with a wrong type or value is an error naming it.
    pub fn parse(path: &Path, json: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| data_err(path, format!("not valid JSON: {e}")))?;
        let Some(obj) = value.as_object() else {
            return Err(data_err(path, "not a JSON object"));
        };
        let keys = Keys { path, obj };
        keys.check_type()?;
        let (height, width) = keys.size()?;
        let do_rescale = keys.flag("do_rescale", true)?;
        let rescale_factor = match obj.get("rescale_factor") {
            None => 1.0 / 255.0,
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() => f,
                _ if v.is_null() && !do_rescale => 1.0 / 255.0,
                _ => return Err(keys.bad("rescale_factor", "a number", v)),
            },
        };
        let p = ImageProcessor {
            path: path.to_path_buf(),
            do_resize: keys.flag("do_resize", true)?,
            height,
            width,
            resample: keys.resample()?,
            do_rescale,
            rescale_factor,
            do_normalize: keys.flag("do_normalize", true)?,
            image_mean: keys.per_channel("image_mean")?,
            image_std: keys.per_channel("image_std")?,
            do_convert_rgb: match obj.get("do_convert_rgb") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(v) => return Err(keys.bad("do_convert_rgb", "true or false", v)),
            },
        };
        if p.do_normalize {
            let zero = match &p.image_std {
                PerChannel::All(v) => *v == 0.0,
                PerChannel::Each(v) => v.contains(&0.0),
            };
            if zero {
                return Err(data_err(path, "`image_std` holds a 0 (division by zero)"));
            }
        }
        Ok(p)
    }

    /// Check that `image_mean` and `image_std` fit a model with `channels` input channels (and
    /// that fsmerge can convert images to that many channels: 1 or 3).
    pub fn check_channels(&self, channels: usize) -> Result<()> {
        if channels != 1 && channels != 3 {
            return Err(data_err(
                &self.path,
                format!("a {channels}-channel model: only 1 (L) or 3 (RGB) channels are supported"),
            ));
        }
        if !self.do_normalize {
            return Ok(());
        }
        for (key, stat) in [
            ("image_mean", &self.image_mean),
            ("image_std", &self.image_std),
        ] {
            if let PerChannel::Each(v) = stat {
                if v.len() != channels {
                    return Err(data_err(
                        &self.path,
                        format!(
                            "`{key}` has {} values for a {channels}-channel model",
                            v.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Per channel (α, β) with pixel value α·v + β for a resized byte v: the rescale and the
    /// normalization, the only steps after the resize.
    fn affine(&self, channels: usize) -> Result<Vec<(f64, f64)>> {
        let f = if self.do_rescale {
            self.rescale_factor
        } else {
            1.0
        };
        if !self.do_normalize {
            return Ok(vec![(f, 0.0); channels]);
        }
        let (Some(mean), Some(std)) = (
            self.image_mean.values(channels),
            self.image_std.values(channels),
        ) else {
            return Err(data_err(&self.path, "`image_mean`/`image_std` length"));
        };
        Ok((mean.iter().zip(&std))
            .map(|(&m, &s)| (f / s as f64, -(m as f64) / s as f64))
            .collect())
    }

    /// How this processor's output follows from `reference`'s on the same image, per channel:
    /// (a, b) with own = a·reference + b. Defined when the two agree on every step before the
    /// rescale and normalization; `None` when they agree on those too (nothing to adapt).
    pub fn from_reference(
        &self,
        reference: &ImageProcessor,
        channels: usize,
    ) -> Result<Option<ChannelAffine>> {
        let (own, theirs) = (self.affine(channels)?, reference.affine(channels)?);
        if own == theirs {
            return Ok(None);
        }
        own.iter()
            .zip(&theirs)
            .map(|(&(a1, b1), &(a0, b0))| {
                let a = a1 / a0;
                if a.is_finite() && a != 0.0 && b1.is_finite() && b0.is_finite() {
                    Ok((a, b1 - a * b0))
                } else {
                    Err(data_err(
                        &self.path,
                        format!(
                            "its rescale/normalization cannot be expressed through {}'s (a zero or infinite scale)",
                            reference.path.display()
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The model input of image `img` (`origin` names it in errors): `channels` × height ×
    /// width f32, channels first, exactly the slow `ViTImageProcessor`'s `pixel_values` for the
    /// image converted to `channels` channels (`convert("RGB")` or `convert("L")`).
    pub fn process(&self, img: &DynamicImage, channels: usize, origin: &str) -> Result<Vec<f32>> {
        let (w, h) = if self.do_resize {
            (self.width, self.height)
        } else {
            (img.width() as usize, img.height() as usize)
        };
        let mut out = vec![0f32; channels * w * h];
        self.process_into(img, channels, origin, &mut out)?;
        Ok(out)
    }

    /// `process` into `out` (exactly `channels` × height × width values; a mismatch, e.g. an
    /// image of another size without `do_resize`, is an error naming `origin`).
    pub fn process_into(
        &self,
        img: &DynamicImage,
        channels: usize,
        origin: &str,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_channels(channels)?;
        let size = (img.width() as usize, img.height() as usize);
        let px = pixels_of(img, channels, origin)?;
        if !self.do_resize {
            return self.normalize_into(&px, size, channels, origin, out);
        }
        let to = (self.width, self.height);
        BUFFERS.with_borrow_mut(|buffers| {
            resize_into(&px, size, channels, to, self.resample, buffers)
                .map_err(|e| data_err(Path::new(origin), e.to_string()))?;
            self.normalize_into(&buffers.out, to, channels, origin, out)
        })
    }

    /// Rescale and normalize the resized interleaved pixels `px` of size (w, h) into `out`,
    /// channels first.
    fn normalize_into(
        &self,
        px: &[u8],
        (w, h): (usize, usize),
        channels: usize,
        origin: &str,
        out: &mut [f32],
    ) -> Result<()> {
        let unit = PerChannel::All(1.0);
        let zero = PerChannel::All(0.0);
        let (mean, std) = if self.do_normalize {
            (&self.image_mean, &self.image_std)
        } else {
            (&zero, &unit)
        };
        let (Some(mean), Some(std)) = (mean.values(channels), std.values(channels)) else {
            return Err(data_err(&self.path, "`image_mean`/`image_std` length"));
        };
        // A pixel's value depends only on its byte and channel: one table of 256 per channel.
        let table: Vec<[f32; 256]> = (0..channels)
            .map(|c| {
                std::array::from_fn(|v| {
                    // transformers: `image.astype(np.float64) * scale`, then `.astype(np.float32)`.
                    let x = if self.do_rescale {
                        (v as f64 * self.rescale_factor) as f32
                    } else {
                        v as f32
                    };
                    if self.do_normalize {
                        (x - mean[c]) / std[c]
                    } else {
                        x
                    }
                })
            })
            .collect();
        let plane = w * h;
        if out.len() != channels * plane {
            return Err(data_err(
                Path::new(origin),
                format!(
                    "a {w}×{h} image where {} values are expected (images of one size without `do_resize`)",
                    out.len()
                ),
            ));
        }
        for (c, (dst, t)) in out.chunks_exact_mut(plane).zip(&table).enumerate() {
            for (o, pixel) in dst.iter_mut().zip(px.chunks_exact(channels)) {
                *o = t[usize::from(pixel[c])];
            }
        }
        Ok(())
    }
}

/// The largest `size` side accepted (a larger one is a typo, not a ViT input).
const MAX_SIDE: usize = 32768;

/// The keys of one preprocessor config, read with errors that name the file and the key.
struct Keys<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Keys<'_> {
    fn bad(&self, key: &str, want: &str, got: &Value) -> Error {
        data_err(self.path, format!("`{key}` must be {want}, got {got}"))
    }

    /// Refuse a processor other than the slow ViT one (a missing type is accepted).
    fn check_type(&self) -> Result<()> {
        match self.obj.get("image_processor_type") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(t)) if t == "ViTImageProcessor" => Ok(()),
            Some(Value::String(t)) if t == "ViTImageProcessorFast" => Err(data_err(
                self.path,
                "`image_processor_type` is ViTImageProcessorFast: fsmerge reproduces the slow \
                 ViTImageProcessor (Pillow's resize); the fast one resizes with torchvision, \
                 whose pixels differ from Pillow's. Set it to ViTImageProcessor if the model \
                 was trained with that",
            )),
            Some(Value::String(t)) => Err(data_err(
                self.path,
                format!("`image_processor_type` is {t}: fsmerge only reproduces ViTImageProcessor"),
            )),
            Some(v) => Err(self.bad("image_processor_type", "a string", v)),
        }
    }

    /// A boolean key; missing is `default`, `null` is false (transformers tests it for truth).
    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, "true or false", v)),
        }
    }

    /// `size` as (height, width): `{"height", "width"}`, an integer (square, as transformers'
    /// `get_size_dict` reads it) or `[height, width]`; default 224 × 224.
    fn size(&self) -> Result<(usize, usize)> {
        let side = |v: &Value| {
            v.as_u64()
                .filter(|&n| n > 0 && n <= MAX_SIDE as u64)
                .map(|n| n as usize)
        };
        let want = "{\"height\": H, \"width\": W} with integers 1..=32768";
        match self.obj.get("size") {
            None | Some(Value::Null) => Ok((224, 224)),
            Some(v @ Value::Number(_)) => side(v)
                .map(|s| (s, s))
                .ok_or_else(|| self.bad("size", want, v)),
            Some(v @ Value::Array(a)) => match a.as_slice() {
                [h, w] => side(h)
                    .zip(side(w))
                    .ok_or_else(|| self.bad("size", want, v)),
                _ => Err(self.bad("size", want, v)),
            },
            Some(v @ Value::Object(m)) => {
                let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
                keys.sort_unstable();
                if keys != ["height", "width"] {
                    return Err(data_err(
                        self.path,
                        format!(
                            "`size` has keys {}: ViTImageProcessor resizes to a fixed \
                             {{\"height\", \"width\"}}",
                            keys.join(", ")
                        ),
                    ));
                }
                side(&m["height"])
                    .zip(side(&m["width"]))
                    .ok_or_else(|| self.bad("size", want, v))
            }
            Some(v) => Err(self.bad("size", want, v)),
        }
    }

    /// `resample`: Pillow's filter number 0–5 (default 2, bilinear).
    fn resample(&self) -> Result<Filter> {
        match self.obj.get("resample") {
            None | Some(Value::Null) => Ok(Filter::Bilinear),
            Some(v) => v
                .as_i64()
                .and_then(Filter::from_pil)
                .ok_or_else(|| self.bad("resample", "a Pillow filter number 0–5", v)),
        }
    }

    /// `image_mean`/`image_std`: a number or a list of numbers (default 0.5).
    fn per_channel(&self, key: &str) -> Result<PerChannel> {
        let want = "a number or a list of numbers";
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(PerChannel::All(0.5)),
            Some(v @ Value::Number(_)) => v
                .as_f64()
                .map(PerChannel::All)
                .ok_or_else(|| self.bad(key, want, v)),
            Some(v @ Value::Array(a)) => a
                .iter()
                .map(Value::as_f64)
                .collect::<Option<Vec<f64>>>()
                .filter(|x| !x.is_empty())
                .map(PerChannel::Each)
                .ok_or_else(|| self.bad(key, want, v)),
            Some(v) => Err(self.bad(key, want, v)),
        }
    }
}

/// Decode an image file's bytes (PNG or JPEG); `origin` (a file, or "file.parquet row 17")
/// names it in the error when the bytes are not a decodable image.
pub fn decode(bytes: &[u8], origin: &str) -> Result<DynamicImage> {
    ::image::load_from_memory(bytes)
        .map_err(|e| data_err(Path::new(origin), format!("cannot decode the image: {e}")))
}

/// Pillow's ITU-R 601-2 luma in 16-bit fixed point (`L24` in `libImaging/Convert.c`).
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

thread_local! {
    /// Each thread's resize buffers, reused from image to image.
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

/// `pixels`, borrowing the decoded buffer where it already has `channels` 8-bit channels.
fn pixels_of<'a>(img: &'a DynamicImage, channels: usize, origin: &str) -> Result<Cow<'a, [u8]>> {
    match (img, channels) {
        (DynamicImage::ImageLuma8(b), 1) => Ok(Cow::Borrowed(b.as_raw())),
        (DynamicImage::ImageRgb8(b), 3) => Ok(Cow::Borrowed(b.as_raw())),
        _ => pixels(img, channels, origin).map(Cow::Owned),
    }
}

/// The pixels of `img` as interleaved `u8` with `channels` channels (1 or 3), as Pillow's
/// `convert("L")` / `convert("RGB")` gives them for the same file: alpha dropped (not
/// composited), gray replicated to RGB, RGB to gray by Pillow's integer luma; 16-bit RGB(A)
/// and gray+alpha keep their high byte (Pillow opens them as 8-bit). 16-bit gray is refused:
/// Pillow opens it as mode `I;16` and its conversion to 8 bits saturates every value over 255.
pub fn pixels(img: &DynamicImage, channels: usize, origin: &str) -> Result<Vec<u8>> {
    let (raw, src_channels): (Vec<u8>, usize) = match img {
        DynamicImage::ImageLuma8(b) => (b.as_raw().clone(), 1),
        DynamicImage::ImageLumaA8(b) => (b.as_raw().clone(), 2),
        DynamicImage::ImageRgb8(b) => (b.as_raw().clone(), 3),
        DynamicImage::ImageRgba8(b) => (b.as_raw().clone(), 4),
        DynamicImage::ImageLumaA16(b) => (high_bytes(b.as_raw()), 2),
        DynamicImage::ImageRgb16(b) => (high_bytes(b.as_raw()), 3),
        DynamicImage::ImageRgba16(b) => (high_bytes(b.as_raw()), 4),
        DynamicImage::ImageLuma16(_) => {
            return Err(data_err(
                Path::new(origin),
                "a 16-bit grayscale image: transformers (Pillow, mode I;16) would clip it to \
                 0..255; convert it to 8 bits first",
            ))
        }
        other => {
            return Err(data_err(
                Path::new(origin),
                format!("unsupported pixel format {:?}", other.color()),
            ))
        }
    };
    let rgb = |p: &[u8]| -> [u8; 3] {
        match src_channels {
            1 | 2 => [p[0]; 3],
            _ => [p[0], p[1], p[2]],
        }
    };
    if src_channels == channels {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() / src_channels * channels);
    for p in raw.chunks_exact(src_channels) {
        match (channels, src_channels) {
            (1, 1 | 2) => out.push(p[0]),
            (1, _) => out.push(luma(p[0], p[1], p[2])),
            (3, _) => out.extend_from_slice(&rgb(p)),
            _ => {
                return Err(data_err(
                    Path::new(origin),
                    format!("cannot convert to {channels} channels (only 1 or 3)"),
                ))
            }
        }
    }
    Ok(out)
}

/// Pillow's 16-bit unpackers (`RGB;16B` and the like) keep each sample's most significant byte.
fn high_bytes(samples: &[u16]) -> Vec<u8> {
    samples.iter().map(|&v| (v >> 8) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ImageProcessor> {
        ImageProcessor::parse(Path::new("m/preprocessor_config.json"), json)
    }

    #[test]
    fn defaults_are_vits() {
        let p = parse("{}").unwrap();
        assert_eq!(
            (p.height, p.width, p.resample),
            (224, 224, Filter::Bilinear)
        );
        assert!(p.do_resize && p.do_rescale && p.do_normalize);
        assert_eq!(p.rescale_factor, 1.0 / 255.0);
        assert_eq!(p.image_mean, PerChannel::All(0.5));
    }

    /// Another rescale/normalization is an affine map of the reference's pixels, per channel.
    #[test]
    fn a_processor_follows_from_another_that_normalizes_otherwise() {
        let reference = parse(
            r#"{"size": 4, "image_mean": [0.29, 0.25, 0.21], "image_std": [0.35, 0.3, 0.25]}"#,
        )
        .unwrap();
        let img = DynamicImage::ImageRgb8(::image::RgbImage::from_fn(6, 5, |x, y| {
            ::image::Rgb([(x * 40) as u8, (y * 50) as u8, (x * y * 9) as u8])
        }));
        let x0 = reference.process(&img, 3, "img").unwrap();
        for own in [
            r#"{"size": 4}"#,
            r#"{"size": 4, "do_normalize": false}"#,
            r#"{"size": 4, "do_rescale": false, "image_mean": [1, 2, 3], "image_std": 7}"#,
        ] {
            let own = parse(own).unwrap();
            let ab = own.from_reference(&reference, 3).unwrap().unwrap();
            let x = own.process(&img, 3, "img").unwrap();
            for (i, (&v, &v0)) in x.iter().zip(&x0).enumerate() {
                let (a, b) = ab[i / 16];
                assert!(
                    (v as f64 - (a * v0 as f64 + b)).abs() < 1e-4,
                    "{own:?}: {v} vs {v0}"
                );
            }
        }
        assert_eq!(reference.from_reference(&reference, 3).unwrap(), None);
    }

    #[test]
    fn json_rescale_factor_is_exactly_one_over_255() {
        let p = parse(r#"{"rescale_factor": 0.00392156862745098}"#).unwrap();
        assert_eq!(p.rescale_factor, 1.0 / 255.0);
    }

    #[test]
    fn size_forms() {
        let p = parse(r#"{"size": 30}"#).unwrap();
        assert_eq!((p.height, p.width), (30, 30));
        let p = parse(r#"{"size": {"width": 40, "height": 24}}"#).unwrap();
        assert_eq!((p.height, p.width), (24, 40));
        let e = parse(r#"{"size": {"shortest_edge": 224}}"#).unwrap_err();
        assert!(e.to_string().contains("shortest_edge"), "{e}");
    }

    #[test]
    fn luma_matches_pillow_rounding() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(10, 10, 10), 10);
        assert_eq!(luma(255, 0, 0), 76);
    }
}
