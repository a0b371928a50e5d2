//! `xrayglm bench data`: throughput of the data path, against a baseline measured in the same run.
//!
//! Baseline: a straightforward pipeline on the `image` crate (decode, `to_rgb8`, CatmullRom resize,
//! normalise) on one thread. Then this crate's exact Pillow-equivalent preprocessing on one thread,
//! on all worker threads, and the full batch loader (tokenized samples + images, background threads);
//! with `--vs_sat`, XrayGLM's own FewShotDataset construction on the same films.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::data::batch::{Dataset, Loader, LoaderConfig, LoaderState, Shard};
use crate::data::image::{normalize_chw, ImageProcessor, Rgb8};
use crate::data::records::Record;
use crate::data::rng::PyRandom;
use crate::data::sample::{SampleBuilder, SampleConfig};
use crate::data::synthetic::{findings_for, render};
use crate::tokenizer::ChatGlmTokenizer;

/// Goal from the issue: preprocessed 512×512 PNGs per second on this machine.
pub const GOAL_IMAGES_PER_S: f64 = 500.0;

#[derive(Debug, Clone)]
pub struct DataBench {
    pub images: usize,
    pub source: String,
    pub threads: usize,
    pub baseline_ips: f64,
    pub single_ips: f64,
    pub parallel_ips: f64,
    pub loader_sps: Option<f64>,
    /// The original's data path in the same run (`--vs_sat`).
    pub sat: Option<DataSat>,
}

/// XrayGLM's FewShotDataset construction on the same films and reports.
#[derive(Debug, Clone)]
pub struct DataSat {
    /// Films preprocessed and samples laid out, per second (one process).
    pub samples_per_s: f64,
    /// Films alone, per second.
    pub images_per_s: f64,
    /// fp32 films the original keeps in memory for the whole run.
    pub held_mib: f64,
}

impl std::fmt::Display for DataBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "data bench: {} {} -> 3x224x224, {} threads",
            self.images, self.source, self.threads
        )?;
        writeln!(
            f,
            "  baseline (image crate, CatmullRom, 1 thread) {:8.1} images/s  1.00x",
            self.baseline_ips
        )?;
        writeln!(
            f,
            "  xrayglm preprocess, 1 thread                  {:8.1} images/s  {:.2}x",
            self.single_ips,
            self.single_ips / self.baseline_ips
        )?;
        writeln!(
            f,
            "  xrayglm preprocess, {} threads                 {:8.1} images/s  {:.2}x  (goal {:.0}: {})",
            self.threads,
            self.parallel_ips,
            self.parallel_ips / self.baseline_ips,
            GOAL_IMAGES_PER_S,
            if self.parallel_ips >= GOAL_IMAGES_PER_S { "met" } else { "NOT met" }
        )?;
        match self.loader_sps {
            Some(s) => writeln!(
                f,
                "  loader (batch 8, {} workers, tokenized)       {:8.1} samples/s {:.2}x",
                self.threads,
                s,
                s / self.baseline_ips
            )?,
            None => writeln!(f, "  loader: skipped (no tokenizer found)")?,
        }
        if let Some(o) = &self.sat {
            writeln!(
                f,
                "  original: PIL + torchvision, 1 process       {:8.1} images/s  (xrayglm 1 thread {:.2}x)",
                o.images_per_s,
                self.single_ips / o.images_per_s
            )?;
            writeln!(
                f,
                "  original: FewShotDataset (films + tokens)    {:8.1} samples/s (xrayglm loader {:.2}x); holds every film as fp32: {:.0} MiB here, {:.0} MiB for OpenI-zh's 6,423",
                o.samples_per_s,
                self.loader_sps.unwrap_or(f64::NAN) / o.samples_per_s,
                o.held_mib,
                o.held_mib / self.images as f64 * 6423.0
            )?;
        }
        Ok(())
    }
}

fn make_images(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut rng = PyRandom::new(7);
    (0..n)
        .map(|i| {
            let f = findings_for(&mut rng);
            let gray = render(&f, 512, &mut PyRandom::new(i as i64));
            let rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
            let path = dir.join(format!("bench_{i:04}.png"));
            image::save_buffer(&path, &rgb, 512, 512, image::ExtendedColorType::Rgb8)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

fn baseline(path: &Path) -> Result<Vec<f32>> {
    let img = image::open(path)?.to_rgb8();
    let r = image::imageops::resize(&img, 224, 224, image::imageops::FilterType::CatmullRom);
    Ok(normalize_chw(&Rgb8 {
        width: 224,
        height: 224,
        data: r.into_raw(),
    }))
}

fn rate(n: usize, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Images in `dir` (PNG and JPEG), repeated until there are `n`.
fn images_from(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| {
                ["png", "jpg", "jpeg"].contains(&e.to_string_lossy().to_lowercase().as_str())
            })
        })
        .collect();
    found.sort();
    anyhow::ensure!(
        !found.is_empty(),
        "{}: no PNG or JPEG images",
        dir.display()
    );
    Ok((0..n).map(|i| found[i % found.len()].clone()).collect())
}

/// `xrayglm bench data`: images/s and samples/s of the data path on 512x512 PNGs.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    #[arg(long, default_value_t = 200)]
    pub images: usize,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Use the PNG/JPEG images in this folder (repeated as needed) instead of generated films.
    #[arg(long)]
    pub from: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Python with torchvision and sentencepiece (scripts/fixtures_venv.sh): XrayGLM's
    /// FewShotDataset construction on the same films and reports, in the same run.
    #[arg(long)]
    pub vs_sat: Option<PathBuf>,
}

/// Run the data benchmark on `a.images` images: generated 512×512 RGB films, or those in
/// `a.from`; the loader with the tokenizer found (if any); the original's with `a.vs_sat`.
pub fn data(a: &DataArgs) -> Result<DataBench> {
    let (n, from) = (a.images, a.from.as_deref());
    let tokenizer_path = crate::tokenizer::find(a.tokenizer.as_deref());
    let vs_sat = match &a.vs_sat {
        None => None,
        Some(py) => {
            let ice_text = tokenizer_path
                .as_deref()
                .filter(|p| p.extension().is_some_and(|e| e == "model"))
                .context(
                    "--vs_sat: the original tokenizes with ice_text.model; pass --tokenizer path/to/ice_text.model",
                )?;
            Some((py.as_path(), ice_text))
        }
    };
    let tokenizer = tokenizer_path
        .as_deref()
        .map(ChatGlmTokenizer::from_path)
        .transpose()?;
    let tokenizer = tokenizer.as_ref();
    let threads = crate::data::worker_threads(a.threads);
    let dir = std::env::temp_dir().join(format!("xrayglm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<DataBench> {
        let paths = match from {
            Some(d) => images_from(d, n)?,
            None => make_images(&dir, n)?,
        };
        let source = match from {
            Some(d) => format!("images from {}", d.display()),
            None => "generated RGB PNG films 512x512".to_string(),
        };
        let proc = ImageProcessor::default();
        // Warm the page cache so every variant reads from memory.
        for p in &paths {
            std::fs::read(p)?;
        }
        let baseline_ips = rate(n, || paths.iter().try_for_each(|p| baseline(p).map(drop)))?;
        let single_ips = rate(n, || {
            paths
                .iter()
                .try_for_each(|p| proc.process_file(p).map(drop))
        })?;
        let parallel_ips = rate(n, || {
            let chunk = n.div_ceil(threads);
            std::thread::scope(|s| {
                let hs: Vec<_> = paths
                    .chunks(chunk)
                    .map(|part| {
                        s.spawn(move || {
                            part.iter().try_for_each(|p| proc.process_file(p).map(drop))
                        })
                    })
                    .collect();
                hs.into_iter()
                    .try_for_each(|h| h.join().expect("bench thread panicked"))
            })
        })?;
        let labels: Vec<String> = (0..n)
            .map(|i| findings_for(&mut PyRandom::new(i as i64)).report())
            .collect();
        let loader_sps = match tokenizer {
            Some(tok) => {
                let records: Vec<Record> = paths
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Record {
                        index: i,
                        id: format!("bench_{i:04}"),
                        img: vec![p.display().to_string()],
                        images: vec![p.clone()],
                        prompt: crate::data::records::FIXED_PROMPT.into(),
                        label: labels[i].clone(),
                        history: Vec::new(),
                    })
                    .collect();
                // From records: tokenizing every sample, then one epoch of batches.
                let t = Instant::now();
                let builder = SampleBuilder::new(tok.clone(), SampleConfig::default())?;
                let ds = Arc::new(Dataset::new(records, &builder, proc, "bench")?);
                let cfg = LoaderConfig {
                    batch_size: 8,
                    workers: threads,
                    prefetch: 2 * threads,
                    ..Default::default()
                };
                let loader = Loader::new(ds, cfg, Shard::default(), LoaderState::default())?;
                let batches = loader.batches_per_epoch();
                for b in loader.take(batches) {
                    b?;
                }
                Some(n as f64 / t.elapsed().as_secs_f64())
            }
            None => None,
        };
        let sat = match vs_sat {
            None => None,
            Some((python, ice_text)) => {
                let spec = dir.join("sat_data.json");
                let sample = SampleConfig::default();
                crate::io::write_json_atomic(
                    &spec,
                    &serde_json::json!({
                        "images": paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                        "labels": labels,
                        "prompt": crate::data::records::FIXED_PROMPT,
                        "tokenizer": ice_text.display().to_string(),
                        "max_source_length": sample.max_source_length,
                        "max_target_length": sample.max_target_length,
                    }),
                )?;
                let out = super::SatScript::run(
                    python,
                    "bench_data_sat.py",
                    &[spec.as_os_str()],
                    &[("THREADS", threads.to_string())],
                )?;
                Some(DataSat {
                    samples_per_s: out.get("sat_samples_per_s")?,
                    images_per_s: out.get("sat_images_per_s")?,
                    held_mib: out.get("sat_held_mib")?,
                })
            }
        };
        Ok(DataBench {
            images: n,
            source,
            threads,
            baseline_ips,
            single_ips,
            parallel_ips,
            loader_sps,
            sat,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
