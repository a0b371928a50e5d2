//! BLIP-2 Q-Former, in sat's "post" layer order, and the projection into ChatGLM.
//!
//! Paper: Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
//! Encoders and Large Language Models" (2023). Reference: VISUALGLM_SPEC.md §1.b (XrayGLM
//! `model/blip2.py QFormer`, sat 0.3.6 `layer_forward_default` with `layernorm_order = "post"`):
//!
//! ```text
//! a  = LN_in(h);  h1 = a + SelfAttn(a);  m = LN_post(h1)
//! cross layers:   h2 = m + CrossAttn(m, vit);  m = LN_postcross(h2)
//! out = m + MLP(m)              … final_layernorm after the last layer
//! ```
//! 32 learned queries, no position embeddings, LN eps 1e-12, exact GELU, cross-attention key/value
//! from the ViT output split contiguously into [K | V].

use tch::nn::Path;
use tch::Tensor;

use super::config::QFormerArgs;
use super::nn::{
    dropout, embedding, gelu_erf, merge_heads, split_heads, standard_attention, LayerNorm, Linear,
};

#[derive(Debug)]
struct Cross {
    query: Linear,
    key_value: Linear,
    dense: Linear,
    layernorm: LayerNorm,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: LayerNorm,
    qkv: Linear,
    dense: Linear,
    post_attention_layernorm: LayerNorm,
    cross: Option<Cross>,
    h_to_4h: Linear,
    h4_to_h: Linear,
}

/// Random-weight presets only (fan-in init): the cross-attention queries get this gain, so the
/// random Q-Former attends sharply to some patches instead of averaging all of them, and the
/// cross-attention output projection [`CROSS_DENSE_GAIN`], so what it read outweighs the learned
/// queries. With plain fan-in weights the outputs barely depend on the image (0.2 % of their
/// variance on the synthetic films); with gains 16 and 3 (and the tiny preset's 32 queries) it is
/// 18 %, and a ridge probe on the tiny preset's image embeddings tells pleural effusion apart on
/// held-out films — the CPU demo can learn to read it.
const CROSS_QUERY_GAIN: f64 = 16.0;
const CROSS_DENSE_GAIN: f64 = 3.0;

#[derive(Debug)]
pub struct QFormer {
    queries: Tensor,
    layers: Vec<Layer>,
    final_layernorm: LayerNorm,
    heads: i64,
    pub dropout: f64,
    /// Use the fused attention kernel.
    pub fused_attention: bool,
}

impl QFormer {
    pub fn new(p: &Path, a: &QFormerArgs) -> Self {
        let h = a.hidden_size;
        let inner = a.inner_hidden_size.unwrap_or(4 * h);
        let eps = a.layernorm_epsilon;
        let t = p / "transformer";
        let layers = (0..a.num_layers)
            .map(|i| {
                let l = &t / "layers" / i;
                let cross = a.is_decoder[i as usize].then(|| {
                    let c = &l / "cross_attention";
                    Cross {
                        query: Linear::with_init(
                            &(&c / "query"),
                            h,
                            h,
                            true,
                            super::nn::gained_init(h, CROSS_QUERY_GAIN),
                        ),
                        key_value: Linear::new(
                            &(&c / "key_value"),
                            a.cross_attn_hidden_size,
                            2 * h,
                            true,
                        ),
                        dense: Linear::with_init(
                            &(&c / "dense"),
                            h,
                            h,
                            true,
                            super::nn::gained_init(h, CROSS_DENSE_GAIN),
                        ),
                        layernorm: LayerNorm::new(&(&l / "post_cross_attention_layernorm"), h, eps),
                    }
                });
                Layer {
                    input_layernorm: LayerNorm::new(&(&l / "input_layernorm"), h, eps),
                    qkv: Linear::new(&(&l / "attention" / "query_key_value"), h, 3 * h, true),
                    dense: Linear::new(&(&l / "attention" / "dense"), h, h, true),
                    post_attention_layernorm: LayerNorm::new(
                        &(&l / "post_attention_layernorm"),
                        h,
                        eps,
                    ),
                    cross,
                    h_to_4h: Linear::new(&(&l / "mlp" / "dense_h_to_4h"), h, inner, true),
                    h4_to_h: Linear::new(&(&l / "mlp" / "dense_4h_to_h"), inner, h, true),
                }
            })
            .collect();
        Self {
            queries: embedding(&(&t / "word_embeddings"), a.vocab_size, h),
            layers,
            final_layernorm: LayerNorm::new(&(&t / "final_layernorm"), h, eps),
            heads: a.num_attention_heads,
            dropout: 0.0,
            fused_attention: false,
        }
    }

    /// `vit [B, S, vit_hidden]` → `[B, queries, hidden]`.
    pub fn forward(&self, vit: &Tensor, train: bool) -> Tensor {
        let b = vit.size()[0];
        let (n, h) = self.queries.size2().unwrap();
        let enc = vit.to_kind(self.queries.kind());
        let mut x = dropout(
            &self.queries.unsqueeze(0).expand([b, n, h], false),
            self.dropout,
            train,
        );
        let nh = self.heads;
        for l in &self.layers {
            let a = l.input_layernorm.forward(&x);
            let qkv = l.qkv.forward(&a).chunk(3, -1);
            let ctx = standard_attention(
                &split_heads(&qkv[0], nh),
                &split_heads(&qkv[1], nh),
                &split_heads(&qkv[2], nh),
                self.dropout,
                train,
                self.fused_attention,
            );
            let h1 = &a + dropout(&l.dense.forward(&merge_heads(&ctx)), self.dropout, train);
            let mut m = l.post_attention_layernorm.forward(&h1);
            if let Some(c) = &l.cross {
                let q = split_heads(&c.query.forward(&m), nh);
                let kv = c.key_value.forward(&enc).chunk(2, -1);
                let ctx = standard_attention(
                    &q,
                    &split_heads(&kv[0], nh),
                    &split_heads(&kv[1], nh),
                    self.dropout,
                    train,
                    self.fused_attention,
                );
                let h2 = &m + dropout(&c.dense.forward(&merge_heads(&ctx)), self.dropout, train);
                m = c.layernorm.forward(&h2);
            }
            let mlp = l.h4_to_h.forward(&gelu_erf(&l.h_to_4h.forward(&m)));
            x = &m + dropout(&mlp, self.dropout, train);
        }
        self.final_layernorm.forward(&x)
    }
}
