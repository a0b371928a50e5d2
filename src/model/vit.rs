//! EVA-CLIP ViT-g/14 as used by BLIP-2 / VisualGLM (the vision tower).
//!
//! Paper: Fang et al., "EVA: Exploring the Limits of Masked Visual Representation Learning at
//! Scale" (2022); BLIP-2 drops the last of its 40 blocks. Reference: docs/reference.md §1.a
//! (XrayGLM `model/blip2.py EVAViT` on sat 0.3.6 `ViTModel`): Conv2d patch embedding, a CLS row,
//! learned absolute positions, pre-LN blocks (LN eps 1e-6, exact GELU, contiguous [Q|K|V]), no
//! final transformer LN, then `ln_vision` (eps 1e-5) on all tokens.

use tch::nn::Path;
use tch::Tensor;

use super::config::{LoraConfig, VitArgs};
use super::lora::Adapted;
use super::nn::{
    dropout, embedding, gelu_erf, merge_heads, split_heads, standard_attention, LayerNorm, Linear,
};

#[derive(Debug)]
struct Block {
    input_layernorm: LayerNorm,
    qkv: Adapted,
    dense: Adapted,
    post_attention_layernorm: LayerNorm,
    h_to_4h: Adapted,
    h4_to_h: Adapted,
}

/// The ViT. Weights under `…vit.` in sat names.
#[derive(Debug)]
pub struct Vit {
    proj_weight: Tensor,
    proj_bias: Tensor,
    cls: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_vision: LayerNorm,
    heads: i64,
    patch: i64,
    pre_len: i64,
    /// Dropout in train mode (sat default 0.1 everywhere; 0 at inference).
    pub dropout: f64,
    /// Use the fused attention kernel.
    pub fused_attention: bool,
}

impl Vit {
    /// Frozen weights in `p`; LoRA (the layers of `lora.targets.vit`) in the fp32 store `lora_p`
    /// under the same names.
    pub fn new(p: &Path, lora_p: &Path, a: &VitArgs, lora: Option<&LoraConfig>) -> Self {
        let h = a.hidden_size;
        let grid = (a.image_size[0] / a.patch_size) * (a.image_size[1] / a.patch_size);
        let t = p / "transformer";
        let proj = p / "mixins" / "patch_embedding" / "proj";
        let blocks = (0..a.num_layers)
            .map(|i| {
                let l = &t / "layers" / i;
                let lc = lora.filter(|c| c.targets.vit.contains(&i));
                let lp = lora_p / "transformer" / "layers" / i;
                let adapted = |name: &str, in_dim: i64, out_dim: i64| {
                    let at = name.split('.').fold(l.clone(), |p, s| p / s);
                    let lat = name.split('.').fold(lp.clone(), |p, s| p / s);
                    Adapted::new(
                        Linear::new(&at, in_dim, out_dim, true),
                        lc.map(|c| (&lat, c)),
                    )
                };
                Block {
                    input_layernorm: LayerNorm::new(
                        &(&l / "input_layernorm"),
                        h,
                        a.layernorm_epsilon,
                    ),
                    qkv: adapted("attention.query_key_value", h, 3 * h),
                    dense: adapted("attention.dense", h, h),
                    post_attention_layernorm: LayerNorm::new(
                        &(&l / "post_attention_layernorm"),
                        h,
                        a.layernorm_epsilon,
                    ),
                    h_to_4h: adapted("mlp.dense_h_to_4h", h, a.inner_hidden_size),
                    h4_to_h: adapted("mlp.dense_4h_to_h", a.inner_hidden_size, h),
                }
            })
            .collect();
        Self {
            proj_weight: proj.var(
                "weight",
                &[h, a.in_channels, a.patch_size, a.patch_size],
                super::nn::weight_init(a.in_channels * a.patch_size * a.patch_size),
            ),
            proj_bias: proj.var("bias", &[h], tch::nn::Init::Const(0.0)),
            cls: embedding(
                &(&t / "word_embeddings"),
                a.vocab_size.max(a.pre_len + a.post_len),
                h,
            ),
            positions: embedding(
                &(&t / "position_embeddings"),
                a.pre_len + grid + a.post_len,
                h,
            ),
            blocks,
            ln_vision: LayerNorm::new(&(p / "mixins" / "cls" / "ln_vision"), h, 1e-5),
            heads: a.num_attention_heads,
            patch: a.patch_size,
            pre_len: a.pre_len,
            dropout: 0.0,
            fused_attention: false,
        }
    }

    /// `image [B, 3, H, W]` (normalised) → `[B, 1 + patches, hidden]`.
    pub fn forward(&self, image: &Tensor, train: bool) -> Tensor {
        let image = image.to_kind(self.proj_weight.kind());
        let b = image.size()[0];
        let patches = image
            .conv2d(
                &self.proj_weight,
                Some(&self.proj_bias),
                [self.patch, self.patch],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let h = *self.positions.size().last().unwrap();
        let cls = self
            .cls
            .narrow(0, 0, self.pre_len)
            .unsqueeze(0)
            .expand([b, self.pre_len, h], false);
        let x = Tensor::cat(&[cls, patches], 1) + self.positions.unsqueeze(0);
        let mut x = dropout(&x, self.dropout, train);
        for blk in &self.blocks {
            let a = blk.input_layernorm.forward(&x);
            let qkv = blk.qkv.forward(&a, train).chunk(3, -1);
            let ctx = standard_attention(
                &split_heads(&qkv[0], self.heads),
                &split_heads(&qkv[1], self.heads),
                &split_heads(&qkv[2], self.heads),
                self.dropout,
                train,
                self.fused_attention,
            );
            let attn = dropout(
                &blk.dense.forward(&merge_heads(&ctx), train),
                self.dropout,
                train,
            );
            // Out of place: with vision adapters the layer norm's saved input must stay intact
            // for the backward (tch's `+=` adds in place).
            x = &x + attn;
            let m = blk.h4_to_h.forward(
                &gelu_erf(
                    &blk.h_to_4h
                        .forward(&blk.post_attention_layernorm.forward(&x), train),
                ),
                train,
            );
            x = &x + dropout(&m, self.dropout, train);
        }
        self.ln_vision.forward(&x)
    }

    /// The linears that carry a LoRA, by their sat name under `vit.`.
    pub fn adapted(&self) -> Vec<(String, &Adapted)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, a) in [
                ("attention.query_key_value", &b.qkv),
                ("attention.dense", &b.dense),
                ("mlp.dense_h_to_4h", &b.h_to_4h),
                ("mlp.dense_4h_to_h", &b.h4_to_h),
            ] {
                if a.lora.is_some() {
                    out.push((format!("transformer.layers.{i}.{name}"), a));
                }
            }
        }
        out
    }

    /// Merge (or unmerge) every LoRA of the ViT.
    pub fn merge_lora(&mut self, merged: bool) {
        for b in &mut self.blocks {
            for a in [&mut b.qkv, &mut b.dense, &mut b.h_to_4h, &mut b.h4_to_h] {
                a.merge(merged);
            }
        }
    }
}
