//! Small building blocks shared by the model components: weights live in a `VarStore` under their
//! sat names (`transformer.layers.0.attention.dense.weight`, …), so checkpoints load by name.

use tch::nn::{Init, Path};
use tch::Tensor;

thread_local! {
    static SKIP_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static FAN_IN_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Build with variance-preserving random weights (N(0, 1/fan_in) for matrices, N(0, 1) for
/// embeddings) instead of sat's N(0, 0.02): random-weight presets then have usable logit ranges,
/// which the CPU demo needs to learn anything through LoRA alone.
pub fn with_fan_in_init<T>(f: impl FnOnce() -> T) -> T {
    FAN_IN_INIT.with(|s| s.set(true));
    let out = f();
    FAN_IN_INIT.with(|s| s.set(false));
    out
}

/// Initialisation of a weight whose rows take `fan_in` inputs.
pub fn weight_init(fan_in: i64) -> Init {
    if !SKIP_INIT.with(|s| s.get()) && FAN_IN_INIT.with(|s| s.get()) {
        Init::Randn {
            mean: 0.0,
            stdev: 1.0 / (fan_in as f64).sqrt(),
        }
    } else {
        normal()
    }
}

/// Initialisation of the output projection (`lm_head`, rows of `fan_in` = hidden): in fan-in mode
/// rows of norm 4, so that with the final LayerNorm's unit-variance output (norm √hidden) a logit
/// can reach 4·√hidden — above log(vocab) ≈ 11.8 for every preset. With 1/√fan_in rows the logits
/// of a 64-wide model are capped at 8 and no LoRA can push a token's probability above ~2 %.
pub fn lm_head_init(fan_in: i64) -> Init {
    if !SKIP_INIT.with(|s| s.get()) && FAN_IN_INIT.with(|s| s.get()) {
        Init::Randn {
            mean: 0.0,
            stdev: 4.0 / (fan_in as f64).sqrt(),
        }
    } else {
        normal()
    }
}

/// Fan-in initialisation times `gain` (fan-in mode only; sat's N(0, 0.02) otherwise).
pub fn gained_init(fan_in: i64, gain: f64) -> Init {
    if !SKIP_INIT.with(|s| s.get()) && FAN_IN_INIT.with(|s| s.get()) {
        Init::Randn {
            mean: 0.0,
            stdev: gain / (fan_in as f64).sqrt(),
        }
    } else {
        normal()
    }
}

/// Initialisation of an embedding table.
pub fn embedding_init() -> Init {
    if !SKIP_INIT.with(|s| s.get()) && FAN_IN_INIT.with(|s| s.get()) {
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        }
    } else {
        normal()
    }
}

/// Build with frozen weights zero-filled instead of randomly initialised, because they are about
/// to be loaded (sat's `--skip-init`; LoRA initialisation is unaffected).
pub fn with_skip_init<T>(f: impl FnOnce() -> T) -> T {
    SKIP_INIT.with(|s| s.set(true));
    let out = f();
    SKIP_INIT.with(|s| s.set(false));
    out
}

/// Initialisation of freshly built (not loaded) weights: N(0, 0.02), biases zero — sat's default.
pub fn normal() -> Init {
    if SKIP_INIT.with(|s| s.get()) {
        Init::Const(0.0)
    } else {
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        }
    }
}

/// `y = x Wᵀ + b` with W stored `[out, in]` (PyTorch / Megatron convention).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Weight-only int8 form (see [`Linear::quantize_int8`]): `[out, in]` int8 values and the
    /// per-row scales `[out]`; the float weight is then freed.
    pub int8: Option<(Tensor, Tensor)>,
    /// NF4 form (see [`Linear::quantize_nf4`]); the float weight is then freed.
    pub nf4: Option<super::nf4::Nf4>,
}

impl Linear {
    pub fn new(p: &Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        Self {
            weight: p.var("weight", &[out_dim, in_dim], weight_init(in_dim)),
            bias: bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0))),
            int8: None,
            nf4: None,
        }
    }

    /// With a chosen weight initialisation.
    pub fn with_init(p: &Path, in_dim: i64, out_dim: i64, bias: bool, init: Init) -> Self {
        Self {
            weight: p.var("weight", &[out_dim, in_dim], init),
            bias: bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0))),
            int8: None,
            nf4: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(q) = &self.nf4 {
            // Dequantized on the fly in x's kind (QLoRA's compute dtype).
            return x.linear(&q.dequantize(x.kind()), self.bias.as_ref());
        }
        match &self.int8 {
            None => x.linear(&self.weight, self.bias.as_ref()),
            Some((q, scale)) => {
                // Dequantized on the fly in x's kind, the row scales applied to the output:
                // x·(s ⊙ Q)ᵀ = (x·Qᵀ) ⊙ s.
                let y = x.matmul(&q.to_kind(x.kind()).tr()) * scale.to_kind(x.kind());
                match &self.bias {
                    Some(b) => y + b.to_kind(x.kind()),
                    None => y,
                }
            }
        }
    }

    /// Weight-only int8 quantization, as the original's `--quant 8` (ChatGLM's
    /// `quantization.py`): per output row, `scale = max|W_row| / 127`, `Q = round(W / scale)`;
    /// the float weight's storage is released. Idempotent.
    pub fn quantize_int8(&mut self) {
        if self.int8.is_some() {
            return;
        }
        tch::no_grad(|| {
            let kind = self.weight.kind();
            let w = self.weight.to_kind(tch::Kind::Float);
            let scale = w.abs().amax([1], true).clamp_min(1e-12) / 127.0;
            let q = (&w / &scale)
                .round()
                .clamp(-127.0, 127.0)
                .to_kind(tch::Kind::Int8);
            self.int8 = Some((q, scale.squeeze_dim(1).to_kind(kind)));
            let empty = Tensor::empty([0], (kind, self.weight.device()));
            self.weight.set_data(&empty);
        });
    }

    /// NF4 (QLoRA's 4-bit NormalFloat, blocks of 64, `double`: double-quantized scales; see
    /// [`super::nf4`]); the float weight's storage is released. Idempotent, and a no-op on an
    /// int8 layer.
    pub fn quantize_nf4(&mut self, double: bool) -> anyhow::Result<()> {
        if self.nf4.is_some() || self.int8.is_some() {
            return Ok(());
        }
        tch::no_grad(|| -> anyhow::Result<()> {
            let kind = self.weight.kind();
            self.nf4 = Some(super::nf4::Nf4::quantize(&self.weight, double)?);
            let empty = Tensor::empty([0], (kind, self.weight.device()));
            self.weight.set_data(&empty);
            Ok(())
        })
    }

    /// Whether the weight is held quantized (int8 or NF4).
    pub fn is_quantized(&self) -> bool {
        self.int8.is_some() || self.nf4.is_some()
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            false,
        )
    }
}

/// An embedding table `[rows, dim]` named `<p>.weight`.
pub fn embedding(p: &Path, rows: i64, dim: i64) -> Tensor {
    p.var("weight", &[rows, dim], embedding_init())
}

/// Dropout that is the identity when `p == 0` or not training.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if train && p > 0.0 {
        x.dropout(p, true)
    } else {
        x.shallow_clone()
    }
}

/// Exact (erf) GELU — the ViT and Q-Former.
pub fn gelu_erf(x: &Tensor) -> Tensor {
    x.gelu("none")
}

/// ChatGLM's tanh GELU: `0.5·x·(1 + tanh(0.7978845608028654·x·(1 + 0.044715·x²)))`, written out as
/// sat's `gelu_impl` computes it.
pub fn gelu_tanh(x: &Tensor) -> Tensor {
    let inner = (x * 0.7978845608028654) * ((x * 0.044715) * x + 1.0);
    x * 0.5 * (inner.tanh() + 1.0)
}

/// Plain multi-head attention `softmax((q/√d)·kᵀ)·v` without a mask, `q,k,v`: `[B, heads, S, d]`.
/// `fused` uses libtorch's scaled-dot-product attention kernel; otherwise sat's
/// `standard_attention` arithmetic, op for op.
pub fn standard_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dropout_p: f64,
    train: bool,
    fused: bool,
) -> Tensor {
    let d = *q.size().last().unwrap() as f64;
    if fused {
        let p = if train { dropout_p } else { 0.0 };
        return Tensor::scaled_dot_product_attention::<Tensor>(
            q,
            k,
            v,
            None,
            p,
            false,
            Some(1.0 / d.sqrt()),
            false,
        );
    }
    let scores = (q / d.sqrt()).matmul(&k.transpose(-1, -2));
    let probs = scores.softmax(-1, scores.kind());
    dropout(&probs, dropout_p, train).matmul(v)
}

/// `[B, S, heads·d] → [B, heads, S, d]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let (b, s, h) = x.size3().unwrap();
    x.view([b, s, heads, h / heads]).transpose(1, 2)
}

/// `[B, heads, S, d] → [B, S, heads·d]`.
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, n, s, d) = x.size4().unwrap();
    x.transpose(1, 2).contiguous().view([b, s, n * d])
}
