//! The engine's model runner: the prefill of a batch of prompts, one decoding step of a group
//! (every row its last token at its own position), each row with its model's adapters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::cache::{own, tensor_bytes, Digest, ImageCache};
use super::output::fail;
use super::scheduler::Ready;
use super::Worker;
use crate::infer::chat::ChatModel;
use crate::infer::generate::image_embeds;
use crate::model::chatglm::{LayerLoras, PartialPrefill, RowAdapters};
use crate::model::positions::{self, Prefix};

impl Worker {
    /// One decoding step for group `gi`'s rows.
    pub(super) fn step(&mut self, gi: usize) {
        // Rows whose client went away leave first.
        let g = &mut self.groups[gi];
        for i in (0..g.len()).rev() {
            if g.rows[i].events.is_closed() {
                g.remove(i);
                self.stats.finished.fetch_add(1, Ordering::SeqCst);
            }
        }
        if g.is_empty() {
            return;
        }
        let dev = self.chat.model.device();
        let (tokens, pos): (Vec<i64>, Vec<(Prefix, i64)>) = g
            .rows
            .iter()
            .zip(g.cache.lens())
            .map(|(r, &at)| {
                let last = *r.reply.last().expect("a live row has chosen a token");
                (last, (r.prefix, at))
            })
            .unzip();
        let b = tokens.len() as i64;
        let ids = Tensor::from_slice(&tokens).view([b, 1]).to_device(dev);
        let pos = positions::step(&pos, dev);
        let mut cache = std::mem::take(&mut g.cache);
        let models: Vec<usize> = g.rows.iter().map(|r| r.model).collect();
        let adapters = row_adapters(&self.sets, &models, dev);
        let out = guarded(|| {
            Ok(tch::no_grad(|| {
                self.chat
                    .model
                    .chatglm
                    .forward_slots(&ids, &pos, &mut cache, Some(&adapters))
            }))
        });
        drop(adapters);
        self.groups[gi].cache = cache;
        self.stats.steps.fetch_add(1, Ordering::SeqCst);
        self.stats.step_rows.fetch_add(b as usize, Ordering::SeqCst);
        self.stats.metrics.step(b as usize);
        match out {
            Ok(logits) => self.choose(gi, &logits, 0),
            Err(e) => {
                for r in self.groups[gi].clear() {
                    fail(&r.events, 500, format!("{e:#}"));
                    self.stats.finished.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

/// The start of the first pass over a batch of prompts of one length and image placement: the
/// films encoded (or found in the image cache) and the embeddings in place, no layer run yet
/// ([`crate::model::chatglm::ChatGlm::prefill_layers`] runs them).
pub(super) fn start_prefill(
    chat: &ChatModel,
    batch: &[Ready],
    images: &mut ImageCache,
) -> Result<PartialPrefill> {
    let model = &chat.model;
    let ids: Vec<&[i64]> = batch.iter().map(|r| r.ids.as_slice()).collect();
    let prefixes: Vec<Prefix> = batch.iter().map(|r| r.row.prefix).collect();
    // Every row's films in row order (the rows share one placement): those not in the image
    // cache are encoded together and kept.
    let films: Vec<(&Arc<Vec<f32>>, &Digest)> = batch
        .iter()
        .flat_map(|r| r.job.images.iter().zip(&r.films))
        .collect();
    let mut embeds: Vec<Option<Tensor>> = films
        .iter()
        .map(|(_, d)| images.get(d).map(|e| e.shallow_clone()))
        .collect();
    let missing: Vec<usize> = (0..films.len()).filter(|&i| embeds[i].is_none()).collect();
    if !missing.is_empty() {
        let s = chat.images.size as i64;
        let px: Vec<Tensor> = missing
            .iter()
            .map(|&i| Tensor::from_slice(films[i].0.as_slice()).view([1, 3, s, s]))
            .collect();
        let px = Tensor::cat(&px, 0).to_kind(Kind::Float);
        let encoded = tch::no_grad(|| image_embeds(model, &px));
        for (j, &i) in missing.iter().enumerate() {
            let e = encoded.narrow(0, j as i64, 1);
            if images.enabled() {
                let kept = own(&e);
                images.insert(*films[i].1, kept.shallow_clone(), tensor_bytes(&kept));
            }
            embeds[i] = Some(e);
        }
    }
    let embeds: Vec<Tensor> = embeds.into_iter().flatten().collect();
    let embeds = (!embeds.is_empty()).then(|| Tensor::cat(&embeds, 0));
    let starts = &batch[0].image_starts;
    Ok(model
        .chatglm
        .prefill_start(&ids, &prefixes, embeds.as_ref(), starts))
}

/// Return the heap's free pages to the operating system (glibc keeps freed memory for reuse; a
/// server's memory should fall back to its idle level after a burst).
pub(super) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only walks glibc's own heap under its lock.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// The adapters of a batch whose row `i` runs model `models[i]` (model 0: the layers' own): one
/// group when every row shares a model.
pub(super) fn row_adapters<'a>(
    sets: &'a [Vec<LayerLoras>],
    models: &[usize],
    dev: tch::Device,
) -> RowAdapters<'a> {
    let set = |m: usize| (m > 0).then(|| sets[m].as_slice());
    let mut distinct = models.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let groups = if distinct.len() == 1 {
        vec![(None, set(distinct[0]))]
    } else {
        distinct
            .iter()
            .map(|&m| {
                let rows: Vec<i64> = (0..models.len() as i64)
                    .filter(|&i| models[i as usize] == m)
                    .collect();
                (Some(Tensor::from_slice(&rows).to_device(dev)), set(m))
            })
            .collect()
    };
    RowAdapters { groups }
}

/// Run model work; a panic inside becomes an error (the rows it touched fail, not the server).
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(anyhow::anyhow!("internal error: {}", panic_text(&p))))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
