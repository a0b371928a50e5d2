//! Batches: deterministic shuffling, sharding over data-parallel ranks, padding, a resumable
//! position, and image preprocessing on background threads.
//!
//! Order: epoch `e` is a Fisher–Yates shuffle of `0..N` seeded by `(seed, e)`. A step's global
//! batch is G = W·A·B samples (W ranks, A micro-batches of B each). The order is padded by
//! wrapping around to a multiple of G; global batch k is positions [k·G, (k+1)·G), cut into W·A
//! micro-batches of B, and micro-batch j goes to rank j mod W as its ⌊j / W⌋-th of the step (for
//! A = 1 this is sat's `DistributedBatchSampler`: rank r takes the r-th slice of B). So every world
//! size that divides G sees the same samples in every step, which is what lets a run resume on
//! another number of ranks; every rank gets the same number of full batches (no rank waits in an
//! all-reduce that another never joins), and every sample is seen once per epoch across ranks
//! (exactly once when N is a multiple of G; the few wrapped samples twice otherwise). A single
//! process without accumulation (G = B) keeps a short last batch instead. `drop_last` drops the
//! tail that does not fill a whole global batch.
//!
//! The reference pads every sample to 320 tokens (`padding = "fixed"`); `"dynamic"` pads each batch
//! to its longest sample (optionally rounded up to a multiple), which is numerically identical for the
//! loss (pads are ignored and the mask is causal on the suffix) and much cheaper.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::image::ImageProcessor;
use super::records::Record;
use super::rng::PyRandom;
use super::sample::{Sample, SampleBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Pad to the longest sample of the batch (rounded up to `pad_to_multiple_of`).
    #[default]
    Dynamic,
    /// Pad every sample to `max_source_length + max_target_length` (the reference's 320).
    Fixed,
}

/// Which samples make up the batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Seeded epoch shuffles, sharded over ranks (every sample once per epoch).
    #[default]
    Epoch,
    /// Seeded epoch shuffles like `Epoch`, then global batches of similar length: the shuffled
    /// order is cut into groups of 50 global batches, each group sorted by length and cut into
    /// batches, and the batches are shuffled again (the longest first, so memory peaks at once).
    /// Every sample once per epoch, a new grouping every epoch; less padding under dynamic
    /// padding.
    LengthGrouped,
    /// sat's `RandomMappingDataset`: global position i → sample `sat_random_mapping(i, N)`, drawn
    /// with replacement; a rank's m-th micro-batch is positions [(m·W + r)·B, …+B), so round m
    /// covers [m·W·B, (m+1)·W·B) — exactly the reference's order — and a step of A rounds is the
    /// same global batch for every split of it. `seed` and `shuffle` do not apply.
    Sat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    pub sampler: Sampler,
    /// Micro-batch size per rank.
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub drop_last: bool,
    pub padding: Padding,
    pub pad_to_multiple_of: usize,
    /// Preprocessing threads (0 = all cores).
    pub workers: usize,
    /// Batches prepared ahead of the trainer.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            sampler: Sampler::Epoch,
            batch_size: 8,
            shuffle: true,
            seed: 1234,
            drop_last: false,
            padding: Padding::Dynamic,
            pad_to_multiple_of: 1,
            workers: 0,
            prefetch: 4,
        }
    }
}

/// Where a rank is in the data: the epoch and how many of its batches of that epoch are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    pub epoch: u64,
    pub offset: usize,
}

/// This process's place among the data-parallel ranks, and how many micro-batches each rank
/// takes per step (the global batch is `world_size · accum · batch_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
    pub accum: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            accum: 1,
        }
    }
}

impl Shard {
    /// Samples per step over every rank and micro-batch.
    pub fn global_batch(&self, batch_size: usize) -> usize {
        self.world_size * self.accum.max(1) * batch_size
    }
}

/// What the model is shown instead of each record's own film — a counterfactual that shows how
/// much the reports owe to the images (`image.ablation` in training, `eval --image_ablation`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ImageAblation {
    /// The record's own film.
    #[default]
    None,
    /// A black film (every pixel 0, then the usual normalisation).
    Blank,
    /// Another record's film: record i is shown film (i + ⌊n/2⌋) mod n of the n records — a fixed
    /// derangement for n ≥ 2 that pairs records far apart in the list.
    Shuffled,
}

/// Tokenized records plus the image processor.
pub struct Dataset {
    pub records: Vec<Record>,
    pub samples: Vec<Sample>,
    pub processor: ImageProcessor,
    pub max_seq_len: usize,
    pub ignore_pad: bool,
    /// Which film each record is shown (its own by default).
    pub ablation: ImageAblation,
}

impl Dataset {
    /// Tokenize every record. A sample the tokenizer cannot build names its record.
    pub fn new(
        records: Vec<Record>,
        builder: &SampleBuilder,
        processor: ImageProcessor,
        file: &str,
    ) -> Result<Self> {
        let samples = records
            .iter()
            .map(|r| {
                builder
                    .build_for(r.images.len(), &r.history, &r.prompt, &r.label)
                    .with_context(|| {
                        format!("{file}: record {} ({}): cannot build sample", r.index, r.id)
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            records,
            samples,
            processor,
            max_seq_len: builder.config().max_seq_len(),
            ignore_pad: builder.config().ignore_pad_token_for_loss,
            ablation: ImageAblation::None,
        })
    }

    /// Show every record another film, or none; refused where no derangement exists.
    pub fn with_ablation(mut self, ablation: ImageAblation) -> Result<Self> {
        if ablation == ImageAblation::Shuffled && self.records.len() < 2 {
            anyhow::bail!(
                "shuffled images need at least 2 films (got {})",
                self.records.len()
            );
        }
        self.ablation = ablation;
        Ok(self)
    }

    /// The films record `i` is shown, one per image block of its sample: its own, another
    /// record's (its k-th view for the k-th block, cycling if it has fewer), or black ones.
    fn films(&self, i: usize) -> Result<Vec<Vec<f32>>> {
        let n = self.records.len();
        let count = self.records[i].images.len();
        let own = match self.ablation {
            ImageAblation::Blank => {
                let size = self.processor.size;
                let black = super::image::Rgb8 {
                    width: size,
                    height: size,
                    data: vec![0; 3 * size * size],
                };
                return Ok(vec![super::image::normalize_chw(&black); count]);
            }
            ImageAblation::None => i,
            ImageAblation::Shuffled => (i + n / 2) % n,
        };
        let r = &self.records[own];
        (0..count)
            .map(|k| {
                let path = &r.images[k % r.images.len()];
                self.processor
                    .process_file(path)
                    .with_context(|| format!("record {} ({})", r.index, r.id))
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A padded batch in plain buffers; [`Batch::to_tensors`] moves it into libtorch.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub image_size: usize,
    /// `[B, L]`
    pub input_ids: Vec<i64>,
    /// `[B, L]`, −100 where no loss is taken.
    pub labels: Vec<i64>,
    /// `[B, 2, L]`: position ids and block position ids.
    pub position_ids: Vec<i64>,
    /// `[B]`: index of `<sop>` per sample (the bidirectional prefix length).
    pub context_lengths: Vec<i64>,
    /// `[N, 3, S, S]` normalised films: every row's, in row order (one per row in XrayGLM's
    /// layout; several for a study's views).
    pub images: Vec<f32>,
    /// Per film: `(row, first slot)` — where its embeddings go.
    pub image_at: Vec<(i64, i64)>,
    pub image_length: usize,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
    /// The loader position after this batch (save it to resume after this batch).
    pub state_after: LoaderState,
}

/// The batch as tensors on a device.
pub struct BatchTensors {
    pub input_ids: tch::Tensor,
    pub labels: tch::Tensor,
    pub position_ids: tch::Tensor,
    pub context_lengths: tch::Tensor,
    pub images: tch::Tensor,
}

impl Batch {
    /// Tokens that carry a loss.
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .filter(|&&l| l != super::sample::IGNORE)
            .count()
    }

    /// Number of films in the batch.
    pub fn films(&self) -> usize {
        self.image_at.len()
    }

    /// Per row, the rows' films out of the batch's `[N, …]` tensor (films are in row order).
    pub fn films_per_row(&self, films: &tch::Tensor) -> Vec<tch::Tensor> {
        let mut counts = vec![0i64; self.batch_size];
        for &(row, _) in &self.image_at {
            counts[row as usize] += 1;
        }
        let mut first = 0;
        counts
            .into_iter()
            .map(|n| {
                let t = films.narrow(0, first, n);
                first += n;
                t
            })
            .collect()
    }

    /// Where the films go, for the model: one per row at the same slot when the batch has
    /// XrayGLM's layout (the reference's splice), otherwise each at its own `(row, slot)`.
    pub fn image_placement(&self) -> crate::model::chatglm::ImageAt<'_> {
        crate::model::chatglm::ImageAt::of(&self.image_at, self.batch_size)
    }

    /// The batch as the model takes it: its tensors `t` (from [`Batch::to_tensors`]) and its
    /// films as pixels, or as embeddings computed before.
    pub fn inputs<'a>(
        &'a self,
        t: &'a BatchTensors,
        images: Option<&'a tch::Tensor>,
    ) -> crate::model::visualglm::BatchInputs<'a> {
        use crate::model::visualglm::Images;
        crate::model::visualglm::BatchInputs {
            input_ids: &t.input_ids,
            images: images.map_or(Images::Pixels(&t.images), Images::Embeds),
            image_at: self.image_placement(),
            position_ids: &t.position_ids,
            context_lengths: &self.context_lengths,
            labels: &t.labels,
        }
    }

    pub fn to_tensors(&self, device: tch::Device) -> BatchTensors {
        let (b, l, s) = (
            self.batch_size as i64,
            self.seq_len as i64,
            self.image_size as i64,
        );
        BatchTensors {
            input_ids: tch::Tensor::from_slice(&self.input_ids)
                .view([b, l])
                .to_device(device),
            labels: tch::Tensor::from_slice(&self.labels)
                .view([b, l])
                .to_device(device),
            position_ids: tch::Tensor::from_slice(&self.position_ids)
                .view([b, 2, l])
                .to_device(device),
            context_lengths: tch::Tensor::from_slice(&self.context_lengths).to_device(device),
            images: tch::Tensor::from_slice(&self.images)
                .view([self.films() as i64, 3, s, s])
                .to_device(device),
        }
    }
}

/// The sample order of one epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let key = [
            seed as u32,
            (seed >> 32) as u32,
            epoch as u32,
            (epoch >> 32) as u32,
        ];
        PyRandom::from_key(&key).shuffle(&mut order);
    }
    order
}

/// Global batches per sorted group of [`Sampler::LengthGrouped`].
pub const LENGTH_GROUP_BATCHES: usize = 50;

/// [`Sampler::LengthGrouped`]'s sample order of one epoch: consecutive runs of `global` indices
/// are the global batches (a shorter last one stays last).
pub fn length_grouped_order(lens: &[usize], seed: u64, epoch: u64, global: usize) -> Vec<usize> {
    let order = epoch_order(lens.len(), seed, epoch, true);
    let global = global.max(1);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for group in order.chunks(global * LENGTH_GROUP_BATCHES) {
        let mut g = group.to_vec();
        g.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        batches.extend(g.chunks(global).map(<[usize]>::to_vec));
    }
    let tail = match batches.last() {
        Some(b) if b.len() < global => batches.pop(),
        _ => None,
    };
    let key = [
        seed as u32,
        (seed >> 32) as u32,
        epoch as u32,
        (epoch >> 32) as u32,
        0x6c65_6e67, // "leng": another stream than the sample shuffle
    ];
    PyRandom::from_key(&key).shuffle(&mut batches);
    let longest = (0..batches.len()).max_by_key(|&k| (lens[batches[k][0]], std::cmp::Reverse(k)));
    if let Some(k) = longest {
        batches.swap(0, k);
    }
    batches.extend(tail);
    batches.concat()
}

/// The micro-batches (dataset indices) of `shard` in one epoch.
pub fn shard_batches(
    order: &[usize],
    shard: Shard,
    batch_size: usize,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    let w = shard.world_size;
    let global = shard.global_batch(batch_size);
    let mut order = order.to_vec();
    if drop_last {
        order.truncate(order.len() / global * global);
    } else if global > batch_size && !order.is_empty() && !order.len().is_multiple_of(global) {
        // Every rank gets full batches and the same number of steps, and no step spans two epochs.
        let pad = global - order.len() % global;
        for i in 0..pad {
            order.push(order[i % order.len()]);
        }
    }
    // Each round of W·B positions gives every rank one micro-batch: rank r takes the r-th slice
    // of B, as sat's DistributedBatchSampler does. A step takes A rounds, so its global batch is
    // the same G samples for every W·A with the same product: one process accumulating W·A
    // micro-batches sees exactly what W ranks accumulating A each see.
    order
        .chunks(w * batch_size)
        .filter_map(|g| {
            let start = shard.rank * batch_size;
            (start < g.len()).then(|| g[start..(start + batch_size).min(g.len())].to_vec())
        })
        .collect()
}

struct Task {
    seq: u64,
    indices: Vec<usize>,
    state_after: LoaderState,
}

/// An endless, resumable batch iterator over epochs, with background preprocessing.
pub struct Loader {
    dataset: Arc<Dataset>,
    cfg: LoaderConfig,
    shard: Shard,
    /// Next position to hand to the workers.
    plan: LoaderState,
    plan_batches: Vec<Vec<usize>>,
    plan_epoch: Option<u64>,
    /// Position of the next batch returned by `next`.
    state: LoaderState,
    next_seq: u64,
    submitted: u64,
    pending: BTreeMap<u64, Result<Batch>>,
    tasks: Option<SyncSender<Task>>,
    results: Receiver<(u64, Result<Batch>)>,
    workers: Vec<JoinHandle<()>>,
}

impl Loader {
    pub fn new(
        dataset: Arc<Dataset>,
        cfg: LoaderConfig,
        shard: Shard,
        start: LoaderState,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            bail!("loader.batch_size must be at least 1");
        }
        if shard.world_size == 0 || shard.rank >= shard.world_size {
            bail!(
                "rank {} is not in a world of {}",
                shard.rank,
                shard.world_size
            );
        }
        if dataset.is_empty() {
            bail!("the dataset is empty");
        }
        let workers_n = super::worker_threads(cfg.workers);
        let prefetch = cfg.prefetch.max(1);
        let (task_tx, task_rx) = mpsc::sync_channel::<Task>(prefetch);
        let (res_tx, res_rx) = mpsc::channel::<(u64, Result<Batch>)>();
        let task_rx = Arc::new(Mutex::new(task_rx));
        let workers = (0..workers_n)
            .map(|i| {
                let rx = Arc::clone(&task_rx);
                let tx: Sender<_> = res_tx.clone();
                let ds = Arc::clone(&dataset);
                let padding = (cfg.padding, cfg.pad_to_multiple_of.max(1));
                std::thread::Builder::new()
                    .name(format!("xrayglm-data-{i}"))
                    .spawn(move || loop {
                        let task = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        let Ok(task) = task else { return };
                        // A panic in a decoder must come back as an error for this batch: a batch
                        // that never arrives would leave the trainer waiting forever.
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            make_batch(&ds, &task.indices, padding, task.state_after)
                        }))
                        .unwrap_or_else(|_| {
                            Err(anyhow::anyhow!(
                                "data worker panicked on samples {:?}",
                                task.indices
                            ))
                        });
                        if tx.send((task.seq, out)).is_err() {
                            return;
                        }
                    })
                    .expect("spawning a data worker")
            })
            .collect();
        let loader = Self {
            dataset,
            cfg,
            shard,
            plan: start,
            plan_batches: Vec::new(),
            plan_epoch: None,
            state: start,
            next_seq: 0,
            submitted: 0,
            pending: BTreeMap::new(),
            tasks: Some(task_tx),
            results: res_rx,
            workers,
        };
        let per_epoch = loader.batches_per_epoch();
        if per_epoch == 0 {
            bail!(
                "no batches: {} samples cannot fill one global batch of {} with drop_last",
                loader.dataset.len(),
                shard.global_batch(loader.cfg.batch_size)
            );
        }
        if loader.cfg.sampler != Sampler::Sat && start.offset > per_epoch {
            bail!(
                "resume offset {} is past the {} batches of an epoch",
                start.offset,
                per_epoch
            );
        }
        Ok(loader)
    }

    /// Micro-batches per epoch for this rank (the same on every rank).
    pub fn batches_per_epoch(&self) -> usize {
        let order = epoch_order(self.dataset.len(), self.cfg.seed, 0, false);
        shard_batches(&order, self.shard, self.cfg.batch_size, self.cfg.drop_last).len()
    }

    /// The position of the next batch `next()` returns.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    fn submit_one(&mut self) {
        if self.cfg.sampler == Sampler::Sat {
            let (w, b, n) = (
                self.shard.world_size as u64,
                self.cfg.batch_size as u64,
                self.dataset.len() as u64,
            );
            let k = self.plan.offset as u64;
            let start = (k * w + self.shard.rank as u64) * b;
            let indices = (start..start + b)
                .map(|i| super::rng::sat_random_mapping(i, n) as usize)
                .collect();
            let after = LoaderState {
                epoch: 0,
                offset: self.plan.offset + 1,
            };
            return self.send(indices, after);
        }
        if self.plan_epoch != Some(self.plan.epoch) {
            let order = if self.cfg.sampler == Sampler::LengthGrouped {
                let lens: Vec<usize> = self.dataset.samples.iter().map(|s| s.len()).collect();
                length_grouped_order(
                    &lens,
                    self.cfg.seed,
                    self.plan.epoch,
                    self.shard.global_batch(self.cfg.batch_size),
                )
            } else {
                epoch_order(
                    self.dataset.len(),
                    self.cfg.seed,
                    self.plan.epoch,
                    self.cfg.shuffle,
                )
            };
            self.plan_batches =
                shard_batches(&order, self.shard, self.cfg.batch_size, self.cfg.drop_last);
            self.plan_epoch = Some(self.plan.epoch);
        }
        if self.plan.offset >= self.plan_batches.len() {
            self.plan = LoaderState {
                epoch: self.plan.epoch + 1,
                offset: 0,
            };
            return self.submit_one();
        }
        let indices = self.plan_batches[self.plan.offset].clone();
        let mut after = LoaderState {
            epoch: self.plan.epoch,
            offset: self.plan.offset + 1,
        };
        if after.offset == self.plan_batches.len() {
            after = LoaderState {
                epoch: after.epoch + 1,
                offset: 0,
            };
        }
        self.send(indices, after);
    }

    /// Hand one batch to the workers; `after` becomes the planning position.
    fn send(&mut self, indices: Vec<usize>, after: LoaderState) {
        let task = Task {
            seq: self.submitted,
            indices,
            state_after: after,
        };
        self.submitted += 1;
        self.plan = after;
        if let Some(tx) = &self.tasks {
            // A send only fails when every worker has exited, which `next` then reports.
            let _ = tx.send(task);
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let ahead = self.cfg.prefetch.max(1) as u64;
        while self.submitted < self.next_seq + ahead {
            self.submit_one();
        }
        let out = loop {
            if let Some(b) = self.pending.remove(&self.next_seq) {
                break b;
            }
            match self.results.recv() {
                Ok((seq, b)) => {
                    self.pending.insert(seq, b);
                }
                Err(_) => break Err(anyhow::anyhow!("all data workers exited")),
            }
        };
        self.next_seq += 1;
        if let Ok(b) = &out {
            self.state = b.state_after;
        }
        Some(out)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.tasks.take();
        // Drain so that no worker blocks on a full results channel, then join.
        while self.results.try_recv().is_ok() {}
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn make_batch(
    ds: &Dataset,
    indices: &[usize],
    padding: (Padding, usize),
    state_after: LoaderState,
) -> Result<Batch> {
    let b = indices.len();
    let longest = indices
        .iter()
        .map(|&i| ds.samples[i].len())
        .max()
        .unwrap_or(0);
    let seq_len = match padding.0 {
        Padding::Fixed => ds.max_seq_len.max(longest),
        Padding::Dynamic => longest.div_ceil(padding.1) * padding.1,
    };
    let size = ds.processor.size;
    let mut batch = Batch {
        batch_size: b,
        seq_len,
        image_size: size,
        input_ids: Vec::with_capacity(b * seq_len),
        labels: Vec::with_capacity(b * seq_len),
        position_ids: Vec::with_capacity(b * 2 * seq_len),
        context_lengths: Vec::with_capacity(b),
        images: Vec::with_capacity(b * 3 * size * size),
        image_at: Vec::with_capacity(b),
        image_length: 0,
        indices: indices.to_vec(),
        state_after,
    };
    for (row, &i) in indices.iter().enumerate() {
        let s = &ds.samples[i];
        let (ids, labels) = s.padded(seq_len, ds.ignore_pad);
        let (pos, block) = s.position_ids(seq_len);
        batch.input_ids.extend(ids);
        batch.labels.extend(labels);
        batch.position_ids.extend(pos);
        batch.position_ids.extend(block);
        batch.context_lengths.push(s.context_length as i64);
        batch.image_length = s.image_length;
        for (film, &start) in ds.films(i)?.into_iter().zip(&s.image_starts) {
            batch.images.extend(film);
            batch.image_at.push((row as i64, start as i64));
        }
    }
    Ok(batch)
}

/// The image paths of a dataset (for benchmarks and checks).
pub fn image_paths(ds: &Dataset) -> Vec<PathBuf> {
    ds.records
        .iter()
        .flat_map(|r| r.images.iter().cloned())
        .collect()
}
