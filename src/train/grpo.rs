//! GRPO (Shao et al., arXiv 2402.03300; TRL's `GRPOTrainer`): sample `G` replies per prompt
//! through the engine's continuous batching, score them, turn the rewards into group-relative
//! advantages and follow the gradient of the clipped policy loss ([`super::loss::GrpoLoss`]).
//!
//! The pieces — [`policy_loss`] on one micro-batch, [`RewardStats`] of a rollout batch — are what
//! the trainer runs over its micro-batches and ranks; [`grpo_backward`] is one whole step on one
//! batch in one process. Log-probabilities are taken at the sampling temperature (the
//! distribution the replies came from), as TRL does.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use super::loss::{group_advantages, Completions, GrpoLoss, GrpoOut, RewardScale};
use super::policy::{PolicyBatch, Reference};
use crate::infer::engine::rollout::{rollouts, Rollout, RolloutConfig, RolloutPrompt};
use crate::model::visualglm::VisualGlm;

/// What a GRPO step does.
#[derive(Debug, Clone)]
pub struct GrpoConfig {
    pub rollout: RolloutConfig,
    pub loss: GrpoLoss,
    pub scale: RewardScale,
}

impl GrpoConfig {
    /// The temperature replies are sampled at, and their log-probs taken at.
    pub fn temperature(&self) -> f64 {
        self.rollout.sampling.temperature
    }
}

/// Summary of a rollout batch's rewards.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RewardStats {
    pub mean: f64,
    pub std: f64,
    /// Share of prompts whose replies all scored the same (no signal from them).
    pub zero_advantage_groups: f64,
}

impl RewardStats {
    /// Of `rewards` in groups of `group` consecutive replies.
    pub fn of(rewards: &[f64], group: usize) -> Self {
        let n = rewards.len().max(1) as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let groups = rewards.chunks(group.max(1));
        let count = groups.len().max(1) as f64;
        let flat = groups.filter(|g| g.iter().all(|&r| r == g[0])).count();
        Self {
            mean,
            std: (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt(),
            zero_advantage_groups: flat as f64 / count,
        }
    }
}

/// Tokens sampled in `replies` (their end tokens included).
pub fn reply_tokens(replies: &[Rollout]) -> usize {
    replies
        .iter()
        .map(|r| r.tokens.len() + usize::from(r.ended))
        .sum()
}

/// One micro-batch of replies, as [`policy_loss`] takes it.
pub struct PolicyStep<'a> {
    pub batch: &'a PolicyBatch,
    /// The prompts' films to encode again with the graph (adapters on the vision side).
    pub pixels: Option<&'a Tensor>,
    /// One per reply.
    pub advantages: &'a [f64],
    pub ref_logps: Option<&'a Tensor>,
    /// The log-probs when the replies were sampled (for updates after the first on one rollout;
    /// `None`: the current policy's, so the ratio is 1).
    pub old_logps: Option<&'a Tensor>,
    /// [`super::loss::GrpoNorm::Dapo`]'s denominator.
    pub batch_tokens: f64,
}

/// One micro-batch's policy loss: the policy's log-probs of its replies (with the graph), and
/// [`GrpoLoss::compute`] with their advantages. Returns the loss terms, the log-probs (no graph)
/// and the mean entropy per reply token.
pub fn policy_loss(
    model: &VisualGlm,
    step: &PolicyStep,
    cfg: &GrpoConfig,
) -> Result<(GrpoOut, Tensor, f64)> {
    let out = step
        .batch
        .policy_logps(model, step.pixels, cfg.temperature(), true);
    let n = out.mask.sum(Kind::Double).double_value(&[]).max(1.0);
    let entropy = (out.entropy.as_ref().expect("entropies were asked for") * &out.mask)
        .sum(Kind::Double)
        .double_value(&[])
        / n;
    let loss = cfg.loss.compute(&Completions {
        logps: &out.logps,
        old_logps: step.old_logps,
        ref_logps: step.ref_logps,
        advantages: &Tensor::from_slice(step.advantages).to_device(model.device()),
        mask: &out.mask,
        batch_tokens: step.batch_tokens,
    })?;
    Ok((loss, out.logps.detach(), entropy))
}

/// What is logged of a step.
#[derive(Debug, Clone, Default)]
pub struct GrpoStats {
    pub loss: f64,
    pub rewards: RewardStats,
    pub completion_tokens_mean: f64,
    pub clip_region: f64,
    pub entropy: f64,
    pub kl: Option<f64>,
    /// Tokens sampled (replies and their end tokens).
    pub rollout_tokens: usize,
    /// Seconds spent sampling, scoring, in the reference's forward, and in the policy's forward
    /// and backward.
    pub rollout_s: f64,
    pub reward_s: f64,
    pub reference_s: f64,
    pub policy_s: f64,
}

/// One GRPO step on `prompts` in one process (one update per rollout, the optimizer step the
/// caller's): rollouts, `reward(replies)` (one score per reply), advantages, the reference's
/// log-probs when `cfg.loss.beta > 0`, and the policy loss's backward. Returns the replies too.
pub fn grpo_backward(
    model: &VisualGlm,
    prompts: &[RolloutPrompt],
    cfg: &GrpoConfig,
    reference: Option<&Reference>,
    reward: &dyn Fn(&[Rollout]) -> Vec<f64>,
) -> Result<(GrpoStats, Vec<Rollout>)> {
    ensure!(
        cfg.loss.beta == 0.0 || reference.is_some(),
        "GRPO with a KL term (beta > 0) needs the reference policy"
    );
    let t = std::time::Instant::now();
    let replies = rollouts(&model.chatglm, prompts, &cfg.rollout)?;
    let rollout_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let rewards = reward(&replies);
    ensure!(rewards.len() == replies.len(), "one reward per reply");
    let reward_s = t.elapsed().as_secs_f64();
    let advantages = group_advantages(&rewards, cfg.rollout.group, cfg.scale);
    let batch = PolicyBatch::new(model, prompts, &replies)?;
    let t = std::time::Instant::now();
    let ref_logps = match reference {
        Some(r) if cfg.loss.beta != 0.0 => Some(r.logps(model, &batch, None, cfg.temperature())),
        _ => None,
    };
    let reference_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let tokens = reply_tokens(&replies);
    let (out, _, entropy) = policy_loss(
        model,
        &PolicyStep {
            batch: &batch,
            pixels: None,
            advantages: &advantages,
            ref_logps: ref_logps.as_ref(),
            old_logps: None,
            batch_tokens: tokens as f64,
        },
        cfg,
    )?;
    out.loss.backward();
    let policy_s = t.elapsed().as_secs_f64();
    Ok((
        GrpoStats {
            loss: out.loss.double_value(&[]),
            rewards: RewardStats::of(&rewards, cfg.rollout.group),
            completion_tokens_mean: tokens as f64 / replies.len().max(1) as f64,
            clip_region: out.clip_region,
            entropy,
            kl: out.kl,
            rollout_tokens: tokens,
            rollout_s,
            reward_s,
            reference_s,
            policy_s,
        },
        replies,
    ))
}
