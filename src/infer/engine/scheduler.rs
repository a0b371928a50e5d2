//! The engine's scheduler: which requests join (admission, checked into rows), which are
//! prefilled together (one batch per model group, prompt length and image placement), and the
//! groups of rows decoded together, each row beside its cache row.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::output::{fail, Row};
use super::runner::{guarded, prefill, row_adapters};
use super::{AdapterBatching, Event, Job, Worker};
use crate::infer::sampling::{Sampler, ENGLISH_INVALID};
use crate::model::chatglm::{KvCache, SlotCache};
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
    pub(super) row: Row,
}

impl Worker {
    /// Read and check a request: its prompt ids, limits and sampler. A bad one hears 400 and is
    /// dropped.
    pub(super) fn ready(&self, job: Job) -> Option<Ready> {
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
            };
            Ok((ids, image_starts, row))
        })();
        match checked {
            Ok((ids, image_starts, row)) => Some(Ready {
                job,
                ids,
                image_starts,
                row,
            }),
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
    /// batch (and, one batch per adapter, a model) — and let each row choose its first token.
    pub(super) fn admit(&mut self, jobs: Vec<Job>) {
        let mut ready: Vec<Ready> = jobs
            .into_iter()
            .filter(|j| !j.events.is_closed())
            .filter_map(|j| self.ready(j))
            .collect();
        while !ready.is_empty() {
            let key = |r: &Ready| {
                let g = self.group_of(r.job.model);
                (g, r.ids.len(), r.image_starts.clone())
            };
            let k = key(&ready[0]);
            let (batch, rest): (Vec<Ready>, Vec<Ready>) =
                ready.into_iter().partition(|r| key(r) == k);
            ready = rest;
            let models: Vec<usize> = batch.iter().map(|r| r.job.model).collect();
            let dev = self.chat.model.device();
            let adapters = row_adapters(&self.sets, &models, dev);
            let prefilled = guarded(|| prefill(&self.chat, &batch, &adapters));
            drop(adapters);
            match prefilled {
                Err(e) => {
                    for r in batch {
                        fail(&r.row.events, 500, format!("{e:#}"));
                        self.stats.finished.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok((cache, logits)) => {
                    let gi = k.0;
                    let g = &mut self.groups[gi];
                    let first = g.len();
                    for (i, r) in batch.into_iter().enumerate() {
                        let _ = r.row.events.send(Event::Started {
                            prompt_tokens: r.row.prompt_tokens,
                        });
                        g.join(&cache, i as i64, r.row);
                    }
                    self.choose(gi, &logits, first);
                }
            }
        }
    }
}
