//! ChatGLM-6B (GLM with 2-D rotary positions), as sat 0.3.6 computes it.
//!
//! Paper: Du et al., "GLM: General Language Model Pretraining with Autoregressive Blank
//! Infilling" (ACL 2022). Reference: docs/reference.md §1.c (sat 0.3.6
//! `model/official/chatglm_model.py`, HF `modeling_chatglm.py`):
//!
//! * block: `a = LN_in(h); h1 = α·a + Attn(a); m = LN_post(h1); out = α·m + MLP(m)`, α = √(2·layers);
//! * fused qkv rows interleaved per head `[q_h k_h v_h]`; 2-D rotary: the first half of each head
//!   rotated by `position_ids`, the second half by `block_position_ids` (rotate-half style);
//! * scores `(q / (√d·c))·kᵀ`, masked as `s·m − 10000·(1−m)`, then `·c` in fp32 and softmax in fp32
//!   (c = layer index + 1) — sat's fp16-overflow trick, kept for bit-faithful numerics;
//! * tanh-GELU MLP, final LN, untied `lm_head` without bias.

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::config::{ModelConfig, RotaryPrecision};
pub use super::kernels::Kernels;
pub use super::kv_cache::{KvCache, SlotCache};
pub use super::lora::{layer_loras, LayerLoras, RowAdapters};
use super::lora::{Lora, Part};
use super::nn::{dropout, embedding, gelu_tanh, LayerNorm, Linear};

#[derive(Debug)]
pub(crate) struct Layer {
    input_layernorm: LayerNorm,
    qkv: Linear,
    dense: Linear,
    post_attention_layernorm: LayerNorm,
    h_to_4h: Linear,
    h4_to_h: Linear,
    lora: LayerLoras,
}

/// Dropout rates in train mode (sat: 0.1 each; HF ChatGLM: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Dropouts {
    pub embedding: f64,
    pub attention: f64,
    pub output: f64,
}

#[derive(Debug)]
pub struct ChatGlm {
    word_embeddings: Tensor,
    pub(crate) layers: Vec<Layer>,
    final_layernorm: LayerNorm,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    heads: i64,
    head_dim: i64,
    alpha: f64,
    pub dropout: Dropouts,
    /// Whether the LoRA deltas are added (false once merged into the base weights).
    pub lora_active: bool,
    /// Fused scaled-dot-product attention (additive −10000 mask) instead of sat's arithmetic.
    pub fused_attention: bool,
    /// Kernel choices measured by `xrayglm bench layer`; the defaults are the fast ones.
    pub kernels: Kernels,
    /// With activation checkpointing, how many layers (the first ones) are recomputed in the
    /// backward; the others keep their activations. `None`: every layer.
    pub recompute_layers: Option<usize>,
    /// Base seed for per-layer dropout generators (see [`ChatGlm::loss_backward_checkpointed`]).
    pub layer_seed: std::cell::Cell<Option<i64>>,
}

/// How a layer's attention uses a cache.
pub(crate) enum Kv<'a> {
    /// Earlier tokens in front of this call's, which are appended (prefill and equal-length
    /// batches).
    Append(&'a mut Option<(Tensor, Tensor)>),
    /// One new token per row written at the row's own position `at[r]`; the keys are the first
    /// `keys` positions of every live row, the mask hides each row's unused ones.
    Slots {
        k: &'a mut Tensor,
        v: &'a mut Tensor,
        at: &'a Tensor,
        keys: i64,
    },
}

/// Inputs for one forward pass.
pub struct GlmInputs<'a> {
    /// `[B, S]`
    pub input_ids: &'a Tensor,
    /// `[B, 2, S]`: position ids and block position ids.
    pub position_ids: &'a Tensor,
    /// `[B, 1, S, S]` float: 1 = may attend.
    pub attention_mask: &'a Tensor,
    /// Image embeddings `[N, L, hidden]` to splice over their placeholder ids (see [`ImageAt`]).
    pub image_embeds: Option<&'a Tensor>,
    pub image_at: ImageAt<'a>,
}

/// Where the `N` images of [`GlmInputs::image_embeds`] go.
#[derive(Debug, Clone, Copy)]
pub enum ImageAt<'a> {
    /// One image per row (`N = B`), each over `[start, start + L)` of its row (VisualGLM's one
    /// film after `<img>`).
    EachRow(i64),
    /// Image `n` over `[start, start + L)` of row `row`, for `(row, start)` = `at[n]`: several
    /// films per sample (each in its own `<img>…</img>` block), or rows without one.
    Slots(&'a [(i64, i64)]),
}

impl<'a> ImageAt<'a> {
    /// The placement for `(row, start)` per image over `rows` rows: [`ImageAt::EachRow`] when it
    /// is one image per row at one slot (the reference's splice), else [`ImageAt::Slots`].
    pub fn of(at: &'a [(i64, i64)], rows: usize) -> Self {
        let one_per_row = !at.is_empty()
            && at.len() == rows
            && at
                .iter()
                .enumerate()
                .all(|(r, &(row, start))| row == r as i64 && start == at[0].1);
        if one_per_row {
            ImageAt::EachRow(at[0].1)
        } else {
            ImageAt::Slots(at)
        }
    }
}

/// Label value the loss ignores.
const IGNORE_LABEL: i64 = super::visualglm::IGNORE;

fn rotary_tables(head_dim: i64, max_len: i64, precision: RotaryPrecision) -> (Tensor, Tensor) {
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
}

/// What every layer of one forward shares: the rotary tables of its positions, its attention
/// mask (`None`: every key is visible, one new token per sequence) and whether it trains.
pub(crate) struct Pass<'a> {
    rot: Rotary,
    mask: Option<Tensor>,
    train: bool,
    /// Per-row adapters (serving several adapters in one batch); `None`: the layers' own.
    adapters: Option<&'a RowAdapters<'a>>,
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
    fn new(pos: Rot, block: Rot, kind: Kind) -> Self {
        let (pc, ps) = pos.tables(kind);
        let (bc, bs) = block.tables(kind);
        Self {
            cos: Tensor::stack(&[pc, bc], 3).unsqueeze(3),
            sin: Tensor::stack(&[ps, bs], 3).unsqueeze(3),
            pos,
            block,
        }
    }

    /// The stacked tables in kind `k`.
    fn stacked(&self, k: Kind) -> (Tensor, Tensor) {
        if self.cos.kind() == k {
            (self.cos.shallow_clone(), self.sin.shallow_clone())
        } else {
            (self.cos.to_kind(k), self.sin.to_kind(k))
        }
    }
}

impl ChatGlm {
    /// `p`: the frozen store (weights under `transformer.` and `mixins.chatglm-final.`);
    /// `lora_p`: the fp32 trainable store for the adapters.
    pub fn new(p: &Path, lora_p: &Path, cfg: &ModelConfig) -> Self {
        let s = &cfg.sat;
        let (h, inner, eps) = (s.hidden_size, cfg.inner_hidden_size(), s.layernorm_epsilon);
        let heads = s.num_attention_heads;
        let head_dim = h / heads;
        let t = p / "transformer";
        let layers = (0..s.num_layers)
            .map(|i| {
                let l = &t / "layers" / i;
                Layer {
                    input_layernorm: LayerNorm::new(&(&l / "input_layernorm"), h, eps),
                    qkv: Linear::new(&(&l / "attention" / "query_key_value"), h, 3 * h, true),
                    dense: Linear::new(&(&l / "attention" / "dense"), h, h, true),
                    post_attention_layernorm: LayerNorm::new(
                        &(&l / "post_attention_layernorm"),
                        h,
                        eps,
                    ),
                    h_to_4h: Linear::new(&(&l / "mlp" / "dense_h_to_4h"), h, inner, true),
                    h4_to_h: Linear::new(&(&l / "mlp" / "dense_4h_to_h"), inner, h, true),
                    lora: layer_loras(lora_p, cfg, i),
                }
            })
            .collect();
        let (cos, sin) = rotary_tables(head_dim, s.max_sequence_length, cfg.rotary);
        Self {
            word_embeddings: embedding(&(&t / "word_embeddings"), s.vocab_size, h),
            layers,
            final_layernorm: LayerNorm::new(&(&t / "final_layernorm"), h, eps),
            lm_head: (p / "mixins" / "chatglm-final" / "lm_head").var(
                "weight",
                &[s.vocab_size, h],
                super::nn::lm_head_init(h),
            ),
            cos: cos.to_device(p.device()),
            sin: sin.to_device(p.device()),
            heads,
            head_dim,
            alpha: ((2 * s.num_layers) as f64).sqrt(),
            dropout: Dropouts::default(),
            lora_active: true,
            fused_attention: false,
            kernels: Kernels::default(),
            recompute_layers: None,
            layer_seed: std::cell::Cell::new(None),
        }
    }

    /// Token embeddings with the image embeddings spliced over the placeholder slots (XrayGLM's
    /// `ImageMixin.word_embedding_forward`): no image, or a sequence shorter than the slots, means
    /// plain embeddings.
    pub fn embed(&self, input_ids: &Tensor, image_embeds: Option<&Tensor>, at: ImageAt) -> Tensor {
        let emb = Tensor::embedding(&self.word_embeddings, input_ids, -1, false, false);
        let Some(img) = image_embeds else {
            return emb;
        };
        let (b, s) = input_ids.size2().unwrap();
        let l = img.size()[1];
        let img = img.to_kind(emb.kind());
        match at {
            ImageAt::EachRow(start) => {
                if start + l > s {
                    return emb;
                }
                Tensor::cat(
                    &[
                        emb.narrow(1, 0, start),
                        img,
                        emb.narrow(1, start + l, s - start - l),
                    ],
                    1,
                )
            }
            ImageAt::Slots(at) => {
                // Flat positions `row·S + start + j` of every slot that lies inside the sequence.
                let (mut index, mut keep) = (Vec::new(), Vec::new());
                for (n, &(row, start)) in at.iter().enumerate() {
                    if row < b && start + l <= s {
                        index.extend((0..l).map(|j| row * s + start + j));
                        keep.push(n as i64);
                    }
                }
                if keep.is_empty() {
                    return emb;
                }
                let h = emb.size()[2];
                let dev = emb.device();
                let values = img
                    .index_select(0, &Tensor::from_slice(&keep).to_device(dev))
                    .reshape([-1, h]);
                let index = Tensor::from_slice(&index).to_device(dev);
                emb.reshape([b * s, h])
                    .index_put(&[Some(index)], &values, false)
                    .reshape([b, s, h])
            }
        }
    }

    /// Logits `[B, S, vocab]` (in the weights' kind).
    pub fn forward(&self, inp: &GlmInputs, train: bool) -> Tensor {
        self.head(&self.hidden(inp, train))
    }

    /// The last layer's output `[B, S, hidden]` (before the final LayerNorm and `lm_head`).
    pub fn hidden(&self, inp: &GlmInputs, train: bool) -> Tensor {
        let (mut x, pass) = self.prepare(inp, train);
        for (i, l) in self.layers.iter().enumerate() {
            self.seed_layer(i);
            x = self.layer(l, i as i64, &x, &pass, None);
        }
        x
    }

    /// The reference's loss (next-token cross-entropy in fp32, −100 ignored, mean over the
    /// counted tokens) from the last layer's output, with the final LayerNorm and `lm_head` applied
    /// only at the positions that predict a counted label: a prompt position never reaches the
    /// vocabulary-sized matmul. Equal to `lm_loss(forward(..))`.
    pub fn target_loss(&self, hidden: &Tensor, labels: &Tensor) -> Tensor {
        let (_, s, h) = hidden.size3().unwrap();
        let next = labels.narrow(1, 1, s - 1).reshape([-1]);
        let rows = next.ne(IGNORE_LABEL).nonzero().squeeze_dim(1);
        let x = hidden
            .narrow(1, 0, s - 1)
            .reshape([-1, h])
            .index_select(0, &rows);
        self.head(&x)
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &next.index_select(0, &rows),
                None,
                tch::Reduction::Mean,
                IGNORE_LABEL,
                0.0,
            )
    }

    /// Incremental decoding (eval mode): the logits `[B, vocab]` of each sequence's last position,
    /// attending to the tokens in `cache` and then these. The first call passes the whole prompt
    /// with its mask `[B, 1, S, S]`; later calls one new token per sequence with `mask: None`.
    pub fn forward_cached(
        &self,
        inp: &GlmInputs,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Tensor {
        self.forward_cached_with(inp, mask, cache, None)
    }

    /// [`ChatGlm::forward_cached`] with per-row adapters.
    pub fn forward_cached_with(
        &self,
        inp: &GlmInputs,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        adapters: Option<&RowAdapters>,
    ) -> Tensor {
        let x = self.embed(inp.input_ids, inp.image_embeds, inp.image_at);
        let pass = Pass {
            rot: self.rot(inp.position_ids, x.kind()),
            mask: mask.map(|m| m.to_kind(Kind::Float)),
            train: false,
            adapters,
        };
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let mut x = x;
        for (i, (l, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            x = self.layer(l, i as i64, &x, &pass, Some(Kv::Append(kv)));
        }
        let s = x.size()[1];
        self.head(&x.narrow(1, s - 1, 1)).squeeze_dim(1)
    }

    /// One decoding step of rows of different lengths (continuous batching): `input_ids [B, 1]`
    /// and `position_ids [B, 2, 1]` of each live row of `cache` (B = `cache.rows()`), attending to
    /// that row's own cached tokens, with per-row `adapters` (`None`: the layers' own). Returns
    /// the logits `[B, vocab]`; each row's length grows by 1.
    pub fn forward_slots(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        cache: &mut SlotCache,
        adapters: Option<&RowAdapters>,
    ) -> Tensor {
        let dev = input_ids.device();
        let b = cache.rows() as i64;
        let at = Tensor::from_slice(&cache.lens).to_device(dev);
        let keys = cache.lens.iter().max().copied().unwrap_or(0) + 1;
        let need = cache.capacity().1.max(keys);
        if need > cache.capacity().1 {
            let like: Vec<(Tensor, Tensor)> = cache
                .layers
                .iter()
                .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                .collect();
            cache.reserve(&like, b, need);
        }
        // Row r sees its positions 0..=lens[r] (the new token included).
        let cols = Tensor::arange(keys, (Kind::Int64, dev)).view([1, 1, 1, keys]);
        let mask = cols.le_tensor(&at.view([b, 1, 1, 1])).to_kind(Kind::Float);
        let x = self.embed(input_ids, None, ImageAt::EachRow(0));
        let pass = Pass {
            rot: self.rot(position_ids, x.kind()),
            mask: Some(mask),
            train: false,
            adapters,
        };
        let mut x = x;
        for (i, (l, (k, v))) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let kv = Kv::Slots {
                k,
                v,
                at: &at,
                keys,
            };
            x = self.layer(l, i as i64, &x, &pass, Some(kv));
        }
        for n in &mut cache.lens {
            *n += 1;
        }
        self.head(&x).squeeze_dim(1)
    }

    /// Embeddings (with dropout) and what every layer of this forward shares.
    pub(crate) fn prepare(&self, inp: &GlmInputs, train: bool) -> (Tensor, Pass<'static>) {
        let emb = self.embed(inp.input_ids, inp.image_embeds, inp.image_at);
        let x = dropout(&emb, self.dropout.embedding, train);
        let pass = Pass {
            rot: self.rot(inp.position_ids, x.kind()),
            mask: Some(inp.attention_mask.to_kind(Kind::Float)),
            train,
            adapters: None,
        };
        (x, pass)
    }

    /// Rotary rows of the positions and block positions `[B, 2, S]`.
    fn rot(&self, position_ids: &Tensor, kind: Kind) -> Rotary {
        let r = |i| Rot::new(&position_ids.select(1, i), &self.cos, &self.sin, kind);
        Rotary::new(r(0), r(1), kind)
    }

    fn head(&self, x: &Tensor) -> Tensor {
        self.final_layernorm.forward(x).matmul(&self.lm_head.tr())
    }

    /// One block; with `kv`, the keys and values of earlier tokens are attended to and this
    /// call's are appended.
    pub(crate) fn layer(
        &self,
        l: &Layer,
        idx: i64,
        h: &Tensor,
        pass: &Pass,
        kv: Option<Kv>,
    ) -> Tensor {
        let (d, train) = (self.dropout, pass.train);
        let a = l.input_layernorm.forward(h);
        let attn = self.attention(l, idx, &a, pass, kv);
        let h1 = &a * self.alpha + attn;
        let m = l.post_attention_layernorm.forward(&h1);
        let up = self.adapt(&l.h_to_4h, Part::HTo4h, l, idx, &m, pass);
        let act = if self.kernels.sat_gelu {
            gelu_tanh(&up)
        } else {
            up.gelu("tanh")
        };
        let down = self.adapt(&l.h4_to_h, Part::H4ToH, l, idx, &act, pass);
        &m * self.alpha + dropout(&down, d.output, train)
    }

    fn attention(&self, l: &Layer, idx: i64, a: &Tensor, pass: &Pass, kv: Option<Kv>) -> Tensor {
        let (rot, mask, train) = (&pass.rot, pass.mask.as_ref(), pass.train);
        let (b, s, hidden) = a.size3().unwrap();
        let (n, hd) = (self.heads, self.head_dim);
        let qkv = self
            .adapt(&l.qkv, Part::Qkv, l, idx, a, pass)
            .view([b, s, n, 3 * hd]);
        // Per head `[q k v]`; q and k rotated together as `[B, S, n, q|k, pos|block, d/2]`.
        let qk = qkv.narrow(-1, 0, 2 * hd).view([b, s, n, 2, 2, hd / 2]);
        let (q, k) = if self.kernels.split_rotary {
            let half = |t: i64, r: i64, table: &Rot| {
                let x = qk.select(3, t).select(3, r);
                let (c, sn) = table.tables(x.kind());
                &x * c + x.roll([hd / 4], [-1]) * sn
            };
            let q = Tensor::cat(&[half(0, 0, &rot.pos), half(0, 1, &rot.block)], -1);
            let k = Tensor::cat(&[half(1, 0, &rot.pos), half(1, 1, &rot.block)], -1);
            (q, k)
        } else {
            let qk = rotate(&qk, rot);
            (
                qk.select(3, 0).reshape([b, s, n, hd]),
                qk.select(3, 1).reshape([b, s, n, hd]),
            )
        };
        let v = qkv.narrow(-1, 2 * hd, hd);
        // [B, S, n, d] → [B, n, S, d]
        let (q, mut k, mut v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        match kv {
            // sat's CachedAutoregressiveMixin: post-rotary keys and values of earlier tokens
            // in front of this call's.
            Some(Kv::Append(cache)) => {
                if let Some((pk, pv)) = cache.as_ref() {
                    k = Tensor::cat(&[pk, &k], 2);
                    v = Tensor::cat(&[pv, &v], 2);
                }
                *cache = Some((k.shallow_clone(), v.shallow_clone()));
            }
            // Each row's new key and value at its own position, then every row's keys so far.
            Some(Kv::Slots {
                k: ck,
                v: cv,
                at,
                keys,
            }) => {
                let rows = Tensor::arange(b, (Kind::Int64, k.device()));
                let idx = [Some(rows), None, Some(at.shallow_clone())];
                let _ = ck.index_put_(&idx, &k.squeeze_dim(2), false);
                let _ = cv.index_put_(&idx, &v.squeeze_dim(2), false);
                k = ck.narrow(0, 0, b).narrow(2, 0, keys);
                v = cv.narrow(0, 0, b).narrow(2, 0, keys);
            }
            None => {}
        }
        let ctx = if self.fused_attention && s == 1 && q.device().is_cuda() {
            // One new token per sequence on a GPU: three plain ops. libtorch's fused attention
            // would pick its cuDNN backend for bf16, which plans anew for every key length: ~45 ms
            // per decoding step on an H200 whatever the model size (scripts/gpu_check.sh step 6).
            one_query_attention(&q, &k, &v, mask)
        } else if self.fused_attention {
            // Same function: softmax(q·kᵀ/√d − 10000·(1 − mask))·v, on libtorch's fused kernel.
            let bias = mask.map(|m| ((m - 1.0) * 10000.0).to_kind(q.kind()));
            let p = if train { self.dropout.attention } else { 0.0 };
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                bias,
                p,
                false,
                Some(1.0 / (hd as f64).sqrt()),
                false,
            )
        } else {
            let c = (idx + 1) as f64;
            let kind = q.kind();
            let q = q / ((hd as f64).sqrt() * c);
            let scores = q.matmul(&k.transpose(-1, -2));
            // Like sat, a single all-visible row is left unmasked.
            let scores: Tensor = match mask {
                Some(m) => &scores * m - (m.ones_like() - m) * 10000.0,
                None => scores,
            };
            // The softmax in fp32 as sat's (float64 models — gradient checks — stay in float64).
            let acc = if kind == Kind::Double {
                Kind::Double
            } else {
                Kind::Float
            };
            let probs = (scores.to_kind(acc) * c).softmax(-1, acc).to_kind(kind);
            dropout(&probs, self.dropout.attention, train).matmul(&v)
        };
        let ctx = ctx.transpose(1, 2).contiguous().view([b, s, hidden]);
        let out = self.adapt(&l.dense, Part::Dense, l, idx, &ctx, pass);
        dropout(&out, self.dropout.output, train)
    }

    /// A frozen linear of layer `l` (number `idx`) with its adapters: the layer's own, or per
    /// row when the pass has row adapters.
    fn adapt(
        &self,
        lin: &Linear,
        part: Part,
        l: &Layer,
        idx: i64,
        x: &Tensor,
        pass: &Pass,
    ) -> Tensor {
        let Some(ra) = pass.adapters else {
            return self.adapted(lin, part.of(&l.lora), x, pass.train);
        };
        fn choose<'x>(
            part: Part,
            set: Option<&'x [LayerLoras]>,
            own: &'x LayerLoras,
            idx: i64,
            active: bool,
        ) -> Option<&'x Lora> {
            match set {
                Some(s) => part.of(&s[idx as usize]),
                None => part.of(own).filter(|_| active),
            }
        }
        let pick = |set| choose(part, set, &l.lora, idx, self.lora_active);
        if let [(None, set)] = ra.groups.as_slice() {
            // One adapter for every row: the plain path.
            return match pick(*set) {
                Some(lo) => lin.forward(x) + lo.delta(x, false),
                None => lin.forward(x),
            };
        }
        let mut out = lin.forward(x);
        for (rows, set) in &ra.groups {
            let Some(lo) = pick(*set) else { continue };
            out = match rows {
                Some(r) => out.index_add(0, r, &lo.delta(&x.index_select(0, r), false)),
                None => out + lo.delta(x, false),
            };
        }
        out
    }

    /// A frozen linear with its LoRA (when present and not merged).
    fn adapted(&self, lin: &Linear, lora: Option<&Lora>, x: &Tensor, train: bool) -> Tensor {
        match lora.filter(|_| self.lora_active) {
            None => lin.forward(x),
            Some(lo) if self.kernels.lora_as_weight && !lin.is_quantized() => {
                let w = &lin.weight + lo.delta_weight().to_kind(lin.weight.kind());
                x.linear(&w, lin.bias.as_ref())
            }
            Some(lo) => lin.forward(x) + lo.delta(x, train),
        }
    }

    /// Weight-only int8 for the four linears of every layer (the embedding table and lm_head stay
    /// in their kind, as in the original's `quantize(model.transformer, 8)`).
    pub fn quantize_int8(&mut self) {
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.dense, &mut l.h_to_4h, &mut l.h4_to_h] {
                lin.quantize_int8();
            }
        }
    }

    /// NF4 for the four linears of every layer (QLoRA's frozen base; `double`: double-quantized
    /// scales). The embedding table and lm_head stay in their kind.
    pub fn quantize_nf4(&mut self, double: bool) -> anyhow::Result<()> {
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.dense, &mut l.h_to_4h, &mut l.h4_to_h] {
                lin.quantize_nf4(double)?;
            }
        }
        Ok(())
    }

    /// Whether the layers' linears are held quantized (int8 or NF4).
    pub fn is_quantized(&self) -> bool {
        self.layers.iter().any(|l| l.qkv.is_quantized())
    }

    /// The LoRA adapters, with the sat name prefix of the layer each adapts.
    pub fn loras(&self) -> Vec<(String, &Lora)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let base = format!("transformer.layers.{i}");
            let named = [
                ("attention.query_key_value", &l.lora.qkv),
                ("attention.dense", &l.lora.dense),
                ("mlp.dense_h_to_4h", &l.lora.h_to_4h),
                ("mlp.dense_4h_to_h", &l.lora.h4_to_h),
            ];
            for (name, lo) in named {
                if let Some(lo) = lo {
                    out.push((format!("{base}.{name}"), lo));
                }
            }
        }
        out
    }
}

/// Rotary for q and k together, `x [B, S, n, 2, 2, d/2]` (q|k, then the position half and the
/// block-position half of each head): `x·cos + roll(x, d/4)·sin` on the stacked tables, four
/// kernels where rotating the four quarter-tensors apart took sixteen and two concatenations.
fn rotate(x: &Tensor, rot: &Rotary) -> Tensor {
    let (c, s) = rot.stacked(x.kind());
    let d = *x.size().last().unwrap();
    x * c + x.roll([d / 2], [-1]) * s
}

/// `softmax(q·kᵀ/√d − 10000·(1 − mask))·v` for `q [B, n, 1, d]` (one new token per row; no mask:
/// every key visible), softmax in fp32: what the fused kernel computes, in a few plain ops.
fn one_query_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let d = *q.size().last().unwrap();
    let scores = (q * (1.0 / (d as f64).sqrt())).matmul(&k.transpose(-1, -2));
    let scores = match mask {
        Some(m) => scores.to_kind(Kind::Float) + (m - 1.0) * 10000.0,
        None => scores,
    };
    scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(v)
}

/// ChatGLM's mask for sequences whose bidirectional prefix has `context_lengths[b]` tokens:
/// lower-triangular ones with every column `< context_length` set to 1. `[B, 1, S, S]` float.
pub fn attention_mask(context_lengths: &[i64], seq_len: i64, device: tch::Device) -> Tensor {
    let b = context_lengths.len() as i64;
    let tril = Tensor::ones([seq_len, seq_len], (Kind::Float, device)).tril(0);
    let cols = Tensor::arange(seq_len, (Kind::Int64, device));
    let ctx = Tensor::from_slice(context_lengths)
        .to_device(device)
        .view([b, 1, 1]);
    let prefix = cols
        .view([1, 1, seq_len])
        .lt_tensor(&ctx)
        .to_kind(Kind::Float);
    tril.unsqueeze(0).maximum(&prefix).unsqueeze(1)
}

/// Position ids `[B, 2, S]` and context lengths from token ids, as sat's `get_inputs` derives them
/// (first `<sop>` ends the context; positions freeze at the first `[gMASK]`, or `[MASK]` when no
/// sequence of the batch has a `[gMASK]`). Sequences must not start with pads (XrayGLM pads right).
pub fn positions_from_ids(
    input_ids: &Tensor,
    bos: i64,
    mask: i64,
    gmask: i64,
) -> anyhow::Result<(Tensor, Vec<i64>)> {
    let (b, s) = input_ids.size2()?;
    let ids: Vec<i64> = Vec::<i64>::try_from(input_ids.to_device(tch::Device::Cpu).flatten(0, -1))?;
    let any_gmask = ids.contains(&gmask);
    let mark = if any_gmask { gmask } else { mask };
    let mut rows = Vec::with_capacity(b as usize);
    let mut ctxs = Vec::with_capacity(b as usize);
    for row in ids.chunks(s as usize) {
        let ctx = row
            .iter()
            .position(|&t| t == bos)
            .ok_or_else(|| anyhow::anyhow!("a sequence has no <sop> ({bos})"))?
            as i64;
        let mpos = row
            .iter()
            .position(|&t| t == mark)
            .ok_or_else(|| anyhow::anyhow!("a sequence has no mask token ({mark})"))?
            as i64;
        rows.push(super::positions::Prefix {
            context_length: ctx,
            mask_position: mpos,
        });
        ctxs.push(ctx);
    }
    Ok((super::positions::batch(&rows, s, input_ids.device()), ctxs))
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
    fn rotary_tables_round_like_sat() {
        // head dim 128 → rotary dim 64, inv_freq[1] = 10000^(-2/64) = 0.74989… (0.75 in fp16).
        let (c32, _) = rotary_tables(128, 512, RotaryPrecision::SatFp32);
        let (c16, _) = rotary_tables(128, 512, RotaryPrecision::SatFp16);
        let (exact, _) = rotary_tables(128, 512, RotaryPrecision::Fp32);
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
    fn one_query_attention_equals_the_fused_kernel() {
        tch::manual_seed(3);
        let opts = (Kind::Float, tch::Device::Cpu);
        let q = Tensor::randn([2, 4, 1, 16], opts);
        let k = Tensor::randn([2, 4, 37, 16], opts);
        let v = Tensor::randn([2, 4, 37, 16], opts);
        let fused = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            Some(0.25),
            false,
        );
        let plain = one_query_attention(&q, &k, &v, None);
        let err = (fused - plain).abs().max().double_value(&[]);
        assert!(err < 1e-6, "max abs difference {err}");
    }

    #[test]
    fn mask_and_positions_follow_glm() {
        let m = attention_mask(&[2], 4, tch::Device::Cpu).view([4, 4]);
        let got: Vec<f32> = Vec::try_from(m.flatten(0, -1)).unwrap();
        #[rustfmt::skip]
        assert_eq!(got, vec![1., 1., 0., 0.,
                             1., 1., 0., 0.,
                             1., 1., 1., 0.,
                             1., 1., 1., 1.]);
        let ids = Tensor::from_slice(&[5i64, 7, 130001, 130004, 9, 9]).view([1, 6]);
        let (pos, ctx) = positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
        assert_eq!(ctx, vec![3]);
        let p: Vec<i64> = Vec::try_from(pos.flatten(0, -1)).unwrap();
        assert_eq!(p, vec![0, 1, 2, 2, 2, 2, 0, 0, 0, 1, 2, 3]);
    }
}
