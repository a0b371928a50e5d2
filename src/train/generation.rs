//! Generation metrics during training (`train.eval_generate_interval`, `train.best_metric`):
//! greedy reports on a fixed set of held-out films, scored like `xrayglm eval` does (BLEU-4,
//! ROUGE-L, CIDEr-D, CE).
//!
//! Data parallel: the films' batches are dealt round-robin to the ranks (batch k to rank
//! k mod world) — each batch exactly as one process would make it, so the reports, and the scores,
//! are the ones a single process gets — and the reports are gathered to every rank through one
//! sum all-reduce of their UTF-8 bytes (each film's row written by one rank only).

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::config::Config;
use crate::data::batch::{Dataset, Loader, LoaderConfig, LoaderState, Sampler, Shard};
use crate::data::records::Record;
use crate::data::sample::SampleBuilder;
use crate::dist::Comm;
use crate::eval::metrics::Lang;
use crate::eval::{Labelers, Report, Scored};
use crate::infer::chat::{ChatModel, ChatSettings};

/// The fixed films reports are generated for, and how.
pub struct GenEval {
    ds: Arc<Dataset>,
    loader: LoaderConfig,
    lang: Lang,
    max_new_tokens: usize,
    labelers: Labelers,
}

impl GenEval {
    /// The first `train.eval_generate_films` held-out films; `None` when neither generation
    /// metrics nor a generated `best_metric` are asked for.
    pub fn setup(
        cfg: &Config,
        held_out: &[Record],
        builder: &SampleBuilder,
        loader: &LoaderConfig,
        file: &str,
    ) -> Result<Option<Self>> {
        let tc = &cfg.train;
        if tc.eval_generate_interval <= 0 && !tc.best_metric.generates() {
            return Ok(None);
        }
        if held_out.is_empty() {
            bail!(
                "train.eval_generate_interval / train.best_metric = {:?} need held-out films: set train.val_fraction > 0",
                tc.best_metric.name()
            );
        }
        let n = tc.eval_generate_films.max(1).min(held_out.len());
        let ds = Dataset::new(held_out[..n].to_vec(), builder, cfg.image.processor(), file)?
            .with_ablation(cfg.image.ablation)?;
        Ok(Some(Self {
            ds: Arc::new(ds),
            loader: LoaderConfig {
                sampler: Sampler::Epoch,
                shuffle: false,
                drop_last: false,
                ..loader.clone()
            },
            lang: Lang::of(cfg.sample.language),
            max_new_tokens: tc.eval_max_new_tokens.max(1),
            labelers: Labelers::builtin(),
        }))
    }

    pub fn films(&self) -> usize {
        self.ds.len()
    }

    /// Generate (this rank's batches), gather, and score every film's report.
    pub fn run(&self, chat: &ChatModel, comm: &dyn Comm) -> Result<Report> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let n = self.ds.len();
        let mut reports: Vec<Option<String>> = vec![None; n];
        let loader = Loader::new(
            Arc::clone(&self.ds),
            self.loader.clone(),
            Shard::default(),
            LoaderState::default(),
        )?;
        let batches = loader.batches_per_epoch();
        let mut settings = ChatSettings {
            english: self.lang == Lang::En,
            ..Default::default()
        };
        settings.sampling.greedy = true;
        settings.sampling.repetition_penalty = 1.0;
        let model = &chat.model;
        for (k, batch) in loader.take(batches).enumerate() {
            let b = batch?;
            if k % world != rank {
                continue;
            }
            let t = b.to_tensors(model.device());
            let embeds =
                tch::no_grad(|| model.encode_image(&t.images.to_kind(model.kind()), false).2);
            let questions: Vec<(&[(String, String)], &str)> = b
                .indices
                .iter()
                .map(|&i| {
                    let r = &self.ds.records[i];
                    (r.history.as_slice(), r.prompt.as_str())
                })
                .collect();
            let out = chat.answer_batch(
                &b.films_per_row(&embeds),
                &questions,
                &settings,
                self.max_new_tokens,
            )?;
            for (&i, h) in b.indices.iter().zip(out) {
                reports[i] = Some(h);
            }
        }
        let reports = gather(&reports, comm)?;
        let items: Vec<Scored> = self
            .ds
            .records
            .iter()
            .zip(reports)
            .map(|(r, h)| Scored {
                id: r.id.clone(),
                reference: r.label.clone(),
                references: Vec::new(),
                hypothesis: h,
                lang: self.lang,
                images: Vec::new(),
            })
            .collect();
        crate::eval::score_with(&items, Default::default(), &self.labelers)
    }
}

/// Every rank's reports (each film written by exactly one rank) on every rank: the lengths, then
/// the bytes, through sum all-reduces.
fn gather(mine: &[Option<String>], comm: &dyn Comm) -> Result<Vec<String>> {
    let mut lens: Vec<f64> = mine
        .iter()
        .map(|r| r.as_ref().map_or(0.0, |s| s.len() as f64))
        .collect();
    comm.all_reduce_sum_f64(&mut lens)?;
    let width = lens.iter().copied().fold(0.0, f64::max) as usize;
    let mut bytes = vec![0.0f64; mine.len() * width];
    for (i, r) in mine.iter().enumerate() {
        if let Some(s) = r {
            for (j, b) in s.bytes().enumerate() {
                bytes[i * width + j] = b as f64;
            }
        }
    }
    comm.all_reduce_sum_f64(&mut bytes)?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let row: Vec<u8> = bytes[i * width..i * width + len as usize]
                .iter()
                .map(|&b| b as u8)
                .collect();
            String::from_utf8_lossy(&row).into_owned()
        })
        .collect())
}
