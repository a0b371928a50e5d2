//! The fine-tuning recipe: `setup` (device and ranks → data → model → optimizer → resume →
//! logs), then `run`: per iteration `step` (micro-batches, all-reduce, skip / loss scale,
//! optimizer), `log`, `validate`, `save`; then the final save.
//!
//! Reference: XrayGLM's `finetune_XrayGLM.sh` on sat 0.3.6 (docs/reference.md §5).

mod best;
mod rl;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::Device;

use super::checkpoint;
use super::metrics::{JsonLog, TensorBoard};
use super::optim::AdamW;
use super::progress::Progress;
use super::scaler::LossScaler;
use super::schedule::Schedule;
use super::setup::{
    base_source, held_out_batches, read_state, resume, setup_data, setup_model, setup_optimizer,
    setup_ranks,
};
use super::vision_cache::VisionCache;
use super::{Summary, TrainerState};
use crate::config::{Config, Method};
use crate::data::batch::{Batch, Dataset, Loader, LoaderState, Shard};
use crate::device::Dtype;
use crate::dist::Comm;
use crate::infer::chat::ChatModel;
use crate::tokenizer::ChatGlmTokenizer;

/// A fine-tuning run, set up and ready to train.
pub struct Trainer<'c> {
    cfg: &'c Config,
    dev: Device,
    comm: Box<dyn Comm>,
    run_dir: PathBuf,
    resumed: bool,
    /// The global batch and its split over this run's ranks and micro-batches.
    batch: super::elastic::GlobalBatch,
    /// Set when the run resumed on another number of ranks than saved its checkpoint.
    elastic_note: Option<(usize, String)>,
    /// The model being trained, with the tokenizer and prompt template to make reports with.
    chat: ChatModel,
    opt: AdamW,
    schedule: Schedule,
    state: TrainerState,
    train_ds: Arc<Dataset>,
    loader: Loader,
    val_batches: Vec<Batch>,
    vision_cache: Option<VisionCache>,
    logs: Logs,
    progress: Progress,
    /// The number of the signal received (0: none).
    stop: Arc<AtomicUsize>,
    window: Window,
    t0: Instant,
    first_loss: Option<f64>,
    first_val: Option<f64>,
    last_val: Option<f64>,
    /// The step of the last validation and of the last generation metrics (and those metrics).
    val_step: i64,
    last_gen: Option<(i64, crate::eval::Report)>,
    /// Reports on fixed held-out films (generation metrics and a generated `best_metric`).
    gen: Option<super::generation::GenEval>,
    /// The run's best checkpoint so far, and how many saves in a row did not beat it.
    best: Option<checkpoint::BestRecord>,
    misses: usize,
    /// The step of the last checkpoint this process saved (or took part in saving).
    saved_step: i64,
    /// Device memory in use, sampled at each log line (libtorch's cache keeps its peak reserved).
    peak_gpu_mib: f64,
    /// GRPO's and DPO's state (reference, reward, pairs); `None` for fine-tuning.
    rl: Option<rl::Rl>,
    /// How a fine-tuning step runs, for its FLOP count; the device's peak TFLOP/s (given or
    /// measured) and the model's parameters, for MFU, HFU and the old 6·N figure.
    flops_plan: crate::model::flops::StepPlan,
    peak_tflops: f64,
    params: f64,
}

/// Totals since the last log line.
struct Window {
    loss: f64,
    steps: usize,
    tokens: usize,
    samples: usize,
    /// Seconds spent in the per-step collectives (loss/flags + gradient bucket).
    comm_s: f64,
    /// The matmul FLOPs this rank's fine-tuning micro-batches ran.
    flops: crate::model::flops::StepFlops,
    start: Instant,
}

impl Window {
    fn new() -> Self {
        Self {
            loss: 0.0,
            steps: 0,
            tokens: 0,
            samples: 0,
            comm_s: 0.0,
            flops: Default::default(),
            start: Instant::now(),
        }
    }
}

/// Rank 0's logs; other ranks log nothing.
struct Logs {
    jsonl: Option<JsonLog>,
    tb: Option<TensorBoard>,
}

impl Logs {
    /// `metrics.jsonl` and TensorBoard events in the run folder (rank 0 only).
    fn open(run_dir: &Path, root: bool) -> Result<Self> {
        Ok(Logs {
            jsonl: root
                .then(|| JsonLog::open(&run_dir.join("metrics.jsonl")))
                .transpose()?,
            tb: root
                .then(|| TensorBoard::create(&run_dir.join("tb")))
                .transpose()?,
        })
    }

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

impl<'c> Trainer<'c> {
    /// Everything before the first step, in order; nothing is written until the inputs check out.
    pub fn setup(cfg: &'c Config, tokenizer: &ChatGlmTokenizer) -> Result<Self> {
        let t0 = Instant::now();
        let (dev, comm) = setup_ranks(cfg)?;
        let root = comm.rank() == 0;
        let run_dir = cfg.train.out_dir.join(&cfg.train.name);
        let resume_from = checkpoint::resume_from(&run_dir, &cfg.train.resume)?;
        // The global batch (kept from the checkpoint) and this world's share of it.
        let saved = resume_from.as_deref().map(read_state).transpose()?;
        let batch = super::elastic::resolve(cfg, comm.world_size(), saved.as_ref())?;
        let start_at = saved
            .as_ref()
            .map(|s| super::elastic::loader_position(s, &batch))
            .transpose()?;
        let elastic_note = saved
            .as_ref()
            .and_then(|s| super::elastic::change_note(s, &batch).map(|note| (s.world_size, note)));
        let source = base_source(cfg)?;
        let mut data = setup_data(cfg, tokenizer, source.sizes())?;
        // The inputs check out: only now is anything written.
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        if root {
            let n = checkpoint::remove_stale(&run_dir);
            if n > 0 {
                crate::errln!(
                    "removed {n} unfinished save(s) of an earlier process in {}",
                    run_dir.display()
                );
            }
        }
        let (mut model, base) =
            setup_model(cfg, source, dev, &run_dir, root, resume_from.is_some())?;
        // The adapters the run starts from, before a resume replaces them: the reference policy.
        let reference = (cfg.train.method != Method::Sft)
            .then(|| crate::train::policy::Reference::snapshot(&model));
        let rl = rl::Rl::setup(cfg, reference, &mut data, model.cfg.sat.max_sequence_length)?;
        let val_batches = held_out_batches(cfg, &data)?;
        let (mut opt, schedule) = setup_optimizer(cfg, &model)?;
        let mut state = fresh_state(cfg, base);
        if let (Some(ck), Some(saved), Some(at)) = (&resume_from, saved, start_at) {
            state = resume(ck, saved, &mut model, &mut opt, state)?;
            state.loader = at;
        }
        (state.world_size, state.grad_accum, state.global_batch) =
            (batch.world, batch.accum, batch.global);
        if root {
            // The config as it ran: the global batch and this world's accumulation resolved.
            let mut resolved = cfg.clone();
            resolved.train.global_batch_size = batch.global;
            resolved.train.grad_accum = batch.accum as i64;
            crate::io::write_atomic(&run_dir.join("config.toml"), resolved.to_toml()?.as_bytes())?;
            crate::io::write_json_atomic(&run_dir.join("model_config.json"), &model.cfg.to_sat())?;
        }
        // Every rank starts from rank 0's LoRA weights.
        crate::dist::lora::broadcast_lora(&model, comm.as_ref())?;
        let shard = Shard {
            rank: comm.rank(),
            world_size: comm.world_size(),
            accum: batch.accum,
        };
        if cfg.train.best_metric == crate::config::BestMetric::ValLoss && data.val.is_empty() {
            bail!(
                "train.best_metric = \"val_loss\" needs held-out films: set train.val_fraction > 0"
            );
        }
        let gen = super::generation::GenEval::setup(
            cfg,
            &data.val,
            &data.builder,
            &data.loader,
            &data.file,
        )?;
        let loader = Loader::new(Arc::clone(&data.train), data.loader, shard, state.loader)?;
        let logs = Logs::open(&run_dir, root)?;
        // SIGINT / SIGTERM: the loop saves a checkpoint and ends.
        let stop = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_usize(sig, Arc::clone(&stop), sig as usize)?;
        }
        let vision_cache = VisionCache::for_run(cfg);
        let progress = Progress::new(
            cfg.train.progress,
            root,
            cfg.train.train_iters as u64,
            state.step as u64,
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        );
        // The best checkpoint so far (a resume keeps it), by this run's metric.
        let best = checkpoint::read_best(&run_dir).filter(|b| b.metric == cfg.train.best_metric);
        let mut trainer = Self {
            cfg,
            dev,
            comm,
            run_dir,
            resumed: resume_from.is_some(),
            batch,
            elastic_note,
            chat: ChatModel::new(model, tokenizer.clone())?,
            opt,
            schedule,
            state,
            train_ds: data.train,
            loader,
            val_batches,
            vision_cache,
            logs,
            progress,
            stop,
            window: Window::new(),
            t0,
            first_loss: None,
            first_val: None,
            last_val: None,
            val_step: -1,
            last_gen: None,
            gen,
            best,
            misses: 0,
            saved_step: -1,
            peak_gpu_mib: 0.0,
            rl,
            flops_plan: crate::model::flops::StepPlan {
                checkpointed: cfg.train.checkpointed(),
                recompute_layers: cfg
                    .train
                    .checkpoint_layers
                    .recompute(None)
                    .unwrap_or(usize::MAX),
            },
            peak_tflops: cfg.train.peak_tflops,
            params: 0.0,
        };
        trainer.params = trainer.chat.model.parameter_counts().0 as f64;
        if trainer.peak_tflops == 0.0 {
            let kind = trainer.chat.model.kind();
            trainer.peak_tflops = crate::model::flops::matmul_tflops(dev, kind);
        }
        trainer.log_start()?;
        if cfg.train.checkpoint_layers == crate::config::CheckpointLayers::AUTO {
            trainer.plan_memory()?;
        }
        Ok(trainer)
    }

    /// Train to `train.train_iters` (or `stop_at`, or a signal), then save.
    pub fn run(mut self) -> Result<Summary> {
        let tc = &self.cfg.train;
        // The starting validation loss (not on a resume: the run logged it already).
        if !self.val_batches.is_empty() && !self.resumed {
            self.first_val = Some(self.validate()?);
        }
        // And the starting reports, for generation metrics to rise from.
        if tc.eval_generate_interval > 0 && !self.resumed {
            self.generate()?;
        }
        let mut signal = None;
        while self.state.step < tc.train_iters {
            // Stop together: a signal may reach the ranks at different steps.
            if let Some(sig) = self.agreed_signal()? {
                signal = Some(sig);
                break;
            }
            if tc.stop_at > 0 && self.state.step >= tc.stop_at {
                break;
            }
            let grad_norm = self.step()?;
            let step = self.state.step;
            if step % tc.log_interval == 0 || step == tc.train_iters {
                self.log(grad_norm)?;
            }
            if !self.val_batches.is_empty()
                && (step % tc.eval_interval == 0 || step == tc.train_iters)
            {
                self.validate()?;
            }
            if tc.eval_generate_interval > 0
                && (step % tc.eval_generate_interval == 0 || step == tc.train_iters)
            {
                self.generate()?;
            }
            if step % tc.save_interval == 0 && step < tc.train_iters {
                self.save()?;
                if self.early_stop() {
                    break;
                }
            }
        }
        self.progress.finish();
        // The final save (also after a signal), then the summary.
        if self.state.step > 0 && self.saved_step != self.state.step {
            self.save()?;
        }
        if signal.is_some() {
            crate::errln!(
                "stopped by signal at step {}; checkpoint saved in {}",
                self.state.step,
                self.run_dir.display()
            );
        }
        Ok(Summary {
            run_dir: self.run_dir,
            steps: self.state.step,
            skipped: self.state.skipped,
            first_loss: self.first_loss,
            last_loss: self.state.last_loss,
            first_val_loss: self.first_val,
            last_val_loss: self.last_val,
            seconds: self.t0.elapsed().as_secs_f64(),
            stopped_by_signal: signal.is_some(),
            signal,
        })
    }

    /// The signal any rank received (its number on that rank; SIGTERM on the others).
    fn agreed_signal(&self) -> Result<Option<i32>> {
        let got = self.stop.load(Ordering::Relaxed) as i32;
        let mut flag = [(got > 0) as u8 as f64];
        self.comm.all_reduce_sum_f64(&mut flag)?;
        Ok((flag[0] > 0.0).then_some(if got > 0 {
            got
        } else {
            signal_hook::consts::SIGTERM
        }))
    }

    /// One iteration of the run's method. Returns the gradient norm before clipping (NaN for a
    /// skipped step).
    fn step(&mut self) -> Result<f64> {
        let grad_norm = match self.cfg.train.method {
            Method::Sft => self.sft_step()?,
            Method::Grpo => self.grpo_step()?,
            Method::Dpo => self.dpo_step()?,
        };
        // The message is made only when a bar shows it.
        self.progress.set(self.state.step as u64, || {
            let ((tps, sps), lr) = (self.rate(), self.lr());
            format!(
                "loss {:.4} lr {lr:.2e} {tps:.0} tok/s {sps:.1} samples/s",
                self.state.last_loss
            )
        });
        Ok(grad_norm)
    }

    /// One fine-tuning iteration: the micro-batches' forward and backward, then the update.
    fn sft_step(&mut self) -> Result<f64> {
        self.opt.zero_grad();
        let scale = self.state.scaler.map(|s| s.scale).unwrap_or(1.0);
        let (loss_sum, bad_loss) = self.micro_batches(scale)?;
        self.state.loader = self.loader.state();
        self.state.step += 1;
        self.update(loss_sum, bad_loss, scale)
    }

    /// Gradients averaged over ranks, then the optimizer step — or a skipped step on a bad loss
    /// or an fp16 overflow. Returns the gradient norm before clipping (NaN for a skipped step).
    fn update(&mut self, loss_sum: f64, bad_loss: Option<String>, scale: f64) -> Result<f64> {
        let (loss, ok) = self.agree(loss_sum, bad_loss, scale)?;
        if ok {
            Ok(self.apply(loss))
        } else {
            self.state.skipped += 1;
            Ok(f64::NAN)
        }
    }

    /// Seed libtorch's generator and the dropout masks for a micro-batch.
    fn seed_micro(&self, seed: i64) {
        tch::manual_seed(seed);
        self.chat
            .model
            .set_dropout_seed(seed.wrapping_mul(31).wrapping_add(17));
    }

    /// The seed of micro-batch `micro` of the coming step on this rank: a function of the run's
    /// seed, the step and the micro-batch's place j = micro · W + rank in the global batch (the
    /// samples it holds, `data::batch`), so that a resumed run and a run on any number of ranks
    /// draw what one uninterrupted process accumulating the same global batch draws.
    fn micro_seed(&self, micro: i64) -> i64 {
        let b = &self.batch;
        let place = micro * b.world as i64 + self.comm.rank() as i64;
        let stride = (b.world * b.accum).max(64) as i64;
        (self.cfg.train.seed as i64)
            .wrapping_mul(1_000_003)
            .wrapping_add(self.state.step * stride + place)
    }

    /// Forward and backward of this step's micro-batches (gradients of `loss · scale`
    /// accumulated): the summed loss, or the first non-finite loss with the samples it came from.
    fn micro_batches(&mut self, scale: f64) -> Result<(f64, Option<String>)> {
        let tc = &self.cfg.train;
        let accum = self.batch.accum as i64;
        let mut loss_sum = 0.0;
        for micro in 0..accum {
            let b = self.loader.next().context("the loader ended")??;
            // Dropout masks depend only on (seed, step, micro-batch, layer): resume is exact and
            // activation checkpointing recomputes the same masks.
            self.seed_micro(self.micro_seed(micro));
            let t = b.to_tensors(self.dev);
            let misses = self.vision_cache.as_ref().map_or(0, |c| c.misses);
            let cached = self
                .vision_cache
                .as_mut()
                .map(|c| c.embeds(&self.chat.model, &b.images, &t.images));
            // The films the vision tower encodes in this micro-batch.
            let films = match &self.vision_cache {
                Some(c) => (c.misses - misses) as i64,
                None => t.images.size()[0],
            };
            let inputs = b.inputs(&t, cached.as_ref());
            let l =
                self.chat
                    .model
                    .loss_backward(&inputs, scale / accum as f64, tc.checkpointed())?;
            if !l.is_finite() {
                let ids: Vec<&str> = b
                    .indices
                    .iter()
                    .map(|&i| self.train_ds.records[i].id.as_str())
                    .collect();
                let bad = format!(
                    "loss {l} at step {} on samples {ids:?}",
                    self.state.step + 1
                );
                return Ok((loss_sum, Some(bad)));
            }
            let shape = crate::model::flops::StepShape {
                rows: b.batch_size as i64,
                seq: t.input_ids.size()[1],
                targets: b.target_tokens() as i64,
                films,
            };
            let f =
                crate::model::flops::training_step(&self.chat.model.cfg, &shape, &self.flops_plan);
            self.window.flops = self.window.flops.add(&f);
            self.window.tokens += b.target_tokens();
            self.window.samples += b.batch_size;
            loss_sum += l;
        }
        Ok((loss_sum, None))
    }

    /// Average gradients over ranks (the reference's mean of per-rank token means); the loss, a
    /// bad loss anywhere, and (through inf/NaN in the averaged gradients) an fp16 overflow are
    /// agreed by every rank, so all ranks skip or step together. Returns the mean loss and
    /// whether to step.
    fn agree(
        &mut self,
        loss_sum: f64,
        bad_loss: Option<String>,
        scale: f64,
    ) -> Result<(f64, bool)> {
        let rank = self.comm.rank();
        let mut scalars = [
            loss_sum / self.batch.accum as f64,
            bad_loss.is_some() as u8 as f64,
        ];
        let comm_t = Instant::now();
        self.comm.all_reduce_sum_f64(&mut scalars)?;
        let loss = scalars[0] / self.comm.world_size() as f64;
        crate::dist::lora::all_reduce_grads(self.opt.params(), self.comm.as_ref())?;
        self.window.comm_s += comm_t.elapsed().as_secs_f64();
        let ok = if let Some(msg) = bad_loss {
            crate::errln!("warning: rank {rank}: skipping step: {msg}");
            false
        } else if scalars[1] > 0.0 {
            crate::errln!(
                "warning: rank {rank}: skipping step {}: a bad loss on another rank",
                self.state.step
            );
            false
        } else if let Some(sc) = self.state.scaler.as_mut() {
            let overflow = !self.opt.grad_norm().double_value(&[]).is_finite();
            sc.update(overflow);
            if !overflow {
                self.opt.scale_grads(1.0 / scale);
            }
            !overflow
        } else {
            true
        };
        Ok((loss, ok))
    }

    /// Clip, step the optimizer at the schedule's rate, count the step. Returns the gradient
    /// norm before clipping.
    fn apply(&mut self, loss: f64) -> f64 {
        let grad_norm = self.opt.clip(self.cfg.train.clip_grad);
        self.opt.step(self.schedule.lr(self.state.opt_steps + 1));
        self.state.opt_steps += 1;
        self.state.last_loss = loss;
        self.first_loss.get_or_insert(loss);
        self.window.loss += loss;
        self.window.steps += 1;
        grad_norm
    }

    /// The current learning rate.
    fn lr(&self) -> f64 {
        self.schedule.lr(self.state.opt_steps.max(1))
    }

    /// Report tokens/s and samples/s of the current window.
    fn rate(&self) -> (f64, f64) {
        let secs = self.window.start.elapsed().as_secs_f64().max(1e-9);
        (
            self.window.tokens as f64 / secs,
            self.window.samples as f64 / secs,
        )
    }

    /// A log line: metrics.jsonl, TensorBoard, and a plain line where no bar is shown.
    fn log(&mut self, grad_norm: f64) -> Result<()> {
        let w = &self.window;
        let secs = w.start.elapsed().as_secs_f64();
        let avg = if w.steps > 0 {
            w.loss / w.steps as f64
        } else {
            f64::NAN
        };
        let (tps, sps) = (w.tokens as f64 / secs, w.samples as f64 / secs);
        let (step, lr, norm) = (self.state.step, self.lr(), grad_norm);
        let mut rec = serde_json::json!({
            "step": step, "loss": avg, "lr": lr, "grad_norm": norm,
            "loss_scale": self.state.scaler.map(|s| s.scale), "skipped": self.state.skipped,
            "tokens_per_s": tps, "samples_per_s": sps, "epoch": self.state.loader.epoch,
            "elapsed_s": self.t0.elapsed().as_secs_f64(), "rss_mib": super::metrics::rss_mib(),
            "peak_rss_mib": super::metrics::peak_rss_mib(),
        });
        if let Some(used) = crate::device::cuda_used_mib(self.dev) {
            self.peak_gpu_mib = self.peak_gpu_mib.max(used);
            rec["gpu_used_mib"] = serde_json::json!(used);
            rec["peak_gpu_used_mib"] = serde_json::json!(self.peak_gpu_mib);
        }
        if let Some(c) = &self.vision_cache {
            rec["vision_cache_hits"] = serde_json::json!(c.hits);
            rec["vision_cache_films"] = serde_json::json!(c.len());
        }
        // Utilization: this rank's matmul FLOPs per second against the device's peak.
        let mut utilization = String::new();
        if w.flops.model() > 0.0 {
            let peak = self.peak_tflops * 1e12;
            let (mfu, hfu) = (
                w.flops.model() / secs / peak,
                w.flops.hardware() / secs / peak,
            );
            let mfu_6n = crate::model::flops::six_n(self.params, w.tokens as f64) / secs / peak;
            rec["model_tflops_per_s"] = serde_json::json!(w.flops.model() / secs / 1e12);
            rec["hardware_tflops_per_s"] = serde_json::json!(w.flops.hardware() / secs / 1e12);
            rec["peak_tflops"] = serde_json::json!(self.peak_tflops);
            rec["mfu"] = serde_json::json!(mfu);
            rec["hfu"] = serde_json::json!(hfu);
            rec["mfu_6n"] = serde_json::json!(mfu_6n);
            utilization = format!(
                " MFU {:.1}% HFU {:.1}% (6N: {:.1}%)",
                100.0 * mfu,
                100.0 * hfu,
                100.0 * mfu_6n
            );
        }
        if self.comm.world_size() > 1 {
            rec["comm_fraction"] = serde_json::json!(w.comm_s / secs);
            rec["lora_rank_divergence"] = serde_json::json!(crate::dist::lora::lora_divergence(
                &self.chat.model,
                self.comm.as_ref()
            )?);
        }
        let rl = self
            .rl
            .as_mut()
            .map(|r| r.take_window())
            .unwrap_or_default();
        for (k, v) in &rl {
            rec[*k] = serde_json::json!(v);
        }
        self.logs.write(&rec)?;
        let mut sc = vec![
            ("train/loss", avg),
            ("train/lr", lr),
            ("train/grad_norm", norm),
            ("train/tokens_per_s", tps),
            ("train/samples_per_s", sps),
            ("memory/rss_mib", super::metrics::rss_mib()),
        ];
        if let Some(s) = self.state.scaler {
            sc.push(("train/loss_scale", s.scale));
        }
        for (tag, key) in [("perf/mfu", "mfu"), ("perf/hfu", "hfu")] {
            if let Some(v) = rec[key].as_f64() {
                sc.push((tag, v));
            }
        }
        sc.extend(rl.iter().copied());
        self.logs.scalars(step, &sc)?;
        let of = |k: &str| rl.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let extra = match (of("rl/reward"), of("rl/kl"), of("dpo/margin")) {
            (Some(r), kl, _) => format!(
                " reward {r:.4}{}",
                kl.map(|k| format!(" kl {k:.4}")).unwrap_or_default()
            ),
            (None, _, Some(m)) => format!(" margin {m:.4}"),
            _ => String::new(),
        };
        let total = self.cfg.train.train_iters;
        self.progress.line(step as u64, total as u64, || {
            format!(
                "step {step}/{total} loss {avg:.4}{extra} lr {lr:.3e} grad_norm {norm:.4} \
                 {tps:.0} tok/s {sps:.1} samples/s{utilization}"
            )
        });
        self.window = Window::new();
        Ok(())
    }

    /// The held-out loss (mean over the fixed validation batches), logged.
    fn validate(&mut self) -> Result<f64> {
        let mut total = 0.0;
        for b in &self.val_batches {
            let t = b.to_tensors(self.dev);
            let inputs = b.inputs(&t, None);
            let l = tch::no_grad(|| self.chat.model.loss(&inputs, false));
            total += l.double_value(&[]);
        }
        let v = total / self.val_batches.len().max(1) as f64;
        let step = self.state.step;
        self.logs.write(
            &serde_json::json!({"step": step, "val_loss": v, "val_ppl": v.min(20.0).exp()}),
        )?;
        self.logs
            .scalars(step, &[("val/loss", v), ("val/ppl", v.min(20.0).exp())])?;
        if let Progress::Lines { .. } = self.progress {
            crate::errln!("step {step}: validation loss {v:.4}");
        }
        self.last_val = Some(v);
        self.val_step = step;
        Ok(v)
    }

    /// Greedy reports on the fixed held-out films, scored and logged as `gen/*`.
    fn generate(&mut self) -> Result<crate::eval::Report> {
        let Some(gen) = &self.gen else {
            bail!("generation metrics were not set up");
        };
        let t = Instant::now();
        let r = gen.run(&self.chat, self.comm.as_ref())?;
        let step = self.state.step;
        let ce = r.ce.as_ref().map(|c| {
            let k = &c.collapse;
            (
                c.micro.f1,
                c.macro_f1,
                k.distinct_hypotheses,
                k.no_finding_hypotheses,
                k.length_ratio,
            )
        });
        let (ce_f1, macro_f1, distinct, no_finding, length_ratio) = ce.unwrap_or_default();
        let values = [
            ("gen/bleu_4", r.bleu_4),
            ("gen/rouge_l", r.rouge_l),
            ("gen/cider_d", r.cider_d),
            ("gen/ce_f1", ce_f1),
            ("gen/ce_macro_f1", macro_f1),
            ("gen/distinct_reports", distinct),
            ("gen/no_finding_share", no_finding),
            ("gen/length_ratio", length_ratio),
        ];
        let mut line = serde_json::json!({"step": step, "gen_films": gen.films(),
            "gen_seconds": t.elapsed().as_secs_f64()});
        for (k, v) in values {
            line[k] = serde_json::json!(v);
        }
        self.logs.write(&line)?;
        self.logs.scalars(step, &values)?;
        if let Progress::Lines { .. } = self.progress {
            crate::errln!(
                "step {step}: reports on {} held-out films: BLEU-4 {:.4}, CE-F1 {ce_f1:.3}",
                gen.films(),
                r.bleu_4
            );
        }
        self.last_gen = Some((step, r.clone()));
        Ok(r)
    }

    /// `train.checkpoint_layers = "auto"`: probe a worst-case micro-batch, recompute as few layers
    /// as fit the budget (see [`super::memory_plan`]), say so.
    fn plan_memory(&mut self) -> Result<()> {
        let tc = &self.cfg.train;
        let (rows, seq) = (
            self.cfg.loader.batch_size as i64,
            self.cfg.sample.max_seq_len() as i64,
        );
        let probe = super::memory_plan::probe(&mut self.chat.model, rows, seq)?;
        let budget = if tc.memory_budget_gib > 0.0 {
            tc.memory_budget_gib * (1u64 << 30) as f64
        } else {
            super::memory_plan::default_budget(self.dev)
        };
        let layers = self.chat.model.cfg.sat.num_layers as usize;
        let plan = super::memory_plan::plan(&probe, layers, budget);
        self.chat.model.set_recompute_layers(Some(plan.recompute));
        self.flops_plan.recompute_layers = plan.recompute;
        if self.comm.rank() == 0 {
            crate::errln!("{plan}");
            let mib = |b: f64| b / (1024.0 * 1024.0);
            self.logs.write(&serde_json::json!({
                "event": "memory_plan", "step": self.state.step, "layers": layers,
                "recompute": plan.recompute, "budget_mib": mib(plan.budget),
                "predicted_mib": mib(plan.predicted), "base_mib": mib(probe.base),
                "per_layer_mib": mib(probe.per_layer), "rows": rows, "seq": seq,
                "fits": plan.fits,
            }))?;
        }
        Ok(())
    }

    /// The start record and line: ranks, backend, device, parameters, global batch.
    fn log_start(&mut self) -> Result<()> {
        let (params, trainable) = self.chat.model.parameter_counts();
        if self.comm.rank() != 0 {
            return Ok(());
        }
        let (tc, world, b) = (&self.cfg.train, self.comm.world_size(), self.batch);
        let dev = self.dev;
        let mut start = serde_json::json!({
            "event": "start", "method": tc.method.name(), "step": self.state.step,
            "world_size": world, "hosts": self.comm.host_count(),
            "backend": self.comm.name(), "device": format!("{dev:?}"), "params": params,
            "trainable_params": trainable, "global_batch": b.global, "grad_accum": b.accum,
            "micro_batch": b.micro,
            "precision": tc.precision, "checkpoint_activations": tc.checkpoint_activations,
            "vision_cache": self.vision_cache.is_some(), "peak_tflops": self.peak_tflops,
        });
        if let Some((saved_world, _)) = &self.elastic_note {
            start["world_size_changed"] = serde_json::json!({"from": saved_world, "to": world});
        }
        self.logs.write(&start)?;
        crate::errln!(
            "{world} rank(s) on {} host(s), backend {}, {dev:?}; {:.3}B parameters, {:.2}M trainable (LoRA); global batch {b}",
            self.comm.host_count(),
            self.comm.name(),
            params as f64 / 1e9,
            trainable as f64 / 1e6,
        );
        if let Some((_, note)) = &self.elastic_note {
            crate::errln!("{note}");
        }
        Ok(())
    }
}

/// A run's state at step 0: the loss scaler of fp16 training, the base it adapts.
fn fresh_state(cfg: &Config, base_model: String) -> TrainerState {
    TrainerState {
        step: 0,
        opt_steps: 0,
        skipped: 0,
        loader: LoaderState::default(),
        scaler: (cfg.train.precision == Dtype::Fp16).then(|| {
            LossScaler::new(
                cfg.train.initial_scale_power,
                cfg.train.loss_scale_window,
                cfg.train.hysteresis,
                cfg.train.min_loss_scale,
            )
        }),
        base_model,
        last_loss: f64::NAN,
        world_size: 0,
        grad_accum: 0,
        global_batch: 0,
    }
}
