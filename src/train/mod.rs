//! `xrayglm finetune`: XrayGLM's LoRA fine-tuning recipe (`finetune_XrayGLM.sh` on sat 0.3.6,
//! docs/reference.md §5) in one process — setup → train → save → cleanup, top to bottom.
//!
//! Run folder `<train.out_dir>/<train.name>/`:
//! `config.toml` (the resolved config), `model_config.json`, `base/` (the frozen weights, only when
//! they are a random preset), `<step>/lora.safetensors` (sat-compatible names),
//! `<step>/optimizer.safetensors`, `<step>/trainer_state.json`, `latest` (written last),
//! `metrics.jsonl`, `tb/` (TensorBoard). Every file is written atomically, so killing the process
//! at any moment leaves the previous checkpoint loadable.

pub use crate::logs::{metrics, progress};
pub mod checkpoint;
pub mod dpo;
pub mod elastic;
pub mod generation;
pub mod grpo;
pub mod loss;
pub mod memory_plan;
pub mod optim;
pub mod policy;
pub mod rl_pairs;
pub mod scaler;
pub mod schedule;
mod setup;
pub mod trainer;
pub mod vision_cache;

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::config::Config;
use crate::data::batch::LoaderState;
use crate::model::visualglm::VisualGlm;
use crate::tokenizer::ChatGlmTokenizer;
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
    /// The ranks, micro-batches per rank and samples per step of the run that wrote this state
    /// (0: not recorded): `loader` counts micro-batches of that split, and a resume on another
    /// number of ranks keeps the global batch ([`elastic`]).
    #[serde(default)]
    pub world_size: usize,
    #[serde(default)]
    pub grad_accum: usize,
    #[serde(default)]
    pub global_batch: usize,
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

/// Run the fine-tune described by `cfg` ([`trainer::Trainer`]: setup, then the training loop).
pub fn finetune(cfg: &Config, tokenizer: &ChatGlmTokenizer) -> Result<Summary> {
    trainer::Trainer::setup(cfg, tokenizer)?.run()
}

/// How [`fixed_batch_steps`] trains: steps, learning-rate schedule, AdamW and gradient clipping.
#[derive(Clone, Copy)]
pub struct FixedBatchRecipe<'a> {
    pub steps: usize,
    pub schedule: &'a Schedule,
    pub adam: AdamWConfig,
    pub clip: f64,
}

/// `xrayglm parity --train_steps N`: N optimizer steps on one fixed batch with the given
/// optimizer, schedule and clipping (no dropout), returning the per-step losses and learning
/// rates — to compare a trajectory with the original implementation's.
pub fn fixed_batch_steps(
    model: &VisualGlm,
    input_ids: &Tensor,
    image: &Tensor,
    labels: &Tensor,
    pre_image: i64,
    recipe: &FixedBatchRecipe,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let FixedBatchRecipe {
        steps,
        schedule,
        adam,
        clip,
    } = *recipe;
    let s = &model.cfg.sat;
    let (pos, ctx) = crate::model::positions::positions_from_ids(
        input_ids,
        s.bos_token_id,
        s.mask_token_id,
        s.gmask_token_id,
    )?;
    let mut opt = AdamW::new(model.lora.variables().into_iter().collect(), adam);
    let (mut losses, mut lrs) = (Vec::new(), Vec::new());
    for k in 1..=steps as i64 {
        opt.zero_grad();
        let inputs = crate::model::visualglm::BatchInputs {
            input_ids,
            images: crate::model::visualglm::Images::Pixels(image),
            image_at: crate::model::chatglm::ImageAt::EachRow(pre_image),
            position_ids: &pos,
            context_lengths: &ctx,
            labels,
        };
        let l = model.loss_backward(&inputs, 1.0, false)?;
        opt.clip(clip);
        let lr = schedule.lr(k);
        opt.step(lr);
        losses.push(l);
        lrs.push(lr);
    }
    Ok((losses, lrs))
}
