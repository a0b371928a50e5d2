//! `xrayglm bench rl`: GRPO's rollouts through the engine's continuous batching (G replies per
//! prompt from one prefill, every row decoded together) against the same number of replies
//! generated one film at a time, and the time split of a GRPO step.

use std::time::Instant;

use anyhow::Result;

use crate::infer::engine::rollout::{rollouts, Rollout, RolloutConfig, RolloutPrompt};
use crate::infer::sampling::SamplingConfig;
use crate::model::positions::Prefix;
use crate::tokenizer::ids;
use crate::train::grpo::{grpo_backward, GrpoConfig};
use crate::train::loss::{GrpoLoss, GrpoNorm, RewardScale};
use crate::train::policy::Reference;

/// `xrayglm bench rl`: rollout tokens/s of a preset with random weights.
#[derive(clap::Args, Debug, Clone)]
pub struct RlArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Prompts (films) per rollout.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Replies per prompt (GRPO's G).
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
}

/// What `xrayglm bench rl` measured.
#[derive(Debug, Clone)]
pub struct RlBench {
    pub args: RlArgs,
    pub threads: i32,
    /// Sampled tokens per second through the engine, and one reply at a time.
    pub engine_tps: f64,
    pub one_tps: f64,
    /// A GRPO step (β > 0): seconds of rollout, reward, reference forward, policy update.
    pub step: [f64; 4],
    /// The reference's log-probs with the policy's forward and backward, seconds: one extra
    /// forward (eval, no graph), or the reference's rows in the policy's batch routed to its
    /// adapters; and the largest difference between the two ways' reference log-probs.
    pub reference: [f64; 2],
    pub reference_diff: f64,
    /// The largest difference between the policy's and the reference's log-probs there (what
    /// the agreement is measured against).
    pub policy_diff: f64,
}

/// Goal from the issue: rollouts through the engine at least this many times faster than one
/// film at a time, at G = 8.
pub const GOAL_ROLLOUT_RATIO: f64 = 3.0;

impl std::fmt::Display for RlBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.args;
        writeln!(
            f,
            "rl bench: preset {}, {} prompts with a film x G = {}, {} new tokens each (random weights: \
             every reply runs to the limit), sampled, {} threads",
            a.preset, a.prompts, a.group, a.new_tokens, self.threads
        )?;
        let ratio = self.engine_tps / self.one_tps;
        writeln!(
            f,
            "  rollouts: engine {:9.1} tokens/s   one at a time {:9.1} tokens/s   {ratio:.2}x; goal >= {GOAL_ROLLOUT_RATIO}x at G = 8: {}",
            self.engine_tps,
            self.one_tps,
            if ratio >= GOAL_ROLLOUT_RATIO { "met" } else { "NOT met" }
        )?;
        let [r, w, rf, p] = self.step;
        let total = (r + w + rf + p).max(1e-12);
        writeln!(
            f,
            "  GRPO step {total:.2} s: rollout {:.0} %, reward {:.0} %, reference {:.0} %, policy update {:.0} %",
            100.0 * r / total,
            100.0 * w / total,
            100.0 * rf / total,
            100.0 * p / total
        )?;
        let [extra, routed] = self.reference;
        writeln!(
            f,
            "  reference + policy forward/backward: extra forward {extra:.3} s   in the batch (per-row adapters) {routed:.3} s   {:.2}x; log-probs agree to {:.1e} (the policy's differ by {:.1e})",
            routed / extra.max(1e-12),
            self.reference_diff,
            self.policy_diff
        )
    }
}

/// Run the rollout benchmark (see [`RlBench`]).
pub fn rl(a: &RlArgs) -> Result<RlBench> {
    use crate::model::config::ModelConfig;
    use crate::model::visualglm::VisualGlm;
    anyhow::ensure!(
        a.prompts >= 1 && a.group >= 1,
        "--prompts and --group must be at least 1"
    );
    anyhow::ensure!(a.new_tokens >= 1, "--new_tokens must be at least 1");
    let cfg = ModelConfig::preset(&a.preset)?;
    let dev = tch::Device::Cpu;
    tch::manual_seed(3);
    let model = VisualGlm::new(cfg.clone(), dev, tch::Kind::Float)?;
    let (_, images) = super::model_inputs(&cfg, a.prompts as i64, 64, dev);
    let embeds = tch::no_grad(|| model.encode_image(&images, false).2);
    let l = cfg.sat.image_length as usize;
    let prompts: Vec<RolloutPrompt> = (0..a.prompts)
        .map(|p| {
            // "<img>" slots, then a question of a length that differs between prompts.
            let mut ids_: Vec<i64> = vec![20, 21, 22];
            ids_.extend(std::iter::repeat_n(ids::UNK, l));
            ids_.extend((0..(8 + 3 * p) as i64).map(|i| 30 + i));
            ids_.extend([ids::GMASK, ids::SOP]);
            RolloutPrompt {
                prefix: Prefix::new(ids_.len() - 1, ids_.len() - 2),
                ids: ids_,
                image_starts: vec![3],
                embeds: Some(embeds.narrow(0, p as i64, 1)),
            }
        })
        .collect();
    let sampling = SamplingConfig {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        greedy: false,
        seed: 9,
        invalid: Vec::new(),
    };
    let rc = RolloutConfig {
        group: a.group,
        sampling: sampling.clone(),
        max_new_tokens: a.new_tokens,
        max_batch: a.prompts * a.group,
    };
    let tokens = |r: &[Rollout]| -> usize {
        r.iter()
            .map(|x| x.tokens.len() + usize::from(x.ended))
            .sum()
    };
    // Warm up, then the engine's way and one reply at a time (its own prefill each).
    rollouts(
        &model.chatglm,
        &prompts[..1],
        &RolloutConfig {
            group: 1,
            ..rc.clone()
        },
    )?;
    let t = Instant::now();
    let engine = rollouts(&model.chatglm, &prompts, &rc)?;
    let engine_tps = tokens(&engine) as f64 / t.elapsed().as_secs_f64();
    let one = RolloutConfig {
        group: 1,
        max_batch: 1,
        ..rc.clone()
    };
    let t = Instant::now();
    let mut n = 0;
    for (i, p) in prompts.iter().enumerate() {
        for k in 0..a.group {
            let mut c = one.clone();
            c.sampling.seed = sampling.seed + (i * a.group + k) as u64;
            n += tokens(&rollouts(&model.chatglm, std::slice::from_ref(p), &c)?);
        }
    }
    let one_tps = n as f64 / t.elapsed().as_secs_f64();
    // A GRPO step with the KL term, its reward the reply's length.
    let grpo = GrpoConfig {
        rollout: rc,
        loss: GrpoLoss {
            norm: GrpoNorm::Dapo,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            max_completion_length: a.new_tokens as i64,
        },
        scale: RewardScale::Group,
    };
    let reference = Reference::snapshot(&model);
    let (s, _) = grpo_backward(&model, &prompts, &grpo, Some(&reference), &|rs| {
        rs.iter().map(|r| r.tokens.len() as f64).collect()
    })?;
    // A reference and a policy that differ from each other and from the base (adapters B
    // nonzero), so that the two ways are compared on something.
    let perturb = || {
        tch::no_grad(|| {
            for (k, mut v) in model.lora.variables() {
                if k.contains("matrix_B") {
                    v.copy_(&(v.randn_like() * 0.02));
                }
            }
        })
    };
    perturb();
    let reference = Reference::snapshot(&model);
    perturb();
    let (reference_s, reference_diff, policy_diff) =
        reference_ways(&model, &prompts, &engine, &reference)?;
    Ok(RlBench {
        args: a.clone(),
        threads: tch::get_num_threads(),
        engine_tps,
        one_tps,
        step: [s.rollout_s, s.reward_s, s.reference_s, s.policy_s],
        reference: reference_s,
        reference_diff,
        policy_diff,
    })
}

/// The reference's log-probs of `replies` beside the policy's forward and backward, two ways
/// (best of two runs each): one extra forward with the reference's adapters swapped in, or one
/// forward of twice the rows, the second half routed to the reference's adapters. Returns the
/// seconds of each, the largest difference of their reference log-probs and the largest
/// difference between the policy's and the reference's.
fn reference_ways(
    model: &crate::model::visualglm::VisualGlm,
    prompts: &[RolloutPrompt],
    replies: &[Rollout],
    reference: &Reference,
) -> Result<([f64; 2], f64, f64)> {
    use crate::model::chatglm::RowAdapters;
    use crate::train::policy::PolicyBatch;
    use tch::{Kind, Tensor};
    let n = replies.len() as i64;
    let batch = PolicyBatch::new(model, prompts, replies)?;
    let extra = || {
        let t = Instant::now();
        let r = reference.logps(model, &batch, None, 1.0);
        let p = batch.policy_logps(model, None, 1.0, false);
        let policy = p.logps.detach();
        (p.logps * p.mask).sum(Kind::Float).backward();
        (t.elapsed().as_secs_f64(), r, policy)
    };
    let twice: Vec<Rollout> = replies.iter().chain(replies).cloned().collect();
    let both = PolicyBatch::new(model, prompts, &twice)?;
    let (_store, layers) = reference.layers(model);
    let dev = model.device();
    let routed = || {
        let t = Instant::now();
        let groups = RowAdapters {
            groups: vec![
                (Some(Tensor::arange(n, (Kind::Int64, dev))), None),
                (
                    Some(Tensor::arange_start(n, 2 * n, (Kind::Int64, dev))),
                    Some(layers.as_slice()),
                ),
            ],
        };
        let embeds = both.slot_embeds(None);
        let out = model.label_logps_with(&both.inputs(&embeds), true, 1.0, false, Some(&groups));
        let r = out.logps.narrow(0, n, n).detach();
        (out.logps.narrow(0, 0, n) * out.mask.narrow(0, 0, n))
            .sum(Kind::Float)
            .backward();
        (t.elapsed().as_secs_f64(), r)
    };
    let (mut best_extra, mut best_routed) = (f64::INFINITY, f64::INFINITY);
    let (mut diff, mut policy_diff) = (0.0f64, 0.0f64);
    for _ in 0..2 {
        let (te, re, policy) = extra();
        policy_diff = policy_diff.max((&policy - &re).abs().max().double_value(&[]));
        let (tr, rr) = routed();
        best_extra = best_extra.min(te);
        best_routed = best_routed.min(tr);
        let w = re.size()[1].min(rr.size()[1]);
        diff = diff.max(
            (re.narrow(1, 0, w) - rr.narrow(1, 0, w))
                .abs()
                .max()
                .double_value(&[]),
        );
    }
    Ok(([best_extra, best_routed], diff, policy_diff))
}
