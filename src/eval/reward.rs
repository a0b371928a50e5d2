//! Per-report rewards for reinforcement learning and preference pairs: weighted terms of the
//! findings a report states (the same labeler and the same "present" rule as the CE metrics), its
//! n-gram overlap with the reference, and its length.
//!
//! The clinical term is the F1 of the report's present observations against the reference's, over
//! the 14 CheXpert observations (No Finding derived, so a normal report has one label and the F1 is
//! always defined). An observation is present when stated positive — or uncertain, with
//! [`UncertainAs::Positive`]; an explicit negative counts as absent, the same as not mentioning it,
//! as in the CE tables. The rules merge mentions CheXpert's way (positive over uncertain over
//! negative), so a report that states a finding both ways states it: listing every observation, or
//! every observation and its denial, pays one false positive for each finding the reference lacks.
//! The `contradiction` term (a penalty) makes a hedge cost even where the reference has the
//! finding: the share of the 14 observations the report states both present and absent.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::findings::ce::{outcome, Prf, UncertainAs};
use super::findings::{Labeler, Labels, Observation, State};
use super::metrics::{bleu, rouge_l, tokenize, CiderDf, Lang};

/// The weight of each term; the reward is their weighted sum (a weight of 0 skips the term).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardWeights {
    /// F1 of the stated findings against the reference's, in [0, 1].
    pub ce_f1: f64,
    /// ROUGE-L (β = 1.2) against the reference, in [0, 1].
    pub rouge_l: f64,
    /// BLEU-4 of the report alone against its reference, in [0, 1].
    pub bleu_4: f64,
    /// CIDEr-D with document frequencies from the training references, in [0, 10].
    pub cider_d: f64,
    /// A penalty: `|report length / reference length − 1|` in characters.
    pub length: f64,
    /// A penalty: the share of the 14 observations stated both present and absent.
    pub contradiction: f64,
    /// How an uncertain mention counts for `ce_f1`.
    pub uncertain_as: UncertainAs,
}

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            ce_f1: 1.0,
            rouge_l: 0.0,
            bleu_4: 0.0,
            cider_d: 0.0,
            length: 0.0,
            contradiction: 1.0,
            uncertain_as: UncertainAs::default(),
        }
    }
}

impl RewardWeights {
    pub fn validate(&self, key: &str) -> Result<()> {
        for (name, w) in [
            ("ce_f1", self.ce_f1),
            ("rouge_l", self.rouge_l),
            ("bleu_4", self.bleu_4),
            ("cider_d", self.cider_d),
            ("length", self.length),
            ("contradiction", self.contradiction),
        ] {
            anyhow::ensure!(
                w.is_finite() && w >= 0.0,
                "{key}.{name} = {w}: a weight is finite and not negative"
            );
        }
        Ok(())
    }
}

/// One report's terms (unweighted) and the reward.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Reward {
    pub total: f64,
    pub ce_f1: f64,
    pub rouge_l: f64,
    pub bleu_4: f64,
    pub cider_d: f64,
    pub length: f64,
    pub contradiction: f64,
}

/// Scores reports against their references.
pub struct Rewarder {
    weights: RewardWeights,
    labeler: Labeler,
    lang: Lang,
    cider: Option<CiderDf>,
}

impl Rewarder {
    /// The embedded rules of `lang`, or a rules file (a user's own findings as the reward);
    /// `corpus`: the training references, for CIDEr-D's document frequencies.
    pub fn new(
        weights: RewardWeights,
        lang: Lang,
        rules: Option<&Path>,
        corpus: &[String],
    ) -> Result<Self> {
        weights.validate("rl.reward")?;
        let labeler = super::findings::files::labeler_for(Some(lang), rules, &[])?;
        let cider = (weights.cider_d > 0.0).then(|| {
            let refs: Vec<Vec<Vec<String>>> =
                corpus.iter().map(|r| vec![tokenize(r, lang)]).collect();
            CiderDf::new(&refs)
        });
        Ok(Self {
            weights,
            labeler,
            lang,
            cider,
        })
    }

    /// The reward of `report` against `reference`.
    pub fn score(&self, report: &str, reference: &str) -> Reward {
        let w = &self.weights;
        let (h, r) = (self.labeler.label(report), self.labeler.label(reference));
        let ce_f1 = findings_f1(&h, &r, w.uncertain_as);
        let contradiction = contradictions(&h) as f64 / Observation::ALL.len() as f64;
        let words = || (tokenize(report, self.lang), tokenize(reference, self.lang));
        let (mut rouge, mut bleu4, mut cider) = (0.0, 0.0, 0.0);
        if w.rouge_l > 0.0 || w.bleu_4 > 0.0 || w.cider_d > 0.0 {
            let (hw, rw) = words();
            let (hs, rs) = (vec![hw], vec![vec![rw]]);
            if w.rouge_l > 0.0 {
                rouge = nan_as_zero(rouge_l(&hs, &rs));
            }
            if w.bleu_4 > 0.0 {
                bleu4 = nan_as_zero(bleu(&hs, &rs)[3]);
            }
            if let Some(c) = &self.cider {
                cider = c.score(&hs[0], &rs[0]);
            }
        }
        let chars = |s: &str| s.chars().filter(|c| !c.is_whitespace()).count() as f64;
        let length = (chars(report) / chars(reference).max(1.0) - 1.0).abs();
        Reward {
            total: w.ce_f1 * ce_f1 + w.rouge_l * rouge + w.bleu_4 * bleu4 + w.cider_d * cider
                - w.length * length
                - w.contradiction * contradiction,
            ce_f1,
            rouge_l: rouge,
            bleu_4: bleu4,
            cider_d: cider,
            length,
            contradiction,
        }
    }

    /// The rewards of `(report, reference)` pairs, on up to `threads` CPU threads (the labeler
    /// and the metrics are plain CPU work beside the model's).
    pub fn score_all(&self, pairs: &[(String, String)], threads: usize) -> Vec<Reward> {
        let per = pairs.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let parts: Vec<_> = pairs
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(h, r)| self.score(h, r))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().expect("a reward thread panicked"))
                .collect()
        })
    }
}

fn nan_as_zero(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// F1 of the observations present in `h` against those present in `r` (1 when neither has one).
pub fn findings_f1(h: &Labels, r: &Labels, uncertain_as: UncertainAs) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    for o in Observation::ALL {
        let (t, p, f) = outcome(h, r, o, uncertain_as);
        (tp, fp, fn_) = (tp + t, fp + p, fn_ + f);
    }
    if tp + fp + fn_ == 0 {
        1.0
    } else {
        Prf::from_counts(tp, fp, fn_).f1
    }
}

/// Observations a report states both present (positive or uncertain) and absent (negative).
pub fn contradictions(h: &Labels) -> usize {
    Observation::ALL
        .iter()
        .filter(|&&o| {
            let said =
                |f: fn(State) -> bool| h.mentions.iter().any(|m| m.observation == o && f(m.state));
            said(|s| matches!(s, State::Positive | State::Uncertain))
                && said(|s| s == State::Negative)
        })
        .count()
}
