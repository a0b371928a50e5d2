//! `xrayglm findings FILE`: label the findings of reports (see `xrayglm::eval::findings`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use xrayglm::eval::findings::{ce, files};
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
    /// The second file's language (default: detected).
    #[arg(long = "against_lang", alias = "against-lang", value_parser = xrayglm::config::parse_enum::<Lang>)]
    pub against_lang: Option<Lang>,
    /// A rule file for the second file.
    #[arg(long = "against_rules", alias = "against-rules")]
    pub against_rules: Option<PathBuf>,
    /// With --against: write a page (HTML, self-contained) of the reports the two labellings
    /// read differently, with both texts and the observations they differ on.
    #[arg(long, requires = "against")]
    pub page: Option<PathBuf>,
    /// With a hypotheses file: count uncertain findings as positive (default: as negative).
    #[arg(long = "uncertain_positive", alias = "uncertain-positive")]
    pub uncertain_positive: bool,
}

pub fn findings(a: FindingsArgs) -> Result<()> {
    if let Some(out) = &a.out {
        xrayglm::io::Inputs::new()
            .flag("FILE", Some(&a.file))
            .flag("--rules", a.rules.as_deref())
            .flag("--against", a.against.as_deref())
            .flag("--against_rules", a.against_rules.as_deref())
            .check("--out", out)?;
    }
    if let Some(page) = &a.page {
        xrayglm::io::Inputs::new()
            .flag("FILE", Some(&a.file))
            .flag("--rules", a.rules.as_deref())
            .flag("--against", a.against.as_deref())
            .flag("--against_rules", a.against_rules.as_deref())
            .flag("--out", a.out.as_deref())
            .check("--page", page)?;
    }
    let l = files::Labelled::file(&a.file, a.distinct, a.lang, a.rules.as_deref())?;
    let mut summary = serde_json::json!({
        "file": a.file.display().to_string(),
        "lang": l.lang,
        "reports": l.reports.len(),
        "counts": files::counts(&l.labels),
    });
    let mut table = files::counts_markdown("reports", &l.labels);
    let uncertain_as = if a.uncertain_positive {
        ce::UncertainAs::Positive
    } else {
        ce::UncertainAs::Negative
    };
    if let (Some(refs), Some(report)) = (&l.references, l.ce(uncertain_as)) {
        summary["reference_counts"] = serde_json::to_value(files::counts(refs))?;
        table.push_str(&files::counts_markdown("references", refs));
        table.push_str(&xrayglm::eval::ce_markdown(&[("hypotheses", &report)]));
        summary["ce"] = serde_json::to_value(&report)?;
    }
    if let Some(other) = &a.against {
        let theirs = l.paired(other, a.against_lang, a.against_rules.as_deref())?;
        let (lang, agreement) = (theirs.lang, l.agreement(&theirs));
        table.push_str(&files::agreement_markdown(&agreement, l.lang, lang));
        if let Some(page) = &a.page {
            let name = |p: &std::path::Path, lang: Lang| {
                let stem = p.file_stem().unwrap_or_default().to_string_lossy();
                format!("{stem} ({})", lang.code())
            };
            let (na, nb) = (name(&a.file, l.lang), name(other, lang));
            let p = xrayglm::eval::page::agreement_page((&na, &l), (&nb, &theirs), &agreement);
            let dir = page.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.unwrap_or(std::path::Path::new("."));
            let file = page.file_name().unwrap_or_default().to_string_lossy();
            p.write(dir, &file, xrayglm::eval::page::PageImages::Embed)?;
            xrayglm::errln!(
                "wrote {} ({} reports read differently)",
                page.display(),
                p.studies.len()
            );
        }
        summary["against"] = serde_json::json!({
            "file": other.display().to_string(),
            "lang": lang,
            "agreement": agreement,
        });
    }
    if let Some(out) = &a.out {
        xrayglm::io::write_atomic(out, l.lines(a.evidence)?.as_bytes())?;
        xrayglm::errln!("wrote {}", out.display());
    }
    xrayglm::outln!("{}", serde_json::to_string_pretty(&summary)?);
    xrayglm::err!("{table}");
    Ok(())
}
