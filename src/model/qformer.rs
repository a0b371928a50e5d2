//! BLIP-2 Q-Former, in sat's "post" layer order, and the projection into ChatGLM.
//!
//! Paper: Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
//! Encoders and Large Language Models" (2023). Reference: docs/reference.md §1.b (XrayGLM
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

use super::config::{LoraConfig, QFormerArgs};
use super::lora::Adapted;
use super::nn::{
    dropout, embedding, gelu_erf, merge_heads, split_heads, standard_attention, LayerNorm, Linear,
};

#[derive(Debug)]
struct Cross {
    query: Adapted,
    key_value: Adapted,
    dense: Adapted,
    layernorm: LayerNorm,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: LayerNorm,
    qkv: Adapted,
    dense: Adapted,
    post_attention_layernorm: LayerNorm,
    cross: Option<Cross>,
    h_to_4h: Adapted,
    h4_to_h: Adapted,
}

impl Layer {
    /// Every linear with its sat name inside the layer.
    fn linears(&self) -> Vec<(&'static str, &Adapted)> {
        let mut v = vec![
            ("attention.query_key_value", &self.qkv),
            ("attention.dense", &self.dense),
        ];
        if let Some(c) = &self.cross {
            v.push(("cross_attention.query", &c.query));
            v.push(("cross_attention.key_value", &c.key_value));
            v.push(("cross_attention.dense", &c.dense));
        }
        v.push(("mlp.dense_h_to_4h", &self.h_to_4h));
        v.push(("mlp.dense_4h_to_h", &self.h4_to_h));
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Adapted> {
        let mut v = vec![&mut self.qkv, &mut self.dense];
        if let Some(c) = &mut self.cross {
            v.extend([&mut c.query, &mut c.key_value, &mut c.dense]);
        }
        v.extend([&mut self.h_to_4h, &mut self.h4_to_h]);
        v
    }
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
    /// Frozen weights in `p`; LoRA (the layers of `lora.targets.qformer`) in the fp32 store
    /// `lora_p` under the same names.
    pub fn new(p: &Path, lora_p: &Path, a: &QFormerArgs, lora: Option<&LoraConfig>) -> Self {
        let h = a.hidden_size;
        let inner = a.inner_hidden_size.unwrap_or(4 * h);
        let eps = a.layernorm_epsilon;
        let t = p / "transformer";
        let layers = (0..a.num_layers)
            .map(|i| {
                let l = &t / "layers" / i;
                let lc = lora.filter(|c| c.targets.qformer.contains(&i));
                let lp = lora_p / "transformer" / "layers" / i;
                // The frozen linear `name` (made by `make` at its path) with its LoRA, if any.
                let adapted = |name: &str, make: &dyn Fn(&Path) -> Linear| {
                    let at = name.split('.').fold(l.clone(), |p, s| p / s);
                    let lat = name.split('.').fold(lp.clone(), |p, s| p / s);
                    Adapted::new(make(&at), lc.map(|c| (&lat, c)))
                };
                let plain = |i: i64, o: i64| move |p: &Path| Linear::new(p, i, o, true);
                let cross = a.is_decoder[i as usize].then(|| Cross {
                    query: adapted("cross_attention.query", &|p| {
                        Linear::with_init(
                            p,
                            h,
                            h,
                            true,
                            super::nn::gained_init(h, CROSS_QUERY_GAIN),
                        )
                    }),
                    key_value: adapted(
                        "cross_attention.key_value",
                        &plain(a.cross_attn_hidden_size, 2 * h),
                    ),
                    dense: adapted("cross_attention.dense", &|p| {
                        Linear::with_init(
                            p,
                            h,
                            h,
                            true,
                            super::nn::gained_init(h, CROSS_DENSE_GAIN),
                        )
                    }),
                    layernorm: LayerNorm::new(&(&l / "post_cross_attention_layernorm"), h, eps),
                });
                Layer {
                    input_layernorm: LayerNorm::new(&(&l / "input_layernorm"), h, eps),
                    qkv: adapted("attention.query_key_value", &plain(h, 3 * h)),
                    dense: adapted("attention.dense", &plain(h, h)),
                    post_attention_layernorm: LayerNorm::new(
                        &(&l / "post_attention_layernorm"),
                        h,
                        eps,
                    ),
                    cross,
                    h_to_4h: adapted("mlp.dense_h_to_4h", &plain(h, inner)),
                    h4_to_h: adapted("mlp.dense_4h_to_h", &plain(inner, h)),
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
            let qkv = l.qkv.forward(&a, train).chunk(3, -1);
            let ctx = standard_attention(
                &split_heads(&qkv[0], nh),
                &split_heads(&qkv[1], nh),
                &split_heads(&qkv[2], nh),
                self.dropout,
                train,
                self.fused_attention,
            );
            let h1 = &a
                + dropout(
                    &l.dense.forward(&merge_heads(&ctx), train),
                    self.dropout,
                    train,
                );
            let mut m = l.post_attention_layernorm.forward(&h1);
            if let Some(c) = &l.cross {
                let q = split_heads(&c.query.forward(&m, train), nh);
                let kv = c.key_value.forward(&enc, train).chunk(2, -1);
                let ctx = standard_attention(
                    &q,
                    &split_heads(&kv[0], nh),
                    &split_heads(&kv[1], nh),
                    self.dropout,
                    train,
                    self.fused_attention,
                );
                let h2 = &m
                    + dropout(
                        &c.dense.forward(&merge_heads(&ctx), train),
                        self.dropout,
                        train,
                    );
                m = c.layernorm.forward(&h2);
            }
            let mlp = l
                .h4_to_h
                .forward(&gelu_erf(&l.h_to_4h.forward(&m, train)), train);
            x = &m + dropout(&mlp, self.dropout, train);
        }
        self.final_layernorm.forward(&x)
    }

    /// The linears that carry a LoRA, by their sat name under `qformer.`.
    pub fn adapted(&self) -> Vec<(String, &Adapted)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, a) in l.linears() {
                if a.lora.is_some() {
                    out.push((format!("transformer.layers.{i}.{name}"), a));
                }
            }
        }
        out
    }

    /// Merge (or unmerge) every LoRA of the Q-Former.
    pub fn merge_lora(&mut self, merged: bool) {
        for l in &mut self.layers {
            for a in l.linears_mut() {
                a.merge(merged);
            }
        }
    }
}
