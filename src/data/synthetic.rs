//! A synthetic chest X-ray demo set: deterministic radiograph-like images with controlled findings
//! and matching templated Chinese reports, so a tiny model can learn something checkable on CPU.
//!
//! Each image is a PA chest film drawn from simple shapes: thorax, two lung fields with ribs, spine,
//! a cardiac silhouette whose width depends on `cardiomegaly`, diaphragm, and an optional pleural
//! effusion (fluid with a meniscus filling the costophrenic angle). As on a real PA film the
//! patient's left is on the image's right. The report is a fixed function of the findings.
//!
//! Layout written (mirrors XrayGLM's `data/Xray/openi-zh.json` beside its PNGs):
//! `<out>/Xray/synth-zh.json` (`{"annotations": [{"image_id", "caption", "findings"}]}`) and
//! `<out>/Xray/<image_id>.png`.
//!
//! With `synthetic.lateral` each study also gets a lateral film, and the films are named as
//! OpenI's are, `<study>_<k>` (`synth_00007_1` the PA film — the same pixels as the one-view set's
//! `synth_00007` — and `synth_00007_2` the lateral), both annotated with the study's report, so
//! `data.group_views` makes two-view samples of them. On the lateral film (anterior to the image
//! left) the two lungs overlap: the heart fills the retrosternal space when enlarged, and fluid
//! blunts the posterior costophrenic recess — more of it for two effusions than for one, and
//! which side it is on cannot be seen, as on a real lateral film.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::rng::PyRandom;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effusion {
    None,
    Left,
    Right,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Findings {
    pub cardiomegaly: bool,
    pub effusion: Effusion,
}

impl Findings {
    /// The report for these findings.
    pub fn report(&self) -> String {
        let mut s = String::new();
        s.push_str(if self.cardiomegaly {
            "心脏明显增大，心胸比例增大。"
        } else {
            "心脏大小正常。"
        });
        s.push_str("双肺野清晰，未见局灶性实变或气胸。");
        s.push_str(match self.effusion {
            Effusion::None => "未见胸腔积液。",
            Effusion::Left => "左侧胸腔积液，左侧肋膈角变钝。",
            Effusion::Right => "右侧胸腔积液，右侧肋膈角变钝。",
            Effusion::Both => "双侧胸腔积液，双侧肋膈角变钝。",
        });
        let mut imp = Vec::new();
        if self.cardiomegaly {
            imp.push("心脏增大");
        }
        match self.effusion {
            Effusion::None => {}
            Effusion::Left => imp.push("左侧胸腔积液"),
            Effusion::Right => imp.push("右侧胸腔积液"),
            Effusion::Both => imp.push("双侧胸腔积液"),
        }
        if imp.is_empty() {
            s.push_str("印象：心肺未见明显异常。");
        } else {
            s.push_str(&format!("印象：{}。", imp.join("，")));
        }
        s
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyntheticAnnotation {
    pub image_id: String,
    pub caption: String,
    pub findings: Findings,
}

/// Version of the drawing and the set's layout; a set written by another version is redrawn.
/// 2: larger effusions (fluid 0.26 of the film high, was 0.17).
pub const GENERATOR_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyntheticFile {
    /// [`GENERATOR_VERSION`] of the writer (absent: 1).
    #[serde(default = "first_version")]
    pub version: u32,
    /// Whether each study has a lateral film too (`<study>_1`, `<study>_2`).
    #[serde(default)]
    pub lateral: bool,
    pub annotations: Vec<SyntheticAnnotation>,
}

fn first_version() -> u32 {
    1
}

pub(super) fn ellipse(u: f64, v: f64, cu: f64, cv: f64, ru: f64, rv: f64) -> f64 {
    ((u - cu) / ru).powi(2) + ((v - cv) / rv).powi(2)
}

/// Soft inside-ness of an ellipse: 1 inside, 0 outside, a short ramp at the edge.
pub(super) fn inside(d: f64, edge: f64) -> f64 {
    ((1.0 - d) / edge).clamp(0.0, 1.0)
}

/// A PA film's background at `(u, v)`: air, the body (the abdomen below the diaphragm denser).
/// Returns the value and how much inside the body the point is.
pub(super) fn frontal_body(u: f64, v: f64) -> (f64, f64) {
    let body = inside(ellipse(u, v, 0.5, 0.58, 0.45, 0.56), 0.05);
    let mut val = 12.0 + body * 105.0;
    if v > 0.80 {
        val += body * 25.0 * ((v - 0.80) / 0.05).min(1.0);
    }
    (val, body)
}

/// Draw one film (grayscale, `size`×`size`).
pub fn render(f: &Findings, size: usize, rng: &mut PyRandom) -> Vec<u8> {
    let jitter = |rng: &mut PyRandom, a: f64| (rng.random() * 2.0 - 1.0) * a;
    let (du, dv) = (jitter(rng, 0.02), jitter(rng, 0.02));
    let exposure = 1.0 + jitter(rng, 0.08);
    let heart_ru = if f.cardiomegaly { 0.215 } else { 0.145 } + jitter(rng, 0.012);
    let fluid = [0.26 + jitter(rng, 0.03), 0.26 + jitter(rng, 0.03)];
    let (left_fluid, right_fluid) = match f.effusion {
        Effusion::None => (false, false),
        Effusion::Left => (true, false),
        Effusion::Right => (false, true),
        Effusion::Both => (true, true),
    };
    let mut img = vec![0f64; size * size];
    for y in 0..size {
        for x in 0..size {
            let u = (x as f64 + 0.5) / size as f64 - du;
            let v = (y as f64 + 0.5) / size as f64 - dv;
            let (mut val, body) = frontal_body(u, v);
            // Lungs: image-left lung is the patient's right.
            for (side, cu) in [(0usize, 0.315), (1usize, 0.685)] {
                let d = ellipse(u, v, cu, 0.50, 0.135, 0.30);
                let l = inside(d, 0.15);
                if l > 0.0 {
                    // Ribs: gently curved bright bands.
                    let curve = (u - 0.5).powi(2) * 1.6;
                    let rib = ((v + curve) * 52.0).sin();
                    let rib = if rib > 0.55 { 16.0 } else { 0.0 };
                    let mut lung = -72.0 + rib;
                    // Effusion: fluid from the base with a meniscus rising at the lateral wall.
                    let has_fluid = if side == 1 { left_fluid } else { right_fluid };
                    if has_fluid {
                        let lateral = (u - cu).abs() / 0.135
                            * if (side == 0) == (u < cu) { 1.0 } else { 0.3 };
                        let level = 0.80 - fluid[side] - 0.08 * lateral.clamp(0.0, 1.0).powi(2);
                        if v > level {
                            lung = 22.0 * ((v - level) / 0.02).min(1.0)
                                - 72.0 * (1.0 - ((v - level) / 0.02).min(1.0));
                        }
                    }
                    val += l * lung;
                }
            }
            // Spine and mediastinum.
            let spine = ((0.045 - (u - 0.5).abs()) / 0.01).clamp(0.0, 1.0) * body;
            val += spine * 45.0;
            // Cardiac silhouette, offset to the image right (patient's left).
            let h = inside(ellipse(u, v, 0.53, 0.64, heart_ru, 0.15), 0.08);
            val = val * (1.0 - h) + h * 175.0;
            img[y * size + x] = val * exposure + jitter(rng, 4.0);
        }
    }
    blur(&img, size)
}

/// Draw the lateral film of a study (grayscale, `size`×`size`; anterior to the image left).
pub fn render_lateral(f: &Findings, size: usize, rng: &mut PyRandom) -> Vec<u8> {
    let jitter = |rng: &mut PyRandom, a: f64| (rng.random() * 2.0 - 1.0) * a;
    let (du, dv) = (jitter(rng, 0.02), jitter(rng, 0.02));
    let exposure = 1.0 + jitter(rng, 0.08);
    // An enlarged heart reaches forward (left) and back: wider and further behind the sternum.
    let (heart_cu, heart_ru) = if f.cardiomegaly {
        (0.43, 0.20)
    } else {
        (0.38, 0.13)
    };
    let heart_ru = heart_ru + jitter(rng, 0.012);
    // Both lungs overlap: fluid from either side fills the posterior recess; two effusions more.
    let fluid = match f.effusion {
        Effusion::None => 0.0,
        Effusion::Left | Effusion::Right => 0.16,
        Effusion::Both => 0.27,
    } + jitter(rng, 0.02);
    let mut img = vec![0f64; size * size];
    for y in 0..size {
        for x in 0..size {
            let u = (x as f64 + 0.5) / size as f64 - du;
            let v = (y as f64 + 0.5) / size as f64 - dv;
            let mut val = 12.0;
            let body = inside(ellipse(u, v, 0.5, 0.58, 0.40, 0.56), 0.05);
            val += body * 110.0;
            if v > 0.80 {
                val += body * 25.0 * ((v - 0.80) / 0.05).min(1.0);
            }
            // The superimposed lungs: one field from the sternum to the spine.
            let l = inside(ellipse(u, v, 0.52, 0.50, 0.25, 0.31), 0.15);
            if l > 0.0 {
                let rib = ((v * 40.0 + u * 6.0).sin() > 0.7) as u8 as f64 * 10.0;
                let mut lung = -70.0 + rib;
                if f.effusion != Effusion::None {
                    // The meniscus rises toward the posterior wall (image right).
                    let back = ((u - 0.52) / 0.25).clamp(0.0, 1.0);
                    let level = 0.80 - fluid * (0.35 + 0.65 * back) - 0.05 * back.powi(2);
                    if v > level {
                        let t = ((v - level) / 0.02).min(1.0);
                        lung = 22.0 * t - 70.0 * (1.0 - t);
                    }
                }
                val += l * lung;
            }
            // Thoracic spine at the back (image right), vertebral bodies as bright blocks.
            let spine = ((0.05 - (u - 0.80).abs()) / 0.01).clamp(0.0, 1.0) * body;
            let body_gap = if ((v * 22.0).fract()) < 0.15 {
                0.6
            } else {
                1.0
            };
            val += spine * 55.0 * body_gap;
            // Sternum: a thin band at the front.
            let sternum = ((0.012 - (u - 0.21).abs()) / 0.006).clamp(0.0, 1.0)
                * (0.25..0.65).contains(&v) as u8 as f64;
            val += sternum * 35.0;
            // Heart: anterior and low, behind the sternum.
            let h = inside(ellipse(u, v, heart_cu, 0.62, heart_ru, 0.16), 0.08);
            val = val * (1.0 - h) + h * 170.0;
            img[y * size + x] = val * exposure + jitter(rng, 4.0);
        }
    }
    blur(&img, size)
}

/// A light 3×3 blur for film softness, rounded to 8 bits.
pub(super) fn blur(img: &[f64], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let (mut s, mut n) = (0.0, 0.0);
            for yy in y.saturating_sub(1)..=(y + 1).min(size - 1) {
                for xx in x.saturating_sub(1)..=(x + 1).min(size - 1) {
                    s += img[yy * size + xx];
                    n += 1.0;
                }
            }
            out[y * size + x] = (s / n).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// The findings of sample `i` of a set seeded with `seed`.
pub fn findings_for(rng: &mut PyRandom) -> Findings {
    let cardiomegaly = rng.random() < 0.4;
    let r = rng.random();
    let effusion = if r < 0.55 {
        Effusion::None
    } else if r < 0.70 {
        Effusion::Left
    } else if r < 0.85 {
        Effusion::Right
    } else {
        Effusion::Both
    };
    Findings {
        cardiomegaly,
        effusion,
    }
}

/// Write `n` films and their annotations under `out`. Returns the annotations file path.
pub fn generate(out: &Path, n: usize, size: usize, seed: i64) -> Result<PathBuf> {
    generate_views(out, n, size, seed, false)
}

/// [`generate`], with a lateral film per study when `lateral` (films `<study>_1`, `<study>_2`).
pub fn generate_views(
    out: &Path,
    n: usize,
    size: usize,
    seed: i64,
    lateral: bool,
) -> Result<PathBuf> {
    let dir = out.join("Xray");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = PyRandom::new(seed);
    // (image id, findings, its own random stream, lateral?)
    let mut plan: Vec<(String, Findings, PyRandom, bool)> = Vec::new();
    for i in 0..n {
        let f = findings_for(&mut rng);
        // Each film gets its own stream so films can be drawn in parallel; the PA film's is the
        // same with or without a lateral.
        let key = [seed as u32, (seed >> 32) as u32, i as u32];
        let frontal = PyRandom::from_key(&key);
        if lateral {
            plan.push((format!("synth_{i:05}_1"), f, frontal, false));
            let side = PyRandom::from_key(&[key[0], key[1], key[2], 2]);
            plan.push((format!("synth_{i:05}_2"), f, side, true));
        } else {
            plan.push((format!("synth_{i:05}"), f, frontal, false));
        }
    }
    let threads = super::worker_threads(0);
    let chunk = plan.len().div_ceil(threads).max(1);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = plan
            .chunks(chunk)
            .map(|part| {
                let dir = &dir;
                s.spawn(move || -> Result<()> {
                    for (id, f, rng, side) in part {
                        let mut rng = rng.clone();
                        let pixels = if *side {
                            render_lateral(f, size, &mut rng)
                        } else {
                            render(f, size, &mut rng)
                        };
                        let png = encode_png_l8(&pixels, size)?;
                        crate::io::write_atomic(&dir.join(format!("{id}.png")), &png)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("synthetic image thread panicked")?;
        }
        Ok(())
    })?;
    let file = SyntheticFile {
        version: GENERATOR_VERSION,
        lateral,
        annotations: plan
            .iter()
            .map(|(id, f, _, _)| SyntheticAnnotation {
                image_id: id.clone(),
                caption: f.report(),
                findings: *f,
            })
            .collect(),
    };
    let path = dir.join("synth-zh.json");
    crate::io::write_json_atomic(&path, &file)?;
    Ok(path)
}

pub(super) fn encode_png_l8(pixels: &[u8], size: usize) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            pixels,
            size as u32,
            size as u32,
            image::ExtendedColorType::L8,
        )
        .context("encoding PNG")?;
    Ok(png)
}
