//! `report.html`: one self-contained page of an evaluation, for a person to look at — the metric
//! tables of every model side by side (best per row marked), the collapse detectors and the
//! image ablation with a verdict in words, an inline-SVG chart of precision / recall / F1 per
//! CheXpert observation, and every study: its films, the reference, each model's report with its
//! findings as chips (right, missed, invented; the matched phrase on hover) and its own scores,
//! with filters, sorting and keyboard navigation.
//!
//! The page needs nothing outside itself: styles and script are inline, its Content-Security-Policy
//! allows no fetch, and films are embedded as small JPEG thumbnails (or copied beside it, or linked
//! where they are: [`PageImages`]). The same page, with two labellings instead of a reference and
//! reports, shows where two labellings of the same studies disagree (`findings --against`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::checkpoint::AblationOutcome;
use super::findings::ce::{outcome, CeReport, Collapse, UncertainAs};
use super::findings::{Labels, Mention, Observation, Side, State};
use super::Report;

/// How the page shows films.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PageImages {
    /// Small JPEG thumbnails inside the page, each linking to its full file (default).
    #[default]
    Embed,
    /// The films copied into `films/` beside the page, shown from there.
    Copy,
    /// The films shown from where they are (a page that moves loses them).
    Link,
}

/// The longest side of an embedded thumbnail, in pixels.
pub const THUMBNAIL_SIDE: usize = 160;

/// Distinct reports per film below this share of the references' own: the model writes one report
/// for many films (templated references are themselves few).
pub const DISTINCT_BELOW: f64 = 0.5;
/// No Finding share above the references' by this much: the model calls films normal too often.
pub const NO_FINDING_ABOVE: f64 = 0.2;
/// Mean report length outside these multiples of the references'.
pub const LENGTH_RATIO_RANGE: (f64, f64) = (0.67, 1.5);

/// The collapse detectors in words: what looks wrong, or that nothing does.
pub fn collapse_verdict(c: &Collapse) -> Vec<String> {
    let mut v = Vec::new();
    if c.distinct_hypotheses < DISTINCT_BELOW * c.distinct_references {
        v.push(format!(
            "writes the same report for many films: only {:.0} % of its reports are distinct ({:.0} % of the references)",
            100.0 * c.distinct_hypotheses,
            100.0 * c.distinct_references
        ));
    }
    if c.no_finding_hypotheses > c.no_finding_references + NO_FINDING_ABOVE {
        v.push(format!(
            "calls films normal too often: {:.0} % of its reports state no finding, {:.0} % of the references",
            100.0 * c.no_finding_hypotheses,
            100.0 * c.no_finding_references
        ));
    }
    let (lo, hi) = LENGTH_RATIO_RANGE;
    if c.length_ratio < lo || c.length_ratio > hi {
        v.push(format!(
            "writes reports {} than the references ({:.2}× their length)",
            if c.length_ratio < lo {
                "much shorter"
            } else {
                "much longer"
            },
            c.length_ratio
        ));
    }
    if v.is_empty() {
        v.push("no sign of collapse: its share of distinct reports, its report length and its share of normal studies are all near the references'".into());
    }
    v
}

/// One model (a checkpoint or a hypotheses file) as the summary shows it.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub name: String,
    pub val_loss: Option<f64>,
    pub metrics: Option<Report>,
    pub ablation: Option<Ablation>,
}

/// A model's image ablation: its metrics with its own films, the share of the references' findings
/// it states, and its reports with other films.
#[derive(Debug, Clone)]
pub struct Ablation {
    pub own: Report,
    pub stated: f64,
    pub others: Vec<AblationOutcome>,
}

/// A chip's reading of one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChipKind {
    /// Stated by the reference (the reference's own chips).
    Stated,
    /// Present in both.
    Right,
    /// In the reference, not in the report.
    Missed,
    /// In the report, not in the reference.
    Invented,
    /// Two labellings read it differently, one as present and the other not (the agreement
    /// page).
    Differs,
    /// Two labellings read it differently, both as present or both as absent (negative against
    /// not mentioned, say).
    Nuance,
}

impl ChipKind {
    /// A finding the report (or the second labelling) gets wrong.
    fn is_error(self) -> bool {
        matches!(self, Self::Missed | Self::Invented | Self::Differs)
    }

    fn class(self) -> &'static str {
        match self {
            Self::Stated => "stated",
            Self::Right => "right",
            Self::Missed => "missed",
            Self::Invented => "invented",
            Self::Differs => "differs",
            Self::Nuance => "nuance",
        }
    }
}

/// One finding shown on a study.
#[derive(Debug, Clone)]
pub struct Chip {
    pub observation: Observation,
    pub kind: ChipKind,
    /// What the chip says (the observation, its side, or two states).
    pub label: String,
    /// The matched phrases (on hover).
    pub evidence: String,
}

/// One model's report of a study, or the second labelling on the agreement page.
#[derive(Debug, Clone)]
pub struct Column {
    pub text: String,
    pub chips: Vec<Chip>,
    /// `(name, value)` shown under the text.
    pub scores: Vec<(&'static str, f64)>,
    /// The report's own CE-F1 (sorting: worst first).
    pub ce_f1: Option<f64>,
    /// The observations it states as present (disagreements between models).
    pub present: BTreeSet<Observation>,
}

impl Column {
    fn has_error(&self) -> bool {
        self.chips.iter().any(|c| c.kind.is_error())
    }
}

/// One study: its films, the reference, and one column per model (none where a model lacks it).
#[derive(Debug, Clone)]
pub struct Study {
    pub id: String,
    pub films: Vec<PathBuf>,
    pub reference: String,
    pub reference_chips: Vec<Chip>,
    pub columns: Vec<Option<Column>>,
}

/// Everything the page shows.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub title: String,
    /// Lines under the title (data, split, conventions).
    pub about: Vec<String>,
    /// Column headings of the studies ("reference" and one per model).
    pub reference_name: String,
    pub models: Vec<ModelSummary>,
    pub studies: Vec<Study>,
    /// Set for the agreement page: the two labellings' per-observation table instead of metrics.
    pub agreement: Option<String>,
}

/// The phrases behind a label: the mentions of `o` whose state is (or is not) present.
fn evidence(l: &Labels, o: Observation, present: bool, uncertain_as: UncertainAs) -> String {
    let phrases: Vec<String> = l
        .mentions
        .iter()
        .filter(|m| m.observation == o && uncertain_as.present(m.state) == present)
        .map(mention_text)
        .collect();
    dedup(phrases).join(" · ")
}

fn mention_text(m: &Mention) -> String {
    match &m.cue {
        Some(c) => format!("“{}” ({} by “{c}”)", m.text, state_word(m.state)),
        None => format!("“{}”", m.text),
    }
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.into_iter().filter(|s| seen.insert(s.clone())).collect()
}

fn state_word(s: State) -> &'static str {
    match s {
        State::Positive => "positive",
        State::Negative => "negative",
        State::Uncertain => "uncertain",
        State::NotMentioned => "not mentioned",
    }
}

fn side_word(s: Side) -> &'static str {
    match s {
        Side::Left => "left",
        Side::Right => "right",
        Side::Both => "both sides",
    }
}

fn chip_label(l: &Labels, o: Observation) -> String {
    match l.sides.get(&o) {
        Some(&s) => format!("{} ({})", o.name(), side_word(s)),
        None => o.name().to_string(),
    }
}

/// The observations present in a labelling.
pub fn present(l: &Labels, uncertain_as: UncertainAs) -> BTreeSet<Observation> {
    Observation::ALL
        .into_iter()
        .filter(|&o| uncertain_as.present(l.get(o)))
        .collect()
}

/// The reference's chips: what it states as present.
pub fn reference_chips(r: &Labels, uncertain_as: UncertainAs) -> Vec<Chip> {
    present(r, uncertain_as)
        .into_iter()
        .map(|o| Chip {
            observation: o,
            kind: ChipKind::Stated,
            label: chip_label(r, o),
            evidence: evidence(r, o, true, uncertain_as),
        })
        .collect()
}

/// A report's chips against its reference, CE's reading: right, missed, invented.
pub fn report_chips(h: &Labels, r: &Labels, uncertain_as: UncertainAs) -> Vec<Chip> {
    let mut chips = Vec::new();
    for o in Observation::ALL {
        let (tp, fp, fn_) = outcome(h, r, o, uncertain_as);
        let (kind, label, ev) = if tp == 1 {
            let ev = format!(
                "report: {} — reference: {}",
                evidence(h, o, true, uncertain_as),
                evidence(r, o, true, uncertain_as)
            );
            (ChipKind::Right, chip_label(h, o), ev)
        } else if fp == 1 {
            let ev = format!("report: {}", evidence(h, o, true, uncertain_as));
            (ChipKind::Invented, chip_label(h, o), ev)
        } else if fn_ == 1 {
            let denied = evidence(h, o, false, uncertain_as);
            let mut ev = format!("reference: {}", evidence(r, o, true, uncertain_as));
            if !denied.is_empty() {
                let _ = write!(ev, " — report: {denied}");
            }
            (ChipKind::Missed, chip_label(r, o), ev)
        } else {
            continue;
        };
        chips.push(Chip {
            observation: o,
            kind,
            label,
            evidence: ev.replace("“”", ""),
        });
    }
    chips
}

/// Chips of two labellings of one report: each observation they read differently.
pub fn differing_chips(a: &Labels, b: &Labels) -> Vec<Chip> {
    Observation::ALL
        .into_iter()
        .filter(|&o| o != Observation::NoFinding && a.get(o) != b.get(o))
        .map(|o| {
            let side = |l: &Labels| {
                let phrases: Vec<String> = l
                    .mentions
                    .iter()
                    .filter(|m| m.observation == o)
                    .map(mention_text)
                    .collect();
                if phrases.is_empty() {
                    "—".to_string()
                } else {
                    dedup(phrases).join(" · ")
                }
            };
            let ua = UncertainAs::Negative;
            let presence = ua.present(a.get(o)) != ua.present(b.get(o));
            Chip {
                observation: o,
                kind: if presence {
                    ChipKind::Differs
                } else {
                    ChipKind::Nuance
                },
                label: format!("{} {} → {}", o.name(), a.get(o).mark(), b.get(o).mark()),
                evidence: format!("first: {} — second: {}", side(a), side(b)),
            }
        })
        .collect()
}

/// The page of two labellings of the same reports (`findings FILE --against OTHER`): the
/// per-observation agreement, and every report the two read differently, with both texts and a
/// chip per observation whose state differs (`+` positive, `-` negative, `?` uncertain, `.` not
/// mentioned).
pub fn agreement_page(
    first: (&str, &super::findings::files::Labelled),
    second: (&str, &super::findings::files::Labelled),
    rows: &[super::findings::ce::Agreement],
) -> Page {
    let (na, a) = first;
    let (nb, b) = second;
    let mut table = format!(
        "<table class=\"agreement\"><thead><tr><th>observation</th><th>κ (4 states)</th><th>κ (positive)</th><th>positive {0} / {1}</th><th>negative {0} / {1}</th><th>uncertain {0} / {1}</th><th>commonest disagreements</th></tr></thead><tbody>",
        esc(na),
        esc(nb)
    );
    for r in rows {
        table.push_str("<tr>");
        for cell in super::findings::files::agreement_cells(r) {
            let _ = write!(table, "<td>{}</td>", esc(&cell));
        }
        table.push_str("</tr>");
    }
    table.push_str("</tbody></table>");
    let ua = UncertainAs::Negative;
    let studies: Vec<Study> = a
        .reports
        .iter()
        .zip(&a.labels)
        .zip(b.reports.iter().zip(&b.labels))
        .filter_map(|((ra, la), (rb, lb))| {
            let chips = differing_chips(la, lb);
            (!chips.is_empty()).then(|| Study {
                id: ra.id.clone(),
                films: Vec::new(),
                reference: ra.text.clone(),
                reference_chips: reference_chips(la, ua),
                columns: vec![Some(Column {
                    text: rb.text.clone(),
                    chips,
                    scores: Vec::new(),
                    ce_f1: None,
                    present: present(lb, ua),
                })],
            })
        })
        .collect();
    Page {
        title: format!("xrayglm findings: {na} against {nb}"),
        about: vec![format!(
            "{} of {} reports are read differently on at least one observation (No Finding aside, as it is derived); each chip shows the first labelling's state → the second's.",
            studies.len(),
            a.reports.len()
        )],
        reference_name: na.to_string(),
        models: vec![ModelSummary {
            name: nb.to_string(),
            val_loss: None,
            metrics: None,
            ablation: None,
        }],
        studies,
        agreement: Some(table),
    }
}

/// Escape text for HTML content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// A path as a URL reference: relative to `from` when both are under one root, else a `file://`
/// URL; each segment percent-encoded.
pub fn href(path: &Path, from: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (p, f) = (abs(path), abs(from));
    let pc: Vec<_> = p.components().collect();
    let fc: Vec<_> = f.components().collect();
    let common = pc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    let encode = |s: &str| {
        let mut o = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                o.push(b as char);
            } else {
                let _ = write!(o, "%{b:02X}");
            }
        }
        o
    };
    let segs = |cs: &[std::path::Component]| -> Vec<String> {
        cs.iter()
            .filter_map(|c| match c {
                std::path::Component::Normal(s) => Some(encode(&s.to_string_lossy())),
                _ => None,
            })
            .collect()
    };
    if p.is_absolute() && common > 1 {
        let mut parts: Vec<String> = vec!["..".into(); fc.len() - common];
        parts.extend(segs(&pc[common..]));
        parts.join("/")
    } else if p.is_absolute() {
        format!("file:///{}", segs(&pc).join("/"))
    } else {
        segs(&pc).join("/")
    }
}

/// A film as a small JPEG, base64 (a `data:` URL's payload).
pub fn thumbnail(path: &Path) -> Result<String> {
    use crate::data::image::{decode_rgb, resize_bicubic, SixteenBit};
    let bytes = crate::io::read_bytes_capped(path, crate::io::MAX_IMAGE_BYTES)
        .with_context(|| format!("{}: cannot read the film", path.display()))?;
    let img = decode_rgb(&bytes, SixteenBit::Scale)
        .with_context(|| format!("{}: cannot decode the film", path.display()))?;
    let scale = THUMBNAIL_SIDE as f64 / img.width.max(img.height).max(1) as f64;
    let small = if scale < 1.0 {
        let w = ((img.width as f64 * scale).round() as usize).max(1);
        let h = ((img.height as f64 * scale).round() as usize).max(1);
        resize_bicubic(&img, w, h)
    } else {
        img
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode(
            &small.data,
            small.width as u32,
            small.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("{}: cannot encode a thumbnail", path.display()))?;
    Ok(crate::infer::openai::base64_encode(&out))
}

/// The films as the page shows them: `(img src, link)` per film; with [`PageImages::Copy`] the
/// files to write beside the page come back too.
struct Films {
    mode: PageImages,
    dir: PathBuf,
    copies: Vec<(PathBuf, PathBuf)>,
    /// Each film's thumbnail, made once (a film can belong to several studies).
    thumbnails: std::collections::HashMap<PathBuf, String>,
}

impl Films {
    /// Make the thumbnails of `paths` on every core (decoding full-size films is the page's cost).
    fn embed_all(&mut self, paths: &[&Path]) -> Result<()> {
        let mut todo: Vec<&Path> = paths.to_vec();
        todo.sort();
        todo.dedup();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = todo.len().div_ceil(threads).max(1);
        let made: Vec<Result<Vec<(PathBuf, String)>>> = std::thread::scope(|s| {
            let parts: Vec<_> = todo
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|p| Ok((p.to_path_buf(), thumbnail(p)?)))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().expect("a thumbnail thread panicked"))
                .collect()
        });
        for part in made {
            self.thumbnails.extend(part?);
        }
        Ok(())
    }

    fn show(&mut self, path: &Path) -> Result<(String, String)> {
        Ok(match self.mode {
            PageImages::Embed => {
                let t = match self.thumbnails.get(path) {
                    Some(t) => t.clone(),
                    None => thumbnail(path)?,
                };
                (format!("data:image/jpeg;base64,{t}"), href(path, &self.dir))
            }
            PageImages::Link => {
                anyhow::ensure!(
                    path.exists(),
                    "{}: the film to link from the page does not exist",
                    path.display()
                );
                let h = href(path, &self.dir);
                (h.clone(), h)
            }
            PageImages::Copy => {
                anyhow::ensure!(
                    path.is_file(),
                    "{}: the film to copy beside the page is not a readable file",
                    path.display()
                );
                let name = path
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_else(|| "film".into());
                let rel = format!("films/{}-{name}", self.copies.len());
                self.copies.push((path.to_path_buf(), self.dir.join(&rel)));
                let h = href(Path::new(&rel), Path::new(""));
                (h.clone(), h)
            }
        })
    }
}

/// The best value of a row (higher or lower is better), when at least two models have one.
fn best(values: &[Option<f64>], higher: bool) -> Option<f64> {
    let vs: Vec<f64> = values.iter().flatten().copied().collect();
    if vs.len() < 2 {
        return None;
    }
    Some(if higher {
        vs.iter().copied().fold(f64::MIN, f64::max)
    } else {
        vs.iter().copied().fold(f64::MAX, f64::min)
    })
}

type Getter = fn(&ModelSummary) -> Option<f64>;

fn ce_of(m: &ModelSummary) -> Option<&CeReport> {
    m.metrics.as_ref()?.ce.as_ref()
}

/// The summary's metric rows: (name, value, higher is better, digits).
fn metric_rows() -> Vec<(&'static str, Getter, bool, usize)> {
    vec![
        (
            "films",
            |m| m.metrics.as_ref().map(|r| r.count as f64),
            true,
            0,
        ),
        ("val loss", |m| m.val_loss, false, 4),
        ("val ppl", |m| m.val_loss.map(f64::exp), false, 3),
        ("BLEU-1", |m| m.metrics.as_ref().map(|r| r.bleu_1), true, 4),
        ("BLEU-2", |m| m.metrics.as_ref().map(|r| r.bleu_2), true, 4),
        ("BLEU-3", |m| m.metrics.as_ref().map(|r| r.bleu_3), true, 4),
        ("BLEU-4", |m| m.metrics.as_ref().map(|r| r.bleu_4), true, 4),
        (
            "ROUGE-L",
            |m| m.metrics.as_ref().map(|r| r.rouge_l),
            true,
            4,
        ),
        (
            "CIDEr-D",
            |m| m.metrics.as_ref().map(|r| r.cider_d),
            true,
            4,
        ),
        (
            "bleu-4 (ChatGLM)",
            |m| m.metrics.as_ref().map(|r| r.chatglm_bleu_4),
            true,
            2,
        ),
        (
            "rouge-1 (ChatGLM)",
            |m| m.metrics.as_ref().map(|r| r.chatglm_rouge_1),
            true,
            2,
        ),
        (
            "rouge-2 (ChatGLM)",
            |m| m.metrics.as_ref().map(|r| r.chatglm_rouge_2),
            true,
            2,
        ),
        (
            "rouge-l (ChatGLM)",
            |m| m.metrics.as_ref().map(|r| r.chatglm_rouge_l),
            true,
            2,
        ),
        (
            "CE precision",
            |m| ce_of(m).map(|c| c.micro.precision),
            true,
            3,
        ),
        ("CE recall", |m| ce_of(m).map(|c| c.micro.recall), true, 3),
        ("CE-F1", |m| ce_of(m).map(|c| c.micro.f1), true, 3),
        ("CE macro-F1", |m| ce_of(m).map(|c| c.macro_f1), true, 3),
    ]
}

const STYLE: &str = r#"
:root{--right:#1b7f3b;--missed:#b26a00;--invented:#c62828;--differs:#6a3fb5;--line:#d7dbe0;--muted:#5f6b7a}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC",sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header,section{max-width:1280px;margin:0 auto;padding:12px 20px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:18px 0 8px}
.about{color:var(--muted);margin:0}
table{border-collapse:collapse;background:#fff;margin:6px 0}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
td.best{font-weight:700;background:#e5f4ea}
td.best::after{content:" ★";color:var(--right)}
.verdict{margin:4px 0}.verdict.bad{color:var(--invented)}.verdict.good{color:var(--right)}
#controls{position:sticky;top:0;background:#f6f7f9;border-bottom:1px solid var(--line);padding:8px 0;z-index:2;display:flex;flex-wrap:wrap;gap:14px;align-items:center}
.study{background:#fff;border:1px solid var(--line);border-radius:6px;margin:10px 0;padding:10px;display:grid;grid-template-columns:auto 1fr;gap:12px}
.study:focus{outline:3px solid #3b82f6}
.study[hidden]{display:none}
.films{display:flex;flex-direction:column;gap:6px}
.has-films .films{width:160px}
.films img{width:160px;height:auto;display:block;border-radius:3px;background:#000}
.texts{display:grid;gap:8px;grid-template-columns:repeat(auto-fit,minmax(260px,1fr))}
.col{border-left:3px solid var(--line);padding-left:8px}
.col h3{font-size:13px;margin:0;color:var(--muted)}
.col p{margin:4px 0;white-space:pre-wrap}
.scores{color:var(--muted);font-size:12px}
.chip{display:inline-block;border-radius:10px;padding:0 8px;margin:2px 3px 2px 0;font-size:12px;border:1px solid;cursor:help}
.chip.stated{border-color:#8a94a3;color:#333}
.chip.right{border-color:var(--right);color:var(--right);background:#eaf6ee}
.chip.missed{border-color:var(--missed);color:var(--missed);border-style:dashed}
.chip.invented{border-color:var(--invented);color:var(--invented);background:#fdecea}
.chip.differs{border-color:var(--differs);color:var(--differs);background:#f1ecfa}
.chip.nuance{border-color:#8a94a3;color:#5f6b7a;border-style:dotted}
.legend .chip{cursor:default}
.id{font-weight:600}
svg text{font:12px system-ui,sans-serif}
.missing{color:var(--muted);font-style:italic}
kbd{border:1px solid var(--line);border-radius:3px;padding:0 4px;background:#fff}
"#;

const SCRIPT: &str = r#"
(function(){
  const studies=[...document.querySelectorAll('.study')];
  const list=document.getElementById('list');
  const errors=document.getElementById('only-errors');
  const obs=document.getElementById('observation');
  const dis=document.getElementById('disagreements');
  const sort=document.getElementById('sort')||{value:'order',addEventListener(){}};
  const shown=document.getElementById('shown');
  function has(el,attr,code){return (' '+el.dataset[attr]+' ').includes(' '+code+' ');}
  function apply(){
    const o=obs.value;let n=0;
    for(const s of studies){
      let ok=true;
      if(o&&!has(s,'obs',o))ok=false;
      if(errors.checked&&(o?!has(s,'errObs',o):s.dataset.error!=='1'))ok=false;
      if(dis&&dis.checked&&s.dataset.disagree!=='1')ok=false;
      s.hidden=!ok;if(ok)n++;
    }
    shown.textContent=n+' of '+studies.length+' studies shown';
  }
  function order(){
    const by=sort.value;
    const key=s=>by==='worst'?parseFloat(s.dataset.ce):0;
    const sorted=studies.slice().sort((a,b)=>key(a)-key(b)||a.dataset.order-b.dataset.order);
    for(const s of sorted)list.appendChild(s);
  }
  function visible(){return [...list.querySelectorAll('.study')].filter(s=>!s.hidden);}
  function move(d){
    const v=visible();if(!v.length)return;
    let i=v.indexOf(document.activeElement);
    i=i<0?(d>0?0:v.length-1):Math.min(v.length-1,Math.max(0,i+d));
    v[i].focus();v[i].scrollIntoView({block:'nearest'});
  }
  for(const el of [errors,obs,dis].filter(Boolean))el.addEventListener('change',apply);
  sort.addEventListener('change',order);
  document.addEventListener('keydown',e=>{
    if(e.target.tagName==='SELECT'||e.altKey||e.ctrlKey||e.metaKey)return;
    if(e.key==='j'||e.key==='ArrowDown'){move(1);e.preventDefault();}
    else if(e.key==='k'||e.key==='ArrowUp'){move(-1);e.preventDefault();}
    else if(e.key==='e'){errors.checked=!errors.checked;apply();}
  });
  order();apply();
})();
"#;

impl Page {
    /// The page as HTML, with the films it copies beside itself in `dir` (its folder).
    pub fn render(
        &self,
        dir: &Path,
        images: PageImages,
    ) -> Result<(String, Vec<(PathBuf, PathBuf)>)> {
        let mut films = Films {
            mode: images,
            dir: dir.to_path_buf(),
            copies: Vec::new(),
            thumbnails: Default::default(),
        };
        if images == PageImages::Embed {
            let all: Vec<&Path> = self
                .studies
                .iter()
                .flat_map(|s| s.films.iter().map(PathBuf::as_path))
                .collect();
            films.embed_all(&all)?;
        }
        let mut h = String::new();
        let img_src = match images {
            PageImages::Embed => "data:",
            _ => "'self' data:",
        };
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"zh\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src {img_src}; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{}</title><style>{STYLE}</style></head><body{}>\n<header><h1>{}</h1>",
            esc(&self.title),
            if self.studies.iter().any(|s| !s.films.is_empty()) {
                " class=\"has-films\""
            } else {
                ""
            },
            esc(&self.title)
        );
        for line in &self.about {
            let _ = write!(h, "<p class=\"about\">{}</p>", esc(line));
        }
        h.push_str("</header>\n");
        match &self.agreement {
            Some(table) => {
                let _ = writeln!(
                    h,
                    "<section id=\"summary\"><h2>Agreement per observation</h2>{table}</section>"
                );
            }
            None => {
                self.summary(&mut h);
                self.chart(&mut h);
            }
        }
        self.study_list(&mut h, &mut films)?;
        let _ = write!(h, "<script>{SCRIPT}</script>\n</body></html>\n");
        Ok((h, films.copies))
    }

    fn summary(&self, h: &mut String) {
        h.push_str("<section id=\"summary\"><h2>Summary</h2><table class=\"metrics\"><thead><tr><th>metric</th>");
        for m in &self.models {
            let _ = write!(h, "<th>{}</th>", esc(&m.name));
        }
        h.push_str("</tr></thead><tbody>");
        for (name, get, higher, digits) in metric_rows() {
            let values: Vec<Option<f64>> = self.models.iter().map(get).collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let b = if name == "films" {
                None
            } else {
                best(&values, higher)
            };
            let _ = write!(
                h,
                "<tr data-metric=\"{}\"><td>{}</td>",
                esc(name),
                esc(name)
            );
            for v in &values {
                match v {
                    Some(x) => {
                        let class = if b == Some(*x) { " class=\"best\"" } else { "" };
                        let _ = write!(h, "<td{class}>{x:.digits$}</td>");
                    }
                    None => h.push_str("<td>–</td>"),
                }
            }
            h.push_str("</tr>");
        }
        h.push_str("</tbody></table><p class=\"about\">★ best of the models in the row. CE: the positive findings of the 14 CheXpert observations (rules/findings) against the reference's; micro over the observations.</p>");
        // Collapse detectors.
        let with_ce: Vec<(&ModelSummary, &CeReport)> = self
            .models
            .iter()
            .filter_map(|m| Some((m, ce_of(m)?)))
            .collect();
        if !with_ce.is_empty() {
            h.push_str("<h2>Collapse</h2><table class=\"collapse\"><thead><tr><th>model</th><th>No Finding (reports / references)</th><th>distinct reports</th><th>length / reference</th></tr></thead><tbody>");
            for (m, c) in &with_ce {
                let k = &c.collapse;
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{:.2} / {:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                    esc(&m.name),
                    k.no_finding_hypotheses,
                    k.no_finding_references,
                    k.distinct_hypotheses,
                    k.length_ratio
                );
            }
            h.push_str("</tbody></table>");
            for (m, c) in &with_ce {
                let v = collapse_verdict(&c.collapse);
                let good = v.len() == 1 && v[0].starts_with("no sign");
                let _ = write!(
                    h,
                    "<p class=\"verdict {}\" data-model=\"{}\"><b>{}</b>: {}.</p>",
                    if good { "good" } else { "bad" },
                    esc(&m.name),
                    esc(&m.name),
                    esc(&v.join("; "))
                );
            }
        }
        // Image ablation.
        let abl: Vec<(&ModelSummary, &Ablation)> = self
            .models
            .iter()
            .filter_map(|m| Some((m, m.ablation.as_ref()?)))
            .collect();
        if !abl.is_empty() {
            let f1 = |r: &Report| r.ce.as_ref().map(|c| c.micro.f1).unwrap_or(0.0);
            h.push_str("<h2>Does the model look at the film?</h2><table class=\"ablation\"><thead><tr><th>model</th><th>films</th><th>CE-F1</th><th>BLEU-4</th><th>reports changed</th><th>true findings stated</th></tr></thead><tbody>");
            for (m, a) in &abl {
                let (own, stated, outs) = (&a.own, a.stated, &a.others);
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>own</td><td>{:.3}</td><td>{:.4}</td><td>–</td><td>{stated:.3}</td></tr>",
                    esc(&m.name),
                    f1(own),
                    own.bleu_4
                );
                for a in outs {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.4}</td><td>{:.3}</td><td>{:.3}</td></tr>",
                        esc(&m.name),
                        super::checkpoint::ablation_name(a.image),
                        f1(&a.metrics),
                        a.metrics.bleu_4,
                        a.changed,
                        a.true_findings_stated
                    );
                }
            }
            h.push_str("</tbody></table>");
            for (m, a) in &abl {
                let (uses, sentence) = super::report::ablation_verdict(&m.name, &a.own, &a.others);
                let _ = write!(
                    h,
                    "<p class=\"verdict {}\">{}</p>",
                    if uses { "good" } else { "bad" },
                    esc(&sentence)
                );
            }
        }
        h.push_str("</section>\n");
    }

    /// Precision, recall and F1 per observation and model, as horizontal bars (one group per
    /// observation).
    fn chart(&self, h: &mut String) {
        let models: Vec<(&ModelSummary, &CeReport)> = self
            .models
            .iter()
            .filter_map(|m| Some((m, ce_of(m)?)))
            .collect();
        if models.is_empty() {
            return;
        }
        const BAR: f64 = 7.0;
        const GAP: f64 = 12.0;
        const LEFT: f64 = 250.0;
        const WIDTH: f64 = 480.0;
        // With several models the observation's name has a line of its own above their bars.
        let head = if models.len() > 1 { 16.0 } else { 0.0 };
        let sub = models.len() as f64 * (3.0 * BAR + 4.0);
        let group = head + sub.max(18.0) + GAP;
        let top = 30.0;
        let height = top + group * Observation::ALL.len() as f64 + 20.0;
        let colors = [
            ("precision", "#4c78a8"),
            ("recall", "#f58518"),
            ("F1", "#54a24b"),
        ];
        let _ = write!(
            h,
            "<section id=\"observations\"><h2>Per observation</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"precision, recall and F1 per observation\">",
            LEFT + WIDTH + 60.0
        );
        for (i, (name, color)) in colors.iter().enumerate() {
            let x = LEFT + i as f64 * 110.0;
            let _ = write!(
                h,
                "<rect x=\"{x}\" y=\"6\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"16\">{name}</text>",
                x + 16.0
            );
        }
        for t in [0.0, 0.5, 1.0] {
            let x = LEFT + t * WIDTH;
            let _ = write!(
                h,
                "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"#d7dbe0\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{t}</text>",
                height - 18.0,
                height - 4.0
            );
        }
        for (k, o) in Observation::ALL.into_iter().enumerate() {
            let y0 = top + k as f64 * group;
            let support = models[0].1.observations[o.index()].references;
            let _ = write!(
                h,
                "<g class=\"obs\" data-observation=\"{}\"><text x=\"0\" y=\"{}\" font-weight=\"600\">{} <tspan fill=\"#5f6b7a\" font-weight=\"400\">(support {support})</tspan></text>",
                o.code(),
                y0 + 12.0,
                esc(o.name())
            );
            for (j, (m, c)) in models.iter().enumerate() {
                let s = &c.observations[o.index()];
                let y = y0 + head + j as f64 * (3.0 * BAR + 4.0);
                if models.len() > 1 {
                    let _ = write!(
                        h,
                        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#5f6b7a\" font-size=\"11\">{}</text>",
                        LEFT - 6.0,
                        y + 2.0 * BAR,
                        esc(&m.name)
                    );
                }
                let vals = [s.prf.precision, s.prf.recall, s.prf.f1];
                for (b, ((what, color), v)) in colors.iter().zip(vals).enumerate() {
                    let _ = write!(
                        h,
                        "<rect class=\"bar\" data-model=\"{}\" data-metric=\"{what}\" x=\"{LEFT}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{color}\"><title>{} · {}: {what} {v:.3} (references {}, reports {}, both {})</title></rect>",
                        esc(&m.name),
                        y + b as f64 * BAR,
                        v * WIDTH,
                        BAR - 1.0,
                        esc(&m.name),
                        esc(o.name()),
                        s.references,
                        s.hypotheses,
                        s.both
                    );
                }
                let _ = write!(
                    h,
                    "<text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text>",
                    LEFT + WIDTH + 6.0,
                    y + 3.0 * BAR - 1.0,
                    if s.references + s.hypotheses == 0 {
                        "–".to_string()
                    } else {
                        format!("{:.2}", s.prf.f1)
                    }
                );
            }
            h.push_str("</g>");
        }
        h.push_str("</svg><p class=\"about\">Support: the references stating the observation. The number at the right is F1; – where neither the references nor the reports state it.</p></section>\n");
    }

    fn study_list(&self, h: &mut String, films: &mut Films) -> Result<()> {
        let several = self.models.len() > 1;
        // The agreement page's errors are readings of presence that differ.
        let (errors, legend) = match self.agreement {
            None => (
                "only errors",
                "<span class=\"chip right\">right</span><span class=\"chip missed\">missed</span><span class=\"chip invented\">invented</span>",
            ),
            Some(_) => (
                "only present / absent disagreements",
                "<span class=\"chip differs\">present in one only</span><span class=\"chip nuance\">absent or present in both, said differently</span>",
            ),
        };
        let _ = write!(
            h,
            "<section id=\"studies\"><h2>Studies</h2><div id=\"controls\">\
             <label><input type=\"checkbox\" id=\"only-errors\"> {errors}</label>\
             <label>observation <select id=\"observation\"><option value=\"\">any</option>"
        );
        for o in Observation::ALL {
            let _ = write!(
                h,
                "<option value=\"{}\">{}</option>",
                o.code(),
                esc(o.name())
            );
        }
        h.push_str("</select></label>");
        if several {
            h.push_str(
                "<label><input type=\"checkbox\" id=\"disagreements\"> models disagree</label>",
            );
        }
        if self.agreement.is_none() {
            h.push_str("<label>sort <select id=\"sort\"><option value=\"order\">as evaluated</option><option value=\"worst\">worst CE first</option></select></label>");
        }
        let _ = write!(
            h,
            "<span id=\"shown\"></span><span class=\"legend\">{legend}</span>\
             <span class=\"about\"><kbd>j</kbd>/<kbd>k</kbd> next / previous, <kbd>e</kbd> {errors}</span></div><div id=\"list\">"
        );
        for (i, s) in self.studies.iter().enumerate() {
            let cols: Vec<&Column> = s.columns.iter().flatten().collect();
            let error = cols.iter().any(|c| c.has_error());
            let mut err_obs = BTreeSet::new();
            let mut obs: BTreeSet<Observation> =
                s.reference_chips.iter().map(|c| c.observation).collect();
            for c in &cols {
                for chip in &c.chips {
                    obs.insert(chip.observation);
                    if chip.kind.is_error() {
                        err_obs.insert(chip.observation);
                    }
                }
            }
            let disagree = cols.windows(2).any(|w| w[0].present != w[1].present);
            let worst = cols
                .iter()
                .filter_map(|c| c.ce_f1)
                .fold(f64::INFINITY, f64::min);
            let codes = |set: &BTreeSet<Observation>| {
                set.iter().map(|o| o.code()).collect::<Vec<_>>().join(" ")
            };
            let _ = write!(
                h,
                "<article class=\"study\" tabindex=\"0\" data-id=\"{}\" data-order=\"{i}\" data-error=\"{}\" data-disagree=\"{}\" data-obs=\"{}\" data-err-obs=\"{}\" data-ce=\"{}\"><div class=\"films\">",
                esc(&s.id),
                error as u8,
                disagree as u8,
                codes(&obs),
                codes(&err_obs),
                if worst.is_finite() { worst } else { 2.0 }
            );
            for f in &s.films {
                let (src, link) = films.show(f)?;
                let _ = write!(
                    h,
                    "<a href=\"{}\" title=\"{}\"><img alt=\"film {}\" src=\"{}\"></a>",
                    esc(&link),
                    esc(&f.display().to_string()),
                    esc(&s.id),
                    esc(&src)
                );
            }
            let _ = write!(
                h,
                "<span class=\"id\">{}</span></div><div class=\"texts\"><div class=\"col reference\"><h3>{}</h3><p>{}</p><div class=\"chips\">",
                esc(&s.id),
                esc(&self.reference_name),
                esc(&s.reference)
            );
            chips(h, &s.reference_chips);
            h.push_str("</div></div>");
            for (m, c) in self.models.iter().zip(&s.columns) {
                let _ = write!(
                    h,
                    "<div class=\"col model\" data-model=\"{}\"><h3>{}</h3>",
                    esc(&m.name),
                    esc(&m.name)
                );
                match c {
                    Some(c) => {
                        let _ = write!(h, "<p>{}</p><div class=\"chips\">", esc(&c.text));
                        chips(h, &c.chips);
                        h.push_str("</div><div class=\"scores\">");
                        let parts: Vec<String> = c
                            .scores
                            .iter()
                            .map(|(n, v)| format!("{n} <span data-score=\"{n}\">{v:.3}</span>"))
                            .collect();
                        h.push_str(&parts.join(" · "));
                        h.push_str("</div>");
                    }
                    None => h.push_str("<p class=\"missing\">no report for this study</p>"),
                }
                h.push_str("</div>");
            }
            h.push_str("</div></article>\n");
        }
        h.push_str("</div></section>\n");
        Ok(())
    }

    /// Write the page as `name` into `dir`, with the films it copies.
    pub fn write(&self, dir: &Path, name: &str, images: PageImages) -> Result<()> {
        write_rendered(dir, name, self.render(dir, images)?)
    }
}

/// Write a rendered page as `name` into `dir`: the films it copies, then the page (each file
/// atomically).
pub fn write_rendered(
    dir: &Path,
    name: &str,
    (html, copies): (String, Vec<(PathBuf, PathBuf)>),
) -> Result<()> {
    for (from, to) in copies {
        let bytes = std::fs::read(&from)
            .with_context(|| format!("{}: cannot read the film to copy", from.display()))?;
        crate::io::write_atomic(&to, &bytes)?;
    }
    crate::io::write_atomic(&dir.join(name), html.as_bytes())
}

fn chips(h: &mut String, chips: &[Chip]) {
    for c in chips {
        let _ = write!(
            h,
            "<span class=\"chip {}\" data-obs=\"{}\" title=\"{}\">{}</span>",
            c.kind.class(),
            c.observation.code(),
            esc(&c.evidence),
            esc(&c.label)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::findings::Labeler;
    use crate::eval::metrics::Lang;

    #[test]
    fn chips_follow_the_ce_outcome_of_each_observation() {
        let l = Labeler::builtin(Lang::En);
        let r = l.label("Cardiomegaly. Small left pleural effusion.");
        let h = l.label("The heart is enlarged. There is a right pneumothorax. No effusion.");
        let chips = report_chips(&h, &r, UncertainAs::Negative);
        let kind = |o| chips.iter().find(|c| c.observation == o).map(|c| c.kind);
        assert_eq!(kind(Observation::Cardiomegaly), Some(ChipKind::Right));
        assert_eq!(kind(Observation::PleuralEffusion), Some(ChipKind::Missed));
        assert_eq!(kind(Observation::Pneumothorax), Some(ChipKind::Invented));
        assert_eq!(kind(Observation::Edema), None);
        // The missed chip names the reference's phrase and the report's denial.
        let missed = chips.iter().find(|c| c.kind == ChipKind::Missed).unwrap();
        assert!(missed.evidence.contains("effusion"), "{}", missed.evidence);
        assert!(missed.evidence.contains("report:"), "{}", missed.evidence);
        // Sides show on the chip.
        let px = chips
            .iter()
            .find(|c| c.observation == Observation::Pneumothorax)
            .unwrap();
        assert_eq!(px.label, "Pneumothorax (right)");
    }

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn links_are_relative_under_one_root_and_encoded() {
        let d = tempfile::tempdir().unwrap();
        let film = d.path().join("img dir/a#1.png");
        let out = d.path().join("eval");
        std::fs::create_dir_all(film.parent().unwrap()).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(&film, b"x").unwrap();
        assert_eq!(href(&film, &out), "../img%20dir/a%231.png");
        assert_eq!(
            href(Path::new("films/0-a b.png"), Path::new("")),
            "films/0-a%20b.png"
        );
    }

    #[test]
    fn verdicts_name_what_looks_collapsed() {
        let ok = Collapse {
            no_finding_hypotheses: 0.2,
            no_finding_references: 0.15,
            distinct_hypotheses: 0.9,
            distinct_references: 0.95,
            length_ratio: 1.05,
        };
        let v = collapse_verdict(&ok);
        assert_eq!(v.len(), 1);
        assert!(v[0].starts_with("no sign"));
        // Templated references: as few distinct reports as they have is no collapse.
        let templated = Collapse {
            distinct_hypotheses: 0.15,
            distinct_references: 0.15,
            ..ok
        };
        assert!(collapse_verdict(&templated)[0].starts_with("no sign"));
        let bad = Collapse {
            no_finding_hypotheses: 0.9,
            distinct_hypotheses: 0.1,
            length_ratio: 0.5,
            ..ok
        };
        let v = collapse_verdict(&bad);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].contains("10 %"), "{v:?}");
        assert!(v[1].contains("90 %"), "{v:?}");
        assert!(v[2].contains("shorter"), "{v:?}");
    }

    #[test]
    fn best_is_marked_only_between_models() {
        assert_eq!(best(&[Some(0.3)], true), None);
        assert_eq!(best(&[Some(0.3), None, Some(0.5)], true), Some(0.5));
        assert_eq!(best(&[Some(0.3), Some(0.5)], false), Some(0.3));
    }
}
