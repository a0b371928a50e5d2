//! `xrayglm finetune`: XrayGLM's LoRA fine-tuning recipe (`finetune_XrayGLM.sh` on sat 0.3.6,
//! VISUALGLM_SPEC.md §5) in one process — setup → train → save → cleanup, top to bottom.
//!
//! Run folder `<train.out_dir>/<train.name>/`:
//! `config.toml` (the resolved config), `model_config.json`, `base/` (the frozen weights, only when
//! they are a random preset), `<step>/lora.safetensors` (sat-compatible names),
//! `<step>/optimizer.safetensors`, `<step>/trainer_state.json`, `latest` (written last),
//! `metrics.jsonl`, `tb/` (TensorBoard). Every file is written atomically, so killing the process
//! at any moment leaves the previous checkpoint loadable.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod scaler;
pub mod schedule;
pub mod vision_cache;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::data::batch::{Batch, Dataset, Loader, LoaderConfig, LoaderState, Shard};
use crate::data::records::{load_records, Record};
use crate::data::rng::PyRandom;
use crate::data::sample::SampleBuilder;
use crate::model::chatglm::Dropouts;
use crate::model::config::ModelConfig;
use crate::model::visualglm::VisualGlm;
use crate::tokenizer::ChatGlmTokenizer;
use crate::weights::source::{load_model, LoadOptions};
use metrics::{JsonLog, TensorBoard};
use optim::{AdamW, AdamWConfig};
use scaler::LossScaler;
use schedule::Schedule;

/// Everything needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Iterations done (successful or skipped).
    pub step: i64,
    /// Successful optimizer steps (the schedule's counter).
    pub opt_steps: i64,
    pub skipped: i64,
    pub loader: LoaderState,
    pub scaler: Option<LossScaler>,
    /// The frozen base model: a directory (relative to the run folder when inside it).
    pub base_model: String,
    pub last_loss: f64,
}

/// What a run reports at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: i64,
    pub skipped: i64,
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub first_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub seconds: f64,
    pub stopped_by_signal: bool,
    /// The signal that stopped the run (SIGINT 2 / SIGTERM 15; SIGTERM when another rank got it):
    /// the process exits with 128 + it after saving, so schedulers see an interrupted run.
    pub signal: Option<i32>,
}

fn kind_of(s: &str) -> Result<Kind> {
    Ok(match s {
        "fp32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        "fp16" => Kind::Half,
        other => bail!("unknown dtype {other:?} (fp32, bf16, fp16)"),
    })
}

/// The seed of a fresh run's adapters: train.seed alone, so every fresh start of a run is the same
/// (a resume then loads its checkpoint's adapters over them).
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
    dev: Device,
    run_dir: &Path,
    root: bool,
    resuming: bool,
) -> Result<(VisualGlm, String)> {
    let m = &cfg.model;
    let kind = match cfg.train.precision.as_str() {
        "bf16" => Kind::BFloat16,
        "fp16" => Kind::Half,
        _ => kind_of(&m.dtype)?,
    };
    let (mut model, base) = if m.path.as_os_str().is_empty() {
        let base_dir = run_dir.join("base");
        if resuming && base_dir.join("model.safetensors").is_file() {
            let opts = LoadOptions {
                device: dev,
                kind,
                qkv_layout: None,
                lora: Some(Some(m.lora.clone())),
                rotary: m.rotary,
            };
            (fresh_lora(load_model(&base_dir, &opts)?, cfg), "base".to_string())
        } else {
            let mut mc = ModelConfig::preset(&m.preset)?;
            mc.lora = Some(m.lora.clone());
            mc.rotary = m.rotary;
            tch::manual_seed(cfg.train.seed as i64);
            let model = VisualGlm::new(mc, dev, kind)?;
            if root {
                crate::weights::source::save_base(&model, &base_dir)?;
            }
            (model, "base".to_string())
        }
    } else {
        let opts = LoadOptions {
            device: dev,
            kind,
            qkv_layout: Some(m.qkv_layout),
            lora: Some(Some(m.lora.clone())),
            rotary: m.rotary,
        };
        let abs = std::fs::canonicalize(&m.path)
            .with_context(|| format!("model.path {}", m.path.display()))?;
        (fresh_lora(load_model(&abs, &opts)?, cfg), abs.display().to_string())
    };
    model.set_fused_attention(m.fused_attention);
    // After the base of a random preset was saved above: a quantized model cannot be saved.
    if m.quantize == "int8" {
        model.quantize_int8();
    }
    model.set_dropout(
        m.vision_dropout,
        Dropouts {
            embedding: m.glm_dropout,
            attention: m.glm_dropout,
            output: m.glm_dropout,
        },
    );
    Ok((model, base))
}

/// Split records into train / validation deterministically.
pub fn split(records: Vec<Record>, fraction: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let n = records.len();
    let n_val = if fraction > 0.0 && n > 1 {
        ((n as f64 * fraction).ceil() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    PyRandom::from_key(&[seed as u32, (seed >> 32) as u32, 0x5eed]).shuffle(&mut order);
    let val_idx: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, r) in records.into_iter().enumerate() {
        if val_idx.contains(&i) {
            val.push(r)
        } else {
            train.push(r)
        }
    }
    (train, val)
}

struct Step<'a> {
    model: &'a VisualGlm,
    dev: Device,
}

impl Step<'_> {
    /// Loss of one batch (fp32 scalar tensor with graph when `train`).
    fn loss(&self, b: &Batch, train: bool) -> Result<Tensor> {
        let t = b.to_tensors(self.dev);
        Ok(self.model.loss(
            &t.input_ids,
            &t.images,
            b.pre_image as i64,
            &t.position_ids,
            &b.context_lengths,
            &t.labels,
            train,
        ))
    }

    fn eval(&self, batches: &[Batch]) -> Result<f64> {
        let mut total = 0.0;
        for b in batches {
            total += tch::no_grad(|| self.loss(b, false))?.double_value(&[]);
        }
        Ok(total / batches.len().max(1) as f64)
    }
}

/// Rank 0's logs; other ranks log nothing.
struct Logs {
    jsonl: Option<JsonLog>,
    tb: Option<TensorBoard>,
}

impl Logs {
    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        match &mut self.jsonl {
            Some(j) => j.write(v),
            None => Ok(()),
        }
    }

    fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        match &mut self.tb {
            Some(t) => t.scalars(step, values),
            None => Ok(()),
        }
    }
}

/// Sum the LoRA gradients of all ranks in one flat fp32 bucket (one all-reduce) and divide by
/// the world size.
fn all_reduce_grads(opt: &mut AdamW, comm: &dyn crate::dist::Comm) -> Result<()> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let parts: Vec<Tensor> = opt
        .slots
        .iter()
        .map(|s| {
            let g = s.param.grad();
            if g.defined() {
                g.to_kind(Kind::Float).flatten(0, -1)
            } else {
                s.param.zeros_like().flatten(0, -1)
            }
        })
        .collect();
    let mut flat = Tensor::cat(&parts, 0);
    comm.all_reduce_tensor(&mut flat)?;
    let avg = flat / world as f64;
    let mut off = 0;
    tch::no_grad(|| {
        for s in &mut opt.slots {
            let n = s.param.numel() as i64;
            let mut g = s.param.grad();
            if g.defined() {
                g.copy_(&avg.narrow(0, off, n).view_as(&s.param));
            }
            off += n;
        }
    });
    Ok(())
}

/// The LoRA tensors sorted by name, and all their values as one flat fp32 tensor (on their device).
fn lora_flat(model: &VisualGlm) -> (Vec<(String, Tensor)>, Tensor) {
    let mut vars: Vec<(String, Tensor)> = model.lora.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let parts: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.detach().to_kind(Kind::Float).flatten(0, -1))
        .collect();
    let flat = Tensor::cat(&parts, 0);
    (vars, flat)
}

/// Largest |θ_rank − mean θ| over all LoRA elements and ranks (0 when the ranks agree).
fn lora_divergence(model: &VisualGlm, comm: &dyn crate::dist::Comm) -> Result<f64> {
    let mine = Vec::<f32>::try_from(&lora_flat(model).1.to_device(Device::Cpu))?;
    let mut sum = mine.clone();
    comm.all_reduce_sum(&mut sum)?;
    let w = comm.world_size() as f32;
    let local = mine
        .iter()
        .zip(&sum)
        .map(|(a, s)| (a - s / w).abs())
        .fold(0f32, f32::max) as f64;
    let mut total = [local];
    comm.all_reduce_sum_f64(&mut total)?;
    Ok(total[0])
}

/// Make every rank's LoRA weights rank 0's.
fn broadcast_lora(model: &VisualGlm, comm: &dyn crate::dist::Comm) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let (mut vars, mut flat) = lora_flat(model);
    comm.broadcast_tensor(&mut flat, 0)?;
    let mut off = 0;
    tch::no_grad(|| {
        for (_, v) in vars.iter_mut() {
            let n = v.numel() as i64;
            v.copy_(&flat.narrow(0, off, n).view_as(v).to_kind(v.kind()));
            off += n;
        }
    });
    Ok(())
}

/// Resident memory of this process in MiB (Linux), for the logs.
fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

/// The largest resident set of this process so far.
fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Run the fine-tune described by `cfg`.
pub fn finetune(cfg: &Config, tokenizer: &ChatGlmTokenizer) -> Result<Summary> {
    // ---- setup ----
    let t0 = Instant::now();
    let tc = &cfg.train;
    let dev = match (
        cfg.model.device.as_str(),
        crate::device::parse(&cfg.model.device)?,
    ) {
        // One GPU per rank on a node.
        ("auto" | "cuda", tch::Device::Cuda(_)) => tch::Device::Cuda(
            crate::dist::launcher_ranks().2 % tch::Cuda::device_count().max(1) as usize,
        ),
        (_, d) => d,
    };
    let comm = crate::dist::init(
        &tc.backend,
        std::time::Duration::from_secs(tc.dist_timeout_s),
        match dev {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        },
    )?;
    crate::dist::check_same_config(comm.as_ref(), &cfg.to_toml()?)?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let root = rank == 0;
    let shard = Shard {
        rank,
        world_size: world,
    };
    let run_dir = tc.out_dir.join(&tc.name);
    let resume_from = checkpoint::resume_from(&run_dir, &tc.resume)?;
    crate::prepare::ensure_synthetic(cfg)?;
    let loaded = load_records(&cfg.data.path, &cfg.data.load_options())?;
    let file = loaded.file.display().to_string();
    let (train_records, val_records) = split(loaded.records, tc.val_fraction, tc.seed);
    // The prompt holds as many image slots as the model has query tokens.
    let mut sample_cfg = cfg.sample.clone();
    let model_sat = if cfg.model.path.as_os_str().is_empty() {
        ModelConfig::preset(&cfg.model.preset)?.sat
    } else {
        crate::weights::source::read_config(&crate::weights::source::resolve_run(&cfg.model.path))
            .with_context(|| format!("model.path {}", cfg.model.path.display()))?
            .sat
    };
    sample_cfg.image_length = model_sat.image_length as usize;
    if tc.checkpoint_layers > model_sat.num_layers {
        bail!(
            "train.checkpoint_layers {} exceeds the model's {} ChatGLM layers",
            tc.checkpoint_layers,
            model_sat.num_layers
        );
    }
    let builder = SampleBuilder::new(tokenizer.clone(), sample_cfg)?;
    let processor = cfg.image.processor();
    let mut loader_cfg = cfg.loader.clone();
    let pad_to = |mut ds: Dataset| -> Result<Dataset> {
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
    };
    if cfg.data.pad_to > 0 {
        loader_cfg.padding = crate::data::batch::Padding::Fixed;
    }
    let train_ds = Arc::new(pad_to(Dataset::new(
        train_records,
        &builder,
        processor,
        &file,
    )?)?);
    if train_ds.max_seq_len as i64 > model_sat.max_sequence_length {
        bail!(
            "the longest training sample has {} tokens, beyond the model's {} positions \
             (max_sequence_length): lower sample.max_source_length / sample.max_target_length",
            train_ds.max_seq_len,
            model_sat.max_sequence_length
        );
    }
    // The inputs check out: only now is anything written.
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if root {
        let n = checkpoint::remove_stale(&run_dir);
        if n > 0 {
            crate::errln!("removed {n} unfinished save(s) of an earlier process in {}", run_dir.display());
        }
    }
    let (mut model, base) = build_model(cfg, dev, &run_dir, root, resume_from.is_some())?;
    if model.cfg.sat.eva_args.image_size[0] as usize != cfg.image.size {
        bail!(
            "image.size {} does not match the model's image size {}",
            cfg.image.size,
            model.cfg.sat.eva_args.image_size[0]
        );
    }
    model.chatglm.recompute_layers =
        (tc.checkpoint_layers >= 0).then_some(tc.checkpoint_layers as usize);
    let val_batches: Vec<Batch> = if val_records.is_empty() {
        Vec::new()
    } else {
        let val_ds = Arc::new(pad_to(Dataset::new(
            val_records,
            &builder,
            processor,
            &file,
        )?)?);
        let vcfg = LoaderConfig {
            shuffle: false,
            ..loader_cfg.clone()
        };
        let vl = Loader::new(
            Arc::clone(&val_ds),
            vcfg,
            Shard::default(),
            LoaderState::default(),
        )?;
        let n = vl.batches_per_epoch().min(tc.eval_batches.max(1));
        vl.take(n).collect::<Result<Vec<_>>>()?
    };
    let lora_params: Vec<(String, Tensor)> = model.lora.variables().into_iter().collect();
    if lora_params.is_empty() {
        bail!("the model has no LoRA parameters to train (model.lora.layers is empty)");
    }
    let mut opt = AdamW::new(
        lora_params,
        AdamWConfig {
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        },
    );
    let schedule = Schedule {
        kind: tc.schedule,
        lr: tc.lr,
        train_iters: tc.train_iters,
        warmup: tc.warmup,
        min_lr_ratio: tc.min_lr_ratio,
        auto_warmup_steps: tc.auto_warmup_steps,
        auto_warmup_rate: tc.auto_warmup_rate,
    };
    let mut state = TrainerState {
        step: 0,
        opt_steps: 0,
        skipped: 0,
        loader: LoaderState::default(),
        scaler: (tc.precision == "fp16").then(|| {
            LossScaler::new(
                tc.initial_scale_power,
                tc.loss_scale_window,
                tc.hysteresis,
                tc.min_loss_scale,
            )
        }),
        base_model: base,
        last_loss: f64::NAN,
    };
    if let Some(ck) = &resume_from {
        let saved: TrainerState =
            serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json"))?)
                .with_context(|| format!("{}: trainer_state.json", ck.display()))?;
        let lora = crate::weights::read_safetensors(&ck.join("lora.safetensors"))?;
        crate::weights::load_into(
            &mut model,
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
        state = TrainerState {
            base_model: state.base_model,
            ..saved
        };
        crate::errln!("resuming from {} (step {})", ck.display(), state.step);
    }
    if root {
        crate::io::write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        crate::io::write_json_atomic(&run_dir.join("model_config.json"), &model.cfg.to_sat())?;
    }
    // Every rank starts from rank 0's LoRA weights.
    broadcast_lora(&model, comm.as_ref())?;
    let mut loader = Loader::new(Arc::clone(&train_ds), loader_cfg, shard, state.loader)?;
    let count =
        |vs: &tch::nn::VarStore| -> i64 { vs.variables().values().map(|t| t.numel() as i64).sum() };
    let (params, trainable) = (count(&model.base) + count(&model.lora), count(&model.lora));
    let mut logs = Logs {
        jsonl: if root {
            Some(JsonLog::open(&run_dir.join("metrics.jsonl"))?)
        } else {
            None
        },
        tb: if root {
            Some(TensorBoard::create(&run_dir.join("tb"))?)
        } else {
            None
        },
    };
    // The number of the signal received (0: none).
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, Arc::clone(&stop), sig as usize)?;
    }
    // Frozen vision without dropout: each film's embeddings are computed once.
    let mut vision_cache = (tc.vision_cache && cfg.model.vision_dropout == 0.0)
        .then(vision_cache::VisionCache::default);
    let bar = if tc.progress && root {
        let b = indicatif::ProgressBar::new(tc.train_iters as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("static template"),
        );
        b.set_position(state.step as u64);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    if root {
        let rec = serde_json::json!({
            "event": "start", "step": state.step, "world_size": world, "backend": comm.name(),
            "device": format!("{dev:?}"), "params": params, "trainable_params": trainable,
            "global_batch": world as i64 * cfg.loader.batch_size as i64 * tc.grad_accum,
            "precision": tc.precision, "checkpoint_activations": tc.checkpoint_activations,
            "vision_cache": vision_cache.is_some(),
        });
        logs.write(&rec)?;
        crate::errln!(
            "{world} rank(s), backend {}, {dev:?}; {:.3}B parameters, {:.2}M trainable (LoRA); global batch {}",
            comm.name(),
            params as f64 / 1e9,
            trainable as f64 / 1e6,
            rec["global_batch"]
        );
    }
    // ---- train ----
    let step_fn = Step { model: &model, dev };
    let mut first_loss = None;
    let first_val = if val_batches.is_empty() || resume_from.is_some() {
        None
    } else {
        Some(step_fn.eval(&val_batches)?)
    };
    if let Some(v) = first_val {
        logs.write(
            &serde_json::json!({"step": state.step, "val_loss": v, "val_ppl": v.min(20.0).exp()}),
        )?;
        logs.scalars(
            state.step,
            &[("val/loss", v), ("val/ppl", v.min(20.0).exp())],
        )?;
    }
    let mut last_val = first_val;
    let (mut window_loss, mut window_n, mut window_tokens, mut window_samples) =
        (0.0, 0, 0usize, 0usize);
    // Seconds spent in the per-step collectives (loss/flags + gradient bucket) in this window.
    let mut window_comm = 0.0;
    // Device memory in use, sampled at each log line (libtorch's cache keeps its peak reserved).
    let mut peak_gpu_mib = 0f64;
    let mut window_t = Instant::now();
    let mut stopped = false;
    let mut signal = None;
    while state.step < tc.train_iters {
        // Stop together: a signal may reach the ranks at different steps.
        let got = stop.load(Ordering::Relaxed) as i32;
        let mut flag = [(got > 0) as u8 as f64];
        comm.all_reduce_sum_f64(&mut flag)?;
        if flag[0] > 0.0 {
            stopped = true;
            signal = Some(if got > 0 { got } else { signal_hook::consts::SIGTERM });
            break;
        }
        if tc.stop_at > 0 && state.step >= tc.stop_at {
            break;
        }
        opt.zero_grad();
        let scale = state.scaler.map(|s| s.scale).unwrap_or(1.0);
        let mut loss_sum = 0.0;
        let mut bad_loss = None;
        for micro in 0..tc.grad_accum {
            let b = loader.next().context("the loader ended")??;
            // Dropout masks depend only on (seed, step, micro-batch, layer): resume is exact and
            // activation checkpointing recomputes the same masks.
            let seed = (tc.seed as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add(state.step * 64 + (rank as i64) * tc.grad_accum + micro);
            tch::manual_seed(seed);
            model
                .chatglm
                .layer_seed
                .set(Some(seed.wrapping_mul(31).wrapping_add(17)));
            let t = b.to_tensors(dev);
            let images = match vision_cache.as_mut() {
                Some(c) => c.embeds(&model, &b.images, &t.images),
                None => t.images.shallow_clone(),
            };
            let l = model.loss_backward(
                &t.input_ids,
                &images,
                b.pre_image as i64,
                &t.position_ids,
                &b.context_lengths,
                &t.labels,
                scale / tc.grad_accum as f64,
                tc.checkpoint_activations,
            )?;
            if !l.is_finite() {
                let ids: Vec<&str> = b
                    .indices
                    .iter()
                    .map(|&i| train_ds.records[i].id.as_str())
                    .collect();
                bad_loss = Some(format!(
                    "loss {l} at step {} on samples {ids:?}",
                    state.step + 1
                ));
                break;
            }
            window_tokens += b.target_tokens();
            window_samples += b.batch_size;
            loss_sum += l;
        }
        state.loader = loader.state();
        state.step += 1;
        // Average gradients over ranks (the reference's mean of per-rank token means); the loss,
        // a bad loss anywhere, and (through inf/NaN in the averaged gradients) an fp16 overflow
        // are agreed by every rank, so all ranks skip or step together.
        let mut scalars = [
            loss_sum / tc.grad_accum as f64,
            bad_loss.is_some() as u8 as f64,
        ];
        let tc0 = Instant::now();
        comm.all_reduce_sum_f64(&mut scalars)?;
        let loss = scalars[0] / world as f64;
        all_reduce_grads(&mut opt, comm.as_ref())?;
        window_comm += tc0.elapsed().as_secs_f64();
        let mut norm = f64::NAN;
        let ok = if let Some(msg) = bad_loss {
            crate::errln!("warning: rank {rank}: skipping step: {msg}");
            false
        } else if scalars[1] > 0.0 {
            crate::errln!(
                "warning: rank {rank}: skipping step {}: a bad loss on another rank",
                state.step
            );
            false
        } else if let Some(sc) = state.scaler.as_mut() {
            let scaled_norm = opt.grad_norm().double_value(&[]);
            let overflow = !scaled_norm.is_finite();
            sc.update(overflow);
            if !overflow {
                opt.scale_grads(1.0 / scale);
            }
            !overflow
        } else {
            true
        };
        if ok {
            norm = opt.clip(tc.clip_grad);
            let lr = schedule.lr(state.opt_steps + 1);
            opt.step(lr);
            state.opt_steps += 1;
            state.last_loss = loss;
            first_loss.get_or_insert(loss);
            window_loss += loss;
            window_n += 1;
        } else {
            state.skipped += 1;
        }
        bar.set_position(state.step as u64);
        let tps = window_tokens as f64 / window_t.elapsed().as_secs_f64().max(1e-9);
        let sps = window_samples as f64 / window_t.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {tps:.0} tok/s {sps:.1} samples/s",
            state.last_loss,
            schedule.lr(state.opt_steps.max(1))
        ));
        if state.step % tc.log_interval == 0 || state.step == tc.train_iters {
            let secs = window_t.elapsed().as_secs_f64();
            let avg = if window_n > 0 {
                window_loss / window_n as f64
            } else {
                f64::NAN
            };
            let rec = serde_json::json!({
                "step": state.step, "loss": avg, "lr": schedule.lr(state.opt_steps.max(1)), "grad_norm": norm,
                "loss_scale": state.scaler.map(|s| s.scale), "skipped": state.skipped,
                "tokens_per_s": window_tokens as f64 / secs, "samples_per_s": window_samples as f64 / secs,
                "epoch": state.loader.epoch, "elapsed_s": t0.elapsed().as_secs_f64(), "rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib(),
            });
            let mut rec = rec;
            if let Some(used) = crate::device::cuda_used_mib(dev) {
                peak_gpu_mib = peak_gpu_mib.max(used);
                rec["gpu_used_mib"] = serde_json::json!(used);
                rec["peak_gpu_used_mib"] = serde_json::json!(peak_gpu_mib);
            }
            if let Some(c) = &vision_cache {
                rec["vision_cache_hits"] = serde_json::json!(c.hits);
                rec["vision_cache_films"] = serde_json::json!(c.len());
            }
            if world > 1 {
                rec["comm_fraction"] = serde_json::json!(window_comm / secs);
                rec["lora_rank_divergence"] =
                    serde_json::json!(lora_divergence(&model, comm.as_ref())?);
            }
            logs.write(&rec)?;
            let mut sc = vec![
                ("train/loss", avg),
                ("train/lr", schedule.lr(state.opt_steps.max(1))),
                ("train/grad_norm", norm),
                ("train/tokens_per_s", window_tokens as f64 / secs),
                ("train/samples_per_s", window_samples as f64 / secs),
                ("memory/rss_mib", rss_mib()),
            ];
            if let Some(s) = state.scaler {
                sc.push(("train/loss_scale", s.scale));
            }
            logs.scalars(state.step, &sc)?;
            if !tc.progress {
                crate::errln!(
                    "step {}/{} loss {avg:.4} lr {:.3e} grad_norm {norm:.4}",
                    state.step,
                    tc.train_iters,
                    schedule.lr(state.opt_steps.max(1))
                );
            }
            (window_loss, window_n, window_tokens, window_samples) = (0.0, 0, 0, 0);
            window_comm = 0.0;
            window_t = Instant::now();
        }
        if !val_batches.is_empty()
            && (state.step % tc.eval_interval == 0 || state.step == tc.train_iters)
        {
            let v = step_fn.eval(&val_batches)?;
            last_val = Some(v);
            logs.write(&serde_json::json!({"step": state.step, "val_loss": v, "val_ppl": v.min(20.0).exp()}))?;
            logs.scalars(
                state.step,
                &[("val/loss", v), ("val/ppl", v.min(20.0).exp())],
            )?;
        }
        if root && state.step % tc.save_interval == 0 && state.step < tc.train_iters {
            checkpoint::save(&run_dir, &model, &opt, &state, tc.keep_last)?;
        }
    }
    bar.finish_and_clear();

    // ---- save + cleanup ----
    if root && state.step > 0 {
        checkpoint::save(&run_dir, &model, &opt, &state, tc.keep_last)?;
    }
    if stopped {
        crate::errln!(
            "stopped by signal at step {}; checkpoint saved in {}",
            state.step,
            run_dir.display()
        );
    }
    Ok(Summary {
        run_dir,
        steps: state.step,
        skipped: state.skipped,
        first_loss,
        last_loss: state.last_loss,
        first_val_loss: first_val,
        last_val_loss: last_val,
        seconds: t0.elapsed().as_secs_f64(),
        stopped_by_signal: stopped,
        signal,
    })
}

/// `xrayglm parity --train-steps N`: N optimizer steps on one fixed batch with the given
/// optimizer, schedule and clipping (no dropout), returning the per-step losses and learning
/// rates — to compare a trajectory with the original implementation's.
pub fn fixed_batch_steps(
    model: &VisualGlm,
    input_ids: &Tensor,
    image: &Tensor,
    labels: &Tensor,
    pre_image: i64,
    steps: usize,
    schedule: &Schedule,
    adam: AdamWConfig,
    clip: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let s = &model.cfg.sat;
    let (pos, ctx) = crate::model::chatglm::positions_from_ids(
        input_ids,
        s.bos_token_id,
        s.mask_token_id,
        s.gmask_token_id,
    )?;
    let mut opt = AdamW::new(model.lora.variables().into_iter().collect(), adam);
    let (mut losses, mut lrs) = (Vec::new(), Vec::new());
    for k in 1..=steps as i64 {
        opt.zero_grad();
        let l = model.loss_backward(input_ids, image, pre_image, &pos, &ctx, labels, 1.0, false)?;
        opt.clip(clip);
        let lr = schedule.lr(k);
        opt.step(lr);
        losses.push(l);
        lrs.push(lr);
    }
    Ok((losses, lrs))
}
