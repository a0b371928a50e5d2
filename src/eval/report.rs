//! What `xrayglm eval` writes: `report.json` (every model's metrics), `report.md` (the n-gram
//! table and the CE table), `report.html` (the page of [`super::page`]), one line per report with
//! its own scores and findings, and TensorBoard scalars — assembled here so that the command line
//! only reads flags.

use std::path::Path;

use anyhow::{Context, Result};

use super::checkpoint::Outcome;
use super::findings::ce::UncertainAs;
use super::page::{Page, PageImages};
use super::{markdown, score_with, scored_lines, Labelers, Row, Scored, ScoredLine};

/// The evaluation of several models (checkpoints or hypotheses files), in order.
pub struct EvalReport {
    labelers: Labelers,
    uncertain_as: UncertainAs,
    entries: Vec<serde_json::Value>,
    rows: Vec<Row>,
    /// Per-report lines: (file name, JSONL bytes).
    files: Vec<(String, Vec<u8>)>,
    /// Each row's scored reports (none for a loss-only checkpoint), for the page.
    lines: Vec<Vec<ScoredLine>>,
    /// The films of each study id, for the page.
    films: std::collections::HashMap<String, Vec<std::path::PathBuf>>,
    /// Lines under the page's title (the data and split evaluated).
    about: Vec<String>,
    /// How the page shows films.
    page_images: PageImages,
    names: std::collections::HashSet<String>,
    /// Per checkpoint with image ablations: its name, own metrics, own findings share, ablations.
    ablations: Vec<(
        String,
        super::Report,
        f64,
        Vec<super::checkpoint::AblationOutcome>,
    )>,
}

impl EvalReport {
    pub fn new(uncertain_as: UncertainAs) -> Self {
        Self {
            labelers: Labelers::builtin(),
            uncertain_as,
            entries: Vec::new(),
            rows: Vec::new(),
            files: Vec::new(),
            lines: Vec::new(),
            films: Default::default(),
            about: Vec::new(),
            page_images: PageImages::default(),
            names: Default::default(),
            ablations: Vec::new(),
        }
    }

    pub fn labelers(&self) -> &Labelers {
        &self.labelers
    }

    /// A name not used by an earlier row (they name the rows and the per-report files).
    fn distinct(&mut self, name: String) -> String {
        let mut n = name.clone();
        let mut k = 2;
        while !self.names.insert(n.clone()) {
            n = format!("{name}-{k}");
            k += 1;
        }
        n
    }

    /// How `report.html` shows films.
    pub fn page_images(&mut self, images: PageImages) {
        self.page_images = images;
    }

    /// A line under the page's title.
    pub fn describe(&mut self, line: String) {
        self.about.push(line);
    }

    /// The films of evaluated records, shown beside their studies on the page.
    pub fn add_films(&mut self, records: &[crate::data::records::Record]) {
        for r in records {
            self.films.insert(r.id.clone(), r.images.clone());
        }
    }

    /// Score a hypotheses file's reports; their lines go to `<name>.scores.jsonl`. Films the
    /// lines name are relative to `base` (the file's folder).
    pub fn add_hypotheses(&mut self, name: &str, items: &[Scored], base: &Path) -> Result<()> {
        let name = self.distinct(name.to_string());
        let r = score_with(items, self.uncertain_as, &self.labelers)?;
        self.entries
            .push(serde_json::json!({"name": name, "metrics": r}));
        for s in items.iter().filter(|s| !s.images.is_empty()) {
            let films = s.images.iter().map(|p| base.join(p)).collect();
            self.films.entry(s.id.clone()).or_insert(films);
        }
        self.add_lines(&format!("{name}.scores.jsonl"), items)?;
        self.rows.push(Row {
            name,
            val_loss: None,
            metrics: Some(r),
        });
        Ok(())
    }

    /// A checkpoint's outcome (given back with its row's distinct name); its generated reports,
    /// with their scores, go to `<name>.jsonl`.
    pub fn add_checkpoint(&mut self, mut o: Outcome) -> Result<Outcome> {
        o.name = self.distinct(o.name.clone());
        if o.generations.is_empty() {
            self.lines.push(Vec::new());
        } else {
            let file = format!("{}.jsonl", o.name.replace('/', "_"));
            self.add_lines(&file, &o.generations)?;
        }
        self.rows.push(Row {
            name: o.name.clone(),
            val_loss: o.val_loss,
            metrics: o.metrics.clone(),
        });
        if let (false, Some(m)) = (o.ablations.is_empty(), &o.metrics) {
            self.ablations.push((
                o.name.clone(),
                m.clone(),
                o.true_findings_stated.unwrap_or(0.0),
                o.ablations.clone(),
            ));
        }
        self.entries.push(serde_json::to_value(&o)?);
        Ok(o)
    }

    fn add_lines(&mut self, file: &str, items: &[Scored]) -> Result<()> {
        let lines = scored_lines(items, &self.labelers);
        let mut text = String::new();
        for line in &lines {
            text.push_str(&serde_json::to_string(&line.json())?);
            text.push('\n');
        }
        self.files.push((file.to_string(), text.into_bytes()));
        self.lines.push(lines);
        Ok(())
    }

    /// The page of this evaluation: every row's summary and every study, joined by id (the k-th
    /// line of an id with the k-th of the same id in the other rows).
    pub fn page(&self) -> Page {
        use super::page::{present, reference_chips, report_chips, Column, ModelSummary, Study};
        let models: Vec<ModelSummary> = self
            .rows
            .iter()
            .map(|r| ModelSummary {
                name: r.name.clone(),
                val_loss: r.val_loss,
                metrics: r.metrics.clone(),
                ablation: self.ablations.iter().find(|a| a.0 == r.name).map(
                    |(_, own, stated, outs)| super::page::Ablation {
                        own: own.clone(),
                        stated: *stated,
                        others: outs.clone(),
                    },
                ),
            })
            .collect();
        // Studies in order of first appearance; each row's line for each.
        let mut keys: Vec<(String, usize)> = Vec::new();
        let mut index: std::collections::HashMap<(String, usize), usize> = Default::default();
        let mut at: Vec<Vec<Option<usize>>> = Vec::new();
        for (m, lines) in self.lines.iter().enumerate() {
            let mut seen: std::collections::HashMap<&str, usize> = Default::default();
            for (j, l) in lines.iter().enumerate() {
                let k = seen.entry(l.item.id.as_str()).or_default();
                let key = (l.item.id.clone(), *k);
                *k += 1;
                let i = *index.entry(key.clone()).or_insert_with(|| {
                    keys.push(key);
                    at.push(vec![None; self.lines.len()]);
                    keys.len() - 1
                });
                at[i][m] = Some(j);
            }
        }
        let ua = self.uncertain_as;
        let studies = keys
            .iter()
            .zip(&at)
            .map(|((id, _), cols)| {
                let first = cols
                    .iter()
                    .enumerate()
                    .find_map(|(m, j)| Some(&self.lines[m][(*j)?]))
                    .expect("a study comes from a line");
                Study {
                    id: id.clone(),
                    films: self.films.get(id).cloned().unwrap_or_default(),
                    reference: first.item.all_references().join("\n\n"),
                    reference_chips: reference_chips(&first.reference, ua),
                    columns: cols
                        .iter()
                        .enumerate()
                        .map(|(m, j)| {
                            let l = &self.lines[m][(*j)?];
                            let ce = super::reward::findings_f1(&l.hypothesis, &l.reference, ua);
                            Some(Column {
                                text: l.item.hypothesis.clone(),
                                chips: report_chips(&l.hypothesis, &l.reference, ua),
                                scores: vec![
                                    ("BLEU-4", l.bleu_4),
                                    ("ROUGE-L", l.rouge_l),
                                    ("CE-F1", ce),
                                ],
                                ce_f1: Some(ce),
                                present: present(&l.hypothesis, ua),
                            })
                        })
                        .collect(),
                }
            })
            .collect();
        let names: Vec<&str> = self.rows.iter().map(|r| r.name.as_str()).collect();
        let mut about = self.about.clone();
        about.push(format!(
            "CE counts uncertain findings as {}.",
            match ua {
                UncertainAs::Negative => "absent",
                UncertainAs::Positive => "present",
            }
        ));
        Page {
            title: format!("xrayglm evaluation: {}", names.join(", ")),
            about,
            reference_name: "reference".into(),
            models,
            studies,
            agreement: None,
        }
    }

    /// `{"reports": [...]}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "reports": self.entries })
    }

    /// The n-gram table, then the CE table of the rows that have one.
    pub fn markdown(&self) -> String {
        let mut s = markdown(&self.rows);
        let ce: Vec<(&str, &super::findings::ce::CeReport)> = self
            .rows
            .iter()
            .filter_map(|r| Some((r.name.as_str(), r.metrics.as_ref()?.ce.as_ref()?)))
            .collect();
        if !self.ablations.is_empty() {
            s.push_str(&ablation_markdown(&self.ablations));
        }
        if !ce.is_empty() {
            s.push_str(&super::ce_markdown(&ce));
            s.push_str(&format!(
                "\nCE: positive findings of the 14 CheXpert observations (rules/findings), uncertain counted as {}; micro over the observations, macro over those present in a reference or hypothesis.\n",
                match self.uncertain_as {
                    UncertainAs::Negative => "absent",
                    UncertainAs::Positive => "present",
                }
            ));
        }
        s
    }

    /// Write everything into `dir` (each file atomically).
    /// The files [`EvalReport::write`] writes into its folder.
    pub fn file_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.files.iter().map(|(n, _)| n.as_str()).collect();
        v.extend(["report.json", "report.md", "report.html"]);
        v
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::io::remove_dead_leftovers(dir);
        // The page first: a film it cannot show stops the evaluation before anything is written.
        let page = self.page().render(dir, self.page_images)?;
        for (name, bytes) in &self.files {
            crate::io::write_atomic(&dir.join(name), bytes)?;
        }
        crate::io::write_json_atomic(&dir.join("report.json"), &self.json())?;
        crate::io::write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        super::page::write_rendered(dir, "report.html", page)
    }
}

/// The scalars of one checkpoint's evaluation as TensorBoard logs them (`eval/...`, at the
/// checkpoint's step), one folder per training run under `tb`.
pub fn log_tensorboard(tb: &Path, o: &Outcome) -> Result<()> {
    let run_name = o.name.split('/').next().unwrap_or(&o.name).to_string();
    let mut w = crate::logs::metrics::TensorBoard::create(&tb.join(run_name))?;
    w.scalars(
        o.step.unwrap_or(0),
        &scalars(o.val_loss, o.metrics.as_ref()),
    )
}

/// `eval/...` scalars of a loss and a report (also what the trainer logs for its generations).
pub fn scalars(val_loss: Option<f64>, m: Option<&super::Report>) -> Vec<(&'static str, f64)> {
    let mut values: Vec<(&'static str, f64)> = Vec::new();
    if let Some(l) = val_loss {
        values.extend([("eval/val_loss", l), ("eval/val_ppl", l.exp())]);
    }
    if let Some(m) = m {
        values.extend([
            ("eval/bleu_1", m.bleu_1),
            ("eval/bleu_4", m.bleu_4),
            ("eval/rouge_l", m.rouge_l),
            ("eval/cider_d", m.cider_d),
            ("eval/chatglm_bleu_4", m.chatglm_bleu_4),
            ("eval/chatglm_rouge_l", m.chatglm_rouge_l),
        ]);
        if let Some(ce) = &m.ce {
            values.extend([
                ("eval/ce_precision", ce.micro.precision),
                ("eval/ce_recall", ce.micro.recall),
                ("eval/ce_f1", ce.micro.f1),
                ("eval/ce_macro_f1", ce.macro_f1),
                ("eval/distinct_reports", ce.collapse.distinct_hypotheses),
                ("eval/no_finding_share", ce.collapse.no_finding_hypotheses),
            ]);
        }
    }
    values
}

/// The image-ablation table: each checkpoint's reports with its own films and with others, and a
/// sentence saying whether the reports depend on the image.
fn ablation_markdown(
    rows: &[(
        String,
        super::Report,
        f64,
        Vec<super::checkpoint::AblationOutcome>,
    )],
) -> String {
    let f1 = |m: &super::Report| m.ce.as_ref().map(|c| c.micro.f1).unwrap_or(0.0);
    let mut s = String::from(
        "\n| model | images | CE-F1 | BLEU-4 | reports changed | true findings stated |\n|---|---|---|---|---|---|\n",
    );
    let mut verdicts = Vec::new();
    for (name, own, stated, abl) in rows {
        s.push_str(&format!(
            "| {name} | own | {:.3} | {:.4} | - | {:.3} |\n",
            f1(own),
            own.bleu_4,
            stated
        ));
        for a in abl {
            s.push_str(&format!(
                "| {name} | {} | {:.3} | {:.4} | {:.3} | {:.3} |\n",
                super::checkpoint::ablation_name(a.image),
                f1(&a.metrics),
                a.metrics.bleu_4,
                a.changed,
                a.true_findings_stated
            ));
        }
        verdicts.push(ablation_verdict(name, own, abl).1);
    }
    s.push('\n');
    s.push_str(&verdicts.join("\n"));
    s.push('\n');
    s
}

/// Whether a model's reports depend on its films, and the sentence saying so: the counterfactual
/// is another real film (a black one also changes what the model is shown in kind); blank only
/// when shuffled was not asked for.
pub fn ablation_verdict(
    name: &str,
    own: &super::Report,
    abl: &[super::checkpoint::AblationOutcome],
) -> (bool, String) {
    let f1 = |m: &super::Report| m.ce.as_ref().map(|c| c.micro.f1).unwrap_or(0.0);
    let other = abl
        .iter()
        .find(|a| a.image == crate::data::batch::ImageAblation::Shuffled)
        .or_else(|| abl.first());
    let worst = other.map_or(f1(own), |a| f1(&a.metrics));
    let drop = f1(own) - worst;
    if drop >= IMAGE_MATTERS {
        (
            true,
            format!(
                "{name}: the reports depend on the image (CE-F1 {:.3} with its own films, {worst:.3} with others).",
                f1(own)
            ),
        )
    } else {
        (
            false,
            format!(
                "{name}: the reports barely depend on the image (CE-F1 {:.3} with its own films, {worst:.3} with others) — the model may have learnt how reports are written rather than what the films show.",
                f1(own)
            ),
        )
    }
}

/// A CE-F1 drop with other films (shuffled; else blank) from which a model counts as using its
/// images.
pub const IMAGE_MATTERS: f64 = 0.1;
