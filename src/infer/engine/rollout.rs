//! Rollouts for reinforcement learning, through the engine's continuous batching: `group` sampled
//! replies per prompt, the prompt prefilled once and its cache row joined by each of its samples,
//! then every live row decoded together whatever its length; a finished row leaves and the next
//! prompt's rows take its place.
//!
//! Each sample draws from its own generator, seeded from the rollout seed and the sample's index,
//! so a rollout does not depend on how many rows run together (`max_batch`) — a resumed run
//! samples what the uninterrupted one did.

use anyhow::{ensure, Result};
use tch::Tensor;

use super::scheduler::Group;
use crate::infer::sampling::{Sampler, SamplingConfig};
use crate::model::chatglm::ChatGlm;
use crate::model::positions::{self, Prefix};
use crate::tokenizer::ids;

/// One prompt to sample replies to.
pub struct RolloutPrompt {
    /// The prompt's ids, ending with `<sop>`.
    pub ids: Vec<i64>,
    pub prefix: Prefix,
    /// Where its films' embeddings go, and the embeddings `[films, image_length, hidden]`.
    pub image_starts: Vec<i64>,
    pub embeds: Option<Tensor>,
}

/// How the replies are sampled.
#[derive(Debug, Clone)]
pub struct RolloutConfig {
    /// Replies per prompt (GRPO's G).
    pub group: usize,
    /// Temperature, top-p, top-k, penalty; `seed` is the rollout's seed.
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    /// Rows decoded together at most (at least one prompt's group).
    pub max_batch: usize,
}

/// One sampled reply: `prompt`'s sample number `index % group`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub prompt: usize,
    /// The reply's tokens, without the end token.
    pub tokens: Vec<i64>,
    /// Whether it ended with `<eop>` (else it reached `max_new_tokens`).
    pub ended: bool,
}

/// A sample being decoded.
struct Sample {
    /// Index into the rollout's replies.
    out: usize,
    sampler: Sampler,
    prefix: Prefix,
}

/// The seed of sample `index` of a rollout seeded `seed`.
fn sample_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64)
}

/// `cfg.group` replies to each prompt, in prompt order (prompt `p`'s are `p·group .. (p+1)·group`).
pub fn rollouts(
    glm: &ChatGlm,
    prompts: &[RolloutPrompt],
    cfg: &RolloutConfig,
) -> Result<Vec<Rollout>> {
    ensure!(
        cfg.group >= 1,
        "a rollout needs at least one reply per prompt"
    );
    ensure!(cfg.max_new_tokens >= 1, "max_new_tokens must be at least 1");
    cfg.sampling.validate()?;
    let g = cfg.group;
    let mut out: Vec<Rollout> = (0..prompts.len() * g)
        .map(|i| Rollout {
            prompt: i / g,
            tokens: Vec::new(),
            ended: false,
        })
        .collect();
    let mut live: Group<Sample> = Group::default();
    let mut next = 0;
    tch::no_grad(|| -> Result<()> {
        while next < prompts.len() || !live.is_empty() {
            // Admit whole prompts while their rows fit.
            while next < prompts.len() && (live.is_empty() || live.len() + g <= cfg.max_batch) {
                let p = &prompts[next];
                let (cache, logits) = glm.prefill(
                    &[&p.ids],
                    &[p.prefix],
                    p.embeds.as_ref(),
                    &p.image_starts,
                    None,
                );
                for k in 0..g {
                    let i = next * g + k;
                    let mut sampler = Sampler::new(SamplingConfig {
                        seed: sample_seed(cfg.sampling.seed, i),
                        ..cfg.sampling.clone()
                    })?;
                    let t = sampler.next(&logits, &[&[] as &[i64]])?[0];
                    if push(&mut out[i], t, cfg.max_new_tokens) {
                        live.join(
                            &cache,
                            0,
                            Sample {
                                out: i,
                                sampler,
                                prefix: p.prefix,
                            },
                        );
                    }
                }
                next += 1;
            }
            if live.is_empty() {
                continue;
            }
            // One step: every live row its last token at its own position.
            let dev = glm.device();
            let (tokens, pos): (Vec<i64>, Vec<(Prefix, i64)>) = live
                .rows
                .iter()
                .zip(live.cache.lens())
                .map(|(s, &at)| {
                    (
                        *out[s.out].tokens.last().expect("a live row has a token"),
                        (s.prefix, at),
                    )
                })
                .unzip();
            let ids = Tensor::from_slice(&tokens)
                .view([tokens.len() as i64, 1])
                .to_device(dev);
            let pos = positions::step(&pos, dev);
            let logits = glm.forward_slots(&ids, &pos, &mut live.cache, None);
            let mut done = Vec::new();
            for (r, s) in live.rows.iter_mut().enumerate() {
                let reply = &out[s.out].tokens;
                let t = s
                    .sampler
                    .next(&logits.narrow(0, r as i64, 1), &[reply.as_slice()])?[0];
                if !push(&mut out[s.out], t, cfg.max_new_tokens) {
                    done.push(r);
                }
            }
            for &r in done.iter().rev() {
                live.remove(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Add token `t` to a reply; whether it goes on (not ended, room for another token).
fn push(r: &mut Rollout, t: i64, max_new: usize) -> bool {
    if t == ids::EOP {
        r.ended = true;
        return false;
    }
    r.tokens.push(t);
    r.tokens.len() < max_new
}
