//! ChatGLM's 2-D rotary embedding (sat 0.3.6 `RotaryEmbedding` with `rotate_half`; reference:
//! docs/reference.md §1.c): the first half of each head is rotated by the position ids, the second
//! half by the block position ids, each with the tables of `dim = head_dim / 2`.

use tch::{Kind, Tensor};

use super::config::RotaryPrecision;

/// The cos and sin tables `[max_len, head_dim / 2]` as sat builds them: `inv_freq` in fp32, the
/// angles in the model's precision, the tables stored in fp16 (see [`RotaryPrecision`]).
pub(crate) fn tables(head_dim: i64, max_len: i64, precision: RotaryPrecision) -> (Tensor, Tensor) {
    let dim = head_dim / 2;
    let opts = (Kind::Float, tch::Device::Cpu);
    let exponent = Tensor::arange_start_step(0, dim, 2, opts) / dim as f64;
    let inv_freq = Tensor::from(10000f32).pow(&exponent).reciprocal();
    let (angles, round) = match precision {
        RotaryPrecision::SatFp32 => (Tensor::arange(max_len, opts).outer(&inv_freq), true),
        RotaryPrecision::SatFp16 => {
            let inv = inv_freq.to_kind(Kind::Half);
            let t = Tensor::arange(max_len, (Kind::Half, tch::Device::Cpu));
            (t.outer(&inv), true)
        }
        RotaryPrecision::Fp32 => (Tensor::arange(max_len, opts).outer(&inv_freq), false),
    };
    let emb = Tensor::cat(&[&angles, &angles], -1);
    let (cos, sin) = (emb.cos(), emb.sin());
    if round {
        (
            cos.to_kind(Kind::Half).to_kind(Kind::Float),
            sin.to_kind(Kind::Half).to_kind(Kind::Float),
        )
    } else {
        (cos, sin)
    }
}

/// The rotary cos/sin rows of one position-id tensor `[B, S]`, gathered once per forward and
/// shared by every layer, as `[B, S, 1, d]` in fp32 and (when the model runs in another kind) in
/// that kind. `sin` has its first half negated, so that `rotate_half(x)·sin` becomes
/// `roll(x, d/2)·sin` (one op instead of chunk, neg and cat; the same numbers).
pub(crate) struct Rot {
    cos: Tensor,
    sin: Tensor,
    low: Option<(Tensor, Tensor)>,
}

impl Rot {
    fn new(pos: &Tensor, cos: &Tensor, sin: &Tensor, kind: Kind) -> Self {
        let (b, s) = pos.size2().unwrap();
        let d = cos.size()[1];
        let flat = pos.flatten(0, -1);
        let c = cos.index_select(0, &flat).view([b, s, 1, d]);
        let sn = sin.index_select(0, &flat);
        let half = sn.chunk(2, -1);
        let sn = Tensor::cat(&[half[0].neg(), half[1].shallow_clone()], -1).view([b, s, 1, d]);
        let low = (kind != Kind::Float).then(|| (c.to_kind(kind), sn.to_kind(kind)));
        Self {
            cos: c,
            sin: sn,
            low,
        }
    }

    /// The cos and (half-negated) sin rows `[B, S, 1, d]` in kind `k`.
    fn tables(&self, k: Kind) -> (Tensor, Tensor) {
        match &self.low {
            Some((c, s)) if c.kind() == k => (c.shallow_clone(), s.shallow_clone()),
            _ => (self.cos.to_kind(k), self.sin.to_kind(k)),
        }
    }

    /// `x·cos + roll(x, d/2)·sin` for one half-head tensor `x [B, S, n, d]`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let (c, sn) = self.tables(x.kind());
        let d = *x.size().last().unwrap();
        x * c + x.roll([d / 2], [-1]) * sn
    }
}

/// A forward's rotary rows: per half (positions, block positions) and, for the single rotation of
/// q and k, both stacked as `[B, S, 1, 1, 2, d]` in the model's kind — built once, used by every
/// layer.
pub(crate) struct Rotary {
    pos: Rot,
    block: Rot,
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// The rows of position ids `[B, 2, S]` from the tables `cos`, `sin` of [`tables`].
    pub(crate) fn new(position_ids: &Tensor, cos: &Tensor, sin: &Tensor, kind: Kind) -> Self {
        let r = |i| Rot::new(&position_ids.select(1, i), cos, sin, kind);
        let (pos, block) = (r(0), r(1));
        let (pc, ps) = pos.tables(kind);
        let (bc, bs) = block.tables(kind);
        Self {
            cos: Tensor::stack(&[pc, bc], 3).unsqueeze(3),
            sin: Tensor::stack(&[ps, bs], 3).unsqueeze(3),
            pos,
            block,
        }
    }

    /// q and k `[B, S, n, d]` rotated, from the fused projection's `qk [B, S, n, q|k, pos|block,
    /// d/2]`. `split`: rotate the four quarter-tensors one by one and concatenate them back (the
    /// benchmark's alternative); else one rotation of the stacked q and k, `x·cos + roll(x,
    /// d/4)·sin` on the stacked tables — four kernels where the split takes sixteen and two
    /// concatenations.
    pub(crate) fn rotate_qk(&self, qk: &Tensor, split: bool) -> (Tensor, Tensor) {
        let s = qk.size();
        let (b, t, n, hd) = (s[0], s[1], s[2], 2 * s[5]);
        if split {
            let half =
                |which: i64, r: i64, table: &Rot| table.apply(&qk.select(3, which).select(3, r));
            let q = Tensor::cat(&[half(0, 0, &self.pos), half(0, 1, &self.block)], -1);
            let k = Tensor::cat(&[half(1, 0, &self.pos), half(1, 1, &self.block)], -1);
            return (q, k);
        }
        let (c, sn) = if self.cos.kind() == qk.kind() {
            (self.cos.shallow_clone(), self.sin.shallow_clone())
        } else {
            (self.cos.to_kind(qk.kind()), self.sin.to_kind(qk.kind()))
        };
        let qk = qk * c + qk.roll([hd / 4], [-1]) * sn;
        (
            qk.select(3, 0).reshape([b, t, n, hd]),
            qk.select(3, 1).reshape([b, t, n, hd]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(x: f64) -> f64 {
        Tensor::from(x as f32)
            .to_kind(Kind::Half)
            .to_kind(Kind::Double)
            .double_value(&[])
    }

    #[test]
    fn tables_round_like_sat() {
        // head dim 128 → rotary dim 64, inv_freq[1] = 10000^(-2/64) = 0.74989… (0.75 in fp16).
        let (c32, _) = tables(128, 512, RotaryPrecision::SatFp32);
        let (c16, _) = tables(128, 512, RotaryPrecision::SatFp16);
        let (exact, _) = tables(128, 512, RotaryPrecision::Fp32);
        let inv1 = 10000f64.powf(-2.0 / 64.0);
        let at = |t: &Tensor| t.double_value(&[300, 1]);
        // fp16 model: angle = fp16(300 · fp16(inv_freq)) = 225 exactly, cos stored in fp16.
        assert_eq!(at(&c16), half(225f64.cos()));
        // fp32 model: fp32 angle, cos stored in fp16.
        assert!((at(&c32) - half((300.0 * inv1).cos())).abs() < 1e-3);
        assert_eq!(at(&c32), half(at(&exact)));
        assert!((at(&exact) - (300.0 * inv1).cos()).abs() < 1e-4);
        assert!(
            (at(&c16) - at(&c32)).abs() > 1e-2,
            "fp16 angles lose ~0.03 rad at position 300"
        );
        // The second half repeats the first (emb = cat(freqs, freqs)).
        assert_eq!(c16.double_value(&[300, 1]), c16.double_value(&[300, 33]));
    }

    #[test]
    fn the_split_and_the_stacked_rotation_agree() {
        tch::manual_seed(5);
        let (cos, sin) = tables(16, 64, RotaryPrecision::Fp32);
        let pos = Tensor::randint(64, [2, 2, 7], (Kind::Int64, tch::Device::Cpu));
        let rot = Rotary::new(&pos, &cos, &sin, Kind::Float);
        let qk = Tensor::randn([2, 7, 3, 2, 2, 8], (Kind::Float, tch::Device::Cpu));
        let (q1, k1) = rot.rotate_qk(&qk, false);
        let (q2, k2) = rot.rotate_qk(&qk, true);
        assert_eq!(q1.size(), [2, 7, 3, 16]);
        let err = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(err(&q1, &q2) < 1e-6 && err(&k1, &k2) < 1e-6);
    }
}
