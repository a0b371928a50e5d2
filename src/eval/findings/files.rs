//! Reports to label, from the files users have: either OpenI schema (`{"annotations":
//! [{"image_id", "caption"}]}` or XrayGLM's `[{"img", "prompt", "label"}]`) or `eval`'s hypotheses
//! JSONL (`{"id", "reference" | "references", "hypothesis"}` per line).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{Labeler, Labels, Observation, State};
use crate::eval::metrics::Lang;

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
    let raw = crate::io::read_capped(path, crate::io::MAX_DATA_BYTES)?;
    let raw = crate::io::strip_bom(&raw);
    let name = path.display();
    // A whole-file JSON list, or an object with "annotations": records; anything else: JSONL.
    let whole: Option<serde_json::Value> = serde_json::from_str(raw)
        .ok()
        .filter(|v: &serde_json::Value| v.is_array() || v.get("annotations").is_some());
    let whole_is_list = whole.as_ref().is_some_and(|v| v.is_array());
    let mut out: Vec<ReportText> = if let Some(v) = whole {
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
            if v.get("reference").is_some() && v.get("references").is_some() {
                bail!(
                    "{name}:{}: both \"reference\" and \"references\": give one of them",
                    i + 1
                );
            }
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
    unique_ids(&name.to_string(), &mut out, whole_is_list)?;
    Ok(out)
}

/// Ids name reports in labels and agreements: each once. A training list names its films, and
/// one film may have several samples (a conversation's answers): those get `#2`, `#3`, ….
fn unique_ids(name: &str, out: &mut [ReportText], training_list: bool) -> Result<()> {
    let mut seen: std::collections::HashMap<String, (usize, usize)> = Default::default();
    for (i, r) in out.iter_mut().enumerate() {
        match seen.get_mut(&r.id) {
            None => {
                seen.insert(r.id.clone(), (i, 1));
            }
            Some((_, n)) if training_list => {
                *n += 1;
                r.id = format!("{}#{n}", r.id);
            }
            Some((first, _)) => bail!(
                "{name}: report {} repeats the id {:?} of report {} (each report once)",
                i + 1,
                r.id,
                *first + 1
            ),
        }
    }
    Ok(())
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

/// zh when a CJK character occurs in the first reports, else en.
pub fn detect_lang(texts: &[ReportText]) -> Lang {
    let cjk = texts
        .iter()
        .take(50)
        .flat_map(|t| t.text.chars())
        .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
    if cjk {
        Lang::Zh
    } else {
        Lang::En
    }
}

/// A rule file's labeler, or the embedded rules of the given (else detected) language.
pub fn labeler_for(
    lang: Option<Lang>,
    rules: Option<&Path>,
    texts: &[ReportText],
) -> Result<Labeler> {
    match rules {
        // A pattern too large for the regex engine names the file.
        Some(p) => Labeler::new(&super::RuleSet::load(p)?)
            .with_context(|| format!("{}: the rules do not compile", p.display())),
        None => Ok(Labeler::builtin(lang.unwrap_or_else(|| detect_lang(texts)))),
    }
}

/// The reports of a file with their labels (and, for a hypotheses file, their references').
pub struct Labelled {
    pub reports: Vec<ReportText>,
    pub lang: Lang,
    pub labels: Vec<Labels>,
    /// The references' labels, when the file is a hypotheses file.
    pub references: Option<Vec<Labels>>,
}

impl Labelled {
    /// Label every report of a file (each distinct text once with `distinct`).
    pub fn file(
        path: &Path,
        distinct: bool,
        lang: Option<Lang>,
        rules: Option<&Path>,
    ) -> Result<Self> {
        let mut reports = read_reports(path)?;
        if distinct {
            let mut seen = std::collections::HashSet::new();
            reports.retain(|r| seen.insert(r.text.trim().to_string()));
        }
        let labeler = labeler_for(lang, rules, &reports)?;
        let labels = reports.iter().map(|r| labeler.label(&r.text)).collect();
        let references = reports.iter().any(|r| !r.references.is_empty()).then(|| {
            reports
                .iter()
                .map(|r| label_references(&labeler, &r.references))
                .collect()
        });
        Ok(Self {
            reports,
            lang: labeler.lang(),
            labels,
            references,
        })
    }

    /// CE metrics of a hypotheses file's reports against their references.
    pub fn ce(&self, uncertain_as: super::ce::UncertainAs) -> Option<super::ce::CeReport> {
        let refs = self.references.as_ref()?;
        let hyp: Vec<&str> = self.reports.iter().map(|r| r.text.as_str()).collect();
        let first: Vec<&str> = self
            .reports
            .iter()
            .map(|r| r.references.first().map(String::as_str).unwrap_or(""))
            .collect();
        Some(super::ce::score(
            &self.labels,
            refs,
            &hyp,
            &first,
            uncertain_as,
        ))
    }

    /// The same reports in a second file, matched by id (one missing is an error naming it), and
    /// their labels: the other file's language detected unless given.
    pub fn paired(
        &self,
        other: &Path,
        lang: Option<Lang>,
        rules: Option<&Path>,
    ) -> Result<Labelled> {
        let theirs = read_reports(other)?;
        let by_id: std::collections::HashMap<&str, &ReportText> =
            theirs.iter().map(|r| (r.id.as_str(), r)).collect();
        let paired: Vec<ReportText> = self
            .reports
            .iter()
            .map(|r| {
                by_id
                    .get(r.id.as_str())
                    .map(|t| (*t).clone())
                    .with_context(|| format!("{}: no report with id {:?}", other.display(), r.id))
            })
            .collect::<Result<_>>()?;
        let labeler = labeler_for(lang, rules, &paired)?;
        let labels = paired.iter().map(|r| labeler.label(&r.text)).collect();
        Ok(Labelled {
            reports: paired,
            lang: labeler.lang(),
            labels,
            references: None,
        })
    }

    /// Agreement with a second labelling of the same reports ([`Labelled::paired`]).
    pub fn agreement(&self, theirs: &Labelled) -> Vec<super::ce::Agreement> {
        super::ce::agreement(&self.labels, &theirs.labels)
    }

    /// One JSON line per report (hypotheses files: both sides' labels).
    pub fn lines(&self, evidence: bool) -> Result<String> {
        let mut text = String::new();
        for (i, (r, l)) in self.reports.iter().zip(&self.labels).enumerate() {
            let line = match &self.references {
                Some(refs) => serde_json::json!({
                    "id": r.id,
                    "hypothesis": label_line(&r.id, l, evidence),
                    "reference": label_line(&r.id, &refs[i], evidence),
                }),
                None => label_line(&r.id, l, evidence),
            };
            text.push_str(&serde_json::to_string(&line)?);
            text.push('\n');
        }
        Ok(text)
    }
}

/// Per-observation state counts as a Markdown table.
pub fn counts_markdown(what: &str, labels: &[Labels]) -> String {
    let mut s = format!(
        "\n| observation ({what}: {}) | positive | uncertain | negative | not mentioned |\n|---|---|---|---|---|\n",
        labels.len()
    );
    for c in counts(labels) {
        let o = c.observation.map(|o| o.name()).unwrap_or("");
        s.push_str(&format!(
            "| {o} | {} | {} | {} | {} |\n",
            c.positive, c.uncertain, c.negative, c.not_mentioned
        ));
    }
    s
}

/// One observation's agreement as its table row's cells: the observation, κ over the four states,
/// κ of "present", the positive / negative / uncertain counts of both sides, and the three
/// commonest disagreements (`+→. 14`).
pub fn agreement_cells(r: &super::ce::Agreement) -> [String; 7] {
    let dis: Vec<String> = r
        .disagreements
        .iter()
        .take(3)
        .map(|(x, y, n)| format!("{}→{} {n}", x.mark(), y.mark()))
        .collect();
    [
        r.observation.name().to_string(),
        format!("{:.3}", r.kappa),
        format!("{:.3}", r.kappa_positive),
        format!("{} / {}", r.a[3], r.b[3]),
        format!("{} / {}", r.a[1], r.b[1]),
        format!("{} / {}", r.a[2], r.b[2]),
        dis.join(", "),
    ]
}

/// Per-observation agreement as a Markdown table.
pub fn agreement_markdown(rows: &[super::ce::Agreement], la: Lang, lb: Lang) -> String {
    let (a, b) = (la.code(), lb.code());
    let mut s = format!(
        "\n| observation | κ (4 states) | κ (positive) | positive {a} / {b} | negative {a} / {b} | uncertain {a} / {b} | commonest disagreements ({a} → {b}) |\n|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        s.push_str(&format!("| {} |\n", agreement_cells(r).join(" | ")));
    }
    s
}
