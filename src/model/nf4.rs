//! NF4 (4-bit NormalFloat) weights with block-wise absmax scales, optionally double-quantized —
//! the storage of a QLoRA frozen base (`model.quantize = "nf4"`, `--quant 4`:
//! [`super::nn::Linear::quantize_nf4`]).
//!
//! Paper: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS 2023), §3:
//!
//! * **code values**: quantiles of N(0, 1), made exact at 0 by building the two halves apart —
//!   8 non-negative values `Φ⁻¹(p)` for `p` = the first 8 of 9 points evenly spaced from δ down to
//!   ½, and 7 negative values `−Φ⁻¹(p)` for the first 7 of 8 points from δ to ½, with
//!   δ = 1 − ½·(1/30 + 1/32) ≈ 0.9677 (the paper's offset: the middle of the 15- and 16-quantile
//!   tail points), all divided by the largest so that they span [−1, 1];
//! * **blocks** of 64 weights, each divided by its absolute maximum and stored as the index of the
//!   nearest code value (4 bits, two per byte);
//! * **double quantization** (optional): the fp32 block maxima, less their mean, quantized again in
//!   blocks of 256 — here as symmetric int8 with an fp32 scale per block (the paper uses an 8-bit
//!   float map; int8 keeps the same 8 + 32/256 bits per block), which brings the scales' memory
//!   from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per weight.
//!
//! Dequantization is `code[index] · absmax` in fp32, then the compute kind.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// Weights per absmax block.
pub const BLOCK: i64 = 64;
/// Block maxima per second-level block (double quantization).
pub const SCALE_BLOCK: i64 = 256;

/// δ: the outermost quantile used for the code values.
fn offset() -> f64 {
    1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
}

/// Φ⁻¹, the standard normal quantile function, for p in (0, 1): Acklam's rational approximations
/// (relative error below 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let low = 0.02425;
    if p < low {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - low {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The 16 NF4 code values, ascending, from the definition above.
pub fn code_values() -> [f64; 16] {
    let spaced = |n: usize| -> Vec<f64> {
        let (a, b) = (offset(), 0.5);
        (0..n)
            .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
            .collect()
    };
    let mut v: Vec<f64> = spaced(9)[..8].iter().map(|&p| normal_quantile(p)).collect();
    v.extend(spaced(8)[..7].iter().map(|&p| -normal_quantile(p)));
    v.push(0.0);
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let mut out = [0.0; 16];
    for (o, x) in out.iter_mut().zip(&v) {
        *o = x / max;
    }
    out.sort_by(f64::total_cmp);
    out
}

/// The block maxima: fp32, or double-quantized.
#[derive(Debug)]
pub enum Scales {
    Plain(Tensor),
    /// int8 values of (absmax − offset) per block, an fp32 scale per [`SCALE_BLOCK`] blocks.
    Double {
        q: Tensor,
        scale: Tensor,
        offset: f64,
    },
}

/// A tensor held as NF4.
#[derive(Debug)]
pub struct Nf4 {
    /// Two code indices per byte (the first in the high nibble), `[padded / 2]` uint8.
    pub packed: Tensor,
    pub scales: Scales,
    pub shape: Vec<i64>,
}

impl Nf4 {
    /// Quantize `w` (any float kind, any shape; padded with zeros to a whole block).
    pub fn quantize(w: &Tensor, double: bool) -> Result<Self> {
        let shape = w.size();
        let n = w.numel() as i64;
        ensure!(n > 0, "NF4: an empty tensor");
        let dev = w.device();
        let pad = (BLOCK - n % BLOCK) % BLOCK;
        let flat = w.to_kind(Kind::Float).reshape([-1]);
        let flat = if pad > 0 {
            Tensor::cat(&[flat, Tensor::zeros([pad], (Kind::Float, dev))], 0)
        } else {
            flat
        };
        let blocks = flat.view([-1, BLOCK]);
        let absmax = blocks.abs().amax([1].as_slice(), true);
        // An all-zero block keeps scale 0 and its values the zero code (as bitsandbytes does; the
        // divisor is the smallest normal fp32 — f64's would underflow to 0 and give 0/0).
        let scaled = &blocks / absmax.clamp_min(f32::MIN_POSITIVE as f64);
        let codes = code_values();
        let mids: Vec<f32> = codes
            .windows(2)
            .map(|p| ((p[0] + p[1]) / 2.0) as f32)
            .collect();
        let mids = Tensor::from_slice(&mids).to_device(dev);
        let idx = Tensor::bucketize(&scaled.reshape([-1]), &mids, false, false);
        let pairs = idx.view([-1, 2]);
        let packed = (pairs.select(1, 0) * 16 + pairs.select(1, 1)).to_kind(Kind::Uint8);
        let absmax = absmax.squeeze_dim(1);
        let scales = if double {
            Self::double(&absmax)
        } else {
            Scales::Plain(absmax)
        };
        Ok(Self {
            packed,
            scales,
            shape,
        })
    }

    /// Second-level quantization of the block maxima.
    fn double(absmax: &Tensor) -> Scales {
        let dev = absmax.device();
        let offset = absmax.mean(Kind::Float).double_value(&[]);
        let n = absmax.size()[0];
        let pad = (SCALE_BLOCK - n % SCALE_BLOCK) % SCALE_BLOCK;
        let centred = absmax - offset;
        let centred = if pad > 0 {
            Tensor::cat(&[centred, Tensor::zeros([pad], (Kind::Float, dev))], 0)
        } else {
            centred
        };
        let groups = centred.view([-1, SCALE_BLOCK]);
        let scale = (groups.abs().amax([1].as_slice(), true) / 127.0).clamp_min(f64::MIN_POSITIVE);
        let q = (&groups / &scale)
            .round()
            .clamp(-127.0, 127.0)
            .to_kind(Kind::Int8)
            .reshape([-1])
            .narrow(0, 0, n);
        Scales::Double {
            q,
            scale: scale.squeeze_dim(1),
            offset,
        }
    }

    /// The block maxima in fp32, `[blocks]`.
    pub fn absmax(&self) -> Tensor {
        match &self.scales {
            Scales::Plain(a) => a.shallow_clone(),
            Scales::Double { q, scale, offset } => {
                let n = q.size()[0];
                let per = scale.repeat_interleave_self_int(SCALE_BLOCK, 0, None::<i64>);
                q.to_kind(Kind::Float) * per.narrow(0, 0, n) + *offset
            }
        }
    }

    /// The weights back, `shape` in `kind`.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let dev = self.packed.device();
        let codes: Vec<f32> = code_values().iter().map(|&c| c as f32).collect();
        let codes = Tensor::from_slice(&codes).to_device(dev);
        let p = self.packed.to_kind(Kind::Int64);
        let idx = Tensor::stack(&[p.floor_divide_scalar(16), p.remainder(16)], 1).reshape([-1]);
        let values = codes.index_select(0, &idx).view([-1, BLOCK]) * self.absmax().unsqueeze(1);
        let n: i64 = self.shape.iter().product();
        values
            .reshape([-1])
            .narrow(0, 0, n)
            .view(self.shape.as_slice())
            .to_kind(kind)
    }

    /// Bytes held (indices and scales).
    pub fn bytes(&self) -> usize {
        let t = |x: &Tensor| x.numel() * x.kind().elt_size_in_bytes();
        t(&self.packed)
            + match &self.scales {
                Scales::Plain(a) => t(a),
                Scales::Double { q, scale, .. } => t(q) + t(scale) + 8,
            }
    }

    pub fn device(&self) -> Device {
        self.packed.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NF4 values as published with QLoRA (its appendix and the `bitsandbytes` release).
    const PUBLISHED: [f64; 16] = [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ];

    #[test]
    fn the_code_values_follow_the_qlora_definition() {
        let c = code_values();
        // The published values come from probabilities spaced in fp32 (torch.linspace) and are
        // stored as fp32; these are computed in f64: equal within 3e-7 (measured: 1.9e-7 at most,
        // code 14; Python's statistics.NormalDist gives the same differences).
        for (i, (a, b)) in c.iter().zip(PUBLISHED).enumerate() {
            assert!((a - b).abs() < 3e-7, "code {i}: {a} vs published {b}");
        }
        assert_eq!(c.iter().filter(|&&x| x == 0.0).count(), 1);
        assert_eq!(c.iter().filter(|&&x| x > 0.0).count(), 8);
        assert_eq!((c[0], c[15]), (-1.0, 1.0));
        // Φ⁻¹ itself: Φ⁻¹(0.975) = 1.959963984540054, Φ⁻¹(0.5) = 0.
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!(normal_quantile(0.5).abs() < 1e-12);
    }

    #[test]
    fn every_weight_goes_to_its_nearest_code_and_back() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 130], (Kind::Float, Device::Cpu)) * 0.02;
        let q = Nf4::quantize(&w, false).unwrap();
        let back = q.dequantize(Kind::Float);
        assert_eq!(back.size(), w.size());
        // 4 bits per weight + 32 bits per block of 64.
        let n = 96 * 130;
        let blocks = (n as f64 / 64.0).ceil() as usize;
        assert_eq!(q.bytes(), blocks * 32 + blocks * 4);
        // Nearest code: the error of each weight is at most half the widest gap times its block's
        // absmax, and no other code is closer.
        let codes = code_values();
        let wv = Vec::<f32>::try_from(w.reshape([-1])).unwrap();
        let bv = Vec::<f32>::try_from(back.reshape([-1])).unwrap();
        let absmax = Vec::<f32>::try_from(q.absmax()).unwrap();
        for (i, (x, y)) in wv.iter().zip(&bv).enumerate() {
            let m = absmax[i / 64] as f64;
            let best = codes
                .iter()
                .map(|c| (c * m - *x as f64).abs())
                .fold(f64::INFINITY, f64::min);
            assert!(((*y - *x).abs() as f64 - best).abs() < 1e-6, "weight {i}");
        }
        // The block maxima are kept exactly.
        let again = Nf4::quantize(&back, false).unwrap();
        assert!(again.packed.equal(&q.packed));
        assert!(again.dequantize(Kind::Float).equal(&back));
        let err = (&back - &w).abs().mean(Kind::Float).double_value(&[]);
        let scale = w.abs().mean(Kind::Float).double_value(&[]);
        assert!(
            err / scale < 0.12,
            "mean error {err} against mean |w| {scale}"
        );
    }

    #[test]
    fn double_quantized_scales_cost_an_eighth_of_a_bit() {
        tch::manual_seed(1);
        let w = Tensor::randn([512, 512], (Kind::Float, Device::Cpu)) * 0.02;
        let plain = Nf4::quantize(&w, false).unwrap();
        let double = Nf4::quantize(&w, true).unwrap();
        let n = 512.0 * 512.0;
        let bits = |q: &Nf4| q.bytes() as f64 * 8.0 / n;
        assert!((bits(&plain) - 4.5).abs() < 1e-9, "{}", bits(&plain));
        assert!((bits(&double) - 4.127).abs() < 0.001, "{}", bits(&double));
        // The scales come back within half an int8 step of their group's range.
        let (a, b) = (plain.absmax(), double.absmax());
        let step = (a.max().double_value(&[]) - a.min().double_value(&[])) / 127.0;
        assert!((&a - &b).abs().max().double_value(&[]) <= step);
        let err = (double.dequantize(Kind::Float) - &w)
            .abs()
            .mean(Kind::Float)
            .double_value(&[]);
        let err0 = (plain.dequantize(Kind::Float) - &w)
            .abs()
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(err < err0 * 1.05, "double {err} vs plain {err0}");
    }
}
