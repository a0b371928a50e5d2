//! Clinical-efficacy (CE) metrics: precision, recall and F1 of the findings generated reports
//! state against those of their references, over the 14 CheXpert observations (the R2Gen line of
//! work: Chen et al., EMNLP 2020, and its successors on MIMIC-CXR and IU X-ray), and the
//! agreement of two labelings of the same reports (Cohen's κ).
//!
//! A label counts as present when its state is positive — and, with [`UncertainAs::Positive`],
//! uncertain (default: uncertain counts as absent, as most CE tables do). Micro scores pool the
//! 14 observations' counts; macro scores average the per-observation F1 over the observations
//! that are present in at least one reference or hypothesis (an observation nobody mentions has no
//! F1 to average).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Labels, Observation, State};

/// How an uncertain label counts in CE metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UncertainAs {
    #[default]
    Negative,
    Positive,
}

impl UncertainAs {
    pub fn present(self, s: State) -> bool {
        match s {
            State::Positive => true,
            State::Uncertain => self == UncertainAs::Positive,
            _ => false,
        }
    }
}

/// Precision, recall and F1 (0 where undefined).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Prf {
    pub fn from_counts(tp: usize, fp: usize, fn_: usize) -> Self {
        let p = if tp + fp > 0 {
            tp as f64 / (tp + fp) as f64
        } else {
            0.0
        };
        let r = if tp + fn_ > 0 {
            tp as f64 / (tp + fn_) as f64
        } else {
            0.0
        };
        let f1 = if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        };
        Self {
            precision: p,
            recall: r,
            f1,
        }
    }
}

/// One observation's CE scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservationScore {
    pub observation: Observation,
    /// References where it is present, hypotheses where it is present, both.
    pub references: usize,
    pub hypotheses: usize,
    pub both: usize,
    #[serde(flatten)]
    pub prf: Prf,
}

/// Signs that a model writes one report for every film.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Collapse {
    /// Share of hypotheses labelled No Finding, and of references.
    pub no_finding_hypotheses: f64,
    pub no_finding_references: f64,
    /// Distinct hypotheses / films (1: every report differs; 1/n: one report for all).
    pub distinct_hypotheses: f64,
    pub distinct_references: f64,
    /// Mean hypothesis length / mean reference length, in characters.
    pub length_ratio: f64,
}

/// CE metrics of a set of reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeReport {
    pub count: usize,
    pub uncertain_as: UncertainAs,
    pub micro: Prf,
    pub macro_f1: f64,
    pub observations: Vec<ObservationScore>,
    pub collapse: Collapse,
}

/// Observation `o` of one hypothesis against its reference, as (true positive, false positive,
/// false negative) counts of 0 or 1.
pub fn outcome(
    h: &Labels,
    r: &Labels,
    o: Observation,
    uncertain_as: UncertainAs,
) -> (usize, usize, usize) {
    match (
        uncertain_as.present(h.get(o)),
        uncertain_as.present(r.get(o)),
    ) {
        (true, true) => (1, 0, 0),
        (true, false) => (0, 1, 0),
        (false, true) => (0, 0, 1),
        (false, false) => (0, 0, 0),
    }
}

/// CE metrics of hypotheses against references (`pairs` of labels, in order) with the texts'
/// collapse detectors.
pub fn score(
    hyps: &[Labels],
    refs: &[Labels],
    hyp_texts: &[&str],
    ref_texts: &[&str],
    uncertain_as: UncertainAs,
) -> CeReport {
    let n = hyps.len().min(refs.len());
    let (mut tp_all, mut fp_all, mut fn_all) = (0, 0, 0);
    let mut observations = Vec::new();
    let mut f1s = Vec::new();
    for o in Observation::ALL {
        let (mut tp, mut fp, mut fn_) = (0, 0, 0);
        for (h, r) in hyps.iter().zip(refs) {
            let (t, p, f) = outcome(h, r, o, uncertain_as);
            (tp, fp, fn_) = (tp + t, fp + p, fn_ + f);
        }
        let prf = Prf::from_counts(tp, fp, fn_);
        if tp + fp + fn_ > 0 {
            f1s.push(prf.f1);
        }
        tp_all += tp;
        fp_all += fp;
        fn_all += fn_;
        observations.push(ObservationScore {
            observation: o,
            references: tp + fn_,
            hypotheses: tp + fp,
            both: tp,
            prf,
        });
    }
    let share_nf = |ls: &[Labels]| {
        ls.iter()
            .filter(|l| l.get(Observation::NoFinding) == State::Positive)
            .count() as f64
            / ls.len().max(1) as f64
    };
    let distinct = |ts: &[&str]| {
        let set: std::collections::HashSet<&str> = ts.iter().map(|t| t.trim()).collect();
        set.len() as f64 / ts.len().max(1) as f64
    };
    let mean_len = |ts: &[&str]| {
        ts.iter().map(|t| t.chars().count()).sum::<usize>() as f64 / ts.len().max(1) as f64
    };
    CeReport {
        count: n,
        uncertain_as,
        micro: Prf::from_counts(tp_all, fp_all, fn_all),
        macro_f1: if f1s.is_empty() {
            0.0
        } else {
            f1s.iter().sum::<f64>() / f1s.len() as f64
        },
        observations,
        collapse: Collapse {
            no_finding_hypotheses: share_nf(hyps),
            no_finding_references: share_nf(refs),
            distinct_hypotheses: distinct(hyp_texts),
            distinct_references: distinct(ref_texts),
            length_ratio: mean_len(hyp_texts) / mean_len(ref_texts).max(1e-9),
        },
    }
}

/// Agreement of two labelings of the same reports on one observation: Cohen's κ over the four
/// states, κ of "present" (positive) alone, and each side's state counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    pub observation: Observation,
    pub kappa: f64,
    pub kappa_positive: f64,
    /// `[not mentioned, negative, uncertain, positive]` counts of each side.
    pub a: [usize; 4],
    pub b: [usize; 4],
    /// Reports with the same state on both sides.
    pub agree: usize,
    /// The commonest disagreements: `(state in a, state in b, count)`.
    pub disagreements: Vec<(State, State, usize)>,
}

/// Cohen's κ of paired categorical labels: (p_o − p_e) / (1 − p_e); 1 when both sides put every
/// item in one and the same category.
pub fn cohen_kappa<T: Eq + std::hash::Hash + Copy>(a: &[T], b: &[T]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 {
        return 0.0;
    }
    let mut ca: HashMap<T, usize> = HashMap::new();
    let mut cb: HashMap<T, usize> = HashMap::new();
    let mut same = 0;
    for (x, y) in a.iter().zip(b) {
        *ca.entry(*x).or_default() += 1;
        *cb.entry(*y).or_default() += 1;
        if x == y {
            same += 1;
        }
    }
    let po = same as f64 / n as f64;
    let pe: f64 = ca
        .iter()
        .map(|(k, &c)| c as f64 * *cb.get(k).unwrap_or(&0) as f64)
        .sum::<f64>()
        / (n as f64 * n as f64);
    if (1.0 - pe).abs() < 1e-12 {
        1.0
    } else {
        (po - pe) / (1.0 - pe)
    }
}

fn state_index(s: State) -> usize {
    match s {
        State::NotMentioned => 0,
        State::Negative => 1,
        State::Uncertain => 2,
        State::Positive => 3,
    }
}

/// Per-observation agreement of two labelings (`a[i]` and `b[i]` label the same report).
pub fn agreement(a: &[Labels], b: &[Labels]) -> Vec<Agreement> {
    Observation::ALL
        .iter()
        .map(|&o| {
            let sa: Vec<State> = a.iter().map(|l| l.get(o)).collect();
            let sb: Vec<State> = b.iter().map(|l| l.get(o)).collect();
            let pa: Vec<bool> = sa.iter().map(|&s| s == State::Positive).collect();
            let pb: Vec<bool> = sb.iter().map(|&s| s == State::Positive).collect();
            let mut ca = [0; 4];
            let mut cb = [0; 4];
            let mut pairs: HashMap<(State, State), usize> = HashMap::new();
            for (&x, &y) in sa.iter().zip(&sb) {
                ca[state_index(x)] += 1;
                cb[state_index(y)] += 1;
                if x != y {
                    *pairs.entry((x, y)).or_default() += 1;
                }
            }
            let mut disagreements: Vec<(State, State, usize)> =
                pairs.into_iter().map(|((x, y), c)| (x, y, c)).collect();
            disagreements.sort_by(|p, q| q.2.cmp(&p.2).then((p.0, p.1).cmp(&(q.0, q.1))));
            Agreement {
                observation: o,
                kappa: cohen_kappa(&sa, &sb),
                kappa_positive: cohen_kappa(&pa, &pb),
                a: ca,
                b: cb,
                agree: sa.iter().zip(&sb).filter(|(x, y)| x == y).count(),
                disagreements,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa_of_known_tables() {
        // Cohen's worked example: 2×2 table [[20, 5], [10, 15]] → po = 0.7, pe = 0.5, κ = 0.4.
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (x, y, n) in [(1, 1, 20), (1, 0, 5), (0, 1, 10), (0, 0, 15)] {
            for _ in 0..n {
                a.push(x);
                b.push(y);
            }
        }
        assert!((cohen_kappa(&a, &b) - 0.4).abs() < 1e-12);
        assert_eq!(cohen_kappa(&[1, 1], &[1, 1]), 1.0);
    }

    #[test]
    fn ce_counts_and_uncertain_convention() {
        let l = |s: &str| Labels::parse_compact(s).unwrap();
        let refs = [l("CM+ PE+"), l("PE?"), l("")];
        let hyps = [l("CM+"), l("PE+"), l("")];
        let t = ["a", "b", "c"];
        let r = score(&hyps, &refs, &t, &t, UncertainAs::Negative);
        let pe = &r.observations[Observation::PleuralEffusion.index()];
        assert_eq!((pe.references, pe.hypotheses, pe.both), (1, 1, 0));
        let r = score(&hyps, &refs, &t, &t, UncertainAs::Positive);
        let pe = &r.observations[Observation::PleuralEffusion.index()];
        assert_eq!((pe.references, pe.hypotheses, pe.both), (2, 1, 1));
        // No Finding: the third pair (both) and, with uncertain as negative, the second reference.
        let nf = &r.observations[0];
        assert_eq!(nf.both, 1);
    }
}
