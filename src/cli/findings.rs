//! `xrayglm findings FILE`: label the findings of reports (see `xrayglm::eval::findings`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use xrayglm::eval::findings::{ce, files, Labeler, Labels, RuleSet};
use xrayglm::eval::metrics::Lang;

#[derive(Args)]
pub struct FindingsArgs {
    /// Reports: OpenI schema ({"annotations": [{"image_id", "caption"}]}), XrayGLM's list
    /// ([{"img", "prompt", "label"}]) or eval's hypotheses JSONL.
    pub file: PathBuf,
    /// zh or en (default: zh when the first reports contain CJK characters).
    #[arg(long, value_parser = xrayglm::config::parse_enum::<Lang>)]
    pub lang: Option<Lang>,
    /// A rule file instead of the embedded rules of the language (rules/findings/*.toml).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Write one line per report: {"id", "labels", "sides"[, "mentions"]} (hypotheses files:
    /// {"id", "hypothesis", "reference"}).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With --out: the matched phrases and the cue that decided each.
    #[arg(long)]
    pub evidence: bool,
    /// Label each distinct report text once (OpenI repeats a study's report for every view).
    #[arg(long)]
    pub distinct: bool,
    /// A second labelling of the same reports (same ids, e.g. the other language of OpenI):
    /// per-observation agreement (Cohen's κ), counts and the commonest disagreements.
    #[arg(long)]
    pub against: Option<PathBuf>,
    #[arg(long, value_parser = xrayglm::config::parse_enum::<Lang>)]
    pub against_lang: Option<Lang>,
    #[arg(long)]
    pub against_rules: Option<PathBuf>,
    /// With a hypotheses file: count uncertain findings as positive (default: as negative).
    #[arg(long)]
    pub uncertain_positive: bool,
}

fn labeler(
    lang: Option<Lang>,
    rules: Option<&PathBuf>,
    texts: &[files::ReportText],
) -> Result<Labeler> {
    match rules {
        Some(p) => Labeler::new(&RuleSet::load(p)?),
        None => Ok(Labeler::builtin(lang.unwrap_or_else(|| detect_lang(texts)))),
    }
}

/// zh when a CJK character occurs in the first reports.
fn detect_lang(texts: &[files::ReportText]) -> Lang {
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

pub fn findings(a: FindingsArgs) -> Result<()> {
    let mut reports = files::read_reports(&a.file)?;
    if a.distinct {
        let mut seen = std::collections::HashSet::new();
        reports.retain(|r| seen.insert(r.text.trim().to_string()));
    }
    let lab = labeler(a.lang, a.rules.as_ref(), &reports)?;
    let labels: Vec<Labels> = reports.iter().map(|r| lab.label(&r.text)).collect();
    let hypotheses = reports.iter().any(|r| !r.references.is_empty());
    let ref_labels: Vec<Labels> = if hypotheses {
        reports
            .iter()
            .map(|r| files::label_references(&lab, &r.references))
            .collect()
    } else {
        Vec::new()
    };
    let mut summary = serde_json::json!({
        "file": a.file.display().to_string(),
        "lang": lab.lang(),
        "reports": reports.len(),
        "counts": files::counts(&labels),
    });
    let mut table = counts_table("reports", &labels);
    if hypotheses {
        let hyp_texts: Vec<&str> = reports.iter().map(|r| r.text.as_str()).collect();
        let ref_texts: Vec<&str> = reports
            .iter()
            .map(|r| r.references.first().map(String::as_str).unwrap_or(""))
            .collect();
        let uncertain_as = if a.uncertain_positive {
            ce::UncertainAs::Positive
        } else {
            ce::UncertainAs::Negative
        };
        let report = ce::score(&labels, &ref_labels, &hyp_texts, &ref_texts, uncertain_as);
        summary["reference_counts"] = serde_json::to_value(files::counts(&ref_labels))?;
        table.push_str(&counts_table("references", &ref_labels));
        table.push_str(&xrayglm::eval::ce_markdown(&[("hypotheses", &report)]));
        summary["ce"] = serde_json::to_value(&report)?;
    }
    if let Some(other) = &a.against {
        let theirs = files::read_reports(other)?;
        let by_id: std::collections::HashMap<&str, &files::ReportText> =
            theirs.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut paired = Vec::new();
        for (r, l) in reports.iter().zip(&labels) {
            let t = by_id.get(r.id.as_str()).with_context(|| {
                format!(
                    "{}: no report with id {:?} (of {})",
                    other.display(),
                    r.id,
                    a.file.display()
                )
            })?;
            paired.push((r, l, *t));
        }
        let their_texts: Vec<files::ReportText> = paired.iter().map(|p| p.2.clone()).collect();
        let lab_b = labeler(a.against_lang, a.against_rules.as_ref(), &their_texts)?;
        let lb: Vec<Labels> = their_texts.iter().map(|r| lab_b.label(&r.text)).collect();
        let la: Vec<Labels> = paired.iter().map(|p| p.1.clone()).collect();
        let agreement = ce::agreement(&la, &lb);
        table.push_str(&agreement_table(&agreement, lab.lang(), lab_b.lang()));
        summary["against"] = serde_json::json!({
            "file": other.display().to_string(),
            "lang": lab_b.lang(),
            "agreement": agreement,
        });
    }
    if let Some(out) = &a.out {
        let mut text = String::new();
        for (i, (r, l)) in reports.iter().zip(&labels).enumerate() {
            let line = if hypotheses {
                serde_json::json!({
                    "id": r.id,
                    "hypothesis": files::label_line(&r.id, l, a.evidence),
                    "reference": files::label_line(&r.id, &ref_labels[i], a.evidence),
                })
            } else {
                files::label_line(&r.id, l, a.evidence)
            };
            text.push_str(&serde_json::to_string(&line)?);
            text.push('\n');
        }
        if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(&a.file).ok() {
            bail!("--out {} is the input file", out.display());
        }
        xrayglm::io::write_atomic(out, text.as_bytes())?;
        xrayglm::errln!("wrote {}", out.display());
    }
    xrayglm::outln!("{}", serde_json::to_string_pretty(&summary)?);
    xrayglm::err!("{table}");
    Ok(())
}

fn counts_table(what: &str, labels: &[Labels]) -> String {
    let mut s = format!(
        "\n| observation ({what}: {}) | positive | uncertain | negative | not mentioned |\n|---|---|---|---|---|\n",
        labels.len()
    );
    for c in files::counts(labels) {
        let o = c.observation.map(|o| o.name()).unwrap_or("");
        s.push_str(&format!(
            "| {o} | {} | {} | {} | {} |\n",
            c.positive, c.uncertain, c.negative, c.not_mentioned
        ));
    }
    s
}

fn agreement_table(rows: &[ce::Agreement], la: Lang, lb: Lang) -> String {
    let name = |l: Lang| match l {
        Lang::Zh => "zh",
        Lang::En => "en",
    };
    let (a, b) = (name(la), name(lb));
    let mut s = format!(
        "\n| observation | κ (4 states) | κ (positive) | positive {a} / {b} | negative {a} / {b} | uncertain {a} / {b} | commonest disagreements ({a} → {b}) |\n|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let dis: Vec<String> = r
            .disagreements
            .iter()
            .take(3)
            .map(|(x, y, n)| format!("{}→{} {n}", x.mark(), y.mark()))
            .collect();
        s.push_str(&format!(
            "| {} | {:.3} | {:.3} | {} / {} | {} / {} | {} / {} | {} |\n",
            r.observation.name(),
            r.kappa,
            r.kappa_positive,
            r.a[3],
            r.b[3],
            r.a[1],
            r.b[1],
            r.a[2],
            r.b[2],
            dis.join(", ")
        ));
    }
    s
}
