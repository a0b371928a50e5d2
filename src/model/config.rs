//! Model configuration: the sat-style `model_config.json` that describes a model directory, and
//! the presets `visualglm-6b`, `small` and `tiny`.
//!
//! Reference: docs/reference.md §1 (dimensions), §4 (LoRA), §6.a (`model_config.json` keys as sat
//! writes them; `eva_args` / `qformer_args` equal HF `config.json`'s `eva_config` /
//! `qformer_config`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// `eva_args`: sat arguments of the EVA-CLIP ViT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitArgs {
    pub num_layers: i64,
    pub hidden_size: i64,
    pub num_attention_heads: i64,
    /// 1: the CLS row.
    #[serde(default = "one")]
    pub vocab_size: i64,
    #[serde(default = "pre")]
    pub layernorm_order: String,
    #[serde(default)]
    pub model_parallel_size: Option<i64>,
    #[serde(default)]
    pub max_sequence_length: Option<i64>,
    pub inner_hidden_size: i64,
    #[serde(default)]
    pub use_final_layernorm: bool,
    #[serde(default = "eps6")]
    pub layernorm_epsilon: f64,
    pub image_size: [i64; 2],
    #[serde(default = "one")]
    pub pre_len: i64,
    #[serde(default)]
    pub post_len: i64,
    #[serde(default = "three")]
    pub in_channels: i64,
    #[serde(default)]
    pub num_classes: i64,
    pub patch_size: i64,
}

/// `qformer_args`: sat arguments of the BLIP-2 Q-Former.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QFormerArgs {
    pub num_layers: i64,
    pub hidden_size: i64,
    pub num_attention_heads: i64,
    /// Number of learned queries (the "vocabulary" of the query embedding).
    pub vocab_size: i64,
    #[serde(default = "post")]
    pub layernorm_order: String,
    #[serde(default)]
    pub model_parallel_size: Option<i64>,
    #[serde(default)]
    pub max_sequence_length: Option<i64>,
    /// Per layer: whether it has cross-attention to the ViT output.
    pub is_decoder: Vec<bool>,
    pub cross_attn_hidden_size: i64,
    #[serde(default = "eps12")]
    pub layernorm_epsilon: f64,
    #[serde(default)]
    pub inner_hidden_size: Option<i64>,
}

fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}
fn pre() -> String {
    "pre".into()
}
fn post() -> String {
    "post".into()
}
fn eps5() -> f64 {
    1e-5
}
fn eps6() -> f64 {
    1e-6
}
fn eps12() -> f64 {
    1e-12
}

/// How the fused `query_key_value` rows of ChatGLM are laid out in a checkpoint.
/// `model.quantize`: how the frozen ChatGLM layer linears are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// In the model's dtype.
    #[default]
    None,
    /// int8, weight-only with per-row absmax scales (the original's `--quant 8`).
    Int8,
    /// NF4 (QLoRA's 4-bit NormalFloat) in blocks of 64 with double-quantized scales.
    Nf4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QkvLayout {
    /// `[q_h k_h v_h]` per head: sat 0.3.6, HF, XrayGLM's released weights. The model's own layout.
    #[default]
    Interleaved,
    /// `[Q | K | V]` blocks: sat ≥ 0.4.
    Blocks,
}

/// The `model_config.json` of a model directory, as sat writes it (plus xrayglm's own optional keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SatModelConfig {
    #[serde(default)]
    pub model_class: Option<String>,
    #[serde(default)]
    pub tokenizer_type: Option<String>,
    pub num_layers: i64,
    pub hidden_size: i64,
    pub num_attention_heads: i64,
    pub vocab_size: i64,
    #[serde(default)]
    pub inner_hidden_size: Option<i64>,
    #[serde(default = "eps5")]
    pub layernorm_epsilon: f64,
    #[serde(default)]
    pub layernorm_order: Option<String>,
    #[serde(default)]
    pub model_parallel_size: Option<i64>,
    #[serde(default = "max_seq")]
    pub max_sequence_length: i64,
    pub image_length: i64,
    pub eva_args: VitArgs,
    pub qformer_args: QFormerArgs,
    #[serde(default = "bos")]
    pub bos_token_id: i64,
    #[serde(default = "mask")]
    pub mask_token_id: i64,
    #[serde(default = "gmask")]
    pub gmask_token_id: i64,
    #[serde(default = "pad")]
    pub pad_token_id: i64,
    #[serde(default)]
    pub use_lora: bool,
    #[serde(default)]
    pub lora_rank: i64,
    /// XrayGLM hard-codes [0, 14]: a list of layer indices, not a range.
    #[serde(default)]
    pub layer_range: Option<Vec<i64>>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// xrayglm extensions (sat ignores them): adapters on the MLP linears too, and the qkv
    /// placement (absent = XrayGLM's head-first, no MLP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_mlp: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_head_first: Option<bool>,
    /// xrayglm extension: adapters on the ChatGLM MLP (own layers), ViT, Q-Former, glm_proj.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_targets: Option<LoraTargets>,
    #[serde(default)]
    pub qkv_layout: QkvLayout,
    /// Keys this struct does not model (sat writes many) are kept, so a round trip loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn max_seq() -> i64 {
    2048
}
fn bos() -> i64 {
    130004
}
fn mask() -> i64 {
    130000
}
fn gmask() -> i64 {
    130001
}
fn pad() -> i64 {
    3
}

/// LoRA placement and hyper-parameters (spec §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// ChatGLM layer indices (XrayGLM: [0, 14]).
    pub layers: Vec<i64>,
    /// Place the q/k/v deltas head-first into ChatGLM's interleaved qkv layout (XrayGLM: true).
    pub head_first: bool,
    /// Also adapt the MLP linears of `layers` (not in XrayGLM).
    pub mlp: bool,
    /// Adapters beyond ChatGLM's attention: each target with its own layers.
    pub targets: LoraTargets,
}

/// Where else adapters go (none by default: XrayGLM adapts ChatGLM's attention only). Every
/// adapted linear gets one plain LoRA (rank `rank`, `alpha / rank`), as PEFT would put it.
impl LoraConfig {
    /// The numbers in their ranges (`key` names the section in errors): rank ≥ 1, alpha finite
    /// and > 0, dropout a probability in [0, 1).
    pub fn validate(&self, key: &str) -> Result<()> {
        if self.rank < 1 {
            bail!("{key}.rank = {}: must be ≥ 1", self.rank);
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("{key}.alpha = {}: must be finite and > 0", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("{key}.dropout = {}: a probability in [0, 1)", self.dropout);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraTargets {
    /// ChatGLM layers whose MLP linears (`dense_h_to_4h`, `dense_4h_to_h`) are adapted; absent:
    /// `layers` when `mlp = true`, else none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp: Option<Vec<i64>>,
    /// EVA ViT layers: `attention.query_key_value`, `attention.dense`, `mlp.dense_h_to_4h`,
    /// `mlp.dense_4h_to_h`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vit: Vec<i64>,
    /// Q-Former layers: the self-attention (`query_key_value`, `dense`), the cross-attention
    /// (`query`, `key_value`, `dense`) where the layer has one, and the MLP.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub qformer: Vec<i64>,
    /// The Q-Former → ChatGLM projection.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub glm_proj: bool,
}

impl LoraTargets {
    /// Whether anything in the vision tower, Q-Former or projection is adapted.
    pub fn vision(&self) -> bool {
        !self.vit.is_empty() || !self.qformer.is_empty() || self.glm_proj
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 10,
            alpha: 1.0,
            dropout: 0.0,
            layers: vec![0, 14],
            head_first: true,
            mlp: false,
            targets: LoraTargets::default(),
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The ChatGLM layers whose MLP is adapted.
    pub fn mlp_layers(&self) -> Vec<i64> {
        match &self.targets.mlp {
            Some(l) => l.clone(),
            None if self.mlp => self.layers.clone(),
            None => Vec::new(),
        }
    }
}

/// How the rotary cos/sin tables are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RotaryPrecision {
    /// sat 0.3.6 with fp32 weights: angles in fp32, cos/sin stored in fp16 (`precision=torch.half`).
    #[default]
    SatFp32,
    /// sat 0.3.6 after `model.half()` and HF: `inv_freq` and the angles themselves in fp16, then
    /// cos/sin in fp16 (angles near 256–512 rad lose 0.125–0.25 rad).
    SatFp16,
    /// Exact fp32 angles and tables (no reference rounding).
    Fp32,
}

/// Everything needed to build a VisualGLM.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub sat: SatModelConfig,
    pub lora: Option<LoraConfig>,
    pub rotary: RotaryPrecision,
    /// Random weights are N(0, 1/fan_in) rather than sat's N(0, 0.02) (presets; see
    /// `nn::with_fan_in_init`). Irrelevant for loaded weights.
    pub fan_in_init: bool,
}

impl ModelConfig {
    pub fn inner_hidden_size(&self) -> i64 {
        self.sat
            .inner_hidden_size
            .unwrap_or(4 * self.sat.hidden_size)
    }

    pub fn head_dim(&self) -> i64 {
        self.sat.hidden_size / self.sat.num_attention_heads
    }

    /// Read a sat `model_config.json`. LoRA comes from `use_lora` / `lora_rank` / `layer_range`
    /// (XrayGLM's [0, 14] when `layer_range` is absent).
    pub fn from_sat_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_capped(path, crate::io::MAX_CONFIG_BYTES)?;
        let sat: SatModelConfig =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let cfg = Self::from_sat(sat);
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    pub fn from_sat(sat: SatModelConfig) -> Self {
        let lora = sat.use_lora.then(|| LoraConfig {
            rank: sat.lora_rank,
            alpha: sat.lora_alpha.unwrap_or(1.0),
            mlp: sat.lora_mlp.unwrap_or(false),
            head_first: sat.lora_head_first.unwrap_or(true),
            targets: sat.lora_targets.clone().unwrap_or_default(),
            layers: sat
                .layer_range
                .clone()
                .unwrap_or_else(|| (0..sat.num_layers).step_by(14).collect()),
            ..Default::default()
        });
        Self {
            sat,
            lora,
            rotary: RotaryPrecision::default(),
            fan_in_init: false,
        }
    }

    /// The `model_config.json` to write beside weights.
    pub fn to_sat(&self) -> SatModelConfig {
        let mut s = self.sat.clone();
        match &self.lora {
            Some(l) => {
                s.use_lora = true;
                s.lora_rank = l.rank;
                s.layer_range = Some(l.layers.clone());
                s.lora_alpha = Some(l.alpha);
                s.lora_mlp = l.mlp.then_some(true);
                s.lora_head_first = (!l.head_first).then_some(false);
                s.lora_targets = (l.targets != LoraTargets::default()).then(|| l.targets.clone());
            }
            None => {
                s.use_lora = false;
                s.lora_targets = None;
            }
        }
        s
    }

    pub fn validate(&self) -> Result<()> {
        let s = &self.sat;
        let (v, q) = (&s.eva_args, &s.qformer_args);
        for (key, x) in [
            ("num_layers", s.num_layers),
            ("hidden_size", s.hidden_size),
            ("num_attention_heads", s.num_attention_heads),
            ("vocab_size", s.vocab_size),
            (
                "inner_hidden_size",
                s.inner_hidden_size.unwrap_or(4 * s.hidden_size),
            ),
            ("max_sequence_length", s.max_sequence_length),
            ("image_length", s.image_length),
            ("eva_args.num_layers", v.num_layers),
            ("eva_args.hidden_size", v.hidden_size),
            ("eva_args.num_attention_heads", v.num_attention_heads),
            ("eva_args.inner_hidden_size", v.inner_hidden_size),
            ("eva_args.image_size", v.image_size[0].min(v.image_size[1])),
            ("eva_args.patch_size", v.patch_size),
            ("eva_args.in_channels", v.in_channels),
            ("qformer_args.num_layers", q.num_layers),
            ("qformer_args.hidden_size", q.hidden_size),
            ("qformer_args.num_attention_heads", q.num_attention_heads),
            ("qformer_args.vocab_size", q.vocab_size),
            (
                "qformer_args.cross_attn_hidden_size",
                q.cross_attn_hidden_size,
            ),
        ] {
            if x <= 0 {
                bail!("model config: {key} is {x}; it must be positive");
            }
        }
        if s.hidden_size % s.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                s.hidden_size,
                s.num_attention_heads
            );
        }
        if (s.hidden_size / s.num_attention_heads) % 4 != 0 {
            bail!("ChatGLM head dim must be a multiple of 4 (2-D rotary on two halves)");
        }
        if v.hidden_size % v.num_attention_heads != 0 || v.image_size[0] % v.patch_size != 0 {
            bail!("eva_args: hidden_size/heads or image_size/patch_size do not divide");
        }
        if q.is_decoder.len() != q.num_layers as usize {
            bail!(
                "qformer_args.is_decoder has {} entries for {} layers",
                q.is_decoder.len(),
                q.num_layers
            );
        }
        if q.vocab_size != s.image_length {
            bail!(
                "qformer_args.vocab_size {} must equal image_length {}",
                q.vocab_size,
                s.image_length
            );
        }
        if let Some(l) = &self.lora {
            l.validate("lora")?;
            if let Some(&bad) = l.layers.iter().find(|&&i| i < 0 || i >= s.num_layers) {
                bail!(
                    "lora layer {bad} is not among the {} ChatGLM layers",
                    s.num_layers
                );
            }
            if l.mlp && l.targets.mlp.is_some() {
                bail!("lora: give the MLP layers once — mlp = true (the attention layers) or targets.mlp = [..]");
            }
            let t = &l.targets;
            for (what, list, n) in [
                (
                    "targets.mlp (ChatGLM)",
                    t.mlp.clone().unwrap_or_default(),
                    s.num_layers,
                ),
                ("targets.vit", t.vit.clone(), s.eva_args.num_layers),
                (
                    "targets.qformer",
                    t.qformer.clone(),
                    s.qformer_args.num_layers,
                ),
            ] {
                if let Some(&bad) = list.iter().find(|&&i| i < 0 || i >= n) {
                    bail!("lora {what}: layer {bad} is not among its {n} layers");
                }
            }
        }
        Ok(())
    }

    /// A named preset: `visualglm-6b` (the real sizes), `small` (CPU benchmarks) or `tiny` (tests, demo).
    pub fn preset(name: &str) -> Result<Self> {
        let sat = match name {
            "visualglm-6b" => build(Dims {
                glm: (28, 4096, 32, 16384, 130528),
                vit: (39, 1408, 16, 6144, 224, 14),
                qf: (12, 768, 12, 32),
            }),
            "small" => build(Dims {
                glm: (4, 256, 4, 1024, 130528),
                vit: (4, 192, 4, 768, 224, 14),
                qf: (2, 128, 4, 32),
            }),
            "tiny" => build(Dims {
                glm: (2, 64, 4, 256, 130528),
                vit: (2, 48, 4, 192, 224, 14),
                qf: (2, 32, 4, 32),
            }),
            other => bail!("unknown model preset {other:?} (visualglm-6b, small, tiny)"),
        };
        let mut cfg = Self::from_sat(sat);
        cfg.fan_in_init = true;
        cfg.lora = Some(LoraConfig {
            layers: if name == "visualglm-6b" {
                vec![0, 14]
            } else {
                vec![0, cfg.sat.num_layers - 1]
            },
            rank: if name == "visualglm-6b" { 10 } else { 4 },
            ..Default::default()
        });
        Ok(cfg)
    }
}

struct Dims {
    /// layers, hidden, heads, inner, vocab
    glm: (i64, i64, i64, i64, i64),
    /// layers, hidden, heads, inner, image size, patch
    vit: (i64, i64, i64, i64, i64, i64),
    /// layers, hidden, heads, queries
    qf: (i64, i64, i64, i64),
}

fn build(d: Dims) -> SatModelConfig {
    let (gl, gh, gn, gi, gv) = d.glm;
    let (vl, vh, vn, vi, img, patch) = d.vit;
    let (ql, qh, qn, queries) = d.qf;
    let grid = img / patch;
    SatModelConfig {
        model_class: Some("FineTuneVisualGLMModel".into()),
        tokenizer_type: Some("THUDM/chatglm-6b".into()),
        num_layers: gl,
        hidden_size: gh,
        num_attention_heads: gn,
        vocab_size: gv,
        inner_hidden_size: Some(gi),
        layernorm_epsilon: 1e-5,
        layernorm_order: Some("post".into()),
        model_parallel_size: Some(1),
        max_sequence_length: 2048,
        image_length: queries,
        eva_args: VitArgs {
            num_layers: vl,
            hidden_size: vh,
            num_attention_heads: vn,
            vocab_size: 1,
            layernorm_order: "pre".into(),
            model_parallel_size: Some(1),
            max_sequence_length: Some(grid * grid + 1),
            inner_hidden_size: vi,
            use_final_layernorm: false,
            layernorm_epsilon: 1e-6,
            image_size: [img, img],
            pre_len: 1,
            post_len: 0,
            in_channels: 3,
            num_classes: 0,
            patch_size: patch,
        },
        qformer_args: QFormerArgs {
            num_layers: ql,
            hidden_size: qh,
            num_attention_heads: qn,
            vocab_size: queries,
            layernorm_order: "post".into(),
            model_parallel_size: Some(1),
            max_sequence_length: Some(0),
            is_decoder: (0..ql).map(|i| i % 2 == 0).collect(),
            cross_attn_hidden_size: vh,
            layernorm_epsilon: 1e-12,
            inner_hidden_size: None,
        },
        bos_token_id: 130004,
        mask_token_id: 130000,
        gmask_token_id: 130001,
        pad_token_id: 3,
        use_lora: true,
        lora_rank: LoraConfig::default().rank,
        layer_range: Some(LoraConfig::default().layers),
        lora_alpha: None,
        lora_mlp: None,
        lora_head_first: None,
        lora_targets: None,
        qkv_layout: QkvLayout::Interleaved,
        extra: Default::default(),
    }
}

impl ModelConfig {
    /// Parameters of the model this config builds (ChatGLM, EVA ViT, Q-Former, glm_proj; LoRA
    /// left out), counted from the sizes as floating point so absurd sizes cannot overflow.
    pub fn parameter_estimate(&self) -> f64 {
        let s = &self.sat;
        let f = |x: i64| x as f64;
        let block = |h: f64, ffn: f64| 4.0 * h * h + 2.0 * h * ffn + 9.0 * h + ffn;
        let (h, v, q) = (f(s.hidden_size), &s.eva_args, &s.qformer_args);
        let glm = f(s.vocab_size) * h
            + f(s.num_layers) * block(h, f(s.inner_hidden_size.unwrap_or(4 * s.hidden_size)))
            + 2.0 * h;
        let vh = f(v.hidden_size);
        let patches = f(v.image_size[0] / v.patch_size.max(1)).powi(2) + 1.0;
        let vit = f(v.num_layers) * block(vh, f(v.inner_hidden_size))
            + vh * f(v.in_channels) * f(v.patch_size).powi(2)
            + patches * vh;
        let qh = f(q.hidden_size);
        let qffn = f(q.inner_hidden_size.unwrap_or(4 * q.hidden_size));
        let qformer = f(q.num_layers) * (block(qh, qffn) + 2.0 * qh * f(q.cross_attn_hidden_size))
            + f(q.vocab_size) * qh;
        glm + vit + qformer + qh * h
    }

    /// Refuse, before allocating, a model whose weights in `kind` (bytes per element) cannot fit
    /// in `available` bytes (`None`: unknown, only the absolute bound applies).
    pub fn check_fits(&self, bytes_per_param: usize, available: Option<u64>) -> Result<()> {
        let need = self.parameter_estimate() * bytes_per_param as f64;
        // Beyond any machine: 1 PiB.
        let limit = available
            .map(|a| a as f64)
            .unwrap_or(f64::MAX)
            .min(1024f64.powi(5));
        if !need.is_finite() || need > limit {
            let gib = |x: f64| x / 1024f64.powi(3);
            bail!(
                "model config: these sizes need about {:.1} GiB for the weights ({:.3e} parameters), \
                 more than the {:.1} GiB available; check hidden_size, num_layers, vocab_size and \
                 the eva_args / qformer_args sizes",
                gib(need),
                self.parameter_estimate(),
                gib(limit)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_model_config_json() {
        for name in ["visualglm-6b", "small", "tiny"] {
            let c = ModelConfig::preset(name).unwrap();
            c.validate().unwrap();
            let json = serde_json::to_string(&c.to_sat()).unwrap();
            let back = ModelConfig::from_sat(serde_json::from_str(&json).unwrap());
            assert_eq!(back.sat, c.to_sat());
            assert_eq!(back.lora, c.lora);
        }
        let real = ModelConfig::preset("visualglm-6b").unwrap();
        assert_eq!(real.lora.as_ref().unwrap().layers, vec![0, 14]);
        assert!((real.lora.unwrap().scaling() - 0.1).abs() < 1e-12);
    }
}
