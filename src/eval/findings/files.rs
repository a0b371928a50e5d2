//! Reports to label, from the files users have: either OpenI schema (`{"annotations":
//! [{"image_id", "caption"}]}` or XrayGLM's `[{"img", "prompt", "label"}]`) or `eval`'s hypotheses
//! JSONL (`{"id", "reference" | "references", "hypothesis"}` per line).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{Labeler, Labels, Observation, State};

/// One report of a file: its id, its text and, in a hypotheses file, its reference(s).
#[derive(Debug, Clone)]
pub struct ReportText {
    pub id: String,
    pub text: String,
    pub references: Vec<String>,
}

/// Read the reports of a file in any of the supported shapes; a bad record names the file and
/// the record.
pub fn read_reports(path: &Path) -> Result<Vec<ReportText>> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display();
    // A whole-file JSON list, or an object with "annotations": records; anything else: JSONL.
    let whole: Option<serde_json::Value> = serde_json::from_str(&raw)
        .ok()
        .filter(|v: &serde_json::Value| v.is_array() || v.get("annotations").is_some());
    let out: Vec<ReportText> = if let Some(v) = whole {
        let (list, id_key, text_key) = match &v {
            serde_json::Value::Object(o) => (
                o.get("annotations")
                    .and_then(|a| a.as_array())
                    .with_context(|| format!("{name}: \"annotations\" must be a list"))?,
                "image_id",
                "caption",
            ),
            serde_json::Value::Array(a) => (a, "img", "label"),
            _ => bail!("{name}: expected a list of records or {{\"annotations\": [...]}}"),
        };
        list.iter()
            .enumerate()
            .map(|(i, r)| {
                let text = r
                    .get(text_key)
                    .and_then(|t| t.as_str())
                    .with_context(|| format!("{name}: record {} has no \"{text_key}\"", i + 1))?;
                let id = r
                    .get(id_key)
                    .or_else(|| r.get("id"))
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .unwrap_or_else(|| (i + 1).to_string());
                Ok(ReportText {
                    id,
                    text: text.to_string(),
                    references: Vec::new(),
                })
            })
            .collect::<Result<_>>()?
    } else {
        let mut out = Vec::new();
        for (i, line) in raw.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{name}:{}: not a JSON line", i + 1))?;
            let text = v
                .get("hypothesis")
                .and_then(|t| t.as_str())
                .with_context(|| format!("{name}:{}: no \"hypothesis\"", i + 1))?;
            let mut references: Vec<String> = Vec::new();
            if let Some(r) = v.get("reference").and_then(|r| r.as_str()) {
                references.push(r.to_string());
            }
            if let Some(rs) = v.get("references").and_then(|r| r.as_array()) {
                for r in rs {
                    references.push(
                        r.as_str()
                            .with_context(|| {
                                format!("{name}:{}: references must be strings", i + 1)
                            })?
                            .to_string(),
                    );
                }
            }
            out.push(ReportText {
                id: v
                    .get("id")
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .unwrap_or_else(|| (i + 1).to_string()),
                text: text.to_string(),
                references,
            });
        }
        out
    };
    if out.is_empty() {
        bail!("{name}: no reports");
    }
    Ok(out)
}

/// Per-observation state counts of a set of labels.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub observation: Option<Observation>,
    pub positive: usize,
    pub negative: usize,
    pub uncertain: usize,
    pub not_mentioned: usize,
}

pub fn counts(labels: &[Labels]) -> Vec<Counts> {
    Observation::ALL
        .iter()
        .map(|&o| {
            let mut c = Counts {
                observation: Some(o),
                ..Default::default()
            };
            for l in labels {
                match l.get(o) {
                    State::Positive => c.positive += 1,
                    State::Negative => c.negative += 1,
                    State::Uncertain => c.uncertain += 1,
                    State::NotMentioned => c.not_mentioned += 1,
                }
            }
            c
        })
        .collect()
}

/// The labels of a reference set: a report with several references is positive for what any of
/// them states (their mentions pooled, CheXpert's aggregation).
pub fn label_references(labeler: &Labeler, refs: &[String]) -> Labels {
    let mentions = refs
        .iter()
        .flat_map(|r| labeler.label(r).mentions)
        .collect();
    Labels::from_mentions(mentions)
}

/// One labelled report as `findings --out` writes it.
pub fn label_line(id: &str, labels: &Labels, evidence: bool) -> serde_json::Value {
    let mut v = serde_json::json!({ "id": id, "labels": labels.to_json() });
    if !labels.sides.is_empty() {
        v["sides"] = serde_json::json!(labels
            .sides
            .iter()
            .map(|(o, s)| (o.name().to_string(), *s))
            .collect::<std::collections::BTreeMap<_, _>>());
    }
    if evidence {
        v["mentions"] = serde_json::to_value(&labels.mentions).unwrap_or_default();
    }
    v
}
