//! The engine's scheduler: which requests join (admission, checked into rows), which are
//! prefilled together (one batch per model group, prompt length and image placement), and the
//! groups of rows decoded together, each row beside its cache row.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::cache::{film_digest, prompt_digest, Digest, PromptEntry};
use super::output::{fail, Row};
use super::runner::{guarded, row_adapters, start_prefill};
use super::{AdapterBatching, Event, Job, Worker};
use crate::infer::sampling::{Sampler, ENGLISH_INVALID};
use crate::model::chatglm::{KvCache, PartialPrefill, SlotCache};
use crate::model::positions::Prefix;
use crate::tokenizer::ids;

/// Rows decoded together and their cache (row `i` of `rows` is row `i` of `cache`): the server's
/// requests (every live row in group 0 with [`AdapterBatching::PerRow`], or one group per
/// model), or a training rollout's samples ([`super::rollout`]).
pub(super) struct Group<R = Row> {
    pub(super) cache: SlotCache,
    pub(super) rows: Vec<R>,
}

impl<R> Default for Group<R> {
    fn default() -> Self {
        Self {
            cache: SlotCache::default(),
            rows: Vec::new(),
        }
    }
}

impl<R> Group<R> {
    /// Add `row`, whose prompt's keys and values are row `i` of `prefilled`.
    pub(super) fn join(&mut self, prefilled: &KvCache, i: i64, row: R) {
        self.cache.join(prefilled, i);
        self.rows.push(row);
    }

    /// Take row `i` out, its cache row with it (the last row takes its place).
    pub(super) fn remove(&mut self, i: usize) -> R {
        self.cache.swap_remove(i);
        self.rows.swap_remove(i)
    }

    /// Take every row out; the cache is freed.
    pub(super) fn clear(&mut self) -> Vec<R> {
        self.cache = SlotCache::default();
        std::mem::take(&mut self.rows)
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A request read and checked, ready for its prefill.
pub(super) struct Ready {
    pub(super) job: Job,
    pub(super) ids: Vec<i64>,
    pub(super) image_starts: Vec<i64>,
    /// Each film's content digest, and the whole prompt's (the caches' keys).
    pub(super) films: Vec<Digest>,
    pub(super) key: Digest,
    pub(super) row: Row,
}

impl Worker {
    /// Read and check a request: its prompt ids, limits and sampler. A bad one hears 400 and is
    /// dropped.
    pub(super) fn ready(&self, mut job: Job) -> Option<Ready> {
        let constraint = job.constraint.take();
        let c = &self.chat;
        let s = &job.settings;
        let checked = (|| -> Result<(Vec<i64>, Vec<i64>, Row)> {
            c.check_max_length(s.max_length)?;
            let (ids, image_starts) = c.prompt_ids_with_system(
                &job.system,
                &job.history,
                &job.query,
                s.english,
                job.images.len(),
            )?;
            crate::infer::chat::check_room(ids.len(), s.max_length)?;
            let mut sampling = s.sampling.clone();
            if s.english && !sampling.invalid.contains(&ENGLISH_INVALID) {
                sampling.invalid.push(ENGLISH_INVALID);
            }
            let mask_position = ids
                .iter()
                .position(|&t| t == ids::GMASK)
                .context("the prompt has no [gMASK]")?;
            let row = Row {
                model: job.model,
                events: job.events.clone(),
                sampler: Sampler::new(sampling)?,
                prompt_tokens: ids.len(),
                prefix: Prefix::new(ids.len() - 1, mask_position),
                max_length: s.max_length,
                max_new: job.max_new_tokens.unwrap_or(usize::MAX),
                reply: Vec::new(),
                shown: String::new(),
                stop: job.stop.iter().filter(|x| !x.is_empty()).cloned().collect(),
                arrived: job.arrived,
                last_token: None,
                constraint,
            };
            Ok((ids, image_starts, row))
        })();
        match checked {
            Ok((ids, image_starts, row)) => {
                let films: Vec<Digest> = job.images.iter().map(|p| film_digest(p)).collect();
                let key = prompt_digest(job.model, &ids, &image_starts, &films);
                Some(Ready {
                    job,
                    ids,
                    image_starts,
                    films,
                    key,
                    row,
                })
            }
            Err(e) => {
                fail(&job.events, 400, format!("{e:#}"));
                self.stats.finished.fetch_add(1, Ordering::SeqCst);
                None
            }
        }
    }

    /// The group a row of model `m` decodes in.
    pub(super) fn group_of(&self, m: usize) -> usize {
        match self.opts.adapter_batching {
            AdapterBatching::PerRow => 0,
            AdapterBatching::PerAdapter => m,
        }
    }

    /// Prefill the admitted requests — those sharing a prompt length and image placement as one
    /// batch (and, one batch per adapter, a model) — and let each row choose its first token. A
    /// prompt in the prompt cache is not prefilled: its row joins from the cache.
    pub(super) fn admit(&mut self, jobs: Vec<Job>) {
        let checked: Vec<Ready> = jobs
            .into_iter()
            .filter(|j| !j.events.is_closed())
            .filter_map(|j| self.ready(j))
            .collect();
        let mut ready = Vec::with_capacity(checked.len());
        for r in checked {
            let gi = self.group_of(r.job.model);
            match self.prompts.get(&r.key) {
                Some(hit) => {
                    let logits = hit.logits.shallow_clone();
                    let g = &mut self.groups[gi];
                    let _ = r.row.events.send(Event::Started {
                        prompt_tokens: r.row.prompt_tokens,
                    });
                    g.join(&hit.kv, 0, r.row);
                    let first = g.len() - 1;
                    self.choose(gi, &logits, first);
                }
                None => ready.push(r),
            }
        }
        while !ready.is_empty() {
            let key = |r: &Ready| {
                let g = self.group_of(r.job.model);
                (g, r.ids.len(), r.image_starts.clone())
            };
            let k = key(&ready[0]);
            let (batch, rest): (Vec<Ready>, Vec<Ready>) =
                ready.into_iter().partition(|r| key(r) == k);
            ready = rest;
            match guarded(|| start_prefill(&self.chat, &batch, &mut self.images)) {
                Err(e) => self.fail_batch(batch, &e),
                Ok(state) => self.pending.push_back(Pending {
                    batch,
                    group: k.0,
                    state,
                }),
            }
        }
    }

    /// Run the prefills under way, oldest first. With `budget` (rows are decoding: the step's
    /// token budget), each runs as many of its layers as the budget left after the decoding rows
    /// pays for — one layer at least for the first — and the rest wait for the next step; without
    /// one (nothing is decoding, so nothing waits on them), each runs to its end. A prefill that
    /// ends joins its rows to their group and they choose their first tokens.
    pub(super) fn advance(&mut self, budget: Option<usize>) {
        let layers = self.chat.model.chatglm.layers.len();
        let mut left = budget.map(|b| b.saturating_sub(self.decoding()));
        let mut first = true;
        while let Some(p) = self.pending.front_mut() {
            let (b, s) = p.state.shape();
            let run = match left {
                None => layers,
                Some(l) => layers_within(l, (b * s) as usize, layers, first),
            };
            if run == 0 {
                break;
            }
            first = false;
            let models: Vec<usize> = p.batch.iter().map(|r| r.job.model).collect();
            let adapters = row_adapters(&self.sets, &models, self.chat.model.device());
            let glm = &self.chat.model.chatglm;
            let state = &mut p.state;
            let out = guarded(|| Ok(glm.prefill_layers(state, run, Some(&adapters))));
            drop(adapters);
            self.stats.prefill_chunks.fetch_add(1, Ordering::SeqCst);
            if let Some(l) = left.as_mut() {
                *l = l.saturating_sub(chunk_cost(run, (b * s) as usize, layers));
            }
            match out {
                Ok(None) => break,
                Ok(Some(logits)) => {
                    let p = self.pending.pop_front().expect("the prefill just run");
                    self.finish_prefill(p, &logits);
                }
                Err(e) => {
                    let p = self.pending.pop_front().expect("the prefill just run");
                    self.fail_batch(p.batch, &e);
                }
            }
        }
    }

    /// A prefill has run its last layer: keep each prompt in the prompt cache, join the rows to
    /// their group and let them choose their first tokens.
    fn finish_prefill(&mut self, p: Pending, logits: &tch::Tensor) {
        let cache = &p.state.cache;
        if self.prompts.enabled() {
            for (i, r) in p.batch.iter().enumerate() {
                let (entry, bytes) = PromptEntry::of_row(cache, logits, i as i64);
                self.prompts.insert(r.key, entry, bytes);
            }
        }
        let g = &mut self.groups[p.group];
        let first = g.len();
        for (i, r) in p.batch.into_iter().enumerate() {
            let _ = r.row.events.send(Event::Started {
                prompt_tokens: r.row.prompt_tokens,
            });
            g.join(cache, i as i64, r.row);
        }
        self.choose(p.group, logits, first);
    }

    /// The requests of a batch whose prefill failed hear why.
    fn fail_batch(&self, batch: Vec<Ready>, e: &anyhow::Error) {
        for r in batch {
            fail(&r.row.events, 500, format!("{e:#}"));
            self.stats.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A batch of prompts being prefilled, a few layers per step.
pub(super) struct Pending {
    pub(super) batch: Vec<Ready>,
    /// The group its rows join.
    group: usize,
    state: PartialPrefill,
}

/// What running `layers` of `layers_total` layers over `tokens` prompt tokens costs, in tokens
/// through the whole model (the unit of the step's budget).
fn chunk_cost(layers: usize, tokens: usize, layers_total: usize) -> usize {
    (layers * tokens).div_ceil(layers_total.max(1))
}

/// How many layers of a prefill over `tokens` prompt tokens fit in `budget` (tokens through the
/// whole model); the step's first prefill runs one layer at least, so every prefill ends.
fn layers_within(budget: usize, tokens: usize, layers_total: usize, first: bool) -> usize {
    let per_layer = tokens.div_ceil(layers_total.max(1)).max(1);
    let fit = (budget / per_layer).min(layers_total);
    if first {
        fit.max(1)
    } else {
        fit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_buys_whole_layers() {
        // 4 layers over 800 tokens: 200 tokens a layer.
        assert_eq!(layers_within(1000, 800, 4, true), 4);
        assert_eq!(layers_within(450, 800, 4, true), 2);
        assert_eq!(layers_within(450, 800, 4, false), 2);
        // Too small for a layer: the first prefill of a step still runs one, a later one none.
        assert_eq!(layers_within(100, 800, 4, true), 1);
        assert_eq!(layers_within(100, 800, 4, false), 0);
        assert_eq!(layers_within(0, 800, 4, true), 1);
        assert_eq!(chunk_cost(2, 800, 4), 400);
        assert_eq!(chunk_cost(1, 10, 4), 3);
        // A prompt that fits runs whole, a tiny one too.
        assert_eq!(layers_within(1024, 1, 28, true), 28);
    }
}
