//! The harder synthetic chest X-ray set (`synthetic.kind = "hard"`): more findings drawn on each
//! film, and reports that state them in several phrasings and in a random order — so a tiny model
//! trained for likelihood spends itself on wording and order, and its findings plateau below
//! perfect (what GRPO and DPO with the findings reward are measured on; docs/rl.md).
//!
//! Findings (each drawn independently): heart size normal / mildly / markedly enlarged; pleural
//! effusion none / left / right / both; pneumothorax none / left / right (a dark rim without lung
//! markings at the apex and the lateral wall, its pleural line visible); a nodule (small) or a
//! mass (large) in one of four lobes; consolidation of the left or right lower lung (a patchy
//! density); a central venous catheter. The film is a PA view: the patient's left is the image's
//! right. Each report is a fixed function of the findings and the film's own random stream (which
//! phrasing, which order), followed by an impression listing the findings.
//!
//! Layout: `<out>/Xray/synth-hard-zh.json` (`{"version", "kind": "hard", "annotations":
//! [{"image_id", "caption", "findings"}]}`) and `<out>/Xray/hard_<i>.png`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::rng::PyRandom;
use super::synthetic::{blur, ellipse, encode_png_l8, frontal_body, inside};

/// Version of the hard set's drawing and reports; a set written by another version is redrawn.
pub const HARD_GENERATOR_VERSION: u32 = 1;

/// The annotations file of the hard set under `out`.
pub fn hard_path(out: &Path) -> PathBuf {
    out.join("Xray").join("synth-hard-zh.json")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Heart {
    Normal,
    Mild,
    Marked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Left,
    Right,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lobe {
    RightUpper,
    RightLower,
    LeftUpper,
    LeftLower,
}

impl Lobe {
    const ALL: [Lobe; 4] = [
        Lobe::RightUpper,
        Lobe::RightLower,
        Lobe::LeftUpper,
        Lobe::LeftLower,
    ];

    fn name(self) -> &'static str {
        match self {
            Lobe::RightUpper => "右肺上叶",
            Lobe::RightLower => "右肺下叶",
            Lobe::LeftUpper => "左肺上叶",
            Lobe::LeftLower => "左肺下叶",
        }
    }

    /// Centre on the film (u, v): the patient's right lung is the image's left.
    fn centre(self) -> (f64, f64) {
        match self {
            Lobe::RightUpper => (0.30, 0.36),
            Lobe::RightLower => (0.30, 0.62),
            Lobe::LeftUpper => (0.70, 0.36),
            Lobe::LeftLower => (0.72, 0.62),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "lobe")]
pub enum Lesion {
    None,
    Nodule(Lobe),
    Mass(Lobe),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardFindings {
    pub heart: Heart,
    pub effusion: super::synthetic::Effusion,
    pub pneumothorax: Option<Side>,
    pub lesion: Lesion,
    pub consolidation: Option<Side>,
    pub catheter: bool,
}

/// Chinese name of a side.
fn side(s: Side) -> &'static str {
    match s {
        Side::Left => "左",
        Side::Right => "右",
    }
}

impl HardFindings {
    /// Findings drawn from `rng` (each independent of the others).
    pub fn draw(rng: &mut PyRandom) -> Self {
        use super::synthetic::Effusion;
        let r = rng.random();
        let heart = if r < 0.55 {
            Heart::Normal
        } else if r < 0.78 {
            Heart::Mild
        } else {
            Heart::Marked
        };
        let r = rng.random();
        let effusion = if r < 0.6 {
            Effusion::None
        } else if r < 0.73 {
            Effusion::Left
        } else if r < 0.86 {
            Effusion::Right
        } else {
            Effusion::Both
        };
        let side_of = |p: f64, rng: &mut PyRandom| {
            let r = rng.random();
            (r < p).then(|| if r < p / 2.0 { Side::Left } else { Side::Right })
        };
        let pneumothorax = side_of(0.25, rng);
        let r = rng.random();
        let lobe = Lobe::ALL[rng.randbelow(4) as usize];
        let lesion = if r < 0.6 {
            Lesion::None
        } else if r < 0.8 {
            Lesion::Nodule(lobe)
        } else {
            Lesion::Mass(lobe)
        };
        let consolidation = side_of(0.3, rng);
        let catheter = rng.random() < 0.25;
        Self {
            heart,
            effusion,
            pneumothorax,
            lesion,
            consolidation,
            catheter,
        }
    }

    /// The CheXpert observations these findings are (No Finding when there is no pathology — a
    /// device is not one, as in CheXpert): what the findings labeler must read from the report.
    pub fn observations(&self) -> Vec<crate::eval::findings::Observation> {
        use crate::eval::findings::Observation as O;
        let mut v = Vec::new();
        if self.heart != Heart::Normal {
            v.push(O::Cardiomegaly);
        }
        if self.lesion != Lesion::None {
            v.push(O::LungLesion);
        }
        if self.consolidation.is_some() {
            v.push(O::Consolidation);
        }
        if self.pneumothorax.is_some() {
            v.push(O::Pneumothorax);
        }
        if self.effusion != super::synthetic::Effusion::None {
            v.push(O::PleuralEffusion);
        }
        if v.is_empty() {
            v.push(O::NoFinding);
        }
        if self.catheter {
            v.push(O::SupportDevices);
        }
        v
    }

    /// The report: one sentence per finding in a phrasing and an order drawn from `rng`, then
    /// the impression.
    pub fn report(&self, rng: &mut PyRandom) -> String {
        use super::synthetic::Effusion;
        let pick = |rng: &mut PyRandom, options: &[String]| {
            options[rng.randbelow(options.len() as u64) as usize].clone()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut sentences = vec![pick(
            rng,
            &match self.heart {
                Heart::Normal => s(&["心脏大小正常。", "心影不大。", "心脏轮廓正常。"]),
                Heart::Mild => s(&["心脏轻度增大。", "心影轻度增大。", "心脏轮廓轻度扩大。"]),
                Heart::Marked => s(&[
                    "心脏明显增大，心胸比例增大。",
                    "心影显著增大。",
                    "心脏明显扩大。",
                ]),
            },
        )];
        let fluid = |w: &str| {
            vec![
                format!("{w}侧胸腔积液。"),
                format!("{w}侧少量胸腔积液，{w}侧肋膈角变钝。"),
                format!("{w}侧胸腔见积液。"),
            ]
        };
        sentences.push(pick(
            rng,
            &match self.effusion {
                Effusion::None => s(&["未见胸腔积液。", "双侧肋膈角锐利。", "无胸腔积液。"]),
                Effusion::Left => fluid("左"),
                Effusion::Right => fluid("右"),
                Effusion::Both => fluid("双"),
            },
        ));
        sentences.push(pick(
            rng,
            &match self.pneumothorax {
                None => s(&["未见气胸。", "无气胸。"]),
                Some(x) => vec![
                    format!("{}侧气胸。", side(x)),
                    format!("{}侧可见气胸，{}肺压缩。", side(x), side(x)),
                ],
            },
        ));
        let lesion = match self.lesion {
            Lesion::None => s(&["未见肺内结节。", ""]),
            Lesion::Nodule(l) => vec![
                format!("{}见一小结节。", l.name()),
                format!("{}结节。", l.name()),
            ],
            Lesion::Mass(l) => vec![
                format!("{}见肿块影。", l.name()),
                format!("{}肿块。", l.name()),
            ],
        };
        sentences.push(pick(rng, &lesion));
        let consolidation = match self.consolidation {
            None => s(&["未见实变。", ""]),
            Some(x) => vec![
                format!("{}下肺实变。", side(x)),
                format!("{}肺下野见斑片状实变。", side(x)),
            ],
        };
        sentences.push(pick(rng, &consolidation));
        if self.catheter {
            sentences.push(pick(
                rng,
                &s(&[
                    "右侧中心静脉导管置入，尖端位于上腔静脉。",
                    "可见中心静脉导管。",
                ]),
            ));
        }
        sentences.retain(|x| !x.is_empty());
        rng.shuffle(&mut sentences);
        let mut out: String = sentences.concat();
        let mut imp: Vec<String> = Vec::new();
        match self.heart {
            Heart::Normal => {}
            Heart::Mild => imp.push("心脏轻度增大".into()),
            Heart::Marked => imp.push("心脏明显增大".into()),
        }
        match self.effusion {
            Effusion::None => {}
            Effusion::Left => imp.push("左侧胸腔积液".into()),
            Effusion::Right => imp.push("右侧胸腔积液".into()),
            Effusion::Both => imp.push("双侧胸腔积液".into()),
        }
        if let Some(x) = self.pneumothorax {
            imp.push(format!("{}侧气胸", side(x)));
        }
        match self.lesion {
            Lesion::None => {}
            Lesion::Nodule(l) => imp.push(format!("{}结节", l.name())),
            Lesion::Mass(l) => imp.push(format!("{}肿块", l.name())),
        }
        if let Some(x) = self.consolidation {
            imp.push(format!("{}下肺实变", side(x)));
        }
        if self.catheter {
            imp.push("中心静脉导管置入".into());
        }
        if imp.is_empty() {
            out.push_str("印象：心肺未见明显异常。");
        } else {
            out.push_str(&format!("印象：{}。", imp.join("；")));
        }
        out
    }
}

/// Draw one PA film of the hard set (grayscale, `size`×`size`).
pub fn render_hard(f: &HardFindings, size: usize, rng: &mut PyRandom) -> Vec<u8> {
    use super::synthetic::Effusion;
    let jitter = |rng: &mut PyRandom, a: f64| (rng.random() * 2.0 - 1.0) * a;
    let (du, dv) = (jitter(rng, 0.02), jitter(rng, 0.02));
    let exposure = 1.0 + jitter(rng, 0.08);
    let heart_ru = match f.heart {
        Heart::Normal => 0.145,
        Heart::Mild => 0.18,
        Heart::Marked => 0.215,
    } + jitter(rng, 0.008);
    let fluid = [0.24 + jitter(rng, 0.03), 0.24 + jitter(rng, 0.03)];
    let fluid_in = |lung: usize| match f.effusion {
        Effusion::None => false,
        Effusion::Left => lung == 1,
        Effusion::Right => lung == 0,
        Effusion::Both => true,
    };
    // Lung 0 is the image-left (patient's right) lung.
    let lung_of = |s: Side| match s {
        Side::Right => 0usize,
        Side::Left => 1usize,
    };
    let (lesion_at, lesion_r) = match f.lesion {
        Lesion::None => ((0.0, 0.0), 0.0),
        Lesion::Nodule(l) => (l.centre(), 0.028),
        Lesion::Mass(l) => (l.centre(), 0.055),
    };
    let lesion_at = (
        lesion_at.0 + jitter(rng, 0.015),
        lesion_at.1 + jitter(rng, 0.015),
    );
    let gap = 0.22 + jitter(rng, 0.03);
    let mut img = vec![0f64; size * size];
    for y in 0..size {
        for x in 0..size {
            let u = (x as f64 + 0.5) / size as f64 - du;
            let v = (y as f64 + 0.5) / size as f64 - dv;
            let (mut val, body) = frontal_body(u, v);
            for (lung, cu) in [(0usize, 0.315), (1usize, 0.685)] {
                let d = ellipse(u, v, cu, 0.50, 0.135, 0.30);
                let l = inside(d, 0.15);
                if l <= 0.0 {
                    continue;
                }
                let curve = (u - 0.5).powi(2) * 1.6;
                let rib = if ((v + curve) * 52.0).sin() > 0.55 {
                    16.0
                } else {
                    0.0
                };
                // Lung markings: a faint vascular texture.
                let marks = 6.0 * ((u * 90.0).sin() * (v * 70.0).cos()).abs();
                let mut lung_val = -72.0 + rib + marks;
                // Pneumothorax: beyond the pleural line (a rim along the apex and lateral wall)
                // no markings, darker; the line itself bright.
                if f.pneumothorax.map(lung_of) == Some(lung) {
                    let rim = 1.0 - d.sqrt();
                    let lateral: f64 = if (lung == 0) == (u < cu) { 1.0 } else { 0.0 };
                    let apical = ((0.45 - v) / 0.25).clamp(0.0, 1.0);
                    let band = gap * (lateral.max(apical));
                    if rim < band {
                        lung_val = -98.0 + rib * 0.5;
                    } else if rim < band + 0.012 && band > 0.0 {
                        lung_val = -10.0;
                    }
                }
                // Consolidation: a patchy density in the lower lung.
                if f.consolidation.map(lung_of) == Some(lung) {
                    let c = inside(ellipse(u, v, cu, 0.48, 0.08, 0.08), 0.4);
                    let patch = 0.6 + 0.4 * ((u * 55.0).sin() * (v * 47.0).sin());
                    lung_val += c * patch * 60.0;
                }
                if fluid_in(lung) {
                    let lateral =
                        (u - cu).abs() / 0.135 * if (lung == 0) == (u < cu) { 1.0 } else { 0.3 };
                    let level = 0.80 - fluid[lung] - 0.08 * lateral.clamp(0.0, 1.0).powi(2);
                    if v > level {
                        let t = ((v - level) / 0.02).min(1.0);
                        lung_val = 22.0 * t + lung_val * (1.0 - t);
                    }
                }
                val += l * lung_val;
            }
            // A nodule or mass: a round density.
            if lesion_r > 0.0 {
                let n = inside(
                    ellipse(u, v, lesion_at.0, lesion_at.1, lesion_r, lesion_r),
                    0.3,
                );
                val += n * 75.0;
            }
            let spine = ((0.045 - (u - 0.5).abs()) / 0.01).clamp(0.0, 1.0) * body;
            val += spine * 45.0;
            let h = inside(ellipse(u, v, 0.53, 0.64, heart_ru, 0.15), 0.08);
            val = val * (1.0 - h) + h * 175.0;
            // A central venous catheter: a thin bright line from the right neck down to the
            // superior vena cava.
            if f.catheter && (0.12..0.46).contains(&v) {
                let path_u = 0.40 + 0.06 * ((v - 0.12) / 0.34);
                if (u - path_u).abs() < 0.005 {
                    val += 90.0;
                }
            }
            img[y * size + x] = val * exposure + jitter(rng, 4.0);
        }
    }
    blur(&img, size)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HardAnnotation {
    pub image_id: String,
    pub caption: String,
    pub findings: HardFindings,
}

/// Write `n` films of the hard set and their annotations under `out`. Returns the annotations
/// file path.
pub fn generate_hard(out: &Path, n: usize, size: usize, seed: i64) -> Result<PathBuf> {
    let dir = out.join("Xray");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = PyRandom::new(seed);
    let plan: Vec<(String, HardFindings, PyRandom)> = (0..n)
        .map(|i| {
            let f = HardFindings::draw(&mut rng);
            let key = [seed as u32, (seed >> 32) as u32, i as u32, 7];
            (format!("hard_{i:05}"), f, PyRandom::from_key(&key))
        })
        .collect();
    let threads = super::worker_threads(0);
    let chunk = plan.len().div_ceil(threads).max(1);
    let captions: Vec<String> = std::thread::scope(|s| -> Result<Vec<String>> {
        let handles: Vec<_> = plan
            .chunks(chunk)
            .map(|part| {
                let dir = &dir;
                s.spawn(move || -> Result<Vec<String>> {
                    let mut out = Vec::with_capacity(part.len());
                    for (id, f, rng) in part {
                        let mut rng = rng.clone();
                        let caption = f.report(&mut rng);
                        let png = encode_png_l8(&render_hard(f, size, &mut rng), size)?;
                        crate::io::write_atomic(&dir.join(format!("{id}.png")), &png)?;
                        out.push(caption);
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().expect("synthetic image thread panicked")?);
        }
        Ok(all)
    })?;
    let annotations: Vec<HardAnnotation> = plan
        .iter()
        .zip(captions)
        .map(|((id, f, _), caption)| HardAnnotation {
            image_id: id.clone(),
            caption,
            findings: *f,
        })
        .collect();
    let path = hard_path(out);
    crate::io::write_json_atomic(
        &path,
        &serde_json::json!({
            "version": HARD_GENERATOR_VERSION,
            "kind": "hard",
            "annotations": annotations,
        }),
    )?;
    Ok(path)
}
