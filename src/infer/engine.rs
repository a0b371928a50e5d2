//! The serving engine: one thread owns the model and decodes every request in flight together
//! (continuous batching), for `xrayglm serve` and `xrayglm web`.
//!
//! * A request is queued (bounded: a full queue is refused at once, the caller answers 503) and
//!   admitted between decoding steps while fewer than `max_batch` rows are live.
//! * Admission runs the request's prefill: requests admitted together that share a model, a
//!   prompt length and image placement are prefilled as one batch (images encoded together), the
//!   rest one group at a time; each row then joins its model's [`SlotCache`].
//! * Every step feeds each live row its last token at its own position ([`ChatGlm::forward_slots`]):
//!   rows of different lengths decode together, a row leaves at `<eop>`, a stop string or its
//!   limit, and a new one takes its place at the next step.
//! * Adapters: the base model's own LoRA (if any) is model 0; every `--lora NAME=DIR` is a set of
//!   [`LayerLoras`] over the same frozen weights (nothing merged or copied). By default rows of all
//!   models decode in one batch: the frozen linears run once and each adapter's LoRA delta is
//!   added to its own rows ([`RowAdapters`]); [`AdapterBatching::PerAdapter`] runs one batch per
//!   model instead (`xrayglm bench serve` measures both). Either way a row computes `W·x + Δ(x)`
//!   as it does alone.
//! * Each row has its own sampler (its own seed and settings), so what it draws does not depend on
//!   what else is in the batch; greedy rows get the tokens they get alone.
//! * A client that goes away cancels its row at the next step. A panic inside the model fails the
//!   rows it touched (an error event), not the server.
//!
//! [`ChatGlm::forward_slots`]: crate::model::chatglm::ChatGlm::forward_slots

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tch::{Kind, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use super::chat::{ChatModel, ChatSettings, Turn};
use super::generate::image_embeds;
use super::sampling::{Sampler, ENGLISH_INVALID};
use crate::data::image::ImageProcessor;
use crate::model::chatglm::{
    attention_mask, GlmInputs, ImageAt, KvCache, LayerLoras, RowAdapters, SlotCache,
};
use crate::model::positions::{self, Prefix};
use crate::tokenizer::{ids, process_response};
use crate::weights::source::AdapterWeights;

/// How rows of different adapters share decoding steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterBatching {
    /// One batch for every row: the frozen linears run once, each adapter's LoRA delta on its own
    /// rows ([`RowAdapters`]).
    #[default]
    PerRow,
    /// One batch, and one forward per step, for each adapter with live rows.
    PerAdapter,
}

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Rows decoded together at most; more requests wait in the queue.
    pub max_batch: usize,
    /// Requests waiting at most; more are refused (503).
    pub max_queue: usize,
    pub adapter_batching: AdapterBatching,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            adapter_batching: AdapterBatching::default(),
        }
    }
}

/// One request: a conversation to continue.
pub struct Job {
    /// Index into [`EngineInfo::models`].
    pub model: usize,
    /// The films, preprocessed (`[3, size, size]` floats each, see [`ImageProcessor`]), in
    /// order; empty: none.
    pub images: Vec<Arc<Vec<f32>>>,
    /// Text before the first question ("" for none).
    pub system: String,
    pub history: Vec<Turn>,
    pub query: String,
    /// Sampling, English mode and `max_length` (prompt + reply tokens at most).
    pub settings: ChatSettings,
    /// Reply tokens at most (besides `max_length`).
    pub max_new_tokens: Option<usize>,
    /// Strings that end the reply (not included in it).
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// What a request hears back, in order: `Started`, `Delta`s, then `Done` — or `Failed` at any
/// point.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt was read (prefilled); replies follow.
    Started {
        prompt_tokens: usize,
    },
    /// The next piece of the reply text.
    Delta(String),
    Done(Finished),
    /// `status`: the HTTP status it stands for (400 bad request, 500 model failure, 503 shutdown).
    Failed {
        status: u16,
        message: String,
    },
}

/// A finished reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The reply (the `Delta`s concatenated).
    pub text: String,
    pub finish: Finish,
    /// Prompt positions (image slots included).
    pub prompt_tokens: usize,
    /// Reply tokens (the end token not counted).
    pub completion_tokens: usize,
}

/// Why a reply ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `<eop>` or a stop string.
    Stop,
    /// `max_tokens` or the model's positions.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: try again later (503).
    QueueFull,
    /// The engine is stopping or stopped (503).
    Stopping,
}

/// Counters the server reports (`/health`) and the tests read.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows being decoded.
    pub active: AtomicUsize,
    /// Requests waiting.
    pub queued: AtomicUsize,
    /// Bytes held by the key/value caches.
    pub cache_bytes: AtomicUsize,
    /// Requests finished (any way).
    pub finished: AtomicUsize,
    /// Decoding steps run, and rows decoded in them (their ratio: the mean batch).
    pub steps: AtomicUsize,
    pub step_rows: AtomicUsize,
}

/// What the HTTP side needs to know about the models, without the models.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Served model names: the base first, then each adapter.
    pub models: Vec<String>,
    pub max_positions: usize,
    pub default_prompt: String,
    pub images: ImageProcessor,
}

/// A handle on the engine thread.
pub struct Engine {
    jobs: SyncSender<Job>,
    pub info: EngineInfo,
    pub stats: Arc<Stats>,
    /// Set by [`Engine::drain`]: refuse new work; rows still decoding after the deadline fail.
    drain: Arc<Mutex<Option<Instant>>>,
    stopping: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// An adapter to serve by name.
pub struct NamedAdapter {
    pub name: String,
    pub weights: AdapterWeights,
}

impl Engine {
    /// Start the engine thread on `chat` (its own adapters, if any, are model `base_name`) and
    /// the adapters to serve beside it.
    pub fn start(
        chat: ChatModel,
        base_name: String,
        adapters: Vec<NamedAdapter>,
        opts: EngineOptions,
    ) -> Result<Self> {
        anyhow::ensure!(opts.max_batch >= 1, "max_batch must be at least 1");
        let mut models = vec![base_name];
        for a in &adapters {
            anyhow::ensure!(
                !models.contains(&a.name),
                "two models are named {:?}: give each --lora its own NAME",
                a.name
            );
            models.push(a.name.clone());
        }
        let info = EngineInfo {
            models,
            max_positions: chat.max_positions(),
            default_prompt: chat.default_prompt.clone(),
            images: chat.images,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(opts.max_queue);
        let stats = Arc::new(Stats::default());
        let drain = Arc::new(Mutex::new(None));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut sets = vec![Vec::new()];
        let mut stores = Vec::new();
        for a in adapters {
            sets.push(a.weights.layers);
            stores.push(a.weights.store);
        }
        let groups = (0..sets.len()).map(|_| Group::default()).collect();
        let worker = Worker {
            chat,
            sets,
            _stores: stores,
            groups,
            opts,
            stats: Arc::clone(&stats),
            drain: Arc::clone(&drain),
            stopping: Arc::clone(&stopping),
        };
        let thread = std::thread::Builder::new()
            .name("xrayglm-engine".into())
            .spawn(move || worker.run(rx))
            .context("starting the engine thread")?;
        Ok(Self {
            jobs: tx,
            info,
            stats,
            drain,
            stopping,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queue a request; its events arrive on `job.events`.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Refused> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Refused::Stopping);
        }
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => Refused::QueueFull,
                    TrySendError::Disconnected(_) => Refused::Stopping,
                })
            }
        }
    }

    /// Stop taking requests; the rows in flight finish, or fail after `grace`. Returns at once;
    /// [`Engine::join`] waits for the thread.
    pub fn drain(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        *self.drain.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + grace);
    }

    /// Wait for the engine thread to end (after [`Engine::drain`]).
    pub fn join(&self) {
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// One row being decoded.
struct Row {
    /// Which model (index into [`EngineInfo::models`]).
    model: usize,
    events: UnboundedSender<Event>,
    sampler: Sampler,
    prompt_tokens: usize,
    /// The prompt's prefix: all of it but `<sop>`, and its `[gMASK]`.
    prefix: Prefix,
    /// Prompt + reply tokens at most.
    max_length: usize,
    max_new: usize,
    reply: Vec<i64>,
    /// The reply text sent so far.
    shown: String,
    stop: Vec<String>,
}

/// Rows decoded together and their cache (row `i` of `rows` is row `i` of `cache`): every live
/// row in group 0 ([`AdapterBatching::PerRow`]), or one group per model.
#[derive(Default)]
struct Group {
    cache: SlotCache,
    rows: Vec<Row>,
}

/// A request read and checked, ready for its prefill.
struct Ready {
    job: Job,
    ids: Vec<i64>,
    image_starts: Vec<i64>,
    row: Row,
}

struct Worker {
    chat: ChatModel,
    /// Per model, its adapter set (model 0's is empty: it runs the layers' own adapters).
    sets: Vec<Vec<LayerLoras>>,
    /// The adapters' own stores (their tensors are shared with `sets`).
    _stores: Vec<tch::nn::VarStore>,
    groups: Vec<Group>,
    opts: EngineOptions,
    stats: Arc<Stats>,
    drain: Arc<Mutex<Option<Instant>>>,
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn active(&self) -> usize {
        self.groups.iter().map(|g| g.rows.len()).sum()
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            // 1. Admit what is waiting (block only when idle).
            let mut admitted = Vec::new();
            let stopping = self.stopping.load(Ordering::SeqCst);
            if self.active() == 0 && !stopping {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(j) => admitted.push(j),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while self.active() + admitted.len() < self.opts.max_batch {
                match rx.try_recv() {
                    Ok(j) => admitted.push(j),
                    Err(_) => break,
                }
            }
            self.stats
                .queued
                .fetch_sub(admitted.len(), Ordering::SeqCst);
            if stopping {
                while let Ok(j) = rx.try_recv() {
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    admitted.push(j);
                }
                for j in admitted.drain(..) {
                    fail(&j.events, 503, "the server is shutting down");
                    self.stats.finished.fetch_add(1, Ordering::SeqCst);
                }
                let deadline = *self.drain.lock().unwrap_or_else(|e| e.into_inner());
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    for g in &mut self.groups {
                        for r in g.rows.drain(..) {
                            fail(&r.events, 503, "the server is shutting down");
                        }
                        g.cache = SlotCache::default();
                    }
                }
                if self.active() == 0 {
                    self.update_stats();
                    return;
                }
            }
            // 2. Prefill the new requests. More arrived meanwhile and there is room: prefill them
            //    first (a burst gets its first tokens sooner; the running rows wait one prefill).
            let was_busy = self.active() > 0 || !admitted.is_empty();
            self.admit(admitted);
            let waiting = self.stats.queued.load(Ordering::SeqCst);
            if waiting > 0 && self.active() < self.opts.max_batch && !stopping {
                self.update_stats();
                continue;
            }
            // 3. One decoding step per group with live rows.
            for m in 0..self.groups.len() {
                if !self.groups[m].rows.is_empty() {
                    self.step(m);
                }
            }
            self.update_stats();
            // 4. Idle again: give the freed caches and activations back to the OS.
            if was_busy && self.active() == 0 {
                release_free_memory();
            }
        }
    }

    fn update_stats(&self) {
        let s = &self.stats;
        s.active.store(self.active(), Ordering::SeqCst);
        let bytes = self.groups.iter().map(|g| g.cache.bytes()).sum();
        s.cache_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Read and check a request: its prompt ids, limits and sampler. A bad one hears 400 and is
    /// dropped.
    fn ready(&self, job: Job) -> Option<Ready> {
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
            super::chat::check_room(ids.len(), s.max_length)?;
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
    fn group_of(&self, m: usize) -> usize {
        match self.opts.adapter_batching {
            AdapterBatching::PerRow => 0,
            AdapterBatching::PerAdapter => m,
        }
    }

    /// Prefill the admitted requests — those sharing a prompt length and image placement as one
    /// batch (and, one batch per adapter, a model) — and let each row choose its first token.
    fn admit(&mut self, jobs: Vec<Job>) {
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
                    let first = g.rows.len();
                    for (i, r) in batch.into_iter().enumerate() {
                        g.cache.join(&cache, i as i64);
                        let _ = r.row.events.send(Event::Started {
                            prompt_tokens: r.row.prompt_tokens,
                        });
                        g.rows.push(r.row);
                    }
                    self.choose(gi, &logits, first);
                }
            }
        }
    }

    /// One decoding step for group `gi`'s rows.
    fn step(&mut self, gi: usize) {
        // Rows whose client went away leave first.
        let g = &mut self.groups[gi];
        for i in (0..g.rows.len()).rev() {
            if g.rows[i].events.is_closed() {
                g.rows.swap_remove(i);
                g.cache.swap_remove(i);
                self.stats.finished.fetch_add(1, Ordering::SeqCst);
            }
        }
        if g.rows.is_empty() {
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
        match out {
            Ok(logits) => self.choose(gi, &logits, 0),
            Err(e) => {
                let g = &mut self.groups[gi];
                for r in g.rows.drain(..) {
                    fail(&r.events, 500, format!("{e:#}"));
                    self.stats.finished.fetch_add(1, Ordering::SeqCst);
                }
                g.cache = SlotCache::default();
            }
        }
    }

    /// Each row from `first` on picks its next token from its row of `logits`; finished rows
    /// leave.
    fn choose(&mut self, m: usize, logits: &Tensor, first: usize) {
        let tok = &self.chat.tokenizer;
        let g = &mut self.groups[m];
        let mut done = Vec::new();
        for i in first..g.rows.len() {
            let r = &mut g.rows[i];
            let row_logits = logits.narrow(0, (i - first) as i64, 1);
            let picked = r
                .sampler
                .next(&row_logits, &[r.reply.as_slice()])
                .map(|p| p[0]);
            let finish = match picked {
                Err(e) => {
                    fail(&r.events, 500, format!("{e:#}"));
                    done.push(i);
                    continue;
                }
                Ok(t) if t == ids::EOP => Some(Finish::Stop),
                Ok(t) => {
                    r.reply.push(t);
                    let full = r.prompt_tokens + r.reply.len() >= r.max_length
                        || r.reply.len() >= r.max_new;
                    r.advance(tok, full)
                }
            };
            if let Some(f) = finish {
                r.finish(tok, f);
                done.push(i);
            }
        }
        for &i in done.iter().rev() {
            g.rows.swap_remove(i);
            g.cache.swap_remove(i);
            self.stats.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Row {
    /// The reply text now: the decoded reply, processed as `chat` shows it, without leading
    /// spaces; cut before the first stop string (then `true`).
    fn text(&self, tok: &crate::tokenizer::ChatGlmTokenizer) -> (String, bool) {
        let text = tok
            .decode(&self.reply)
            .map(|t| process_response(&t))
            .unwrap_or_default();
        let text = text.trim_start().to_string();
        let cut = self.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        match cut {
            Some(i) => (text[..i].to_string(), true),
            None => (text, false),
        }
    }

    /// After a new token: send the text that is now stable; `Some` when the reply is over
    /// (a stop string, or `full`: no room for another token).
    fn advance(&mut self, tok: &crate::tokenizer::ChatGlmTokenizer, full: bool) -> Option<Finish> {
        let (text, stopped) = self.text(tok);
        if stopped {
            return Some(Finish::Stop);
        }
        if full {
            return Some(Finish::Length);
        }
        // Hold back trailing white space and what could still become a stop string.
        let mut end = text.trim_end().len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                    end -= k;
                    break;
                }
            }
        }
        let stable = &text[..end];
        if stable.len() > self.shown.len() && stable.starts_with(self.shown.as_str()) {
            let _ = self
                .events
                .send(Event::Delta(stable[self.shown.len()..].to_string()));
            self.shown = stable.to_string();
        }
        None
    }

    /// Send the rest of the text and the end.
    fn finish(&mut self, tok: &crate::tokenizer::ChatGlmTokenizer, finish: Finish) {
        let (text, _) = self.text(tok);
        let text = text.trim_end();
        if text.len() > self.shown.len() && text.starts_with(self.shown.as_str()) {
            let _ = self
                .events
                .send(Event::Delta(text[self.shown.len()..].to_string()));
            self.shown = text.to_string();
        }
        let _ = self.events.send(Event::Done(Finished {
            text: self.shown.clone(),
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.reply.len(),
        }));
    }
}

/// The first pass over a batch of prompts of one length and image placement: their cache and
/// the logits `[B, vocab]` of each last position.
fn prefill(chat: &ChatModel, batch: &[Ready], adapters: &RowAdapters) -> Result<(KvCache, Tensor)> {
    let model = &chat.model;
    let dev = model.device();
    let len = batch[0].ids.len() as i64;
    let b = batch.len() as i64;
    let ctx = len - 1;
    let ids: Vec<i64> = batch.iter().flat_map(|r| r.ids.iter().copied()).collect();
    let input = Tensor::from_slice(&ids).view([b, len]).to_device(dev);
    let contexts: Vec<Prefix> = batch.iter().map(|r| r.row.prefix).collect();
    let pos = positions::batch(&contexts, len, dev);
    // Every row's films in row order (the rows share one placement), encoded together.
    let s = chat.images.size as i64;
    let px: Vec<Tensor> = batch
        .iter()
        .flat_map(|r| &r.job.images)
        .map(|p| Tensor::from_slice(p.as_slice()).view([1, 3, s, s]))
        .collect();
    let embeds = (!px.is_empty()).then(|| {
        let px = Tensor::cat(&px, 0).to_kind(Kind::Float);
        tch::no_grad(|| image_embeds(model, &px))
    });
    let at: Vec<(i64, i64)> = (0..b)
        .flat_map(|row| batch[0].image_starts.iter().map(move |&s| (row, s)))
        .collect();
    let mask = attention_mask(&vec![ctx; batch.len()], len, dev);
    let mut cache = KvCache::default();
    let logits = tch::no_grad(|| {
        model.chatglm.forward_cached_with(
            &GlmInputs {
                input_ids: &input,
                position_ids: &pos,
                attention_mask: &mask,
                image_embeds: embeds.as_ref(),
                image_at: ImageAt::of(&at, batch.len()),
            },
            Some(&mask),
            &mut cache,
            Some(adapters),
        )
    });
    Ok((cache, logits))
}

/// Return the heap's free pages to the operating system (glibc keeps freed memory for reuse; a
/// server's memory should fall back to its idle level after a burst).
fn release_free_memory() {
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
fn row_adapters<'a>(
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
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(anyhow::anyhow!("internal error: {}", panic_text(&p))))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn fail(events: &UnboundedSender<Event>, status: u16, message: impl Into<String>) {
    let _ = events.send(Event::Failed {
        status,
        message: message.into(),
    });
}
