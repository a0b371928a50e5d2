//! `xrayglm rl-pairs`: DPO pairs made by a model itself. For each film of a training list, `K`
//! reports are sampled through the engine (one prefill per film, the `K` rows decoded together),
//! each is scored by the reward against the film's reference report, and the best and the worst
//! become a pair — when their rewards differ by at least the margin (an uninformative pair is
//! left out). The pairs are written in xrayglm's pair format, readable by `rl.pairs`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use super::policy::prompt_of_sample;
use crate::data::batch::{Dataset, Loader, LoaderConfig, LoaderState, Sampler, Shard};
use crate::eval::reward::Rewarder;
use crate::infer::chat::ChatModel;
use crate::infer::engine::rollout::{rollouts, RolloutConfig, RolloutPrompt};

/// How pairs are made.
#[derive(Debug, Clone)]
pub struct PairsConfig {
    /// Replies per film (`rollout.group`, K ≥ 2), their sampling and length.
    pub rollout: RolloutConfig,
    /// The smallest reward gap between the chosen and the rejected report kept.
    pub margin: f64,
    /// Films whose replies are sampled in one call.
    pub films_per_call: usize,
    /// Threads that score the reports.
    pub threads: usize,
    /// Reports in English (the language of the reward and of the response text).
    pub english: bool,
}

/// One pair, as the pair file holds it.
#[derive(Debug, Clone, Serialize)]
pub struct MadePair {
    pub id: String,
    /// The films ([`write_pairs`] writes them relative to the pair file's folder).
    pub images: Vec<String>,
    pub prompt: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<(String, String)>,
    pub chosen: String,
    pub rejected: String,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// What a pass made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairsSummary {
    pub films: usize,
    pub pairs: usize,
    /// Films left out: their best and worst reports' rewards closer than the margin.
    pub below_margin: usize,
    /// Mean reward of the sampled reports, of the chosen ones and of the rejected ones.
    pub mean_reward: f64,
    pub mean_chosen: f64,
    pub mean_rejected: f64,
}

/// Sample, score and pair the reports of every film of `ds` (in order); `on_film` is told how many
/// films are done.
pub fn make_pairs(
    chat: &ChatModel,
    ds: Arc<Dataset>,
    loader: &LoaderConfig,
    rewarder: &Rewarder,
    cfg: &PairsConfig,
    on_film: &mut dyn FnMut(usize),
) -> Result<(Vec<MadePair>, PairsSummary)> {
    anyhow::ensure!(
        cfg.rollout.group >= 2,
        "rl-pairs needs at least 2 reports per film"
    );
    let lc = LoaderConfig {
        sampler: Sampler::Epoch,
        shuffle: false,
        drop_last: false,
        batch_size: cfg.films_per_call.max(1),
        ..loader.clone()
    };
    let loader = Loader::new(
        Arc::clone(&ds),
        lc,
        Shard::default(),
        LoaderState::default(),
    )?;
    let batches = loader.batches_per_epoch();
    let model = &chat.model;
    let k = cfg.rollout.group;
    let (mut pairs, mut summary) = (Vec::new(), PairsSummary::default());
    let mut reward_sum = 0.0;
    for (call, batch) in loader.take(batches).enumerate() {
        let b = batch?;
        let t = b.to_tensors(model.device());
        let embeds = tch::no_grad(|| model.encode_image(&t.images.to_kind(model.kind()), false).2);
        let prompts: Vec<RolloutPrompt> = b
            .indices
            .iter()
            .zip(b.films_per_row(&embeds))
            .map(|(&i, films)| prompt_of_sample(&ds.samples[i], Some(films)))
            .collect();
        let mut rc = cfg.rollout.clone();
        rc.sampling.seed = cfg
            .rollout
            .sampling
            .seed
            .wrapping_add(call as u64 * 1_000_003);
        let replies = rollouts(&model.chatglm, &prompts, &rc)?;
        let texts = replies
            .iter()
            .map(|r| {
                let reply = chat.response_text(&prompts[r.prompt].ids, &r.tokens, cfg.english)?;
                Ok((reply, ds.records[b.indices[r.prompt]].label.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let rewards = rewarder.score_all(&texts, cfg.threads);
        for (p, &i) in b.indices.iter().enumerate() {
            let group = &rewards[p * k..(p + 1) * k];
            reward_sum += group.iter().map(|r| r.total).sum::<f64>();
            // The first best and the first worst report.
            let (mut best, mut worst) = (0, 0);
            for (j, r) in group.iter().enumerate() {
                if r.total > group[best].total {
                    best = j;
                }
                if r.total < group[worst].total {
                    worst = j;
                }
            }
            summary.films += 1;
            let (hi, lo) = (group[best].total, group[worst].total);
            if hi - lo < cfg.margin || hi == lo {
                summary.below_margin += 1;
                continue;
            }
            let r = &ds.records[i];
            pairs.push(MadePair {
                id: r.id.clone(),
                images: r.images.iter().map(|p| p.display().to_string()).collect(),
                prompt: r.prompt.clone(),
                history: r.history.clone(),
                chosen: texts[p * k + best].0.clone(),
                rejected: texts[p * k + worst].0.clone(),
                chosen_reward: hi,
                rejected_reward: lo,
            });
        }
        on_film(summary.films);
    }
    let n = pairs.len().max(1) as f64;
    summary.pairs = pairs.len();
    summary.mean_reward = reward_sum / (summary.films * k).max(1) as f64;
    summary.mean_chosen = pairs.iter().map(|p| p.chosen_reward).sum::<f64>() / n;
    summary.mean_rejected = pairs.iter().map(|p| p.rejected_reward).sum::<f64>() / n;
    Ok((pairs, summary))
}

/// Write `pairs` to `path` (atomically), their films relative to its folder where they lie below
/// it. Returns how many film paths had to be written absolute (reading them then needs
/// `data.allow_outside_root`).
pub fn write_pairs(path: &Path, pairs: &[MadePair]) -> Result<usize> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut absolute = 0;
    let out: Vec<MadePair> = pairs
        .iter()
        .map(|p| {
            let images = p
                .images
                .iter()
                .map(|f| crate::data::records::relative_to(Path::new(f), &base))
                .collect::<Vec<_>>();
            absolute += images.iter().filter(|f| Path::new(f).is_absolute()).count();
            MadePair {
                images,
                ..p.clone()
            }
        })
        .collect();
    crate::io::write_json_atomic(path, &out)?;
    Ok(absolute)
}
