//! Model directories in the three formats a user meets, and loading any of them into a
//! [`VisualGlm`]:
//!
//! * **xrayglm** (ours): `model_config.json` + `model.safetensors` (frozen weights, sat names)
//!   + optional `lora.safetensors` + optional `tokenizer.json`; memory-mapped.
//! * **sat** (XrayGLM / VisualGLM releases, spec §6.a): `latest` (iteration, or `release`),
//!   `<iter>/mp_rank_00_model_states.pt` (the `module` dict; DeepSpeed keys ignored) and
//!   `model_config.json`.
//! * **hf** (`THUDM/visualglm-6b`, spec §6.b): `config.json` (ChatGLM config + `eva_config` /
//!   `qformer_config`) and `pytorch_model.bin` / `pytorch_model-*.bin` (with
//!   `pytorch_model.bin.index.json`) or `model*.safetensors`.
//!
//! Tensors are read and copied into the model one at a time, so loading never holds a second copy
//! of the weights.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::st::SafeTensorsFile;
use super::torch_zip::TorchCheckpoint;
use super::{hf_to_sat, LoadReport, Loader, Require};
use crate::model::config::{LoraConfig, ModelConfig, QkvLayout, RotaryPrecision, SatModelConfig};
use crate::model::visualglm::VisualGlm;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xrayglm,
    Sat,
    Hf,
    /// A `xrayglm finetune` checkpoint: `lora.safetensors` + `trainer_state.json` naming its base.
    Checkpoint,
    /// A PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`, as `xrayglm export
    /// --format peft` writes) over the base model its `base_model_name_or_path` names.
    Peft,
}

pub fn detect(dir: &Path) -> Result<Format> {
    if !dir.is_dir() {
        bail!("{}: not a model directory", dir.display());
    }
    if dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file()
    {
        return Ok(Format::Peft);
    }
    if dir.join("model.safetensors").is_file() && dir.join("model_config.json").is_file() {
        return Ok(Format::Xrayglm);
    }
    if dir.join("lora.safetensors").is_file() && dir.join("trainer_state.json").is_file() {
        return Ok(Format::Checkpoint);
    }
    if dir.join("latest").is_file() && dir.join("model_config.json").is_file() {
        return Ok(Format::Sat);
    }
    if dir.join("config.json").is_file() {
        return Ok(Format::Hf);
    }
    bail!(
        "{}: unrecognised model directory (want model_config.json + model.safetensors, a sat checkpoint \
         with `latest`, or an HF folder with config.json)",
        dir.display()
    )
}

/// Which LoRA adapters a loaded model gets.
#[derive(Debug, Clone, Default)]
pub enum LoraSetting {
    /// Those its `model_config.json` describes (loaded with the weights when the files hold them).
    #[default]
    AsSaved,
    /// None.
    Without,
    /// These (fresh, unless the files hold adapters of this shape).
    Use(LoraConfig),
}

impl From<Option<LoraConfig>> for LoraSetting {
    fn from(l: Option<LoraConfig>) -> Self {
        l.map_or(Self::Without, Self::Use)
    }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Kind of the frozen weights.
    pub kind: Kind,
    /// Layout of ChatGLM's fused qkv in the files; `None` = the config's `qkv_layout` (default
    /// interleaved).
    pub qkv_layout: Option<QkvLayout>,
    /// The adapters to build (e.g. fresh adapters over a base model).
    pub lora: LoraSetting,
    pub rotary: RotaryPrecision,
}

impl LoadOptions {
    /// Loading onto the device `spec` names, the frozen weights in `dtype` — by default
    /// `gpu_default` on a GPU and fp32 on the CPU.
    pub fn on(
        spec: crate::device::DeviceSpec,
        dtype: Option<crate::device::Dtype>,
        gpu_default: crate::device::Dtype,
    ) -> anyhow::Result<Self> {
        let device = spec.device()?;
        let dtype = dtype.unwrap_or(if device.is_cuda() {
            gpu_default
        } else {
            crate::device::Dtype::Fp32
        });
        Ok(Self {
            device,
            kind: dtype.kind(),
            ..Default::default()
        })
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            qkv_layout: None,
            lora: LoraSetting::AsSaved,
            rotary: RotaryPrecision::default(),
        }
    }
}

/// The model config of a directory in any format.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let format = detect(dir)?;
    if matches!(format, Format::Peft | Format::Checkpoint) {
        base_chain(dir)?;
    }
    match format {
        Format::Xrayglm | Format::Sat | Format::Checkpoint => {
            ModelConfig::from_sat_file(&dir.join("model_config.json"))
        }
        Format::Hf => hf_config(&dir.join("config.json")),
        Format::Peft => {
            let p = PeftAdapter::read(dir)?;
            let mut cfg = read_config(&resolve_run(&p.base))?;
            cfg.lora = Some(p.config);
            Ok(cfg)
        }
    }
}

/// A PEFT LoRA adapter read back into xrayglm's adapters: the base folder, the LoRA config it
/// amounts to, and per adapted linear (sat name) its single-rank `A`, `B`.
pub struct PeftAdapter {
    pub base: PathBuf,
    pub config: LoraConfig,
    pub modules: Vec<(String, Tensor, Tensor)>,
}

/// The options of `adapter_config.json` that change what the adapter computes and that xrayglm
/// does not implement: refused by name rather than ignored. Each with the value that means "off".
const PEFT_UNSUPPORTED: &[(&str, &str)] = &[
    ("use_dora", "false"),
    ("use_rslora", "false"),
    ("fan_in_fan_out", "false"),
    ("bias", "\"none\""),
    ("lora_bias", "false"),
    ("modules_to_save", "null"),
    ("layers_to_transform", "null"),
    ("layers_pattern", "null"),
    ("layer_replication", "null"),
    ("exclude_modules", "null"),
    ("target_parameters", "null"),
    ("megatron_config", "null"),
    ("use_qalora", "false"),
];

/// How many adapters deep a PEFT folder or checkpoint may stand on other adapters.
const MAX_BASE_CHAIN: usize = 8;

fn peft_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::io::read_capped(&cfg_path, crate::io::MAX_CONFIG_BYTES)?;
    let c: Value = serde_json::from_str(crate::io::strip_bom(&text))
        .with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    if c["peft_type"].as_str() != Some("LORA") {
        bail!("{}: peft_type is not LORA", cfg_path.display());
    }
    Ok((cfg_path, c))
}

/// The base folder a PEFT adapter names (`base_model_name_or_path`, absolute or relative to the
/// adapter's folder).
pub fn peft_base(dir: &Path) -> Result<PathBuf> {
    let (cfg_path, c) = peft_config(dir)?;
    let name = c["base_model_name_or_path"].as_str().unwrap_or("");
    [PathBuf::from(name), dir.join(name)]
        .into_iter()
        .find(|p| !name.is_empty() && p.is_dir())
        .with_context(|| {
            format!(
                "{}: base_model_name_or_path {name:?} is not a local folder: set it to the \
                 folder of the base model the adapter was trained on",
                cfg_path.display()
            )
        })
}

/// The folders a model stands on, from `dir` (a run resolved to its checkpoint) down to the full
/// model: a checkpoint names its base in `trainer_state.json`, a PEFT adapter in
/// `base_model_name_or_path`. A chain that comes back to a folder it passed, or that is deeper
/// than [`MAX_BASE_CHAIN`], is an error naming the folders.
pub fn base_chain(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut cur = resolve_run(dir);
    loop {
        let canon = std::fs::canonicalize(&cur).unwrap_or_else(|_| cur.clone());
        if chain.contains(&canon) {
            let names: Vec<String> = chain
                .iter()
                .chain(std::iter::once(&canon))
                .map(|p| p.display().to_string())
                .collect();
            bail!(
                "{}: the base models loop: {} (base_model_name_or_path / trainer_state.json's base_model)",
                dir.display(),
                names.join(" → ")
            );
        }
        chain.push(canon);
        if chain.len() > MAX_BASE_CHAIN + 1 {
            bail!(
                "{}: more than {MAX_BASE_CHAIN} adapters stand on each other before a full model",
                dir.display()
            );
        }
        let next = match detect(&cur)? {
            Format::Peft => peft_base(&cur)?,
            Format::Checkpoint => checkpoint_base(&cur)?,
            _ => return Ok(chain),
        };
        cur = resolve_run(&next);
    }
}

/// Record a model folder as an input of a command: a run's pointers and training config (when
/// the folder is a run), the files of the checkpoint it resolves to and of every base model it
/// stands on.
pub fn model_inputs(inputs: &mut crate::io::Inputs, what: &str, dir: &Path) {
    if !dir.is_dir() {
        inputs.file(what, dir);
    } else if resolve_run(dir) != dir {
        for f in ["latest", "best", "best.json", "config.toml"] {
            inputs.file(format!("{what} ({f})"), &dir.join(f));
        }
    }
    for d in base_chain(dir).unwrap_or_default() {
        inputs.folder(what, &d);
    }
}

/// Refuse the options of `adapter_config.json` that change the maths and are not implemented.
fn peft_options_supported(cfg_path: &Path, c: &Value) -> Result<()> {
    for (key, off) in PEFT_UNSUPPORTED {
        let v = &c[*key];
        let is_off = v.is_null()
            || *v == serde_json::from_str::<Value>(off)?
            || v.as_array().is_some_and(|a| a.is_empty());
        if !is_off {
            bail!(
                "{}: {key} = {v} is not supported by xrayglm (only {key} = {off}): the adapter \
                 would compute something else than this loader",
                cfg_path.display()
            );
        }
    }
    Ok(())
}

/// `r` (a whole number ≥ 1, `min_one`) or `lora_alpha` (finite and > 0) of `adapter_config.json`.
fn peft_number(cfg_path: &Path, c: &Value, k: &str, min_one: bool) -> Result<f64> {
    let v = &c[k];
    let x = v
        .as_f64()
        .with_context(|| format!("{}: {k} must be a number, found {v}", cfg_path.display()))?;
    if min_one && !(x >= 1.0 && x.fract() == 0.0) {
        bail!(
            "{}: {k} = {v}: must be a whole number ≥ 1",
            cfg_path.display()
        );
    }
    if !(min_one || x.is_finite() && x > 0.0) {
        bail!("{}: {k} = {v}: must be > 0", cfg_path.display());
    }
    Ok(x)
}

/// The LoRA tensors of `adapter_model.safetensors` by module (HF name) → (A, B), each floating
/// point, a finite matrix, of a module `target_modules` selects; at least one module.
type PeftParts = std::collections::BTreeMap<String, (Option<Tensor>, Option<Tensor>)>;

fn peft_tensors(dir: &Path, cfg_path: &Path, c: &Value) -> Result<PeftParts> {
    let file = dir.join("adapter_model.safetensors");
    let st = SafeTensorsFile::open(&file)?;
    let targets = peft_targets(cfg_path, &c["target_modules"])?;
    let mut parts = PeftParts::default();
    for t in st.tensors() {
        let (n, x) = t?;
        let stem = n.strip_prefix("base_model.model.").unwrap_or(&n);
        let stem = stem.strip_suffix(".weight").unwrap_or(stem);
        let stem = stem.strip_suffix(".default").unwrap_or(stem);
        let (module, ab) = if let Some(m) = stem.strip_suffix(".lora_A") {
            (m, 0)
        } else if let Some(m) = stem.strip_suffix(".lora_B") {
            (m, 1)
        } else {
            bail!(
                "{}: {n} is not a LoRA tensor (lora_A / lora_B)",
                file.display()
            );
        };
        if !x.is_floating_point() {
            bail!(
                "{}: {n} is {:?}, not floating point",
                file.display(),
                x.kind()
            );
        }
        if x.dim() != 2 {
            bail!(
                "{}: {n} has shape {:?}, not a matrix",
                file.display(),
                x.size()
            );
        }
        let finite = x.f_isfinite()?.f_all()?.f_int64_value(&[])? == 1;
        if !finite {
            bail!("{}: {n} holds NaN or infinite values", file.display());
        }
        if !targets(module) {
            bail!(
                "{}: {n} adapts {module}, which target_modules ({}) does not select",
                file.display(),
                c["target_modules"]
            );
        }
        let e = parts.entry(module.to_string()).or_default();
        if ab == 0 {
            e.0 = Some(x);
        } else {
            e.1 = Some(x);
        }
    }
    if parts.is_empty() {
        bail!(
            "{}: target_modules ({}) selects no module of the file: the adapter would change nothing",
            cfg_path.display(),
            c["target_modules"]
        );
    }
    Ok(parts)
}

/// PEFT's module selection (`target_modules`): a string is a regular expression that must match
/// the whole module name; a list selects a module named exactly so or ending in `.<entry>`.
fn peft_targets(cfg_path: &Path, v: &Value) -> Result<impl Fn(&str) -> bool> {
    enum T {
        Regex(regex::Regex),
        List(Vec<String>),
    }
    let t = match v {
        Value::String(s) => {
            T::Regex(regex::Regex::new(&format!("^(?:{s})$")).with_context(|| {
                format!(
                    "{}: target_modules is not a regular expression",
                    cfg_path.display()
                )
            })?)
        }
        Value::Array(a) => T::List(
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .with_context(|| {
                    format!(
                        "{}: target_modules is not a list of names",
                        cfg_path.display()
                    )
                })?,
        ),
        _ => bail!(
            "{}: target_modules must be a regular expression or a list of module names",
            cfg_path.display()
        ),
    };
    Ok(move |m: &str| match &t {
        T::Regex(r) => r.is_match(m),
        T::List(l) => l.iter().any(|x| m == x || m.ends_with(&format!(".{x}"))),
    })
}

/// PEFT's per-module value from a `rank_pattern` / `alpha_pattern`: the first key that matches the
/// end of the module name (`(.*\.)?(key)$`), else the default.
fn peft_pattern(pattern: &Value, module: &str, default: f64) -> f64 {
    for (k, v) in pattern.as_object().into_iter().flatten() {
        let hit = regex::Regex::new(&format!("^(?:.*\\.)?(?:{k})$"))
            .map(|r| r.is_match(module))
            .unwrap_or(false);
        if hit {
            return v.as_f64().unwrap_or(default);
        }
    }
    default
}

impl PeftAdapter {
    /// Read `adapter_config.json` and `adapter_model.safetensors`, verified: options xrayglm does
    /// not implement refused by name, `target_modules` must select every module of the file,
    /// every tensor floating point, finite and of the shape its rank says. The adapter must have
    /// xrayglm's shape: one scaling for every module, ChatGLM's qkv as its 3 head-first
    /// partitions (block-diagonal B), the rest plain.
    pub fn read(dir: &Path) -> Result<Self> {
        let (cfg_path, c) = peft_config(dir)?;
        peft_options_supported(&cfg_path, &c)?;
        let base = peft_base(dir)?;
        let (r, alpha) = (
            peft_number(&cfg_path, &c, "r", true)?,
            peft_number(&cfg_path, &c, "lora_alpha", false)?,
        );
        let file = dir.join("adapter_model.safetensors");
        let parts = peft_tensors(dir, &cfg_path, &c)?;
        // The scaling PEFT applies to every module is lora_alpha / r (rank and alpha patterns
        // keep that ratio in xrayglm's exports); the partitions' rank is the smallest rank.
        for (k, v) in c["rank_pattern"].as_object().into_iter().flatten() {
            let a = c["alpha_pattern"]
                .get(k)
                .and_then(|x| x.as_f64())
                .unwrap_or(alpha);
            let rk = v.as_f64().unwrap_or(r);
            if !(rk >= 1.0 && a > 0.0) {
                bail!(
                    "{}: rank_pattern / alpha_pattern {k:?}: rank must be ≥ 1 and alpha > 0",
                    cfg_path.display()
                );
            }
            if ((a / rk) - alpha / r).abs() > 1e-9 * (alpha / r) {
                bail!(
                    "{}: module pattern {k:?} scales by {} and the rest by {}: xrayglm adapters \
                     have one scaling",
                    cfg_path.display(),
                    a / rk,
                    alpha / r
                );
            }
        }
        for (m, (a, b)) in &parts {
            let (Some(a), Some(b)) = (a, b) else {
                bail!("{}: {m} lacks lora_A or lora_B", file.display());
            };
            let rank = peft_pattern(&c["rank_pattern"], m, r) as i64;
            if a.size()[0] != rank || b.size()[1] != rank {
                bail!(
                    "{}: {m}: lora_A {:?} and lora_B {:?} do not have the rank {rank} the config gives it",
                    file.display(),
                    a.size(),
                    b.size()
                );
            }
        }
        let mut modules = Vec::new();
        let mut rank = i64::MAX;
        for (m, (a, b)) in parts {
            let (Some(a), Some(b)) = (a, b) else {
                bail!("{}: {m} lacks lora_A or lora_B", file.display());
            };
            rank = rank.min(a.size()[0]);
            modules.push((hf_to_sat(&m), a, b));
        }
        let scaling = alpha / r;
        let mut config = LoraConfig {
            rank,
            alpha: scaling * rank as f64,
            layers: Vec::new(),
            ..Default::default()
        };
        let mut mlp = Vec::new();
        let layer_of = |rest: &str| -> Option<i64> { rest.split('.').next()?.parse().ok() };
        for (m, _, _) in &modules {
            let t = &mut config.targets;
            if let Some(rest) = m.strip_prefix("transformer.layers.") {
                let i = layer_of(rest).with_context(|| format!("module {m}"))?;
                let list = if rest.contains(".mlp.") {
                    &mut mlp
                } else {
                    &mut config.layers
                };
                list.push(i);
            } else if let Some(rest) = m.strip_prefix("mixins.eva.model.vit.transformer.layers.") {
                t.vit
                    .push(layer_of(rest).with_context(|| format!("module {m}"))?);
            } else if let Some(rest) =
                m.strip_prefix("mixins.eva.model.qformer.transformer.layers.")
            {
                t.qformer
                    .push(layer_of(rest).with_context(|| format!("module {m}"))?);
            } else if m == "mixins.eva.model.glm_proj" {
                t.glm_proj = true;
            } else {
                bail!("{}: {m} is not a linear xrayglm adapts", file.display());
            }
        }
        for l in [
            &mut config.layers,
            &mut mlp,
            &mut config.targets.vit,
            &mut config.targets.qformer,
        ] {
            l.sort_unstable();
            l.dedup();
        }
        config.targets.mlp = (!mlp.is_empty()).then_some(mlp);
        Ok(Self {
            base,
            config,
            modules,
        })
    }
}

/// HF `config.json` → the sat-style config.
pub fn hf_config(path: &Path) -> Result<ModelConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let get = |k: &str| {
        v.get(k)
            .cloned()
            .with_context(|| format!("{}: missing {k}", path.display()))
    };
    let mut sat = serde_json::Map::new();
    for k in [
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "image_length",
    ] {
        sat.insert(k.into(), get(k)?);
    }
    for k in [
        "inner_hidden_size",
        "layernorm_epsilon",
        "max_sequence_length",
        "bos_token_id",
        "mask_token_id",
        "gmask_token_id",
        "pad_token_id",
    ] {
        if let Some(x) = v.get(k).filter(|x| !x.is_null()) {
            sat.insert(k.into(), x.clone());
        }
    }
    sat.insert("eva_args".into(), get("eva_config")?);
    sat.insert("qformer_args".into(), get("qformer_config")?);
    let sat: SatModelConfig = serde_json::from_value(Value::Object(sat))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let cfg = ModelConfig::from_sat(sat);
    cfg.validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(cfg)
}

fn sat_weights_file(dir: &Path) -> Result<PathBuf> {
    let latest = std::fs::read_to_string(dir.join("latest")).context("reading latest")?;
    let iter = latest.trim();
    let f = dir.join(iter).join("mp_rank_00_model_states.pt");
    if !f.is_file() {
        bail!(
            "{}: `latest` says {iter:?} but {} is missing",
            dir.display(),
            f.display()
        );
    }
    Ok(f)
}

fn hf_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for index in [
        "pytorch_model.bin.index.json",
        "model.safetensors.index.json",
    ] {
        let p = dir.join(index);
        if p.is_file() {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no weight_map", p.display()))?
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    for single in ["pytorch_model.bin", "model.safetensors"] {
        if dir.join(single).is_file() {
            return Ok(vec![dir.join(single)]);
        }
    }
    bail!(
        "{}: no HF weight files (pytorch_model*.bin or model*.safetensors)",
        dir.display()
    )
}

/// Stream the named tensors of one file (torch zip or safetensors) into `f`.
fn for_each_tensor(
    path: &Path,
    mut f: impl FnMut(Result<(String, Tensor)>) -> Result<()>,
) -> Result<()> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let st = SafeTensorsFile::open(path)?;
        for t in st.tensors() {
            f(t)?;
        }
    } else {
        let ck = TorchCheckpoint::open(path)?;
        for t in ck.tensors()? {
            f(t)?;
        }
    }
    Ok(())
}

/// The base model a training checkpoint was trained on.
pub fn checkpoint_base(dir: &Path) -> Result<PathBuf> {
    let state: Value = serde_json::from_str(&crate::io::read_capped(
        &dir.join("trainer_state.json"),
        crate::io::MAX_CONFIG_BYTES,
    )?)
    .with_context(|| format!("{}: trainer_state.json", dir.display()))?;
    let base = state["base_model"]
        .as_str()
        .with_context(|| format!("{}: no base_model", dir.display()))?;
    let p = PathBuf::from(base);
    Ok(if p.is_absolute() { p } else { dir.join(p) })
}

/// A training run folder (`latest` naming a checkpoint subfolder) resolves to that checkpoint;
/// anything else to itself.
/// The run folder's layout is [`crate::run`]'s: the checkpoint `latest` names, or
/// when `latest` is broken the newest complete step folder.
pub fn resolve_run(dir: &Path) -> PathBuf {
    use crate::run as checkpoint;
    // `RUN/best`, `RUN/latest`: the checkpoint the file names.
    if let Some(ck) = checkpoint::pointer(dir) {
        return ck;
    }
    if let Some(ck) = checkpoint::latest(dir) {
        return ck;
    }
    match checkpoint::newest_complete(dir) {
        Some(step) => {
            let ck = dir.join(step.to_string());
            // A run whose `latest` is broken: said once per folder, as training says it.
            static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
            let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
            if dir.join("latest").exists() && !warned.contains(&ck) {
                crate::errln!(
                    "warning: {}: {}; using the newest complete checkpoint {}",
                    dir.display(),
                    checkpoint::pointer_error(&dir.join("latest"))
                        .unwrap_or_else(|| "`latest` is unreadable".into()),
                    ck.display()
                );
                warned.push(ck.clone());
            }
            ck
        }
        None => dir.to_path_buf(),
    }
}

/// Load a model directory of any format (a training run folder loads its latest checkpoint).
pub fn load_model(dir: &Path, opts: &LoadOptions) -> Result<(VisualGlm, LoadReport)> {
    ModelDir::open(dir)?.load(opts)
}

/// A model directory as found: a run folder resolved to its checkpoint, its format detected and
/// its config read — once, so that a caller can size things by the model before loading it.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub format: Format,
    pub config: ModelConfig,
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if let Some(e) = crate::run::pointer_error(dir) {
            bail!("{}: {e}", dir.display());
        }
        let dir = resolve_run(dir);
        let format = detect(&dir)?;
        let config = read_config(&dir)?;
        Ok(Self {
            dir,
            format,
            config,
        })
    }

    /// The weights (for a checkpoint: its base model's, then its adapters).
    pub fn load(&self, opts: &LoadOptions) -> Result<(VisualGlm, LoadReport)> {
        match self.format {
            Format::Checkpoint => self.load_checkpoint(opts),
            Format::Peft => self.load_peft(opts),
            _ => self.load_weights(opts),
        }
    }

    /// A PEFT adapter over its base: the base loaded with the adapter's LoRA shape, then every
    /// module's A and B split into its partitions (linears the adapter leaves out keep B = 0).
    fn load_peft(&self, opts: &LoadOptions) -> Result<(VisualGlm, LoadReport)> {
        let p = PeftAdapter::read(&self.dir)?;
        let lora = match &opts.lora {
            LoraSetting::Without => None,
            _ => Some(p.config.clone()),
        };
        let base_opts = LoadOptions {
            lora: LoraSetting::from(lora.clone()),
            ..opts.clone()
        };
        let (model, mut report) = load_model(&p.base, &base_opts).with_context(|| {
            format!(
                "loading the base model {} of {}",
                p.base.display(),
                self.dir.display()
            )
        })?;
        if lora.is_none() {
            return Ok((model, report));
        }
        let loras: std::collections::HashMap<String, &crate::model::lora::Lora> =
            model.loras().into_iter().collect();
        for (name, a, b) in &p.modules {
            let l = loras.get(name).with_context(|| {
                format!("{}: no adapter {name} in the model", self.dir.display())
            })?;
            l.set_from_single_rank(a, b)
                .with_context(|| format!("{}: {name}", self.dir.display()))?;
            report.lora_loaded += 2;
        }
        Ok((model, report))
    }

    /// A training checkpoint: adapters over the base model it names (which must have its sizes).
    fn load_checkpoint(&self, opts: &LoadOptions) -> Result<(VisualGlm, LoadReport)> {
        let (dir, cfg) = (self.dir.as_path(), &self.config);
        let base = checkpoint_base(dir)?;
        if let Ok(b) = read_config(&resolve_run(&base)) {
            let diffs = size_differences(cfg, &b, "checkpoint");
            if !diffs.is_empty() {
                bail!(
                    "{}: its base model {} is not the model it was trained on: {}",
                    dir.display(),
                    base.display(),
                    diffs.join(", ")
                );
            }
        }
        let base_opts = LoadOptions {
            lora: LoraSetting::from(cfg.lora.clone()),
            ..opts.clone()
        };
        let (mut model, mut report) = load_model(&base, &base_opts).with_context(|| {
            format!(
                "loading the base model {} of {}",
                base.display(),
                dir.display()
            )
        })?;
        let mut loader = Loader::new(&mut model, QkvLayout::Interleaved);
        for t in SafeTensorsFile::open(&dir.join("lora.safetensors"))?.tensors() {
            let (n, x) = t?;
            loader.put(n, x);
        }
        let lora = loader.finish(Require::Lora, &dir.display().to_string())?;
        report.loaded += lora.loaded;
        report.lora_loaded += lora.lora_loaded;
        Ok((model, report))
    }

    /// The weights of an xrayglm, sat or HF directory.
    fn load_weights(&self, opts: &LoadOptions) -> Result<(VisualGlm, LoadReport)> {
        let (dir, format) = (self.dir.as_path(), self.format);
        let mut cfg = self.config.clone();
        cfg.rotary = opts.rotary;
        let had_lora = cfg.lora.is_some();
        match &opts.lora {
            LoraSetting::AsSaved => {}
            LoraSetting::Without => cfg.lora = None,
            LoraSetting::Use(l) => cfg.lora = Some(l.clone()),
        }
        let layout = opts.qkv_layout.unwrap_or(cfg.sat.qkv_layout);
        // Our own files always hold the model's interleaved layout.
        let layout = if format == Format::Xrayglm {
            QkvLayout::Interleaved
        } else {
            layout
        };
        let require = if had_lora && cfg.lora.is_some() {
            Require::All
        } else {
            Require::Base
        };
        let mut model = VisualGlm::new_for_loading(cfg, opts.device, opts.kind)?;
        let source = dir.display().to_string();
        let files: Vec<PathBuf> = match format {
            Format::Xrayglm => {
                let mut v = vec![dir.join("model.safetensors")];
                if dir.join("lora.safetensors").is_file() {
                    v.push(dir.join("lora.safetensors"));
                }
                v
            }
            Format::Sat => vec![sat_weights_file(dir)?],
            Format::Hf => hf_weight_files(dir)?,
            Format::Checkpoint => return self.load_checkpoint(opts),
            Format::Peft => return self.load_peft(opts),
        };
        let mut loader = Loader::new(&mut model, layout);
        for file in &files {
            for_each_tensor(file, |t| {
                let (n, x) = t?;
                loader.put(
                    if format == Format::Hf {
                        hf_to_sat(&n)
                    } else {
                        n
                    },
                    x,
                );
                Ok(())
            })
            .with_context(|| format!("loading {}", file.display()))?;
        }
        let report = loader.finish(require, &source)?;
        Ok((model, report))
    }
}

/// Write a model in xrayglm's own format: `model.safetensors` (frozen weights, sat names, in
/// their current kind), `lora.safetensors` (when the model has adapters) and `model_config.json`.
/// Each file is written atomically.
pub fn save_xrayglm(model: &VisualGlm, dir: &Path) -> Result<()> {
    save(model, dir, true)
}

/// Write only the frozen weights (a base model for later LoRA checkpoints).
pub fn save_base(model: &VisualGlm, dir: &Path) -> Result<()> {
    save(model, dir, false)
}

fn save(model: &VisualGlm, dir: &Path, with_lora: bool) -> Result<()> {
    if model.chatglm.is_quantized() {
        bail!("cannot save a quantized (int8 or nf4) model (its float weights are gone): save before quantizing");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = [("format", "xrayglm".to_string())];
    let write = |vars: std::collections::HashMap<String, Tensor>, path: &Path| -> Result<()> {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let list: Vec<(String, &Tensor)> =
            names.iter().map(|n| ((*n).clone(), &vars[*n])).collect();
        super::st::write(path, &list, &meta)
    };
    write(model.base.variables(), &dir.join("model.safetensors"))?;
    let lora = model.lora.variables();
    if with_lora && !lora.is_empty() {
        write(lora, &dir.join("lora.safetensors"))?;
    } else if dir.join("lora.safetensors").exists() {
        std::fs::remove_file(dir.join("lora.safetensors"))?;
    }
    let mut cfg = model.cfg.clone();
    if !with_lora {
        cfg.lora = None;
    }
    let mut sat = cfg.to_sat();
    sat.qkv_layout = QkvLayout::Interleaved;
    crate::io::write_json_atomic(&dir.join("model_config.json"), &sat)
}

/// The sizes in which a model trained with adapters (`what`: checkpoint, adapter) differs from the
/// base it is to run over, as `"<key> <ours> (<what>) vs <theirs> (base)"`; empty when they fit.
fn size_differences(ours: &ModelConfig, base: &ModelConfig, what: &str) -> Vec<String> {
    let (x, y) = (&ours.sat, &base.sat);
    [
        ("num_layers", x.num_layers, y.num_layers),
        ("hidden_size", x.hidden_size, y.hidden_size),
        (
            "num_attention_heads",
            x.num_attention_heads,
            y.num_attention_heads,
        ),
        (
            "inner_hidden_size",
            ours.inner_hidden_size(),
            base.inner_hidden_size(),
        ),
        ("vocab_size", x.vocab_size, y.vocab_size),
        ("image_length", x.image_length, y.image_length),
    ]
    .iter()
    .filter(|(_, a, b)| a != b)
    .map(|(k, a, b)| format!("{k} {a} ({what}) vs {b} (base)"))
    .collect()
}

/// A LoRA adapter loaded on its own, to be swapped over a base model that is already loaded
/// (serving several adapters over one frozen base): its fp32 store and one
/// [`crate::model::chatglm::LayerLoras`] per ChatGLM layer.
pub struct AdapterWeights {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub store: tch::nn::VarStore,
    pub layers: Vec<crate::model::chatglm::LayerLoras>,
}

/// The adapters of a training run, checkpoint or xrayglm folder (`lora.safetensors`), checked
/// against the base model `base` they will run over: the same layer count and sizes.
pub fn load_adapter(dir: &Path, base: &ModelConfig, device: Device) -> Result<AdapterWeights> {
    let md = ModelDir::open(dir)?;
    let file = md.dir.join("lora.safetensors");
    let lora = match (&md.config.lora, md.format) {
        (Some(l), Format::Checkpoint | Format::Xrayglm) if file.is_file() => l.clone(),
        (Some(l), Format::Peft) => l.clone(),
        _ => bail!(
            "{}: not an adapter (a training run or checkpoint folder, an xrayglm folder with \
             lora.safetensors, or a PEFT folder)",
            dir.display()
        ),
    };
    if lora.targets.vision() {
        bail!(
            "{}: the adapter adapts the vision side (model.lora.targets: vit / qformer / glm_proj), \
             which the server cannot swap per request: serve it as the model (--from_pretrained) or \
             merge it (export --format sat)",
            dir.display()
        );
    }
    let diffs = size_differences(&md.config, base, "adapter");
    if !diffs.is_empty() {
        bail!(
            "{}: the adapter was trained on another model: {}",
            dir.display(),
            diffs.join(", ")
        );
    }
    let cfg = ModelConfig {
        lora: Some(lora.clone()),
        ..base.clone()
    };
    let store = tch::nn::VarStore::new(device);
    let layers: Vec<crate::model::chatglm::LayerLoras> = (0..base.sat.num_layers)
        .map(|i| crate::model::chatglm::layer_loras(&store.root(), &cfg, i))
        .collect();
    if md.format == Format::Peft {
        // Each module's single-rank A, B split into the layer adapters' partitions.
        for (name, a, b) in PeftAdapter::read(&md.dir)?.modules {
            let lora = name
                .strip_prefix("transformer.layers.")
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(i, linear)| {
                    let l = layers.get(i.parse::<usize>().ok()?)?;
                    match linear {
                        "attention.query_key_value" => l.qkv.as_ref(),
                        "attention.dense" => l.dense.as_ref(),
                        "mlp.dense_h_to_4h" => l.h_to_4h.as_ref(),
                        "mlp.dense_4h_to_h" => l.h4_to_h.as_ref(),
                        _ => None,
                    }
                })
                .with_context(|| format!("{}: no adapter {name} in the model", md.dir.display()))?;
            lora.set_from_single_rank(&a, &b)
                .with_context(|| format!("{}: {name}", md.dir.display()))?;
        }
        return Ok(AdapterWeights {
            dir: md.dir,
            config: lora,
            store,
            layers,
        });
    }
    let mut vars = store.variables();
    let mut seen = std::collections::BTreeSet::new();
    let st = SafeTensorsFile::open(&file)?;
    for t in st.tensors() {
        let (n, x) = t.with_context(|| format!("reading {}", file.display()))?;
        let Some(canon) = super::canonical_name(&n) else {
            continue;
        };
        let Some(target) = vars.get_mut(&canon) else {
            bail!(
                "{}: {n} is not an adapter of the layers {:?} its config names",
                file.display(),
                lora.layers
            );
        };
        if target.size() != x.size() {
            bail!(
                "{}: {n} has shape {:?}, the adapter needs {:?}",
                file.display(),
                x.size(),
                target.size()
            );
        }
        tch::no_grad(|| target.copy_(&x));
        seen.insert(canon);
    }
    let missing: Vec<&String> = vars.keys().filter(|k| !seen.contains(*k)).collect();
    if !missing.is_empty() {
        bail!("{}: missing adapter tensors {missing:?}", file.display());
    }
    Ok(AdapterWeights {
        dir: md.dir,
        config: lora,
        store,
        layers,
    })
}
