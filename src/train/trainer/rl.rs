//! The trainer's iterations for `train.method = "grpo"` and `"dpo"` (docs/rl.md); the rest of the
//! run — data, checkpoints, resume, ranks, logs, `best` — is the fine-tuning recipe's.
//!
//! A GRPO iteration: each micro-batch's prompts get `rl.group` replies through the engine, each
//! micro-batch sampled from its own seed (a function of the run's seed, the step and the
//! micro-batch's place among every rank's, so a resumed run and a run on more ranks sample what
//! the uninterrupted single process did). The replies are scored on CPU threads while the frozen
//! reference scores their tokens; advantages come from every rank's rewards; then `rl.mu`
//! optimizer updates on that rollout batch. The token normalizations are over the whole rollout
//! batch of the step: `dapo` divides by its reply tokens over every rank and micro-batch, the
//! others average their micro-batches' values.
//!
//! A DPO iteration: each micro-batch's pairs, chosen and rejected after their prompt, against the
//! reference; the loss is averaged like the fine-tuning loss.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::super::dpo::{dpo_backward, TokenPair};
use super::super::grpo::{policy_loss, reply_tokens, GrpoConfig, PolicyStep, RewardStats};
use super::super::loss::{group_advantages, DpoLoss, GrpoLoss};
use super::super::policy::{prompt_of_sample, PolicyBatch, Reference};
use super::super::setup::Data;
use super::Trainer;
use crate::config::{Config, Method};
use crate::data::batch::Batch;
use crate::eval::metrics::Lang;
use crate::eval::reward::{Reward, Rewarder};
use crate::infer::engine::rollout::{rollouts, RolloutConfig, RolloutPrompt};
use crate::infer::sampling::{SamplingConfig, ENGLISH_INVALID};

/// What GRPO and DPO keep beside the fine-tuning recipe's state.
pub(super) struct Rl {
    /// The adapters the run started from (`train.init_from`'s), frozen.
    reference: Reference,
    /// GRPO: the reward, and the threads it is computed on.
    rewarder: Option<Rewarder>,
    threads: usize,
    grpo: GrpoConfig,
    /// DPO: the loss, and each training record's chosen and rejected answers as ids.
    dpo: DpoLoss,
    pairs: Vec<(Vec<i64>, Vec<i64>)>,
    english: bool,
    /// `rl.seed`, mixed into every rollout's seed.
    seed: u64,
    /// Sums and counts since the last log line, by name.
    window: BTreeMap<&'static str, (f64, usize)>,
}

/// One micro-batch's rollouts.
struct Micro {
    prompts: Vec<RolloutPrompt>,
    /// The reference report of each prompt.
    references: Vec<String>,
    replies: Vec<crate::infer::engine::rollout::Rollout>,
    batch: PolicyBatch,
    /// The films, when adapters on the vision side train (encoded again with the graph).
    pixels: Option<Tensor>,
}

impl Rl {
    /// For grpo and dpo; `reference` is the model's adapters before any resume.
    pub(super) fn setup(
        cfg: &Config,
        reference: Option<Reference>,
        data: &mut Data,
        max_positions: i64,
    ) -> Result<Option<Self>> {
        let Some(reference) = reference else {
            return Ok(None);
        };
        let r = &cfg.rl;
        let lang = Lang::of(cfg.sample.language);
        let rewarder = match cfg.train.method {
            Method::Grpo => {
                let longest = data
                    .train
                    .samples
                    .iter()
                    .map(|s| s.context_length + 1)
                    .max()
                    .unwrap_or(0);
                if (longest + r.max_new_tokens + 1) as i64 > max_positions {
                    bail!(
                        "rl.max_new_tokens = {}: the longest prompt ({longest} tokens) and its reply \
                         exceed the model's {max_positions} positions",
                        r.max_new_tokens
                    );
                }
                let corpus: Vec<String> =
                    data.train.records.iter().map(|r| r.label.clone()).collect();
                let rules = (!r.rules.as_os_str().is_empty()).then_some(r.rules.as_path());
                Some(
                    Rewarder::new(r.reward.clone(), lang, rules, &corpus)
                        .with_context(|| format!("rl.rules {}", r.rules.display()))?,
                )
            }
            _ => None,
        };
        let english = lang == Lang::En;
        let sampling = SamplingConfig {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k as i64,
            repetition_penalty: 1.0,
            greedy: false,
            seed: 0,
            invalid: if english {
                vec![ENGLISH_INVALID]
            } else {
                Vec::new()
            },
        };
        Ok(Some(Self {
            reference,
            rewarder,
            threads: if r.reward_threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                r.reward_threads
            },
            grpo: GrpoConfig {
                rollout: RolloutConfig {
                    group: r.group,
                    sampling,
                    max_new_tokens: r.max_new_tokens,
                    max_batch: r.max_batch,
                },
                loss: GrpoLoss {
                    norm: r.loss_type,
                    beta: r.beta,
                    epsilon_low: r.epsilon_low,
                    epsilon_high: r.epsilon_high,
                    max_completion_length: r.max_new_tokens as i64,
                },
                scale: r.scale_rewards,
            },
            dpo: DpoLoss {
                kind: r.dpo_loss,
                beta: r.dpo_beta,
            },
            pairs: std::mem::take(&mut data.pairs),
            english,
            seed: r.seed,
            window: BTreeMap::new(),
        }))
    }

    fn add(&mut self, name: &'static str, value: f64) {
        let e = self.window.entry(name).or_insert((0.0, 0));
        e.0 += value;
        e.1 += 1;
    }

    /// The window's means by name, and a fresh window.
    pub(super) fn take_window(&mut self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut self.window)
            .into_iter()
            .map(|(k, (sum, n))| (k, sum / n.max(1) as f64))
            .collect()
    }
}

impl Trainer<'_> {
    /// A batch's prompts (each with its films' embeddings, computed without a graph) and the
    /// films themselves when adapters on the vision side train.
    fn prompts_of(&mut self, b: &Batch) -> (Vec<RolloutPrompt>, Option<Tensor>) {
        let t = b.to_tensors(self.dev);
        let model = &self.chat.model;
        let embeds = match self.vision_cache.as_mut() {
            Some(c) => c.embeds(model, &b.images, &t.images),
            None => tch::no_grad(|| model.encode_image(&t.images.to_kind(model.kind()), false).2),
        };
        let prompts = b
            .indices
            .iter()
            .zip(b.films_per_row(&embeds))
            .map(|(&i, films)| prompt_of_sample(&self.train_ds.samples[i], Some(films)))
            .collect();
        let pixels = self.cfg.model.lora.targets.vision().then_some(t.images);
        (prompts, pixels)
    }

    /// Micro-batch `micro`'s prompts and their replies, sampled from the micro-batch's seed.
    fn rollout_micro(&mut self, rl: &Rl, micro: i64) -> Result<Micro> {
        let b = self.loader.next().context("the loader ended")??;
        let (prompts, pixels) = self.prompts_of(&b);
        let references = b
            .indices
            .iter()
            .map(|&i| self.train_ds.records[i].label.clone())
            .collect();
        let mut rc = rl.grpo.rollout.clone();
        rc.sampling.seed = (self.micro_seed(micro) as u64)
            ^ 0x005e_ed0f_7011_0075
            ^ rl.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let model = &self.chat.model;
        let replies = rollouts(&model.chatglm, &prompts, &rc)?;
        let batch = PolicyBatch::new(model, &prompts, &replies)?;
        self.window.samples += replies.len();
        Ok(Micro {
            prompts,
            references,
            replies,
            batch,
            pixels,
        })
    }

    /// One GRPO iteration: rollouts, rewards beside the reference's forward, advantages over
    /// every rank, then `rl.mu` optimizer updates. Returns the last update's gradient norm.
    pub(super) fn grpo_step(&mut self) -> Result<f64> {
        let mut rl = self.rl.take().context("GRPO was not set up")?;
        let out = self.grpo_iteration(&mut rl);
        self.rl = Some(rl);
        out
    }

    fn grpo_iteration(&mut self, rl: &mut Rl) -> Result<f64> {
        let accum = self.batch.accum as i64;
        let world = self.comm.world_size();
        // Rollouts, one micro-batch at a time.
        let t = Instant::now();
        let micros = (0..accum)
            .map(|k| self.rollout_micro(rl, k))
            .collect::<Result<Vec<_>>>()?;
        let rollout_s = t.elapsed().as_secs_f64();
        // Rewards on CPU threads while the reference scores the replies.
        let mut texts = Vec::new();
        for m in &micros {
            for r in &m.replies {
                let reply =
                    self.chat
                        .response_text(&m.prompts[r.prompt].ids, &r.tokens, rl.english)?;
                texts.push((reply, m.references[r.prompt].clone()));
            }
        }
        let temperature = rl.grpo.temperature();
        let (rewards, ref_logps, reward_s, reference_s) = std::thread::scope(|s| {
            let rewarder = rl.rewarder.as_ref().expect("GRPO has a rewarder");
            let (threads, texts) = (rl.threads, &texts);
            let scoring = s.spawn(move || {
                let t = Instant::now();
                (
                    rewarder.score_all(texts, threads),
                    t.elapsed().as_secs_f64(),
                )
            });
            let t = Instant::now();
            let refs: Vec<Option<Tensor>> = micros
                .iter()
                .map(|m| {
                    (rl.grpo.loss.beta != 0.0).then(|| {
                        rl.reference.logps(
                            &self.chat.model,
                            &m.batch,
                            m.pixels.as_ref(),
                            temperature,
                        )
                    })
                })
                .collect();
            let reference_s = t.elapsed().as_secs_f64();
            let (rewards, reward_s) = scoring.join().expect("the reward thread panicked");
            (rewards, refs, reward_s, reference_s)
        });
        // Advantages from every rank's rewards (each rank holds whole groups).
        let totals: Vec<f64> = rewards.iter().map(|r| r.total).collect();
        let (all, offset) = crate::dist::all_gather_f64(self.comm.as_ref(), &totals)?;
        let g = rl.grpo.rollout.group;
        let advantages =
            group_advantages(&all, g, rl.grpo.scale)[offset..][..totals.len()].to_vec();
        let mut sums = reward_sums(&rewards);
        let local_tokens: usize = micros.iter().map(|m| reply_tokens(&m.replies)).sum();
        sums.push(local_tokens as f64);
        self.comm.all_reduce_sum_f64(&mut sums)?;
        let tokens = sums.pop().unwrap_or(0.0);
        let batch_tokens = tokens / (world as f64 * accum as f64);
        self.state.loader = self.loader.state();
        self.state.step += 1;
        self.window.tokens += local_tokens;
        // μ optimizer updates on this rollout batch.
        let t = Instant::now();
        let mu = self.cfg.rl.mu;
        let mut old: Vec<Option<Tensor>> = (0..micros.len()).map(|_| None).collect();
        let mut grad_norm = f64::NAN;
        for it in 0..mu {
            self.opt.zero_grad();
            let scale = self.state.scaler.map(|s| s.scale).unwrap_or(1.0);
            let (mut loss_sum, mut bad) = (0.0, None);
            let mut first = 0;
            for (k, m) in micros.iter().enumerate() {
                self.seed_micro(self.micro_seed(k as i64).wrapping_add(it as i64 * 7919));
                let n = m.replies.len();
                let (out, logps, entropy) = policy_loss(
                    &self.chat.model,
                    &PolicyStep {
                        batch: &m.batch,
                        pixels: m.pixels.as_ref(),
                        advantages: &advantages[first..first + n],
                        ref_logps: ref_logps[k].as_ref(),
                        old_logps: old[k].as_ref(),
                        batch_tokens,
                    },
                    &rl.grpo,
                )?;
                first += n;
                let l = out.loss.double_value(&[]);
                if !l.is_finite() {
                    bad = Some(format!("GRPO loss {l} at step {}", self.state.step));
                    break;
                }
                (&out.loss * (scale / accum as f64)).backward();
                loss_sum += l;
                if mu > 1 && it == 0 {
                    old[k] = Some(logps);
                }
                rl.add("rl/entropy", entropy);
                rl.add("rl/clip_fraction", out.clip_region);
                if let Some(kl) = out.kl {
                    rl.add("rl/kl", kl);
                }
            }
            grad_norm = self.update(loss_sum, bad, scale)?;
        }
        // What is logged of the iteration.
        let stats = RewardStats::of(&all, g);
        let n = all.len().max(1) as f64;
        rl.add("rl/reward", stats.mean);
        rl.add("rl/reward_std", stats.std);
        rl.add("rl/zero_advantage_groups", stats.zero_advantage_groups);
        for (name, sum) in REWARD_TERMS.iter().zip(&sums) {
            rl.add(name, sum / n);
        }
        rl.add("rl/completion_tokens", tokens / n);
        rl.add(
            "rl/rollout_tokens_per_s",
            local_tokens as f64 / rollout_s.max(1e-9),
        );
        rl.add("rl/rollout_s", rollout_s);
        rl.add("rl/reward_s", reward_s);
        rl.add("rl/reference_s", reference_s);
        rl.add("rl/policy_s", t.elapsed().as_secs_f64());
        Ok(grad_norm)
    }

    /// One DPO iteration: each micro-batch's pairs against the reference, then the update.
    pub(super) fn dpo_step(&mut self) -> Result<f64> {
        let mut rl = self.rl.take().context("DPO was not set up")?;
        let out = self.dpo_iteration(&mut rl);
        self.rl = Some(rl);
        out
    }

    fn dpo_iteration(&mut self, rl: &mut Rl) -> Result<f64> {
        let accum = self.batch.accum as i64;
        self.opt.zero_grad();
        let scale = self.state.scaler.map(|s| s.scale).unwrap_or(1.0);
        let (mut loss_sum, mut bad) = (0.0, None);
        for micro in 0..accum {
            let b = self.loader.next().context("the loader ended")??;
            self.seed_micro(self.micro_seed(micro));
            let (prompts, pixels) = self.prompts_of(&b);
            let pairs: Vec<TokenPair> = prompts
                .into_iter()
                .zip(&b.indices)
                .map(|(prompt, &i)| TokenPair {
                    prompt,
                    chosen: rl.pairs[i].0.clone(),
                    rejected: rl.pairs[i].1.clone(),
                })
                .collect();
            let out = dpo_backward(
                &self.chat.model,
                &pairs,
                pixels.as_ref(),
                &rl.dpo,
                &rl.reference,
                scale / accum as f64,
            )?;
            let l = out.loss.double_value(&[]);
            if !l.is_finite() {
                bad = Some(format!("DPO loss {l} at step {}", self.state.step + 1));
                break;
            }
            loss_sum += l;
            self.window.samples += pairs.len();
            self.window.tokens += pairs
                .iter()
                .map(|p| p.chosen.len() + p.rejected.len() + 2)
                .sum::<usize>();
            rl.add("dpo/chosen_reward", out.chosen_reward);
            rl.add("dpo/rejected_reward", out.rejected_reward);
            rl.add("dpo/margin", out.chosen_reward - out.rejected_reward);
            rl.add("dpo/accuracy", out.accuracy);
        }
        self.state.loader = self.loader.state();
        self.state.step += 1;
        self.update(loss_sum, bad, scale)
    }
}

/// The logged names of the reward's terms, in [`reward_sums`]' order.
const REWARD_TERMS: [&str; 6] = [
    "rl/reward_ce_f1",
    "rl/reward_rouge_l",
    "rl/reward_bleu_4",
    "rl/reward_cider_d",
    "rl/reward_length",
    "rl/reward_contradiction",
];

/// Each term of the rewards, summed.
fn reward_sums(rewards: &[Reward]) -> Vec<f64> {
    let mut s = vec![0.0; REWARD_TERMS.len()];
    for r in rewards {
        for (acc, v) in s.iter_mut().zip([
            r.ce_f1,
            r.rouge_l,
            r.bleu_4,
            r.cider_d,
            r.length,
            r.contradiction,
        ]) {
            *acc += v;
        }
    }
    s
}
