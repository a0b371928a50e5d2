//! Image preprocessing, equal to XrayGLM's `BlipImageEvalProcessor(224)`.
//!
//! Reference: docs/reference.md §2 (`PIL.Image.open(p).convert('RGB')`, torchvision
//! `Resize((224,224), BICUBIC)`, which for PIL input is Pillow's antialiased bicubic resize,
//! `ToTensor()`, CLIP `Normalize`).
//!
//! The resampler follows Pillow's separable convolution (`Resample.c`): float filter weights per
//! output pixel normalised to sum 1, then converted to 22-bit fixed point; a horizontal pass into an
//! 8-bit intermediate, then a vertical pass; each output rounded by adding half and shifting, clamped
//! to 0..255. With the same arithmetic the output equals Pillow's bit for bit.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};

/// CLIP normalisation constants, as float32 like torchvision's `Normalize`.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.261_302_6, 0.275_777_1];

/// How 16-bit images become 8-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SixteenBit {
    /// Map the full 16-bit range onto 0..255 (`round(v / 257)`). Default: 16-bit radiographs keep
    /// their contrast.
    #[default]
    Scale,
    /// What Pillow's `convert('RGB')` does to a 16-bit grayscale PNG (`I;16`): values above 255
    /// clip to 255 (16-bit RGB keeps the high byte). Choose this for bit parity with the reference.
    Pillow,
}

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn sum(&self) -> u64 {
        self.data.iter().map(|&v| v as u64).sum()
    }
}

/// The environment variable that sets the decoding memory limit per image, in MiB.
pub const MAX_DECODE_ENV: &str = "XRAYGLM_MAX_IMAGE_MIB";

/// The decoding memory limit per image (MiB): `XRAYGLM_MAX_IMAGE_MIB`, default 512 (the image
/// crate's own default). It stops decompression bombs: a small file that unpacks to gigabytes.
pub fn max_decode_mib() -> u64 {
    std::env::var(MAX_DECODE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(512)
}

/// An image whose decoding would pass the memory limit (not a corrupt file).
#[derive(Debug)]
pub struct ImageTooLarge(pub String);

impl std::fmt::Display for ImageTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ImageTooLarge {}

/// Decode PNG or JPEG bytes into RGB the way `PIL.Image.open(..).convert('RGB')` does: gray is
/// replicated, alpha is dropped (not composited), palettes are expanded.
pub fn decode_rgb(bytes: &[u8], sixteen: SixteenBit) -> Result<Rgb8> {
    if bytes.is_empty() {
        bail!("empty file (0 bytes)");
    }
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .context("reading image header")?;
    match img.format() {
        Some(image::ImageFormat::Png) | Some(image::ImageFormat::Jpeg) => {}
        Some(f) => bail!("unsupported image format {f:?} (PNG and JPEG are supported)"),
        None => bail!("not a PNG or JPEG file"),
    }
    let limit_mib = max_decode_mib();
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(limit_mib << 20);
    let mut img = img;
    img.limits(limits);
    let img = match img.decode() {
        Ok(i) => i,
        Err(image::ImageError::Limits(e)) => {
            let dims = image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .ok()
                .and_then(|r| r.into_dimensions().ok())
                .map(|(w, h)| format!("{w}x{h} pixels"))
                .unwrap_or_else(|| "its size".into());
            return Err(ImageTooLarge(format!(
                "decoding it ({dims}) needs more memory than the limit of {limit_mib} MiB per \
                 image ({e}); raise the limit with {MAX_DECODE_ENV}=<MiB> if the film is genuine"
            ))
            .into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context("decoding image")),
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("image has zero size {w}x{h}");
    }
    let to8 = |v: u16| -> u8 {
        match sixteen {
            SixteenBit::Scale => ((v as u32 * 255 + 32767) / 65535) as u8,
            SixteenBit::Pillow => v.min(255) as u8,
        }
    };
    let mut data = Vec::with_capacity(w * h * 3);
    match img {
        DynamicImage::ImageRgb8(b) => data = b.into_raw(),
        DynamicImage::ImageRgba8(b) => {
            for p in b.as_raw().chunks_exact(4) {
                data.extend_from_slice(&p[..3]);
            }
        }
        DynamicImage::ImageLuma8(b) => {
            for &v in b.as_raw() {
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA8(b) => {
            for p in b.as_raw().chunks_exact(2) {
                data.extend_from_slice(&[p[0], p[0], p[0]]);
            }
        }
        DynamicImage::ImageLuma16(b) => {
            for &v in b.as_raw() {
                let g = to8(v);
                data.extend_from_slice(&[g, g, g]);
            }
        }
        DynamicImage::ImageLumaA16(b) => {
            for p in b.as_raw().chunks_exact(2) {
                let g = to8(p[0]);
                data.extend_from_slice(&[g, g, g]);
            }
        }
        // Pillow reads 16-bit colour PNGs as 8-bit RGB from the high byte.
        DynamicImage::ImageRgb16(b) => {
            for &v in b.as_raw() {
                data.push(match sixteen {
                    SixteenBit::Scale => ((v as u32 * 255 + 32767) / 65535) as u8,
                    SixteenBit::Pillow => (v >> 8) as u8,
                });
            }
        }
        DynamicImage::ImageRgba16(b) => {
            for p in b.as_raw().chunks_exact(4) {
                for &v in &p[..3] {
                    data.push(match sixteen {
                        SixteenBit::Scale => ((v as u32 * 255 + 32767) / 65535) as u8,
                        SixteenBit::Pillow => (v >> 8) as u8,
                    });
                }
            }
        }
        other => bail!("unsupported pixel format {:?}", other.color()),
    }
    Ok(Rgb8 {
        width: w,
        height: h,
        data,
    })
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
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

/// Fixed-point filter taps for one axis: for output i, taps `k[i*ksize .. i*ksize+len[i]]` apply to
/// inputs `start[i]..start[i]+len[i]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut t = Taps {
        ksize,
        start: vec![0; out_size],
        len: vec![0; out_size],
        k: vec![0; out_size * ksize],
    };
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            let v = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        for (x, &wx) in w.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            t.k[xx * ksize + x] = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        t.start[xx] = xmin;
        t.len[xx] = xmax;
    }
    t
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((w, h), BICUBIC)` (no `reducing_gap`) on an RGB image.
pub fn resize_bicubic(src: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    let need_h = out_w != src.width;
    let need_v = out_h != src.height;
    let tv = taps(src.height, out_h);
    // Rows of the source that the vertical pass reads.
    let (y_first, y_last) = if need_v {
        (tv.start[0], tv.start[out_h - 1] + tv.len[out_h - 1])
    } else {
        (0, src.height)
    };
    let half = 1i32 << (PRECISION_BITS - 1);
    let horizontal;
    let (mid, mid_w, row0) = if need_h {
        let th = taps(src.width, out_w);
        let rows = y_last - y_first;
        let mut out = vec![0u8; rows * out_w * 3];
        for r in 0..rows {
            let in_row =
                &src.data[(y_first + r) * src.width * 3..(y_first + r + 1) * src.width * 3];
            let out_row = &mut out[r * out_w * 3..(r + 1) * out_w * 3];
            for xx in 0..out_w {
                let k = &th.k[xx * th.ksize..xx * th.ksize + th.len[xx]];
                let px = &in_row[th.start[xx] * 3..(th.start[xx] + th.len[xx]) * 3];
                let (mut s0, mut s1, mut s2) = (half, half, half);
                for (p, &kk) in px.chunks_exact(3).zip(k) {
                    s0 += p[0] as i32 * kk;
                    s1 += p[1] as i32 * kk;
                    s2 += p[2] as i32 * kk;
                }
                out_row[xx * 3] = clip8(s0);
                out_row[xx * 3 + 1] = clip8(s1);
                out_row[xx * 3 + 2] = clip8(s2);
            }
        }
        horizontal = out;
        (&horizontal[..], out_w, y_first)
    } else {
        (&src.data[..], src.width, 0)
    };
    if !need_v {
        let start = row0 * mid_w * 3;
        return Rgb8 {
            width: mid_w,
            height: src.height,
            data: mid[start..start + src.height * mid_w * 3].to_vec(),
        };
    }
    let stride = mid_w * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for yy in 0..out_h {
        acc.iter_mut().for_each(|a| *a = half);
        let k = &tv.k[yy * tv.ksize..yy * tv.ksize + tv.len[yy]];
        for (j, &kk) in k.iter().enumerate() {
            let y = tv.start[yy] + j - row0;
            let row = &mid[y * stride..(y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * kk;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    Rgb8 {
        width: mid_w,
        height: out_h,
        data: out,
    }
}

/// `ToTensor()` + CLIP `Normalize` into a CHW float32 buffer, with torchvision's float32 arithmetic.
pub fn normalize_chw(img: &Rgb8) -> Vec<f32> {
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p[c] as f32 / 255.0f32 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// The image processor: decode → RGB → bicubic resize → normalize.
#[derive(Debug, Clone, Copy)]
pub struct ImageProcessor {
    pub size: usize,
    pub sixteen_bit: SixteenBit,
}

impl Default for ImageProcessor {
    fn default() -> Self {
        Self {
            size: 224,
            sixteen_bit: SixteenBit::Scale,
        }
    }
}

impl ImageProcessor {
    /// The resized 8-bit image (before normalisation).
    pub fn resized(&self, bytes: &[u8]) -> Result<Rgb8> {
        let rgb = decode_rgb(bytes, self.sixteen_bit)?;
        Ok(resize_bicubic(&rgb, self.size, self.size))
    }

    /// Preprocess encoded image bytes into a 3×size×size CHW float32 tensor buffer.
    pub fn process_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        Ok(normalize_chw(&self.resized(bytes)?))
    }

    pub fn process_file(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = crate::io::read_bytes_capped(path, crate::io::MAX_IMAGE_BYTES)
            .with_context(|| format!("{}: cannot read image", path.display()))?;
        self.process_bytes(&bytes)
            .with_context(|| format!("{}: bad image", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(512, 224), (420, 224), (100, 224), (224, 224), (3000, 224)] {
            let t = taps(i, o);
            for xx in 0..o {
                let s: i64 = t.k[xx * t.ksize..xx * t.ksize + t.len[xx]]
                    .iter()
                    .map(|&v| v as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.len[xx] as i64,
                    "{i}->{o} out {xx}: {s}"
                );
                assert!(t.start[xx] + t.len[xx] <= i);
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Rgb8 {
            width: 37,
            height: 500,
            data: [10u8, 128, 250].repeat(37 * 500),
        };
        let r = resize_bicubic(&img, 224, 224);
        assert!(r.data.chunks_exact(3).all(|p| p == [10, 128, 250]));
    }

    #[test]
    fn same_size_is_identity() {
        let data: Vec<u8> = (0..224 * 224 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let img = Rgb8 {
            width: 224,
            height: 224,
            data,
        };
        assert_eq!(resize_bicubic(&img, 224, 224), img);
    }

    #[test]
    fn empty_bytes_is_an_error() {
        let e = decode_rgb(&[], SixteenBit::Scale).unwrap_err();
        assert!(e.to_string().contains("0 bytes"));
    }
}
