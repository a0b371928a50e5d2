//! The trainer's setup steps, in the order `Trainer::setup` takes them: ranks and device, the
//! base model's source, the data (records → split → samples, checked against the model), the
//! model with its adapters (fresh, or over a saved base), the optimizer and schedule, and resuming
//! from a checkpoint. Nothing here writes before the inputs check out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::TrainerState;
use crate::config::{Config, Method};
use crate::data::batch::{Batch, Dataset, Loader, LoaderConfig, LoaderState, Shard};
use crate::data::records::{load_records, Record};
use crate::data::sample::SampleBuilder;
use crate::device::Dtype;
use crate::dist::Comm;
use crate::model::chatglm::Dropouts;
use crate::model::config::{ModelConfig, Quantize, SatModelConfig};
use crate::model::visualglm::VisualGlm;
use crate::tokenizer::ChatGlmTokenizer;
use crate::weights::source::{load_model, LoadOptions};

/// The training and held-out data, checked before anything is written.
pub(super) struct Data {
    pub(super) train: Arc<Dataset>,
    /// DPO: each training record's chosen and rejected answers as ids, in the dataset's order.
    pub(super) pairs: Vec<(Vec<i64>, Vec<i64>)>,
    pub(super) val: Vec<Record>,
    pub(super) builder: SampleBuilder,
    pub(super) loader: LoaderConfig,
    pub(super) file: String,
}

/// The device of this rank (one GPU per rank on a node) and the ranks' communicator; every rank
/// must run the same config.
pub(super) fn setup_ranks(cfg: &Config) -> Result<(Device, Box<dyn Comm>)> {
    let spec = cfg.model.device;
    let dev = match (spec, spec.device()?) {
        (s, Device::Cuda(_)) if s.any_gpu() => Device::Cuda(
            crate::dist::launcher_ranks().2 % tch::Cuda::device_count().max(1) as usize,
        ),
        (_, d) => d,
    };
    let comm = crate::dist::init(
        cfg.train.backend,
        std::time::Duration::from_secs(cfg.train.dist_timeout_s),
        match dev {
            Device::Cuda(i) => Some(i),
            _ => None,
        },
    )?;
    crate::dist::check_same_config(comm.as_ref(), &cfg.to_toml()?)?;
    if comm.rank() == 0 {
        if let Some(w) = crate::dist::detection_warning(comm.as_ref(), cfg.train.dist_timeout_s) {
            crate::errln!("{w}");
        }
    }
    Ok((dev, comm))
}

/// Where the frozen base comes from, its config read once before anything is built (the
/// prompt's image slots and the limits the data is checked against come from it).
pub(super) enum BaseSource {
    /// `model.preset` with random weights (`model.path` empty).
    Preset(ModelConfig),
    /// `model.path` (canonical, as the run records it) and what it holds.
    Dir(PathBuf, crate::weights::source::ModelDir),
}

impl BaseSource {
    pub(super) fn sizes(&self) -> &SatModelConfig {
        match self {
            Self::Preset(c) => &c.sat,
            Self::Dir(_, d) => &d.config.sat,
        }
    }
}

/// `train.init_from` (a checkpoint: its base and adapters), else `model.path`, else the preset.
pub(super) fn base_source(cfg: &Config) -> Result<BaseSource> {
    let m = &cfg.model;
    let (key, path) = if cfg.train.init_from.as_os_str().is_empty() {
        ("model.path", &m.path)
    } else {
        ("train.init_from", &cfg.train.init_from)
    };
    let source = if path.as_os_str().is_empty() {
        BaseSource::Preset(ModelConfig::preset(&m.preset)?)
    } else {
        let abs =
            std::fs::canonicalize(path).with_context(|| format!("{key} {}", path.display()))?;
        let dir = crate::weights::source::ModelDir::open(&abs)
            .with_context(|| format!("{key} {}", path.display()))?;
        // A run folder or `RUN/best` is recorded as the checkpoint it names now.
        BaseSource::Dir(dir.dir.clone(), dir)
    };
    // The adapters must fit the model (their layers among its layers) before anything is written.
    let mut adapted = match &source {
        BaseSource::Preset(c) => c.clone(),
        BaseSource::Dir(_, d) => d.config.clone(),
    };
    adapted.lora = Some(cfg.model.lora.clone());
    adapted.validate().context("model.lora")?;
    let layers = source.sizes().num_layers;
    if let crate::config::CheckpointLayers::Count(k) = cfg.train.checkpoint_layers {
        if k > layers {
            bail!("train.checkpoint_layers {k} exceeds the model's {layers} ChatGLM layers");
        }
    }
    Ok(source)
}

/// Records → train / held-out split → training samples, checked against the model's limits.
pub(super) fn setup_data(
    cfg: &Config,
    tokenizer: &ChatGlmTokenizer,
    sat: &SatModelConfig,
) -> Result<Data> {
    crate::prepare::ensure_synthetic(cfg)?;
    let (records, rejected, file) = match cfg.train.method {
        Method::Dpo => pair_records(cfg)?,
        _ => {
            let loaded = load_records(&cfg.data.path, &cfg.load_options())?;
            let file = loaded.file.display().to_string();
            (loaded.records, Default::default(), file)
        }
    };
    let (train, val) = crate::data::split(records, cfg.train.val_fraction, cfg.train.seed);
    // The prompt holds as many image slots as the model has query tokens.
    let mut sample_cfg = cfg.sample.clone();
    sample_cfg.image_length = sat.image_length as usize;
    let builder = SampleBuilder::new(tokenizer.clone(), sample_cfg)?;
    let mut loader = cfg.loader.clone();
    if cfg.data.pad_to > 0 {
        loader.padding = crate::data::batch::Padding::Fixed;
    }
    let ds = pad_to(
        cfg,
        Dataset::new(train, &builder, cfg.image.processor(), &file)?
            .with_ablation(cfg.image.ablation)?,
    )?;
    if ds.max_seq_len as i64 > sat.max_sequence_length {
        bail!(
            "the longest training sample has {} tokens, beyond the model's {} positions \
             (max_sequence_length): lower sample.max_source_length / sample.max_target_length",
            ds.max_seq_len,
            sat.max_sequence_length
        );
    }
    let pairs = match cfg.train.method {
        Method::Dpo => ds
            .records
            .iter()
            .map(|r| {
                let answer = |text: &str| {
                    crate::train::policy::answer_ids(&builder, text)
                        .with_context(|| format!("{file}: pair {} ({})", r.index, r.id))
                };
                Ok((answer(&r.label)?, answer(&rejected[&r.index])?))
            })
            .collect::<Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    Ok(Data {
        train: Arc::new(ds),
        pairs,
        val,
        builder,
        loader,
        file,
    })
}

/// DPO's pairs (`rl.pairs`) as records whose answer is the chosen one, with each record's
/// rejected answer by its index.
fn pair_records(
    cfg: &Config,
) -> Result<(
    Vec<Record>,
    std::collections::HashMap<usize, String>,
    String,
)> {
    let loaded = crate::data::records::load_pairs(&cfg.rl.pairs, &cfg.load_options())
        .with_context(|| format!("rl.pairs {}", cfg.rl.pairs.display()))?;
    let file = loaded.file.display().to_string();
    if loaded.pairs.is_empty() {
        bail!("{file}: no usable pairs ({} bad)", loaded.bad.len());
    }
    let mut rejected = std::collections::HashMap::new();
    let records = loaded
        .pairs
        .into_iter()
        .map(|p| {
            rejected.insert(p.index, p.rejected);
            Record {
                index: p.index,
                id: p.id,
                img: p.img,
                images: p.images,
                prompt: p.prompt,
                label: p.chosen,
                history: p.history,
            }
        })
        .collect();
    Ok((records, rejected, file))
}

/// `data.pad_to`: every sample padded to that length (refused when a sample is longer).
fn pad_to(cfg: &Config, mut ds: Dataset) -> Result<Dataset> {
    if cfg.data.pad_to > 0 {
        let longest = ds.samples.iter().map(|s| s.len()).max().unwrap_or(0);
        if longest > cfg.data.pad_to {
            bail!(
                "data.pad_to {} is shorter than the longest sample ({longest} tokens)",
                cfg.data.pad_to
            );
        }
        ds.max_seq_len = cfg.data.pad_to;
    }
    Ok(ds)
}

/// The fixed validation batches: the first `train.eval_batches` of the held-out films, in order.
pub(super) fn held_out_batches(cfg: &Config, data: &Data) -> Result<Vec<Batch>> {
    if data.val.is_empty() {
        return Ok(Vec::new());
    }
    let ds = pad_to(
        cfg,
        Dataset::new(
            data.val.clone(),
            &data.builder,
            cfg.image.processor(),
            &data.file,
        )?
        .with_ablation(cfg.image.ablation)?,
    )?;
    let vcfg = LoaderConfig {
        shuffle: false,
        ..data.loader.clone()
    };
    let vl = Loader::new(Arc::new(ds), vcfg, Shard::default(), LoaderState::default())?;
    let n = vl.batches_per_epoch().min(cfg.train.eval_batches.max(1));
    vl.take(n).collect()
}

/// The frozen base and its LoRA adapters, with the run's dropout and recompute settings.
pub(super) fn setup_model(
    cfg: &Config,
    source: BaseSource,
    dev: Device,
    run_dir: &Path,
    root: bool,
    resuming: bool,
) -> Result<(VisualGlm, String)> {
    let (mut model, base) = build_model(cfg, source, dev, run_dir, root, resuming)?;
    if !cfg.train.init_from.as_os_str().is_empty()
        && model.cfg.lora.as_ref() != Some(&cfg.model.lora)
    {
        bail!(
            "train.init_from {}: its adapters ({:?}) are not this run's model.lora ({:?}); \
             set model.lora to the checkpoint's",
            cfg.train.init_from.display(),
            model.cfg.lora,
            cfg.model.lora
        );
    }
    if model.cfg.sat.eva_args.image_size[0] as usize != cfg.image.size {
        bail!(
            "image.size {} does not match the model's image size {}",
            cfg.image.size,
            model.cfg.sat.eva_args.image_size[0]
        );
    }
    let tc = &cfg.train;
    // "auto" is decided by the memory plan once the model is on its device.
    model.set_recompute_layers(tc.checkpoint_layers.recompute(None));
    Ok((model, base))
}

/// The seed of a fresh run's adapters over a loaded base: train.seed alone, so every fresh start
/// of a run is the same (a resume then loads its checkpoint's adapters over them).
fn lora_seed(cfg: &Config) -> i64 {
    (cfg.train.seed as i64) ^ 0x4c6f_5241
}

/// A loaded base whose source held no adapters gets them drawn from [`lora_seed`]; adapters that
/// came with the weights (fine-tuning on from a LoRA checkpoint) are kept.
fn fresh_lora((model, report): (VisualGlm, crate::weights::LoadReport), cfg: &Config) -> VisualGlm {
    if report.lora_loaded == 0 {
        model.init_lora(lora_seed(cfg));
    }
    model
}

/// The frozen base model and its location. A random preset is drawn from train.seed (frozen
/// weights, then adapters) on every fresh start — so a run that died before its first checkpoint
/// starts again identically — and written into the run folder for its checkpoints; a resume loads
/// the weights written there.
fn build_model(
    cfg: &Config,
    source: BaseSource,
    dev: Device,
    run_dir: &Path,
    root: bool,
    resuming: bool,
) -> Result<(VisualGlm, String)> {
    let m = &cfg.model;
    // Mixed-precision training runs the frozen weights in its half kind.
    let kind = match cfg.train.precision {
        Dtype::Fp32 => m.dtype.kind(),
        half => half.kind(),
    };
    let opts = |qkv_layout| LoadOptions {
        device: dev,
        kind,
        qkv_layout,
        lora: crate::weights::source::LoraSetting::Use(m.lora.clone()),
        rotary: m.rotary,
    };
    let (mut model, base) = match source {
        BaseSource::Preset(mut mc) => {
            let base_dir = run_dir.join("base");
            if resuming && base_dir.join("model.safetensors").is_file() {
                let loaded = load_model(&base_dir, &opts(None))?;
                (fresh_lora(loaded, cfg), "base".to_string())
            } else {
                mc.lora = Some(m.lora.clone());
                mc.rotary = m.rotary;
                tch::manual_seed(cfg.train.seed as i64);
                let model = VisualGlm::new(mc, dev, kind)?;
                if root {
                    crate::weights::source::save_base(&model, &base_dir)?;
                }
                (model, "base".to_string())
            }
        }
        BaseSource::Dir(abs, d) => {
            let loaded = d.load(&opts(Some(m.qkv_layout)))?;
            (fresh_lora(loaded, cfg), abs.display().to_string())
        }
    };
    model.set_fused_attention(m.fused_attention);
    // After the base of a random preset was saved above: a quantized model cannot be saved.
    match m.quantize {
        Quantize::None => {}
        Quantize::Int8 => model.quantize_int8(),
        Quantize::Nf4 => model.quantize_nf4(true)?,
    }
    let (vision, glm) = cfg.train_dropout();
    model.set_dropout(
        vision,
        Dropouts {
            embedding: glm,
            attention: glm,
            output: glm,
        },
    );
    Ok((model, base))
}

/// AdamW over the LoRA weights and the learning-rate schedule.
pub(super) fn setup_optimizer(cfg: &Config, model: &VisualGlm) -> Result<(AdamW, Schedule)> {
    let tc = &cfg.train;
    let lora_params: Vec<(String, Tensor)> = model.lora.variables().into_iter().collect();
    if lora_params.is_empty() {
        bail!("the model has no LoRA parameters to train (model.lora.layers is empty)");
    }
    let opt = AdamW::new(
        lora_params,
        AdamWConfig {
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        },
    );
    // GRPO makes `rl.mu` optimizer steps per iteration.
    let updates = match tc.method {
        Method::Grpo => cfg.rl.mu as i64,
        _ => 1,
    };
    let schedule = Schedule {
        kind: tc.schedule,
        lr: tc.lr,
        train_iters: tc.train_iters * updates,
        warmup: tc.warmup,
        min_lr_ratio: tc.min_lr_ratio,
        auto_warmup_steps: tc.auto_warmup_steps,
        auto_warmup_rate: tc.auto_warmup_rate,
    };
    Ok((opt, schedule))
}

/// Load a checkpoint's adapters, optimizer moments and trainer state.
pub(super) fn resume(
    ck: &Path,
    saved: TrainerState,
    model: &mut VisualGlm,
    opt: &mut AdamW,
    fresh: TrainerState,
) -> Result<TrainerState> {
    let lora = crate::weights::read_safetensors(&ck.join("lora.safetensors"))?;
    crate::weights::load_into(
        model,
        lora.into_iter().map(Ok),
        crate::model::config::QkvLayout::Interleaved,
        crate::weights::Require::Lora,
        &ck.display().to_string(),
    )?;
    let ost: std::collections::HashMap<String, Tensor> =
        crate::weights::read_safetensors(&ck.join("optimizer.safetensors"))?
            .into_iter()
            .collect();
    opt.load_state(&ost, saved.opt_steps)?;
    crate::errln!("resuming from {} (step {})", ck.display(), saved.step);
    Ok(TrainerState {
        base_model: fresh.base_model,
        ..saved
    })
}

/// A checkpoint's `trainer_state.json`.
pub(super) fn read_state(ck: &Path) -> Result<TrainerState> {
    let path = ck.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}
