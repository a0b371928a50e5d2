//! `xrayglm export`: a fine-tuned model in the formats other tools read.
//!
//! * `peft` — `adapter_config.json` + `adapter_model.safetensors` for the HF `THUDM/visualglm-6b`
//!   module names. XrayGLM's qkv LoRA has 3 partitions placed head-first (docs/reference.md §4);
//!   it is written as one LoRA of rank 3r whose A stacks the A_p and whose block-diagonal B puts
//!   each partition's rows where ChatGLM's interleaved qkv has them
//!   ([`crate::model::lora::Lora::as_single_rank`]). PEFT scales by `lora_alpha / r`, so
//!   `lora_alpha = 3α` keeps sat's `α / r`; single-partition layers (`attention.dense`, MLP)
//!   keep rank r and α through `rank_pattern` / `alpha_pattern`. `target_modules` is a regex over
//!   the adapted layers only (a plain `dense` would also match the vision tower's layers).
//!   Adapters on the vision side (`model.lora.targets`: ViT, Q-Former, glm_proj) are plain rank-r
//!   LoRAs under their HF names (`image_encoder.vit.transformer.layers.N.…`), matched by their own
//!   alternatives in `target_modules` and rank patterns. `xrayglm chat/eval --from_pretrained`
//!   load such a folder back over its base (`base_model_name_or_path`, a local folder).
//! * `merged` — the base model with the LoRA folded in, HF names (spec §6.b: `image_encoder.`,
//!   `lm_head.weight`, per-layer `rotary_emb.inv_freq`), sharded safetensors with
//!   `model.safetensors.index.json`, `config.json`, and the tokenizer when one is known.
//! * `sat` — the merged model under sat names: `model.safetensors` + `model_config.json` (xrayglm's
//!   own format, which `chat`, `web` and `eval` load).
//! * `lora` — the adapters alone under sat names (`…query_key_value.matrix_A.0`, …) in
//!   `lora.safetensors` + `model_config.json`, as our checkpoints hold them.
//!
//! Every export is written into a temporary folder beside the target and renamed into place, so a
//! failed export leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::model::visualglm::VisualGlm;
use crate::tokenizer::ChatGlmTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Peft,
    Merged,
    Sat,
    Lora,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "peft" => Self::Peft,
            "merged" => Self::Merged,
            "sat" => Self::Sat,
            "lora" => Self::Lora,
            other => bail!("unknown export format {other:?} (peft, merged, sat, lora)"),
        })
    }
}

/// How to export.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    /// Largest shard of a `merged` export, bytes.
    pub shard_bytes: usize,
    /// `base_model_name_or_path` of a `peft` adapter.
    pub base_model_name: String,
    /// Tokenizer file (ice_text.model or tokenizer.json) to save beside a merged model.
    pub tokenizer: Option<PathBuf>,
}

/// Write `model` to `to` (which must not exist or be empty). Returns the files written.
pub fn export(model: &mut VisualGlm, to: &Path, o: &Options) -> Result<Vec<String>> {
    let adapters = model.loras().len();
    if matches!(o.format, Format::Peft | Format::Lora) && adapters == 0 {
        bail!("the model has no LoRA adapters to export (a base or merged model): --format peft and lora need a fine-tuned checkpoint");
    }
    in_fresh_dir(to, |dir| match o.format {
        Format::Peft => peft(model, dir, o),
        Format::Lora => lora(model, dir),
        Format::Merged => merged_hf(model, dir, o),
        Format::Sat => merged_sat(model, dir, o),
    })
}

/// Run `f` on a temporary folder beside `to`, then rename it to `to`; on error remove it.
fn in_fresh_dir(to: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<Vec<String>> {
    if to.is_file() || (to.is_dir() && to.read_dir()?.next().is_some()) {
        bail!(
            "{} already exists and is not empty: export into a new folder",
            to.display()
        );
    }
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let leaf = to
        .file_name()
        .with_context(|| format!("{}: not a folder name", to.display()))?
        .to_string_lossy()
        .to_string();
    crate::io::remove_dead_leftovers(&parent);
    let tmp = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let done = f(&tmp).and_then(|_| {
        let mut names: Vec<String> = std::fs::read_dir(&tmp)?
            .map(|e| Ok(e?.file_name().to_string_lossy().to_string()))
            .collect::<Result<_>>()?;
        names.sort();
        crate::io::sync_dir(&tmp)?;
        if to.is_dir() {
            std::fs::remove_dir(to)?;
        }
        std::fs::rename(&tmp, to).with_context(|| format!("renaming into {}", to.display()))?;
        crate::io::sync_dir(&parent)?;
        Ok(names)
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done
}

fn write_st(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let list: Vec<(String, &Tensor)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    crate::weights::st::write(path, &list, &[("format", "pt".to_string())])
}

/// HF module path → (partitions, single-rank A, B), in layer order.
type Adapters = Vec<(String, i64, Tensor, Tensor)>;

fn adapters(model: &VisualGlm) -> Adapters {
    model
        .loras()
        .into_iter()
        .map(|(name, l)| {
            let (a, b) = l.as_single_rank();
            (sat_to_hf(&name), l.a.len() as i64, a, b)
        })
        .collect()
}

/// The rank-pattern key (and `target_modules` alternative) of a vision-side module group.
const VISION_GROUPS: [(&str, &str); 3] = [
    ("image_encoder.vit.", "vit\\..*"),
    ("image_encoder.qformer.", "qformer\\..*"),
    ("image_encoder.glm_proj", "glm_proj"),
];

fn peft(model: &VisualGlm, dir: &Path, o: &Options) -> Result<()> {
    let cfg = model
        .cfg
        .lora
        .clone()
        .context("the model has no LoRA configuration")?;
    let ad = adapters(model);
    let mut tensors = BTreeMap::new();
    // Partitions per module kind (the part of the name after the layer index).
    let mut kinds: BTreeMap<String, i64> = BTreeMap::new();
    // ChatGLM: the kinds adapted in each layer.
    let mut layers: BTreeMap<i64, std::collections::BTreeSet<String>> = BTreeMap::new();
    // Vision-side modules, by their group's pattern key.
    let mut vision: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, n, a, b) in &ad {
        if let Some((_, key)) = VISION_GROUPS.iter().find(|(pre, _)| name.starts_with(pre)) {
            vision.entry(key).or_default().push(name.clone());
        } else {
            let rest = name
                .strip_prefix("transformer.layers.")
                .and_then(|s| s.split_once('.'))
                .with_context(|| format!("unexpected LoRA module name {name}"))?;
            layers
                .entry(rest.0.parse::<i64>()?)
                .or_default()
                .insert(rest.1.to_string());
            kinds.insert(rest.1.to_string(), *n);
        }
        tensors.insert(
            format!("base_model.model.{name}.lora_A.weight"),
            a.shallow_clone(),
        );
        tensors.insert(
            format!("base_model.model.{name}.lora_B.weight"),
            b.shallow_clone(),
        );
    }
    let top = *kinds.values().max().unwrap_or(&1);
    let (mut rank_pattern, mut alpha_pattern) = (serde_json::Map::new(), serde_json::Map::new());
    for (kind, n) in &kinds {
        if *n != top {
            rank_pattern.insert(kind.clone(), json!(n * cfg.rank));
            alpha_pattern.insert(kind.clone(), json!(*n as f64 * cfg.alpha));
        }
    }
    // Vision-side modules are single-partition: rank r and α (a pattern when r is not the top).
    for key in vision.keys() {
        if top != 1 {
            rank_pattern.insert(key.to_string(), json!(cfg.rank));
            alpha_pattern.insert(key.to_string(), json!(cfg.alpha));
        }
    }
    let esc = |s: &str| s.replace('.', "\\.");
    // ChatGLM layers grouped by the kinds they adapt: `transformer\.layers\.(0|14)\.(…)` per
    // group (XrayGLM's adapters: one group).
    let mut groups: BTreeMap<Vec<String>, Vec<i64>> = BTreeMap::new();
    for (layer, ks) in &layers {
        groups
            .entry(ks.iter().cloned().collect())
            .or_default()
            .push(*layer);
    }
    let mut alternatives = Vec::new();
    for (ks, ls) in &groups {
        alternatives.push(format!(
            "transformer\\.layers\\.({})\\.({})",
            ls.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join("|"),
            ks.iter().map(|k| esc(k)).collect::<Vec<_>>().join("|")
        ));
    }
    for names in vision.values() {
        alternatives.extend(names.iter().map(|n| esc(n)));
    }
    // One alternative (XrayGLM's adapters): the regex as before; several: each in a group.
    let target = if alternatives.len() == 1 {
        alternatives.remove(0)
    } else {
        alternatives
            .iter()
            .map(|a| format!("({a})"))
            .collect::<Vec<_>>()
            .join("|")
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": o.base_model_name,
        "revision": null,
        "inference_mode": true,
        "r": top * cfg.rank,
        "lora_alpha": top as f64 * cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
    });
    // Where the adapter came from, in the safetensors metadata (PEFT warns about unknown
    // adapter_config keys).
    let origin = json!({
        "source": "sat LoraMixin: head-first qkv partitions as one rank-3r LoRA (block-diagonal B in ChatGLM's interleaved rows)",
        "sat_rank": cfg.rank,
        "sat_alpha": cfg.alpha,
        "scaling": cfg.alpha / cfg.rank as f64,
    });
    let list: Vec<(String, &Tensor)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    crate::weights::st::write(
        &dir.join("adapter_model.safetensors"),
        &list,
        &[
            ("format", "pt".to_string()),
            ("xrayglm", origin.to_string()),
        ],
    )?;
    crate::io::write_json_atomic(&dir.join("adapter_config.json"), &config)
}

fn lora(model: &VisualGlm, dir: &Path) -> Result<()> {
    let tensors = crate::weights::lora_tensors(model);
    write_st(&dir.join("lora.safetensors"), &tensors)?;
    let mut sat = model.cfg.to_sat();
    sat.qkv_layout = crate::model::config::QkvLayout::Interleaved;
    crate::io::write_json_atomic(&dir.join("model_config.json"), &sat)
}

/// Fold the adapters into the weights and drop them.
fn merge(model: &mut VisualGlm) -> Result<()> {
    model.merge_lora()?;
    model.cfg.lora = None;
    model.lora = tch::nn::VarStore::new(model.lora.device());
    Ok(())
}

/// sat name → HF `THUDM/visualglm-6b` name (spec §6.b).
pub fn sat_to_hf(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("mixins.eva.model.") {
        format!("image_encoder.{rest}")
    } else if name == "mixins.chatglm-final.lm_head.weight" {
        "lm_head.weight".to_string()
    } else {
        name.to_string()
    }
}

fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
}

/// `config.json` of an HF visualglm-6b folder for this model.
pub fn hf_config(model: &VisualGlm) -> Result<Value> {
    let sat = serde_json::to_value(model.cfg.to_sat())?;
    let mut c = serde_json::Map::new();
    c.insert(
        "architectures".into(),
        json!(["ChatGLMForConditionalGenerationWithImage"]),
    );
    c.insert(
        "auto_map".into(),
        json!({
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"
        }),
    );
    c.insert("model_type".into(), json!("chatglm"));
    for k in [
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "inner_hidden_size",
        "layernorm_epsilon",
        "max_sequence_length",
        "bos_token_id",
        "mask_token_id",
        "gmask_token_id",
        "pad_token_id",
        "image_length",
    ] {
        if let Some(v) = sat.get(k).filter(|v| !v.is_null()) {
            c.insert(k.into(), v.clone());
        }
    }
    c.insert("eos_token_id".into(), json!(crate::tokenizer::ids::EOP));
    c.insert("position_encoding_2d".into(), json!(true));
    c.insert("use_cache".into(), json!(true));
    c.insert("torch_dtype".into(), json!(dtype_name(model.kind())));
    c.insert("eva_config".into(), sat["eva_args"].clone());
    c.insert("qformer_config".into(), sat["qformer_args"].clone());
    Ok(Value::Object(c))
}

fn save_tokenizer(dir: &Path, path: Option<&Path>) -> Result<()> {
    if let Some(p) = path {
        let tok = ChatGlmTokenizer::from_path(p)?;
        tok.save(&dir.join("tokenizer.json"))?;
        if p.extension().is_some_and(|e| e == "model") {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            crate::io::write_atomic(&dir.join("ice_text.model"), &bytes)?;
        }
    }
    Ok(())
}

fn merged_hf(model: &mut VisualGlm, dir: &Path, o: &Options) -> Result<()> {
    merge(model)?;
    let kind = model.kind();
    let mut all: BTreeMap<String, Tensor> = model
        .base
        .variables()
        .into_iter()
        .map(|(k, v)| (sat_to_hf(&k), v))
        .collect();
    // HF ChatGLM keeps each layer's rotary inv_freq as a buffer (rotary dim = head_dim / 2).
    let s = &model.cfg.sat;
    let dim = s.hidden_size / s.num_attention_heads / 2;
    let inv = ((Tensor::arange_start_step(0, dim, 2, (Kind::Float, tch::Device::Cpu))
        / dim as f64)
        * 10000f64.ln())
    .exp()
    .reciprocal()
    .to_kind(kind);
    for i in 0..s.num_layers {
        all.insert(
            format!("transformer.layers.{i}.attention.rotary_emb.inv_freq"),
            inv.copy(),
        );
    }
    // Shards in name order, each at most `shard_bytes` (a larger tensor gets a shard alone).
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (name, t) in &all {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if size > 0 && size + bytes > o.shard_bytes.max(1) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(name.clone());
        size += bytes;
        total += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let part: BTreeMap<String, Tensor> = names
            .iter()
            .map(|k| (k.clone(), all[k].shallow_clone()))
            .collect();
        write_st(&dir.join(&file), &part)?;
        for k in names {
            weight_map.insert(k.clone(), json!(file));
        }
    }
    crate::io::write_json_atomic(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    crate::io::write_json_atomic(&dir.join("config.json"), &hf_config(model)?)?;
    save_tokenizer(dir, o.tokenizer.as_deref())
}

fn merged_sat(model: &mut VisualGlm, dir: &Path, o: &Options) -> Result<()> {
    merge(model)?;
    crate::weights::source::save_xrayglm(model, dir)?;
    save_tokenizer(dir, o.tokenizer.as_deref())
}
