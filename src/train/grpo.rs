//! GRPO's update on one batch of prompts (Shao et al., arXiv 2402.03300; TRL's `GRPOTrainer`):
//! sample `G` replies per prompt through the engine's continuous batching, score them, turn the
//! rewards into group-relative advantages and accumulate the gradient of the clipped policy loss
//! ([`super::loss::GrpoLoss`]) into the adapters. One update per rollout (μ = 1), so the sampling
//! policy is the current one and the ratio is 1 with the gradient of `log π`. The KL term's
//! reference is a frozen copy of the adapters ([`Reference`]), its log-probs one extra forward in
//! eval mode. The prompts' film embeddings come computed (without a graph), so adapters on the
//! vision side get no gradient from this step.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use super::loss::{group_advantages, Completions, GrpoLoss, RewardScale};
use crate::data::sample::SampleBuilder;
use crate::infer::engine::rollout::{rollouts, Rollout, RolloutConfig, RolloutPrompt};
use crate::model::chatglm::ImageAt;
use crate::model::positions::{self, Prefix};
use crate::model::visualglm::{BatchInputs, Images, VisualGlm, IGNORE};
use crate::tokenizer::ids;

/// A record's prompt for rollouts or pairs: the training sample's prompt part (its films' blocks,
/// the earlier turns, the question, `[gMASK]`, `<sop>`) and the films' embeddings
/// `[films, image_length, hidden]`. A prompt followed by [`answer_ids`] and `<eop>` is the
/// training sample of that answer.
pub fn prompt_of(
    builder: &SampleBuilder,
    films: usize,
    history: &[(String, String)],
    question: &str,
    embeds: Option<Tensor>,
) -> Result<RolloutPrompt> {
    let s = builder.build_for(films, history, question, "")?;
    Ok(RolloutPrompt {
        ids: s.input_ids[..=s.context_length].to_vec(),
        prefix: s.prefix(),
        image_starts: s.image_starts.iter().map(|&i| i as i64).collect(),
        embeds,
    })
}

/// An answer's token ids, cut where training cuts a target (`sample.max_target_length − 2`).
pub fn answer_ids(builder: &SampleBuilder, answer: &str) -> Result<Vec<i64>> {
    let mut ids = builder.tokenizer().encode(answer)?;
    ids.truncate(builder.config().max_target_length.saturating_sub(2));
    Ok(ids)
}

/// What a GRPO step does.
#[derive(Debug, Clone)]
pub struct GrpoConfig {
    pub rollout: RolloutConfig,
    pub loss: GrpoLoss,
    pub scale: RewardScale,
}

/// What is logged of a step.
#[derive(Debug, Clone, Default)]
pub struct GrpoStats {
    pub loss: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Share of prompts whose replies all scored the same (no signal from them).
    pub zero_advantage_groups: f64,
    pub completion_tokens_mean: f64,
    pub clip_region: f64,
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

/// The frozen reference policy: the adapters a run starts from (the KL term's `π_ref`).
pub struct Reference {
    weights: Vec<(String, Tensor)>,
}

impl Reference {
    /// A copy of the model's adapters now.
    pub fn snapshot(model: &VisualGlm) -> Self {
        let mut weights: Vec<(String, Tensor)> = model
            .lora
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        Self { weights }
    }

    /// Per-token label log-probs of `b` under the reference (eval mode, no graph): one extra
    /// forward with the reference's adapters swapped in and the policy's put back.
    pub(super) fn label_logps(&self, model: &VisualGlm, b: &BatchInputs) -> Tensor {
        let vars = model.lora.variables();
        tch::no_grad(|| {
            let mut current = Vec::with_capacity(self.weights.len());
            for (k, w) in &self.weights {
                let mut v = vars[k].shallow_clone();
                current.push(v.copy());
                v.copy_(w);
            }
            let (logps, _) = model.label_logps(b, false);
            for ((k, _), c) in self.weights.iter().zip(&current) {
                vars[k].shallow_clone().copy_(c);
            }
            logps
        })
    }
}

/// One GRPO step's rollouts, rewards and backward pass (the optimizer step is the caller's).
/// `reward(prompt, reply)` scores a reply; the replies are also returned. `reference` is needed
/// when `cfg.loss.beta > 0`.
pub fn grpo_backward(
    model: &VisualGlm,
    prompts: &[RolloutPrompt],
    cfg: &GrpoConfig,
    reference: Option<&Reference>,
    reward: &mut dyn FnMut(usize, &Rollout) -> f64,
) -> Result<(GrpoStats, Vec<Rollout>)> {
    ensure!(
        cfg.loss.beta == 0.0 || reference.is_some(),
        "GRPO with a KL term (beta > 0) needs the reference policy"
    );
    let t = std::time::Instant::now();
    let replies = rollouts(&model.chatglm, prompts, &cfg.rollout)?;
    let rollout_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let rewards: Vec<f64> = replies.iter().map(|r| reward(r.prompt, r)).collect();
    let reward_s = t.elapsed().as_secs_f64();
    let g = cfg.rollout.group;
    let advantages = group_advantages(&rewards, g, cfg.scale);
    let dev = model.device();
    let batch = PolicyBatch::new(model, prompts, &replies)?;
    let t = std::time::Instant::now();
    let ref_logps = match reference {
        Some(r) if cfg.loss.beta != 0.0 => Some(r.label_logps(model, &batch.inputs())),
        _ => None,
    };
    let reference_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let (logps, mask) = model.label_logps(&batch.inputs(), true);
    let out = cfg.loss.compute(&Completions {
        logps: &logps,
        old_logps: None,
        ref_logps: ref_logps.as_ref(),
        advantages: &Tensor::from_slice(&advantages).to_device(dev),
        mask: &mask,
        batch_tokens: mask.sum(Kind::Double).double_value(&[]),
    })?;
    out.loss.backward();
    let policy_s = t.elapsed().as_secs_f64();
    let n = rewards.len().max(1) as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let flat = rewards
        .chunks(g)
        .filter(|grp| grp.iter().all(|&r| r == grp[0]))
        .count();
    let tokens: usize = replies
        .iter()
        .map(|r| r.tokens.len() + usize::from(r.ended))
        .sum();
    Ok((
        GrpoStats {
            loss: out.loss.double_value(&[]),
            reward_mean: mean,
            reward_std: (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt(),
            zero_advantage_groups: flat as f64 / prompts.len().max(1) as f64,
            completion_tokens_mean: tokens as f64 / n,
            clip_region: out.clip_region,
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

/// The replies as a training batch: each prompt followed by its reply (and `<eop>` when it
/// ended), right-padded, the reply's tokens the labels.
pub(super) struct PolicyBatch {
    input_ids: Tensor,
    labels: Tensor,
    position_ids: Tensor,
    context_lengths: Vec<i64>,
    embeds: Tensor,
    image_at: Vec<(i64, i64)>,
    rows: usize,
}

impl PolicyBatch {
    pub(super) fn new(
        model: &VisualGlm,
        prompts: &[RolloutPrompt],
        replies: &[Rollout],
    ) -> Result<Self> {
        let dev = model.device();
        let seqs: Vec<(Vec<i64>, usize)> = replies
            .iter()
            .map(|r| {
                let p = &prompts[r.prompt];
                let mut s = p.ids.clone();
                s.extend(&r.tokens);
                if r.ended {
                    s.push(ids::EOP);
                }
                (s, p.ids.len())
            })
            .collect();
        let len = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1);
        let (mut input, mut labels) = (Vec::new(), Vec::new());
        for (s, prompt_len) in &seqs {
            for i in 0..len {
                let t = s.get(i).copied();
                input.push(t.unwrap_or(ids::PAD));
                labels.push(match t {
                    Some(t) if i >= *prompt_len => t,
                    _ => IGNORE,
                });
            }
        }
        let b = replies.len() as i64;
        let prefixes: Vec<Prefix> = replies.iter().map(|r| prompts[r.prompt].prefix).collect();
        let mut films = Vec::new();
        let mut image_at = Vec::new();
        for (row, r) in replies.iter().enumerate() {
            let p = &prompts[r.prompt];
            if let Some(e) = &p.embeds {
                ensure!(
                    e.size()[0] as usize == p.image_starts.len(),
                    "a prompt's films and image slots differ in number"
                );
                films.push(e.shallow_clone());
                image_at.extend(p.image_starts.iter().map(|&s| (row as i64, s)));
            }
        }
        let s = &model.cfg.sat;
        let embeds = if films.is_empty() {
            Tensor::zeros([0, s.image_length, s.hidden_size], (model.kind(), dev))
        } else {
            Tensor::cat(&films, 0).to_device(dev)
        };
        Ok(Self {
            input_ids: Tensor::from_slice(&input)
                .view([b, len as i64])
                .to_device(dev),
            labels: Tensor::from_slice(&labels)
                .view([b, len as i64])
                .to_device(dev),
            position_ids: positions::batch(&prefixes, len as i64, dev),
            context_lengths: prefixes.iter().map(|p| p.context_length).collect(),
            embeds,
            image_at,
            rows: replies.len(),
        })
    }

    pub(super) fn inputs(&self) -> BatchInputs<'_> {
        BatchInputs {
            input_ids: &self.input_ids,
            images: Images::Embeds(&self.embeds),
            image_at: if self.image_at.is_empty() {
                ImageAt::Slots(&[])
            } else {
                ImageAt::of(&self.image_at, self.rows)
            },
            position_ids: &self.position_ids,
            context_lengths: &self.context_lengths,
            labels: &self.labels,
        }
    }
}
