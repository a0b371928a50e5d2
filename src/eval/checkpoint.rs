//! Evaluation of model checkpoints (`xrayglm eval --checkpoint DIR…`): on one split of an
//! image-report file, the teacher-forced loss and perplexity (the trainer's loss, weighted by
//! target tokens), one generated report per film (batched KV-cached decoding; greedy by default),
//! and the report metrics of [`super::score`].
//!
//! The split: a training run's own held-out films by default (its `config.toml`: data file,
//! `train.val_fraction`, `train.seed`, prompt and sample settings — exactly the trainer's split), or
//! every record of a separate file (`--data FILE`), or a held-out fraction of it with a seed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::metrics::Lang;
use super::{Report, Scored};
use crate::config::Config;
use crate::data::batch::{
    Dataset, ImageAblation, Loader, LoaderConfig, LoaderState, Sampler, Shard,
};
use crate::data::records::{load_records, Record};
use crate::data::sample::SampleBuilder;
use crate::infer::chat::{ChatModel, ChatSettings};

/// Which records of a data file: the run's held-out films, its training films (the rest), or all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Heldout,
    Train,
    All,
}

/// Where the films come from and which of them are evaluated.
#[derive(Debug, Clone, Default)]
pub struct DataOptions {
    /// Settings file (data, prompt, sample lengths, image size); default: the first checkpoint's
    /// training `config.toml`.
    pub config: Option<PathBuf>,
    /// `key=value` overrides on that config, as for `finetune`.
    pub overrides: Vec<String>,
    /// Image-report file (either schema); default: the config's `data.path`.
    pub data: Option<PathBuf>,
    /// Default: held-out for the config's own data, all for `--data`.
    pub split: Option<Split>,
    /// Held-out fraction and seed (default: the config's `train.val_fraction`, `train.seed`).
    pub val_fraction: Option<f64>,
    pub seed: Option<u64>,
    /// Evaluate only the first N films of the split.
    pub limit: Option<usize>,
}

/// The evaluated films and the settings they are turned into samples with.
pub struct EvalData {
    pub cfg: Config,
    pub file: String,
    pub records: Vec<Record>,
    /// How the records were chosen, for the report.
    pub split: String,
    pub lang: Lang,
}

/// The training `config.toml` that belongs to a model folder (a run, one of its checkpoints, or
/// a folder holding one), if any.
pub fn run_config_path(dir: &Path) -> Option<PathBuf> {
    let ck = crate::weights::source::resolve_run(dir);
    let mut candidates = vec![dir.join("config.toml"), ck.join("config.toml")];
    if let Some(p) = ck.parent() {
        candidates.push(p.join("config.toml"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Read and split the data once for all checkpoints.
pub fn resolve_data(first_checkpoint: &Path, o: &DataOptions) -> Result<EvalData> {
    let cfg_path = o
        .config
        .clone()
        .or_else(|| run_config_path(first_checkpoint));
    if cfg_path.is_none() && o.data.is_none() {
        bail!(
            "{} has no training config.toml to take the evaluation data from: pass --data FILE (and --config for prompt and sample settings)",
            first_checkpoint.display()
        );
    }
    let mut cfg = Config::load(cfg_path.as_deref(), &o.overrides)?;
    let own_data = o.data.is_none();
    if let Some(d) = &o.data {
        cfg.data.path = d.clone();
    }
    crate::prepare::ensure_synthetic(&cfg)?;
    let loaded = load_records(&cfg.data.path, &cfg.load_options())?;
    let file = loaded.file.display().to_string();
    let fraction = o.val_fraction.unwrap_or(if own_data {
        cfg.train.val_fraction
    } else {
        0.0
    });
    let seed = o.seed.unwrap_or(cfg.train.seed);
    let split = o.split.unwrap_or(if fraction > 0.0 {
        Split::Heldout
    } else {
        Split::All
    });
    let (mut records, what) = match split {
        Split::All => {
            let n = loaded.records.len();
            (loaded.records, format!("all {n} records of {file}"))
        }
        Split::Heldout | Split::Train => {
            if !(fraction > 0.0 && fraction < 1.0) && split == Split::Heldout {
                bail!("--split heldout needs a held-out fraction in (0, 1) (--val_fraction; the config has train.val_fraction = {})", cfg.train.val_fraction);
            }
            let (train, val) = crate::data::split(loaded.records, fraction, seed);
            let (part, name) = match split {
                Split::Train => (train, "training"),
                _ => (val, "held-out"),
            };
            let n = part.len();
            (
                part,
                format!("{name} {n} records of {file} (held-out fraction {fraction}, seed {seed})"),
            )
        }
    };
    if let Some(n) = o.limit {
        records.truncate(n);
    }
    if records.is_empty() {
        bail!("{file}: the evaluation split ({what}) has no records");
    }
    let lang = Lang::of(cfg.sample.language);
    Ok(EvalData {
        cfg,
        file,
        records,
        split: what,
        lang,
    })
}

/// How each checkpoint is run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub batch_size: usize,
    /// New tokens per report at most (stops earlier at `<eop>`).
    pub max_new_tokens: usize,
    pub settings: ChatSettings,
    /// Teacher-forced loss and perplexity.
    pub loss: bool,
    /// Generated reports and their metrics.
    pub generate: bool,
    pub progress: bool,
    /// How uncertain findings count in the CE metrics.
    pub uncertain_as: super::findings::ce::UncertainAs,
    /// Generate every report again with these images instead of the film's own.
    pub ablations: Vec<ImageAblation>,
}

/// One checkpoint's results.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub name: String,
    pub checkpoint: String,
    /// The training step of the checkpoint, when it records one.
    pub step: Option<i64>,
    pub split: String,
    pub films: usize,
    /// Mean cross-entropy per target token (nats), and its exponential.
    pub val_loss: Option<f64>,
    pub val_ppl: Option<f64>,
    pub target_tokens: usize,
    pub metrics: Option<Report>,
    /// Of the findings the references state, the share the reports state too (No Finding aside).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub true_findings_stated: Option<f64>,
    /// The reports again with other images (`--image_ablation`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ablations: Vec<AblationOutcome>,
    pub seconds: f64,
    #[serde(skip)]
    pub generations: Vec<Scored>,
}

/// The reports of the same films generated with other images than their own.
#[derive(Debug, Clone, Serialize)]
pub struct AblationOutcome {
    pub image: ImageAblation,
    /// Metrics against each film's own reference.
    pub metrics: Report,
    /// Share of films whose report differs from the one made with the film's own image.
    pub changed: f64,
    /// Of the findings the references state, the share these reports still state.
    pub true_findings_stated: f64,
}

/// The step recorded in a checkpoint's `trainer_state.json`.
pub fn checkpoint_step(dir: &Path) -> Option<i64> {
    let ck = crate::weights::source::resolve_run(dir);
    let text = std::fs::read_to_string(ck.join("trainer_state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_i64()
}

/// A short display name: `run/step` for a checkpoint folder, else the folder name.
pub fn checkpoint_name(dir: &Path) -> String {
    let leaf = |p: &Path| {
        p.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| p.display().to_string())
    };
    let ck = crate::weights::source::resolve_run(dir);
    let l = leaf(&ck);
    match ck.parent() {
        Some(p) if l.parse::<i64>().is_ok() && p.file_name().is_some() => {
            format!("{}/{l}", leaf(p))
        }
        _ => l,
    }
}

/// The longest prompt of the data (its history, question and films) leaves room for
/// `max_new_tokens` in the model's positions; otherwise an error naming the record.
fn check_room_for_reports(chat: &ChatModel, data: &EvalData, o: &RunOptions) -> Result<()> {
    // (films, history, question) of every record.
    type Asked<'a> = (usize, &'a [(String, String)], &'a str);
    let mut lengths: std::collections::HashMap<Asked, usize> = Default::default();
    let (mut longest, mut which) = (0, None);
    for r in &data.records {
        let key = (r.images.len(), r.history.as_slice(), r.prompt.as_str());
        let n = match lengths.get(&key) {
            Some(&n) => n,
            None => {
                let h = crate::infer::chat::turns(&r.history);
                let n = chat
                    .prompt_ids(&h, &r.prompt, o.settings.english, r.images.len())?
                    .0
                    .len();
                lengths.insert(key, n);
                n
            }
        };
        if n > longest {
            (longest, which) = (n, Some(r));
        }
    }
    let max = chat.max_positions();
    if longest + o.max_new_tokens > max {
        let r = which.expect("a longest prompt");
        let record = format!(
            "record {} ({}{})",
            r.index,
            r.id,
            if r.history.is_empty() {
                String::new()
            } else {
                format!(", {} earlier turns", r.history.len())
            }
        );
        if longest >= max {
            bail!(
                "{}: {record}: its prompt takes {longest} tokens, the model's whole {max} \
                 positions (max_sequence_length), leaving no room for a report: leave the \
                 record out, or shorten its history (data.conversation_turns = \"last\" keeps \
                 one sample per conversation)",
                data.cfg.data.path.display()
            );
        }
        bail!(
            "--max_new_tokens {} after the longest prompt ({longest} tokens, {record} of {}) is \
             beyond the model's {max} positions (max_sequence_length): use at most {}",
            o.max_new_tokens,
            data.cfg.data.path.display(),
            max.saturating_sub(longest)
        );
    }
    Ok(())
}

/// Evaluate one loaded model on the data.
pub fn evaluate(chat: &ChatModel, dir: &Path, data: &EvalData, o: &RunOptions) -> Result<Outcome> {
    if !o.loss && !o.generate {
        bail!("nothing to evaluate: both the loss and generation are switched off");
    }
    if o.batch_size == 0 {
        bail!("--batch_size must be at least 1");
    }
    if o.generate {
        // Prompt + report must fit the model's positions: refused before any work.
        check_room_for_reports(chat, data, o)?;
    }
    let t0 = std::time::Instant::now();
    let model = &chat.model;
    let size = model.cfg.sat.eva_args.image_size[0] as usize;
    if data.cfg.image.size != size {
        bail!(
            "{}: image.size {} of the evaluation settings does not match the model's {size}",
            dir.display(),
            data.cfg.image.size
        );
    }
    let mut sample_cfg = data.cfg.sample.clone();
    sample_cfg.image_length = model.cfg.sat.image_length as usize;
    let builder = SampleBuilder::new(chat.tokenizer.clone(), sample_cfg)?;
    let ds = Dataset::new(
        data.records.clone(),
        &builder,
        data.cfg.image.processor(),
        &data.file,
    )?;
    let name = checkpoint_name(dir);
    let labelers = super::Labelers::builtin();
    // The films as they are: loss and reports.
    let own = pass(chat, data, o, Arc::new(ds), o.loss, o.generate, &name)?;
    let scored = |hyps: Vec<Option<String>>| -> Result<Vec<Scored>> {
        data.records
            .iter()
            .zip(hyps)
            .map(|(r, h)| {
                Ok(Scored {
                    id: r.id.clone(),
                    reference: r.label.clone(),
                    references: Vec::new(),
                    hypothesis: h.with_context(|| format!("no report generated for {}", r.id))?,
                    lang: data.lang,
                    images: Vec::new(),
                })
            })
            .collect()
    };
    let generations: Vec<Scored> = if o.generate {
        scored(own.hyps)?
    } else {
        Vec::new()
    };
    let metrics = if o.generate {
        Some(super::score_with(&generations, o.uncertain_as, &labelers)?)
    } else {
        None
    };
    // The same films' reports again with other images: does the model look at them?
    let mut ablations = Vec::new();
    for &ablation in &o.ablations {
        let ds = Dataset::new(
            data.records.clone(),
            &builder,
            data.cfg.image.processor(),
            &data.file,
        )?
        .with_ablation(ablation)?;
        let label = format!("{name} ({} images)", ablation_name(ablation));
        let p = pass(chat, data, o, Arc::new(ds), false, true, &label)?;
        let items = scored(p.hyps)?;
        let m = super::score_with(&items, o.uncertain_as, &labelers)?;
        let changed = items
            .iter()
            .zip(&generations)
            .filter(|(a, b)| a.hypothesis.trim() != b.hypothesis.trim())
            .count() as f64
            / items.len().max(1) as f64;
        ablations.push(AblationOutcome {
            image: ablation,
            changed,
            true_findings_stated: findings_stated(&items, &labelers),
            metrics: m,
        });
    }
    let val_loss = (o.loss && own.tokens > 0).then(|| own.loss_sum / own.tokens as f64);
    Ok(Outcome {
        name,
        checkpoint: dir.display().to_string(),
        step: checkpoint_step(dir),
        split: data.split.clone(),
        films: data.records.len(),
        val_loss,
        val_ppl: val_loss.map(f64::exp),
        target_tokens: own.tokens,
        true_findings_stated: o.generate.then(|| findings_stated(&generations, &labelers)),
        metrics,
        ablations,
        seconds: t0.elapsed().as_secs_f64(),
        generations,
    })
}

/// The name of an ablation in reports.
pub fn ablation_name(a: ImageAblation) -> &'static str {
    match a {
        ImageAblation::None => "own",
        ImageAblation::Blank => "blank",
        ImageAblation::Shuffled => "shuffled",
    }
}

/// Of the findings the references state as present (No Finding aside), the share the reports
/// state too.
fn findings_stated(items: &[Scored], labelers: &super::Labelers) -> f64 {
    use super::findings::{Observation, State};
    let (mut stated, mut all) = (0usize, 0usize);
    for s in items {
        let (h, r) = labelers.label(s);
        for o in Observation::ALL.into_iter().skip(1) {
            if r.get(o) == State::Positive {
                all += 1;
                stated += (h.get(o) == State::Positive) as usize;
            }
        }
    }
    if all == 0 {
        0.0
    } else {
        stated as f64 / all as f64
    }
}

/// What one pass over the films gives: the summed loss and its target tokens, and the reports.
struct Pass {
    loss_sum: f64,
    tokens: usize,
    hyps: Vec<Option<String>>,
}

/// One pass over the films in batches: the frozen vision tower once per batch, then the
/// teacher-forced loss and / or the reports (one decoding call per distinct question).
fn pass(
    chat: &ChatModel,
    data: &EvalData,
    o: &RunOptions,
    ds: Arc<Dataset>,
    loss: bool,
    generate: bool,
    name: &str,
) -> Result<Pass> {
    let model = &chat.model;
    let lcfg = LoaderConfig {
        sampler: Sampler::Epoch,
        batch_size: o.batch_size,
        shuffle: false,
        drop_last: false,
        ..data.cfg.loader.clone()
    };
    let loader = Loader::new(ds, lcfg, Shard::default(), LoaderState::default())?;
    let n_batches = loader.batches_per_epoch();
    // A bar on a terminal; elsewhere a line for about every tenth of the films.
    let total = data.records.len() as u64;
    let progress = crate::logs::progress::Progress::new(
        o.progress,
        true,
        total,
        0,
        "{msg} [{bar:30}] {pos}/{len} films {elapsed_precise} (eta {eta})",
    );
    let mut done = 0u64;
    let mut next_line = 0u64;
    let dev = model.device();
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    let mut hyps: Vec<Option<String>> = vec![None; data.records.len()];
    for batch in loader.take(n_batches) {
        let b = batch?;
        let t = b.to_tensors(dev);
        // The frozen vision tower runs once per batch, for the loss and the reports alike.
        let embeds = tch::no_grad(|| model.encode_image(&t.images.to_kind(model.kind()), false).2);
        if loss {
            let n = b.target_tokens();
            if n > 0 {
                let l = tch::no_grad(|| model.loss(&b.inputs(&t, Some(&embeds)), false))
                    .double_value(&[]);
                loss_sum += l * n as f64;
                tokens += n;
            }
        }
        if generate {
            let questions: Vec<(&[(String, String)], &str)> = b
                .indices
                .iter()
                .map(|&i| {
                    let r = &data.records[i];
                    (r.history.as_slice(), r.prompt.as_str())
                })
                .collect();
            let reports = chat.answer_batch(
                &b.films_per_row(&embeds),
                &questions,
                &o.settings,
                o.max_new_tokens,
            )?;
            for (&i, h) in b.indices.iter().zip(reports) {
                hyps[i] = Some(h);
            }
        }
        done += b.batch_size as u64;
        progress.set(done, || name.to_string());
        if o.progress && (done >= next_line || done == total) {
            progress.line(done, total, || format!("{name}: {done}/{total} films"));
            next_line = done + total.div_ceil(10).max(1);
        }
    }
    progress.finish();
    Ok(Pass {
        loss_sum,
        tokens,
        hyps,
    })
}
