//! Evaluation of generated reports: n-gram metrics (see [`metrics`]) and clinical-efficacy metrics
//! (see [`findings`]) over `{"id", "reference" | "references", "hypothesis"[, "lang"]}` JSONL
//! files, as `xrayglm eval --hypotheses FILE.jsonl` prints them, and of checkpoints
//! ([`checkpoint`]); [`report`] assembles `report.json`, `report.md` and the per-report lines, and
//! [`page`] the `report.html` a person reads.

pub mod checkpoint;
pub mod findings;
pub mod metrics;
pub mod page;
pub mod report;
pub mod reward;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use metrics::{bleu, chatglm_bleu4, chatglm_rouge, cider_d, rouge_l, tokenize, Lang};

/// One generated report and its reference(s): `"reference"`, `"references": [..]` (several, as
/// pycocoevalcap allows), or both.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scored {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    #[serde(default)]
    pub reference: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    pub hypothesis: String,
    #[serde(default)]
    pub lang: Lang,
    /// The study's films (`"image": path` or `"images": [..]`, relative to the file), shown on
    /// the evaluation page.
    #[serde(
        default,
        alias = "image",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub images: Vec<String>,
}

impl Scored {
    /// Every reference: `reference` (when given) then `references`.
    pub fn all_references(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        if !self.reference.is_empty() {
            v.push(&self.reference);
        }
        v.extend(self.references.iter().map(String::as_str));
        v
    }
}

/// A path or a list of paths.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Ids may be written as strings or numbers.
fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

/// The longest reference or hypothesis `eval` scores by default, in characters: ROUGE-L's longest
/// common subsequence is quadratic in the length (OpenI reports are under 1,000 characters; one
/// 200,000-character pair took over 300 s).
pub const MAX_REPORT_CHARS: usize = 20_000;

/// How [`read_hypotheses`] treats unusual files.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Score several lines with the same id (otherwise an error naming both lines).
    pub allow_duplicates: bool,
    /// Longest reference or hypothesis accepted, in characters.
    pub max_chars: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            allow_duplicates: false,
            max_chars: MAX_REPORT_CHARS,
        }
    }
}

/// Read a hypotheses file; a bad line is an error naming the file and the line.
pub fn read_hypotheses(path: &Path, opts: &ReadOptions) -> Result<Vec<Scored>> {
    let text = crate::io::read_capped(path, crate::io::MAX_DATA_BYTES)
        .with_context(|| format!("{}: cannot read hypotheses", path.display()))?;
    let text = crate::io::strip_bom(&text);
    let mut out = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: Scored = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: expected {{\"id\", \"reference\" or \"references\": [..], \"hypothesis\"[, \"lang\": \"zh\"|\"en\"]}}",
                path.display(),
                i + 1
            )
        })?;
        if !s.reference.is_empty() && !s.references.is_empty() {
            bail!(
                "{}:{}: {:?} has both \"reference\" and \"references\": give one of them",
                path.display(),
                i + 1,
                s.id
            );
        }
        if s.all_references().is_empty() {
            bail!(
                "{}:{}: {:?} has no reference (\"reference\" or \"references\": [..])",
                path.display(),
                i + 1,
                s.id
            );
        }
        let texts = std::iter::once(("hypothesis", s.hypothesis.as_str()))
            .chain(s.all_references().into_iter().map(|r| ("reference", r)));
        for (what, t) in texts {
            let n = t.chars().count();
            if n > opts.max_chars {
                bail!(
                    "{}:{}: the {what} of {:?} has {n} characters, over the limit of {} \
                     (scoring is quadratic in the length); raise it with --max_chars N",
                    path.display(),
                    i + 1,
                    s.id,
                    opts.max_chars
                );
            }
        }
        if let Some(first) = seen.insert(s.id.clone(), i + 1) {
            if !opts.allow_duplicates {
                bail!(
                    "{}: id {:?} appears on lines {first} and {}; each report is scored once \
                     (pass --allow_duplicates to score both)",
                    path.display(),
                    s.id,
                    i + 1
                );
            }
        }
        out.push(s);
    }
    if out.is_empty() {
        bail!("{}: no hypotheses to score", path.display());
    }
    Ok(out)
}

/// The metrics of a set of reports. pycocoevalcap-style scores are in [0, 1] (CIDEr-D in [0, 10]);
/// the `chatglm_*` scores are ×100 like ChatGLM's / LLaMA-Factory's `bleu-4` and `rouge-*` (with
/// several references, those two use the first: their scripts take one label).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub count: usize,
    pub bleu_1: f64,
    pub bleu_2: f64,
    pub bleu_3: f64,
    pub bleu_4: f64,
    pub rouge_l: f64,
    pub cider_d: f64,
    pub chatglm_bleu_4: f64,
    /// LLaMA-Factory's `rouge-1` / `rouge-2` / `rouge-l` (jieba words, rouge-chinese F, ×100).
    pub chatglm_rouge_1: f64,
    pub chatglm_rouge_2: f64,
    pub chatglm_rouge_l: f64,
    /// Reports whose hypothesis is empty (they score 0, and are counted).
    pub empty_hypotheses: usize,
    /// Clinical efficacy: the findings of hypotheses against references ([`findings::ce`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce: Option<findings::ce::CeReport>,
}

/// The labelers of both languages, built once per scoring.
pub struct Labelers {
    zh: findings::Labeler,
    en: findings::Labeler,
}

impl Labelers {
    pub fn builtin() -> Self {
        Self {
            zh: findings::Labeler::builtin(Lang::Zh),
            en: findings::Labeler::builtin(Lang::En),
        }
    }

    pub fn get(&self, lang: Lang) -> &findings::Labeler {
        match lang {
            Lang::Zh => &self.zh,
            Lang::En => &self.en,
        }
    }

    /// The labels of a hypothesis and of its references (pooled, CheXpert's aggregation).
    pub fn label(&self, s: &Scored) -> (findings::Labels, findings::Labels) {
        let l = self.get(s.lang);
        let refs: Vec<String> = s.all_references().into_iter().map(String::from).collect();
        (
            l.label(&s.hypothesis),
            findings::files::label_references(l, &refs),
        )
    }
}

/// Score reports with the default CE convention (uncertain findings count as absent).
pub fn score(items: &[Scored]) -> Result<Report> {
    score_with(
        items,
        findings::ce::UncertainAs::default(),
        &Labelers::builtin(),
    )
}

/// Score reports: n-gram metrics against every reference, CE metrics of their findings.
pub fn score_with(
    items: &[Scored],
    uncertain_as: findings::ce::UncertainAs,
    labelers: &Labelers,
) -> Result<Report> {
    if items.is_empty() {
        bail!("no reports to score");
    }
    let hyps: Vec<Vec<String>> = items
        .iter()
        .map(|s| tokenize(&s.hypothesis, s.lang))
        .collect();
    let refs: Vec<Vec<Vec<String>>> = items
        .iter()
        .map(|s| {
            s.all_references()
                .into_iter()
                .map(|r| tokenize(r, s.lang))
                .collect()
        })
        .collect();
    let b = bleu(&hyps, &refs);
    let pairs: Vec<(String, String)> = items
        .iter()
        .map(|s| {
            let first = s
                .all_references()
                .first()
                .copied()
                .unwrap_or("")
                .to_string();
            (s.hypothesis.clone(), first)
        })
        .collect();
    let rouge_cn = chatglm_rouge(&pairs);
    let (hyp_labels, ref_labels): (Vec<_>, Vec<_>) =
        items.iter().map(|s| labelers.label(s)).unzip();
    let hyp_texts: Vec<&str> = items.iter().map(|s| s.hypothesis.as_str()).collect();
    let ref_texts: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
    Ok(Report {
        count: items.len(),
        bleu_1: b[0],
        bleu_2: b[1],
        bleu_3: b[2],
        bleu_4: b[3],
        rouge_l: rouge_l(&hyps, &refs),
        cider_d: cider_d(&hyps, &refs),
        chatglm_bleu_4: chatglm_bleu4(&pairs),
        chatglm_rouge_1: rouge_cn[0],
        chatglm_rouge_2: rouge_cn[1],
        chatglm_rouge_l: rouge_cn[2],
        empty_hypotheses: items
            .iter()
            .filter(|s| s.hypothesis.trim().is_empty())
            .count(),
        ce: Some(findings::ce::score(
            &hyp_labels,
            &ref_labels,
            &hyp_texts,
            &ref_texts,
            uncertain_as,
        )),
    })
}

/// One report with its own scores, as the per-report lines and the page carry them: sentence
/// BLEU-4 and ROUGE-L (pycocoevalcap's scorers on this pair alone) and the findings of hypothesis
/// and reference, so that a user can sort and read the worst reports.
#[derive(Debug, Clone)]
pub struct ScoredLine {
    pub item: Scored,
    pub bleu_4: f64,
    pub rouge_l: f64,
    pub hypothesis: findings::Labels,
    pub reference: findings::Labels,
}

impl ScoredLine {
    /// The JSONL line: the item's fields, its scores and both sides' findings.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.item).unwrap_or_default();
        v["bleu_4"] = serde_json::json!(self.bleu_4);
        v["rouge_l"] = serde_json::json!(self.rouge_l);
        v["hypothesis_findings"] = self.hypothesis.to_json();
        v["reference_findings"] = self.reference.to_json();
        v
    }
}

/// Each report's own scores and findings.
pub fn scored_lines(items: &[Scored], labelers: &Labelers) -> Vec<ScoredLine> {
    items
        .iter()
        .map(|s| {
            let h = vec![tokenize(&s.hypothesis, s.lang)];
            let r = vec![s
                .all_references()
                .into_iter()
                .map(|x| tokenize(x, s.lang))
                .collect::<Vec<_>>()];
            let (hl, rl) = labelers.label(s);
            ScoredLine {
                item: s.clone(),
                bleu_4: bleu(&h, &r)[3],
                rouge_l: rouge_l(&h, &r),
                hypothesis: hl,
                reference: rl,
            }
        })
        .collect()
}

/// The per-report JSONL lines of [`scored_lines`].
pub fn sample_lines(items: &[Scored], labelers: &Labelers) -> Vec<serde_json::Value> {
    scored_lines(items, labelers)
        .iter()
        .map(ScoredLine::json)
        .collect()
}

/// One row of the Markdown table: a model (or hypotheses file) with what was measured for it.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub val_loss: Option<f64>,
    pub metrics: Option<Report>,
}

/// A Markdown table, one row per model; `-` where something was not measured.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| model | n | val loss | ppl | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CIDEr-D | bleu-4 | rouge-1 | rouge-2 | rouge-l |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let loss = row
            .val_loss
            .map(|l| format!("{l:.4} | {:.3}", l.exp()))
            .unwrap_or_else(|| "- | -".into());
        let m = match &row.metrics {
            Some(r) => format!(
                "{} | {loss} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2}",
                r.count,
                r.bleu_1,
                r.bleu_2,
                r.bleu_3,
                r.bleu_4,
                r.rouge_l,
                r.cider_d,
                r.chatglm_bleu_4,
                r.chatglm_rouge_1,
                r.chatglm_rouge_2,
                r.chatglm_rouge_l
            ),
            None => format!("- | {loss} | - | - | - | - | - | - | - | - | - | -"),
        };
        s.push_str(&format!("| {} | {m} |\n", row.name));
    }
    s
}

/// The CE table (Markdown): one row per model with micro / macro scores, each observation's F1
/// and the collapse detectors.
pub fn ce_markdown(rows: &[(&str, &findings::ce::CeReport)]) -> String {
    use findings::Observation;
    let mut s = String::from("\n| model | CE-P | CE-R | CE-F1 | macro-F1 |");
    for o in Observation::ALL {
        s.push_str(&format!(" {} |", o.code()));
    }
    s.push_str(" No Finding hyp / ref | distinct hyp | length hyp/ref |\n|---|---|---|---|---|");
    for _ in Observation::ALL {
        s.push_str("---|");
    }
    s.push_str("---|---|---|\n");
    for (name, r) in rows {
        s.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.micro.precision, r.micro.recall, r.micro.f1, r.macro_f1
        ));
        for o in &r.observations {
            if o.references + o.hypotheses == 0 {
                s.push_str(" - |");
            } else {
                s.push_str(&format!(" {:.2} |", o.prf.f1));
            }
        }
        let c = &r.collapse;
        s.push_str(&format!(
            " {:.2} / {:.2} | {:.2} | {:.2} |\n",
            c.no_finding_hypotheses, c.no_finding_references, c.distinct_hypotheses, c.length_ratio
        ));
    }
    s
}
