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
//!
//! Blocks as in the reference: [`SelfAttention`] and [`Mlp`] inside a [`Block`]; [`ChatGlm`] is the
//! transformer (embedding, blocks, final LayerNorm, `lm_head`). The rotary tables live in
//! `rotary.rs`, the caches in `kv_cache.rs`, adapter routing in `lora.rs`, the checkpointed
//! backward in `checkpointing.rs` and the benchmark's kernel alternatives behind [`Kernels`].

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::config::ModelConfig;
pub use super::kernels::Kernels;
pub(crate) use super::kv_cache::Kv;
pub use super::kv_cache::{KvCache, SlotCache};
pub use super::lora::{layer_loras, LayerLoras, RowAdapters};
use super::lora::{Lora, Part, Route};
use super::nn::{dropout, embedding, gelu_tanh, LayerNorm, Linear};
use super::positions::{self, Prefix};
use super::rotary::{self, Rotary};

/// Dropout rates in train mode (sat: 0.1 each; HF ChatGLM: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Dropouts {
    pub embedding: f64,
    pub attention: f64,
    pub output: f64,
}

/// How the blocks compute: the model's settings, copied into every forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    dropout: Dropouts,
    fused_attention: bool,
    kernels: Kernels,
    lora_active: bool,
}

/// What every block of one forward shares: the settings, the rotary rows of its positions, its
/// attention mask (`None`: every key is visible, one new token per sequence), whether it trains
/// and the per-row adapters (serving several adapters in one batch; `None`: the blocks' own).
pub(crate) struct Pass<'a> {
    set: Settings,
    rot: Rotary,
    mask: Option<Tensor>,
    train: bool,
    adapters: Option<&'a RowAdapters<'a>>,
}

/// Self-attention of one block: the fused `query_key_value` projection, 2-D rotary on q and k,
/// sat's scaled and masked softmax (or the fused kernel) and the output `dense`.
#[derive(Debug)]
pub(crate) struct SelfAttention {
    qkv: Linear,
    dense: Linear,
    heads: i64,
    head_dim: i64,
    /// sat's `layer_id + 1`, the coefficient of its fp16-overflow trick.
    coeff: f64,
}

impl SelfAttention {
    fn new(p: &Path, cfg: &ModelConfig, index: i64) -> Self {
        let h = cfg.sat.hidden_size;
        let heads = cfg.sat.num_attention_heads;
        Self {
            qkv: Linear::new(&(p / "query_key_value"), h, 3 * h, true),
            dense: Linear::new(&(p / "dense"), h, h, true),
            heads,
            head_dim: h / heads,
            coeff: (index + 1) as f64,
        }
    }

    /// `a [B, S, hidden]` attending to itself and, with `kv`, to the cached keys of earlier
    /// tokens (this call's join the cache).
    fn forward(&self, a: &Tensor, pass: &Pass, route: &Route, kv: Option<Kv>) -> Tensor {
        let (set, mask, train) = (pass.set, pass.mask.as_ref(), pass.train);
        let (b, s, hidden) = a.size3().unwrap();
        let (n, hd) = (self.heads, self.head_dim);
        let qkv = route
            .linear(&self.qkv, Part::Qkv, a)
            .view([b, s, n, 3 * hd]);
        // Per head `[q k v]`; q and k rotated together as `[B, S, n, q|k, pos|block, d/2]`.
        let qk = qkv.narrow(-1, 0, 2 * hd).view([b, s, n, 2, 2, hd / 2]);
        let (q, k) = pass.rot.rotate_qk(&qk, set.kernels.split_rotary);
        let v = qkv.narrow(-1, 2 * hd, hd);
        // [B, S, n, d] → [B, n, S, d]
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let (k, v) = match kv {
            Some(kv) => kv.attend(k, v),
            None => (k, v),
        };
        let ctx = if set.fused_attention && s == 1 && q.device().is_cuda() {
            // One new token per sequence on a GPU: three plain ops. libtorch's fused attention
            // would pick its cuDNN backend for bf16, which plans anew for every key length: ~45 ms
            // per decoding step on an H200 whatever the model size (scripts/gpu_check.sh step 6).
            one_query_attention(&q, &k, &v, mask)
        } else if set.fused_attention {
            // Same function: softmax(q·kᵀ/√d − 10000·(1 − mask))·v, on libtorch's fused kernel.
            let bias = mask.map(|m| ((m - 1.0) * 10000.0).to_kind(q.kind()));
            let p = if train { set.dropout.attention } else { 0.0 };
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
            let c = self.coeff;
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
            dropout(&probs, set.dropout.attention, train).matmul(&v)
        };
        let ctx = ctx.transpose(1, 2).contiguous().view([b, s, hidden]);
        let out = route.linear(&self.dense, Part::Dense, &ctx);
        dropout(&out, set.dropout.output, train)
    }
}

/// The block's MLP: `dense_4h_to_h(gelu_tanh(dense_h_to_4h(m)))`.
#[derive(Debug)]
pub(crate) struct Mlp {
    h_to_4h: Linear,
    h4_to_h: Linear,
}

impl Mlp {
    fn new(p: &Path, cfg: &ModelConfig) -> Self {
        let (h, inner) = (cfg.sat.hidden_size, cfg.inner_hidden_size());
        Self {
            h_to_4h: Linear::new(&(p / "dense_h_to_4h"), h, inner, true),
            h4_to_h: Linear::new(&(p / "dense_4h_to_h"), inner, h, true),
        }
    }

    fn forward(&self, m: &Tensor, pass: &Pass, route: &Route) -> Tensor {
        let up = route.linear(&self.h_to_4h, Part::HTo4h, m);
        let act = if pass.set.kernels.sat_gelu {
            gelu_tanh(&up)
        } else {
            up.gelu("tanh")
        };
        route.linear(&self.h4_to_h, Part::H4ToH, &act)
    }
}

/// One transformer block (sat's `BaseTransformerLayer` with ChatGLM's scaled residuals) and the
/// LoRA adapters of its four linears.
#[derive(Debug)]
pub(crate) struct Block {
    input_layernorm: LayerNorm,
    attention: SelfAttention,
    post_attention_layernorm: LayerNorm,
    mlp: Mlp,
    lora: LayerLoras,
    index: usize,
    /// `√(2·layers)`, the residual scale.
    alpha: f64,
}

impl Block {
    /// Block `i` under `p` (`transformer.layers.<i>`), its adapters in the store `lora_p`.
    fn new(p: &Path, lora_p: &Path, cfg: &ModelConfig, i: i64) -> Self {
        let s = &cfg.sat;
        let (h, eps) = (s.hidden_size, s.layernorm_epsilon);
        Self {
            input_layernorm: LayerNorm::new(&(p / "input_layernorm"), h, eps),
            attention: SelfAttention::new(&(p / "attention"), cfg, i),
            post_attention_layernorm: LayerNorm::new(&(p / "post_attention_layernorm"), h, eps),
            mlp: Mlp::new(&(p / "mlp"), cfg),
            lora: layer_loras(lora_p, cfg, i),
            index: i as usize,
            alpha: ((2 * s.num_layers) as f64).sqrt(),
        }
    }

    /// `h [B, S, hidden]` through the block; with `kv`, the keys and values of earlier tokens
    /// are attended to and this call's are appended.
    pub(crate) fn forward(&self, h: &Tensor, pass: &Pass, kv: Option<Kv>) -> Tensor {
        let route = Route {
            own: &self.lora,
            layer: self.index,
            rows: pass.adapters,
            active: pass.set.lora_active,
            as_weight: pass.set.kernels.lora_as_weight,
            train: pass.train,
        };
        let a = self.input_layernorm.forward(h);
        let h1 = &a * self.alpha + self.attention.forward(&a, pass, &route, kv);
        let m = self.post_attention_layernorm.forward(&h1);
        let down = self.mlp.forward(&m, pass, &route);
        &m * self.alpha + dropout(&down, pass.set.dropout.output, pass.train)
    }

    /// Whether a parameter of the block asks for a gradient (an active adapter being trained).
    pub(crate) fn trains(&self) -> bool {
        let l = &self.lora;
        [&l.qkv, &l.dense, &l.h_to_4h, &l.h4_to_h]
            .into_iter()
            .flatten()
            .any(|lo| lo.a.iter().chain(&lo.b).any(Tensor::requires_grad))
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        let (a, m) = (&mut self.attention, &mut self.mlp);
        [&mut a.qkv, &mut a.dense, &mut m.h_to_4h, &mut m.h4_to_h]
    }
}

/// Per-label log-probabilities `[B, S − 1]` ([`ChatGlm::label_logps`]).
pub struct LabelLogps {
    /// `log p(label)`, with the graph; 0 where the label is ignored.
    pub logps: Tensor,
    /// 1.0 where a label is counted.
    pub mask: Tensor,
    /// The entropy of each counted position's distribution (no graph); 0 elsewhere. Computed on
    /// request only: it costs a third of the vocabulary-wide work.
    pub entropy: Option<Tensor>,
}

/// The label statistics of `lm_head` over the vocabulary for rows of final-LayerNorm outputs,
/// computed in chunks of rows so that no more than [`HeadStats::CHUNK_FLOATS`] logits exist at
/// once: the log-prob of each row's label at `temperature`, and on request its entropy and the
/// slope `∂ log p / ∂x = (W[label] − pᵀW) / T` (in `x`'s kind).
struct HeadStats {
    logp: Tensor,
    entropy: Option<Tensor>,
    slope: Option<Tensor>,
}

impl HeadStats {
    /// Logits per chunk (256 MiB of fp32): 514 rows of ChatGLM's vocabulary.
    const CHUNK_FLOATS: i64 = 1 << 26;

    fn of(
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
        slope: bool,
    ) -> Self {
        let (n, vocab) = (x.size()[0], w.size()[0]);
        let step = (Self::CHUNK_FLOATS / vocab.max(1)).max(1);
        let (mut logps, mut entropies, mut slopes) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let len = step.min(n - start);
            let (xc, tc) = (x.narrow(0, start, len), targets.narrow(0, start, len));
            let mut z = xc.matmul(&w.tr()).to_kind(Kind::Float);
            if temperature != 1.0 {
                z /= temperature;
            }
            let z = z.log_softmax(-1, Kind::Float);
            logps.push(z.gather(1, &tc.unsqueeze(1), false).squeeze_dim(1));
            if entropy || slope {
                let p = z.exp();
                if entropy {
                    entropies.push(-(&p * &z).sum_dim_intlist(-1, false, Kind::Float));
                }
                if slope {
                    let expected = p.to_kind(w.kind()).matmul(w);
                    let s = (w.index_select(0, &tc) - expected) / temperature;
                    slopes.push(s.to_kind(x.kind()));
                }
            }
            start += len;
        }
        let cat = |v: Vec<Tensor>, empty: Tensor| {
            if v.is_empty() {
                empty
            } else {
                Tensor::cat(&v, 0)
            }
        };
        let opts = (Kind::Float, x.device());
        Self {
            logp: cat(logps, Tensor::zeros([0], opts)),
            entropy: entropy.then(|| cat(entropies, Tensor::zeros([0], opts))),
            slope: slope.then(|| {
                cat(
                    slopes,
                    Tensor::zeros([0, x.size()[1]], (x.kind(), x.device())),
                )
            }),
        }
    }
}

/// ChatGLM-6B: the token embedding, the blocks, the final LayerNorm and the untied `lm_head`.
#[derive(Debug)]
pub struct ChatGlm {
    word_embeddings: Tensor,
    pub(crate) layers: Vec<Block>,
    final_layernorm: LayerNorm,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
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

/// A prefill part-way through its layers ([`ChatGlm::prefill_start`]).
#[derive(Debug)]
pub struct PartialPrefill {
    /// The hidden states `[B, S, hidden]` after the layers run so far.
    x: Tensor,
    position_ids: Tensor,
    /// `[B, 1, S, S]` float.
    mask: Tensor,
    /// The keys and values of the layers run so far.
    pub cache: KvCache,
    done: usize,
}

impl PartialPrefill {
    /// Layers run so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Rows and tokens per row.
    pub fn shape(&self) -> (i64, i64) {
        let s = self.x.size();
        (s[0], s[1])
    }
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

impl ChatGlm {
    /// `p`: the frozen store (weights under `transformer.` and `mixins.chatglm-final.`);
    /// `lora_p`: the fp32 trainable store for the adapters.
    pub fn new(p: &Path, lora_p: &Path, cfg: &ModelConfig) -> Self {
        let s = &cfg.sat;
        let h = s.hidden_size;
        let t = p / "transformer";
        let layers = (0..s.num_layers)
            .map(|i| Block::new(&(&t / "layers" / i), lora_p, cfg, i))
            .collect();
        let head_dim = h / s.num_attention_heads;
        let (cos, sin) = rotary::tables(head_dim, s.max_sequence_length, cfg.rotary);
        Self {
            word_embeddings: embedding(&(&t / "word_embeddings"), s.vocab_size, h),
            layers,
            final_layernorm: LayerNorm::new(&(&t / "final_layernorm"), h, s.layernorm_epsilon),
            lm_head: (p / "mixins" / "chatglm-final" / "lm_head").var(
                "weight",
                &[s.vocab_size, h],
                super::nn::lm_head_init(h),
            ),
            cos: cos.to_device(p.device()),
            sin: sin.to_device(p.device()),
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

    /// The device the weights are on.
    pub fn device(&self) -> tch::Device {
        self.word_embeddings.device()
    }

    /// Logits `[B, S, vocab]` (in the weights' kind).
    pub fn forward(&self, inp: &GlmInputs, train: bool) -> Tensor {
        self.head(&self.hidden(inp, train))
    }

    /// The last layer's output `[B, S, hidden]` (before the final LayerNorm and `lm_head`).
    pub fn hidden(&self, inp: &GlmInputs, train: bool) -> Tensor {
        self.hidden_with(inp, train, None)
    }

    /// [`ChatGlm::hidden`] with per-row adapters (`None`: the layers' own).
    pub fn hidden_with(
        &self,
        inp: &GlmInputs,
        train: bool,
        adapters: Option<&RowAdapters>,
    ) -> Tensor {
        let (mut x, pass) = self.prepare(inp, train, adapters);
        for (i, block) in self.layers.iter().enumerate() {
            self.seed_layer(i);
            x = block.forward(&x, &pass, None);
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

    /// `log p(label)` of every counted label `[B, S − 1]` (0 where the label is ignored), the mask
    /// of counted labels (1.0) and each counted position's entropy (no graph), from the last
    /// layer's output: the final LayerNorm and `lm_head` at the predicting positions only, the
    /// logits divided by `temperature` (the distribution replies were sampled from), log-softmax in
    /// fp32. At temperature 1 their masked mean, negated, is [`ChatGlm::target_loss`]; per token
    /// they are what the preference and policy-gradient losses take. `entropy`: whether to compute
    /// the entropies too.
    ///
    /// The vocabulary-wide part runs in row chunks without a graph (see [`HeadStats`]): the
    /// logits of all positions at once are `rows × vocab` floats (3 GB for 64 rollouts of 90
    /// tokens over ChatGLM's 130,528 pieces), and autograd would keep them and their softmax for
    /// the backward. Each log-prob depends on its own position's LayerNorm output `x` alone, with
    /// `∂ log p / ∂x = (W[label] − Σ_v p_v W[v]) / T`, so the graph carries `x · slope` instead;
    /// the value is exactly the chunked log-prob and every gradient the same as through the full
    /// logits (`lm_head` is frozen with the base).
    pub fn label_logps(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        temperature: f64,
        entropy: bool,
    ) -> LabelLogps {
        let (b, s, h) = hidden.size3().unwrap();
        let next = labels.narrow(1, 1, s - 1).reshape([-1]);
        let counted = next.ne(IGNORE_LABEL);
        let rows = counted.nonzero().squeeze_dim(1);
        let x = self.final_layernorm.forward(
            &hidden
                .narrow(1, 0, s - 1)
                .reshape([-1, h])
                .index_select(0, &rows),
        );
        let targets = next.index_select(0, &rows);
        // `lm_head` belongs to the frozen base: no gradient of its own is lost to the slope.
        debug_assert!(!self.lm_head.requires_grad(), "lm_head is frozen");
        let with_slope = x.requires_grad();
        let stats = tch::no_grad(|| {
            let x = x.detach();
            HeadStats::of(
                &x,
                &self.lm_head,
                &targets,
                temperature,
                entropy,
                with_slope,
            )
        });
        let logp = match &stats.slope {
            Some(slope) => {
                &stats.logp + ((&x - x.detach()) * slope).sum_dim_intlist(-1, false, Kind::Float)
            }
            None => stats.logp,
        };
        let place = |v: &Tensor| {
            Tensor::zeros([b * (s - 1)], (v.kind(), v.device()))
                .index_put(&[Some(rows.shallow_clone())], v, false)
                .view([b, s - 1])
        };
        LabelLogps {
            logps: place(&logp),
            mask: counted.to_kind(Kind::Float).view([b, s - 1]),
            entropy: stats.entropy.as_ref().map(place),
        }
    }

    /// The first pass of generation over prompts of one length (eval mode): row `r` holds
    /// `ids[r]` (ending with `<sop>`) with the bidirectional prefix `prefixes[r]`, and the images
    /// `image_embeds [N, L, hidden]` (row order) lie at `image_starts` of every row. Returns the
    /// cache and the logits `[B, vocab]` of each last position; `adapters` as in
    /// [`ChatGlm::forward_cached_with`].
    pub fn prefill(
        &self,
        ids: &[&[i64]],
        prefixes: &[Prefix],
        image_embeds: Option<&Tensor>,
        image_starts: &[i64],
        adapters: Option<&RowAdapters>,
    ) -> (KvCache, Tensor) {
        let mut p = self.prefill_start(ids, prefixes, image_embeds, image_starts);
        let logits = self.prefill_layers(&mut p, self.layers.len(), adapters);
        (p.cache, logits.expect("every layer ran"))
    }

    /// A prefill to run a few layers at a time ([`ChatGlm::prefill_layers`]): the embeddings of
    /// [`ChatGlm::prefill`]'s inputs, no layer run yet. Splitting a prefill by layers keeps it
    /// exact where splitting it by tokens would not: every token of the context attends to every
    /// other, so no token's keys are final before the whole context has been through the layer.
    pub fn prefill_start(
        &self,
        ids: &[&[i64]],
        prefixes: &[Prefix],
        image_embeds: Option<&Tensor>,
        image_starts: &[i64],
    ) -> PartialPrefill {
        let dev = self.device();
        let (b, len) = (ids.len() as i64, ids.first().map_or(0, |r| r.len()) as i64);
        let flat: Vec<i64> = ids.iter().flat_map(|r| r.iter().copied()).collect();
        let input = Tensor::from_slice(&flat).view([b, len]).to_device(dev);
        let position_ids = positions::batch(prefixes, len, dev);
        let contexts: Vec<i64> = prefixes.iter().map(|p| p.context_length).collect();
        let mask = positions::attention_mask(&contexts, len, dev).to_kind(Kind::Float);
        let at: Vec<(i64, i64)> = (0..b)
            .flat_map(|row| image_starts.iter().map(move |&s| (row, s)))
            .collect();
        let embeds = image_embeds.map(|e| e.to_device(dev));
        let x = tch::no_grad(|| self.embed(&input, embeds.as_ref(), ImageAt::of(&at, ids.len())));
        PartialPrefill {
            x,
            position_ids,
            mask,
            cache: KvCache {
                layers: (0..self.layers.len()).map(|_| None).collect(),
            },
            done: 0,
        }
    }

    /// Run up to `layers` more layers of a prefill (at least one); once the last has run, the
    /// logits `[B, vocab]` of each last position (the cache is then `p.cache`).
    pub fn prefill_layers(
        &self,
        p: &mut PartialPrefill,
        layers: usize,
        adapters: Option<&RowAdapters>,
    ) -> Option<Tensor> {
        let end = (p.done + layers.max(1)).min(self.layers.len());
        tch::no_grad(|| {
            let pass = self.pass(
                &p.position_ids,
                p.x.kind(),
                Some(p.mask.shallow_clone()),
                false,
                adapters,
            );
            for i in p.done..end {
                let kv = Kv::Append(&mut p.cache.layers[i]);
                p.x = self.layers[i].forward(&p.x, &pass, Some(kv));
            }
            p.done = end;
            (end == self.layers.len()).then(|| {
                let s = p.x.size()[1];
                self.head(&p.x.narrow(1, s - 1, 1)).squeeze_dim(1)
            })
        })
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
        let mask = mask.map(|m| m.to_kind(Kind::Float));
        let pass = self.pass(inp.position_ids, x.kind(), mask, false, adapters);
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let mut x = x;
        for (block, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, &pass, Some(Kv::Append(kv)));
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
        let pass = self.pass(position_ids, x.kind(), Some(mask), false, adapters);
        let mut x = x;
        for (block, (k, v)) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let kv = Kv::Slots {
                k,
                v,
                at: &at,
                keys,
            };
            x = block.forward(&x, &pass, Some(kv));
        }
        for n in &mut cache.lens {
            *n += 1;
        }
        self.head(&x).squeeze_dim(1)
    }

    /// Embeddings (with dropout) and what every layer of this forward shares.
    pub(crate) fn prepare<'a>(
        &self,
        inp: &GlmInputs,
        train: bool,
        adapters: Option<&'a RowAdapters<'a>>,
    ) -> (Tensor, Pass<'a>) {
        let emb = self.embed(inp.input_ids, inp.image_embeds, inp.image_at);
        let x = dropout(&emb, self.dropout.embedding, train);
        let mask = Some(inp.attention_mask.to_kind(Kind::Float));
        let pass = self.pass(inp.position_ids, x.kind(), mask, train, adapters);
        (x, pass)
    }

    /// What the blocks of one forward over position ids `[B, 2, S]` share.
    fn pass<'a>(
        &self,
        position_ids: &Tensor,
        kind: Kind,
        mask: Option<Tensor>,
        train: bool,
        adapters: Option<&'a RowAdapters<'a>>,
    ) -> Pass<'a> {
        Pass {
            set: Settings {
                dropout: self.dropout,
                fused_attention: self.fused_attention,
                kernels: self.kernels,
                lora_active: self.lora_active,
            },
            rot: Rotary::new(position_ids, &self.cos, &self.sin, kind),
            mask,
            train,
            adapters,
        }
    }

    fn head(&self, x: &Tensor) -> Tensor {
        self.final_layernorm.forward(x).matmul(&self.lm_head.tr())
    }

    /// Weight-only int8 for the four linears of every layer (the embedding table and lm_head stay
    /// in their kind, as in the original's `quantize(model.transformer, 8)`).
    pub fn quantize_int8(&mut self) {
        for block in &mut self.layers {
            for lin in block.linears_mut() {
                lin.quantize_int8();
            }
        }
    }

    /// NF4 for the four linears of every layer (QLoRA's frozen base; `double`: double-quantized
    /// scales). The embedding table and lm_head stay in their kind.
    pub fn quantize_nf4(&mut self, double: bool) -> anyhow::Result<()> {
        for block in &mut self.layers {
            for lin in block.linears_mut() {
                lin.quantize_nf4(double)?;
            }
        }
        Ok(())
    }

    /// Whether the layers' linears are held quantized (int8 or NF4).
    pub fn is_quantized(&self) -> bool {
        self.layers.iter().any(|b| b.attention.qkv.is_quantized())
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Why the serving engine caches whole prompts and not shared prefixes: the context before
    /// `<sop>` is read bidirectionally, so appending to it (a follow-up turn) leaves the first
    /// layer's keys of the earlier tokens as they were (up to the rounding of a longer matmul) but
    /// changes them from the second layer on.
    #[test]
    fn a_longer_context_changes_the_keys_of_its_first_tokens() {
        use crate::tokenizer::ids;
        tch::manual_seed(4);
        let cfg = crate::model::config::ModelConfig::preset("tiny").unwrap();
        let m =
            crate::model::visualglm::VisualGlm::new(cfg, tch::Device::Cpu, Kind::Float).unwrap();
        let turn1: Vec<i64> = vec![20, 21, 22, 23, 24];
        let keys = |context: &[i64]| {
            let mut ids = context.to_vec();
            ids.extend([ids::GMASK, ids::SOP]);
            let prefix = Prefix::new(ids.len() - 1, ids.len() - 2);
            let (cache, _) = m.chatglm.prefill(&[&ids], &[prefix], None, &[], None);
            cache
                .layers
                .iter()
                .map(|l| l.as_ref().unwrap().0.narrow(2, 0, turn1.len() as i64))
                .collect::<Vec<Tensor>>()
        };
        let short = keys(&turn1);
        let long = keys(&[turn1.as_slice(), &[30, 31, 32]].concat());
        let diff = |l: usize| (&short[l] - &long[l]).abs().max().double_value(&[]);
        assert!(diff(0) < 1e-5, "layer 0 keys moved by {}", diff(0));
        assert!(diff(1) > 1e-3, "layer 1 keys moved by {}", diff(1));
    }
}
