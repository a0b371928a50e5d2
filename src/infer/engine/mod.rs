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
//!
//! The engine thread's loop is here ([`Worker`]: admit → prefill → step → release); each part has
//! its own file: [`scheduler`] (admission, prefill batches, the groups of rows and their caches),
//! [`runner`] (the model passes: prefill, decoding step, per-row adapters) and [`output`] (the next
//! token, detokenizing, stop strings, the end of a reply). The key/value caches are the model's
//! ([`crate::model::chatglm::KvCache`], [`SlotCache`]).
//!
//! * Caches ([`cache`]): a film is encoded once while its embeddings stay in the image cache (by
//!   content), and a prompt asked again — same adapter, ids and films — skips its prefill (its
//!   keys, values and first logits are kept whole). Both are bounded in bytes (LRU) and exact; why
//!   ChatGLM-6B's prompts are cached whole rather than by shared prefix is in [`cache`].
//! * Chunked prefill: while rows decode, a step has a token budget ([`EngineOptions::step_tokens`]);
//!   a prefill beyond it runs a few of its layers per step between decoding steps — split by
//!   layers, which is exact for GLM's bidirectional context where a split by tokens is not.
//! * Structured output: a row may carry a grammar ([`Constraint`]) that masks its logits before
//!   each choice and ends its reply when complete.
//!
//! [`ChatGlm::forward_slots`]: crate::model::chatglm::ChatGlm::forward_slots
//! [`RowAdapters`]: crate::model::chatglm::RowAdapters
//! [`LayerLoras`]: crate::model::chatglm::LayerLoras
//! [`SlotCache`]: crate::model::chatglm::SlotCache

mod cache;
mod output;
pub mod rollout;
mod runner;
mod scheduler;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc::UnboundedSender;

use super::chat::{ChatModel, ChatSettings, Turn};
use super::metrics::{CacheGauges, Gauges, Metrics};
use super::structured::{Constraint, LazyGrammars};
use crate::data::image::ImageProcessor;
use crate::model::chatglm::LayerLoras;
use crate::weights::source::AdapterWeights;
use output::fail;
use runner::release_free_memory;
use scheduler::Group;

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
    /// Bytes of whole prompts' keys, values and first logits kept for prompts asked again (0: off).
    pub prompt_cache_bytes: usize,
    /// Bytes of film embeddings kept by content (0: off).
    pub image_cache_bytes: usize,
    /// Token budget of one step while rows decode: one token per decoding row, and a prefill's
    /// tokens through the whole model. A prefill that does not fit runs a few of its layers per
    /// step (chunked prefill) so that the rows decoding keep their pace. 0: prefills run whole.
    pub step_tokens: usize,
}

impl EngineOptions {
    /// Default of [`EngineOptions::prompt_cache_bytes`], MiB.
    pub const PROMPT_CACHE_MIB: usize = 1024;
    /// Default of [`EngineOptions::image_cache_bytes`], MiB.
    pub const IMAGE_CACHE_MIB: usize = 256;
    /// Default of [`EngineOptions::step_tokens`].
    pub const STEP_TOKENS: usize = 1024;
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            adapter_batching: AdapterBatching::default(),
            prompt_cache_bytes: Self::PROMPT_CACHE_MIB << 20,
            image_cache_bytes: Self::IMAGE_CACHE_MIB << 20,
            step_tokens: Self::STEP_TOKENS,
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
    /// When the request reached the server (its latencies count from here).
    pub arrived: Instant,
    /// The grammar the reply is held to (constrained decoding, [`EngineInfo::grammars`]);
    /// `None`: free text.
    pub constraint: Option<Constraint>,
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

/// Counters the server reports (`/api/health`, `/metrics`) and the tests read.
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
    /// Prefill passes run (a prefill split over steps counts each part).
    pub prefill_chunks: AtomicUsize,
    /// The prompt and image caches: bytes held, hits and misses.
    pub prompt_cache: CacheStats,
    pub image_cache: CacheStats,
    /// Tokens, latencies and answers for `/metrics`.
    pub metrics: Metrics,
}

/// One cache's numbers.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub bytes: AtomicUsize,
    pub entries: AtomicUsize,
    pub hits: AtomicUsize,
    pub misses: AtomicUsize,
}

impl CacheStats {
    fn set<V>(&self, c: &cache::Lru<V>) {
        self.bytes.store(c.bytes(), Ordering::SeqCst);
        self.entries.store(c.len(), Ordering::SeqCst);
        self.hits.store(c.hits as usize, Ordering::SeqCst);
        self.misses.store(c.misses as usize, Ordering::SeqCst);
    }

    fn read(&self) -> CacheGauges {
        let n = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        CacheGauges {
            bytes: n(&self.bytes),
            hits: n(&self.hits),
            misses: n(&self.misses),
        }
    }
}

/// What the HTTP side needs to know about the models, without the models.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Served model names: the base first, then each adapter.
    pub models: Vec<String>,
    pub max_positions: usize,
    pub default_prompt: String,
    pub images: ImageProcessor,
    /// Structured output's grammars over the model's vocabulary (built on first use).
    pub grammars: Arc<LazyGrammars>,
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
    max_queue: usize,
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
        let stats = Arc::new(Stats {
            metrics: Metrics::new(models.clone()),
            ..Stats::default()
        });
        let max_queue = opts.max_queue;
        let info = EngineInfo {
            models,
            max_positions: chat.max_positions(),
            default_prompt: chat.default_prompt.clone(),
            images: chat.images,
            grammars: Arc::new(LazyGrammars::new(
                chat.tokenizer.clone(),
                chat.model.cfg.sat.vocab_size as usize,
            )),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(opts.max_queue);
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
            prompts: cache::PromptCache::new(opts.prompt_cache_bytes),
            images: cache::ImageCache::new(opts.image_cache_bytes),
            pending: VecDeque::new(),
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
            max_queue,
        })
    }

    /// Whether a request sent now would be taken: `Err` says why not (shutting down, the engine
    /// thread gone, a full queue).
    pub fn ready(&self) -> std::result::Result<(), &'static str> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("shutting down");
        }
        let gone = self
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|t| t.is_finished());
        if gone {
            return Err("the engine thread has stopped");
        }
        if self.stats.queued.load(Ordering::SeqCst) >= self.max_queue {
            return Err("the queue is full");
        }
        Ok(())
    }

    /// The numbers `/metrics` reads at the moment it is asked.
    pub fn gauges(&self) -> Gauges {
        let n = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        Gauges {
            queued: n(&self.stats.queued),
            running: n(&self.stats.active),
            cache_bytes: n(&self.stats.cache_bytes),
            steps: n(&self.stats.steps),
            prefill_chunks: n(&self.stats.prefill_chunks),
            prompt_cache: self.stats.prompt_cache.read(),
            image_cache: self.stats.image_cache.read(),
        }
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

struct Worker {
    chat: ChatModel,
    /// Per model, its adapter set (model 0's is empty: it runs the layers' own adapters).
    sets: Vec<Vec<LayerLoras>>,
    /// The adapters' own stores (their tensors are shared with `sets`).
    _stores: Vec<tch::nn::VarStore>,
    groups: Vec<Group>,
    /// Whole prompts' prefills and film embeddings, for requests that repeat them.
    prompts: cache::PromptCache,
    images: cache::ImageCache,
    /// Prefills under way, oldest first.
    pending: VecDeque<scheduler::Pending>,
    opts: EngineOptions,
    stats: Arc<Stats>,
    drain: Arc<Mutex<Option<Instant>>>,
    stopping: Arc<AtomicBool>,
}

impl Worker {
    /// Rows decoding.
    fn decoding(&self) -> usize {
        self.groups.iter().map(|g| g.len()).sum()
    }

    /// Rows decoding or being prefilled.
    fn active(&self) -> usize {
        self.decoding() + self.pending.iter().map(|p| p.batch.len()).sum::<usize>()
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
                        for r in g.clear() {
                            fail(&r.events, 503, "the server is shutting down");
                        }
                    }
                    for p in self.pending.drain(..) {
                        for r in p.batch {
                            fail(&r.row.events, 503, "the server is shutting down");
                        }
                    }
                }
                if self.active() == 0 {
                    self.update_stats();
                    return;
                }
            }
            // 2. Prefill the new requests (those whose prompt is cached join at once): whole when
            //    nothing is decoding, else within the step's token budget. More arrived meanwhile
            //    and there is room: prefill them first (a burst gets its first tokens sooner).
            let was_busy = self.active() > 0 || !admitted.is_empty();
            self.admit(admitted);
            let budget =
                (self.decoding() > 0 && self.opts.step_tokens > 0).then_some(self.opts.step_tokens);
            self.advance(budget);
            let waiting = self.stats.queued.load(Ordering::SeqCst);
            if waiting > 0 && self.active() < self.opts.max_batch && !stopping {
                self.update_stats();
                continue;
            }
            // 3. One decoding step per group with live rows.
            for m in 0..self.groups.len() {
                if !self.groups[m].is_empty() {
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
        s.prompt_cache.set(&self.prompts);
        s.image_cache.set(&self.images);
    }
}
