//! DPO's update on a batch of preference pairs (Rafailov et al., arXiv 2305.18290; TRL's
//! `DPOTrainer`): each pair's chosen and rejected answers after their prompt, in one batch; their
//! sequence log-probabilities under the policy and under the frozen reference ([`Reference`]);
//! the gradient of [`super::loss::DpoLoss`] accumulated into the adapters.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use super::loss::{DpoLoss, DpoOut, Pairs};
use super::policy::{PolicyBatch, Reference};
use crate::infer::engine::rollout::{Rollout, RolloutPrompt};
use crate::model::visualglm::VisualGlm;

/// One pair as token ids: the prompt (ending with `<sop>`) and the two answers (each without its
/// end token, which is added).
pub struct TokenPair {
    pub prompt: RolloutPrompt,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
}

/// One DPO micro-batch's forward passes and the backward of its loss times `scale` (the optimizer
/// step is the caller's). `pixels`: the pairs' films `[films, 3, S, S]` in pair order, to encode
/// again with the graph when adapters on the vision side train.
pub fn dpo_backward(
    model: &VisualGlm,
    pairs: &[TokenPair],
    pixels: Option<&Tensor>,
    loss: &DpoLoss,
    reference: &Reference,
    scale: f64,
) -> Result<DpoOut> {
    ensure!(!pairs.is_empty(), "a DPO step needs at least one pair");
    let n = pairs.len();
    let prompts: Vec<RolloutPrompt> = pairs
        .iter()
        .map(|p| RolloutPrompt {
            ids: p.prompt.ids.clone(),
            prefix: p.prompt.prefix,
            image_starts: p.prompt.image_starts.clone(),
            embeds: p.prompt.embeds.as_ref().map(|e| e.shallow_clone()),
        })
        .collect();
    // Rows 0..n the chosen answers, n..2n the rejected ones, each ended by `<eop>`.
    let answers: Vec<Rollout> = (0..2 * n)
        .map(|i| Rollout {
            prompt: i % n,
            tokens: if i < n {
                pairs[i].chosen.clone()
            } else {
                pairs[i - n].rejected.clone()
            },
            ended: true,
        })
        .collect();
    let batch = PolicyBatch::new(model, &prompts, &answers)?;
    let reference_logps = reference.logps(model, &batch, pixels, 1.0);
    let out = batch.policy_logps(model, pixels, 1.0, false);
    let (logps, mask) = (out.logps, out.mask);
    let seq = (&logps * &mask).sum_dim_intlist(-1, false, Kind::Float);
    let ref_seq = (reference_logps * &mask).sum_dim_intlist(-1, false, Kind::Float);
    let tokens = mask.sum_dim_intlist(-1, false, Kind::Float);
    let half =
        |t: &tch::Tensor, first: bool| t.narrow(0, if first { 0 } else { n as i64 }, n as i64);
    let out = loss.compute(&Pairs {
        chosen: &half(&seq, true),
        rejected: &half(&seq, false),
        ref_chosen: &half(&ref_seq, true),
        ref_rejected: &half(&ref_seq, false),
        chosen_tokens: &half(&tokens, true),
        rejected_tokens: &half(&tokens, false),
    });
    (&out.loss * scale).backward();
    Ok(out)
}
