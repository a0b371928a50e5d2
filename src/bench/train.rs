//! `xrayglm bench train`: LoRA fine-tuning throughput on the OpenI-zh report length mix, xrayglm's
//! trainer against the original's recipe in the same run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::data::rng::PyRandom;
use crate::data::sample::{SampleBuilder, SampleConfig};

/// `xrayglm bench train`: LoRA fine-tuning throughput on a preset (random weights) with the real
/// OpenI-zh report length mix, xrayglm's trainer against the original's recipe in the same run.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    /// Steps left out of the timing.
    #[arg(long, default_value_t = 2)]
    pub warm: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Films drawn (reports cycle through them).
    #[arg(long, default_value_t = 64)]
    pub films: usize,
    /// OpenI-zh reports, `{"annotations": [{"image_id", "caption"}]}` (default:
    /// ../shared/data/Xray/openi-zh.json beside the source tree).
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// ice_text.model (default: the search paths).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Python with SwissArmyTransformer 0.3.6 (scripts/fixtures_venv.sh) for
    /// scripts/bench_train_sat.py.
    #[arg(long)]
    pub vs_sat: Option<PathBuf>,
    /// Also train under this memory budget with `train.checkpoint_layers = "auto"`, against every
    /// layer recomputed (`train.checkpoint_activations`), and print both.
    #[arg(long = "memory_budget_gib", alias = "memory-budget-gib")]
    pub memory_budget_gib: Option<f64>,
    /// Overrides of xrayglm's side, e.g. `loader.padding="fixed"`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// One side's steady-state numbers.
#[derive(Debug, Clone, Copy)]
pub struct TrainSide {
    pub samples_per_s: f64,
    /// Target (report) tokens per second: the useful ones, not padding or prompt.
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub peak_rss_mib: f64,
    /// Peak memory in use on the GPU (whole device), when training ran on one.
    pub peak_gpu_mib: Option<f64>,
    /// xrayglm's trainer's MFU, HFU and old 6·N figure over the timed steps (its log's, against
    /// its `train.peak_tflops` or a measured matmul).
    pub utilization: Option<[f64; 3]>,
}

#[derive(Debug, Clone)]
pub struct TrainBench {
    pub preset: String,
    pub batch: usize,
    pub steps: usize,
    pub warm: usize,
    pub threads: i32,
    pub mean_len: f64,
    /// xrayglm's side: what its `--set` overrides leave, e.g. `fp32 on cpu`.
    pub setting: String,
    pub ours: TrainSide,
    pub sat: Option<TrainSide>,
    /// With `--memory_budget_gib`: every layer recomputed, and the memory plan's run with its
    /// decision.
    pub plan: Option<PlanRuns>,
}

/// `--memory_budget_gib`: the same training with every layer recomputed and under the plan.
#[derive(Debug, Clone)]
pub struct PlanRuns {
    pub full: TrainSide,
    pub planned: TrainSide,
    pub budget_mib: f64,
    pub recompute: usize,
    pub layers: usize,
}

/// Goal from the issue: xrayglm's time for the same samples ≤ this fraction of the original's.
pub const GOAL_TRAIN_TIME_RATIO: f64 = 0.5;

impl std::fmt::Display for TrainBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "train bench: preset {}, {}, micro-batch {}, {} timed steps after {} warm-up, OpenI-zh report lengths (mean sample {:.0} tokens), LoRA r10 on 2 layers, dropout 0.1, {} threads",
            self.preset, self.setting, self.batch, self.steps - self.warm, self.warm, self.mean_len, self.threads
        )?;
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, s: &TrainSide| {
            write!(
                f,
                "  {name:9} {:8.2} samples/s {:9.1} report tokens/s {:9.1} ms/step  peak RSS {:7.0} MiB",
                s.samples_per_s, s.tokens_per_s, s.step_ms, s.peak_rss_mib
            )?;
            if let Some(g) = s.peak_gpu_mib {
                write!(f, "  peak GPU (device) {g:.0} MiB")?;
            }
            match s.utilization {
                Some([mfu, hfu, six]) => writeln!(
                    f,
                    "  MFU {:.1}% HFU {:.1}% (6N: {:.1}%)",
                    100.0 * mfu,
                    100.0 * hfu,
                    100.0 * six
                ),
                None => writeln!(f),
            }
        };
        row(f, "xrayglm", &self.ours)?;
        if let Some(p) = &self.plan {
            row(f, "recompute", &p.full)?;
            row(f, "plan", &p.planned)?;
            writeln!(
                f,
                "  memory plan under {:.0} MiB: recompute {} of {} layers; peak RSS {:.0} MiB ({}), {:.2}x the samples/s of every layer recomputed ({:.0} MiB)",
                p.budget_mib,
                p.recompute,
                p.layers,
                p.planned.peak_rss_mib,
                if p.planned.peak_rss_mib <= p.budget_mib {
                    "under the budget"
                } else {
                    "OVER the budget"
                },
                p.planned.samples_per_s / p.full.samples_per_s,
                p.full.peak_rss_mib
            )?;
        }
        if let Some(s) = &self.sat {
            row(f, "original", s)?;
            let ratio = s.samples_per_s / self.ours.samples_per_s;
            writeln!(
                f,
                "  time for the same samples: {ratio:.2}x the original's ({:.2}x faster), memory {:.2}x; goal <= {GOAL_TRAIN_TIME_RATIO}x: {}",
                1.0 / ratio,
                self.ours.peak_rss_mib / s.peak_rss_mib,
                if ratio <= GOAL_TRAIN_TIME_RATIO { "met" } else { "NOT met" }
            )?;
        }
        Ok(())
    }
}

/// Run the training benchmark (see [`TrainBench`]): the list, xrayglm's trainer as a child
/// process, then (with `--vs_sat`) the original's recipe on the same samples.
pub fn train(o: &TrainArgs) -> Result<TrainBench> {
    use crate::model::config::ModelConfig;
    anyhow::ensure!(o.steps > o.warm, "bench train: --steps must exceed --warm");
    let tokenizer = crate::tokenizer::find(o.tokenizer.as_deref()).with_context(|| {
        format!(
            "no tokenizer: pass --tokenizer ice_text.model or set XRAYGLM_TOKENIZER ({})",
            crate::tokenizer::HOW_TO_GET
        )
    })?;
    let cfg = ModelConfig::preset(&o.preset)?;
    let layers = cfg.sat.num_layers;
    let tmp = super::tempfile_dir("xrayglm-bench-train")?;
    // Removed however the benchmark ends.
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(tmp.clone());
    let data = write_list(o, &tmp)?;
    let (samples, len_sum) = samples_as_built(&data, &tokenizer, cfg.sat.image_length)?;
    let lora_layers = [0, layers / 2];
    // XrayGLM's adapters (rank 10, alpha 1): the one default in model::config::LoraConfig.
    let xrayglm_lora = crate::model::config::LoraConfig::default();
    let mut sets = vec![
        "model.path=\"\"".to_string(),
        format!("model.preset={:?}", o.preset),
        "model.device=\"cpu\"".into(),
        "model.dtype=\"fp32\"".into(),
        format!("model.lora.layers=[{}, {}]", lora_layers[0], lora_layers[1]),
        format!("model.lora.rank={}", xrayglm_lora.rank),
        format!("model.lora.alpha={:?}", xrayglm_lora.alpha),
        "model.lora.mlp=false".into(),
        "model.vision_dropout=0.1".into(),
        "model.glm_dropout=0.1".into(),
        format!("data.path={:?}", data.display().to_string()),
        "synthetic.count=0".into(),
        format!("loader.batch_size={}", o.batch),
        format!("train.train_iters={}", o.steps),
        "train.log_interval=1".into(),
        "train.save_interval=1000000".into(),
        "train.eval_interval=1000000".into(),
        "train.val_fraction=0.0".into(),
        "train.precision=\"fp32\"".into(),
        "train.lr=1e-4".into(),
        "train.progress=false".into(),
        format!("train.out_dir={:?}", tmp.display().to_string()),
        "train.name=\"bench\"".into(),
    ];
    sets.extend(o.overrides.iter().cloned());
    // One peak for every run's MFU, measured here on the runs' device and dtype (each child
    // measuring its own would compare noise), unless one is given.
    if given(&sets, "train.peak_tflops", "0")
        .parse::<f64>()
        .unwrap_or(0.0)
        == 0.0
    {
        let dev: crate::device::DeviceSpec = given(&sets, "model.device", "cpu").parse()?;
        let dtype: crate::device::Dtype = given(&sets, "model.dtype", "fp32").parse()?;
        let peak = crate::model::flops::matmul_tflops(dev.device()?, dtype.kind());
        sets.push(format!("train.peak_tflops={peak}"));
    }
    let ours = run_ours(o, &sets, &tokenizer, &tmp, "bench")?;
    let plan = match o.memory_budget_gib {
        None => None,
        Some(gib) => {
            let with = |extra: &[String], name: &str| -> Result<TrainSide> {
                let mut s = sets.clone();
                s.extend(extra.iter().cloned());
                s.push(format!("train.name={name:?}"));
                run_ours(o, &s, &tokenizer, &tmp, name)
            };
            let full = with(&["train.checkpoint_activations=true".into()], "bench-full")?;
            let planned = with(
                &[
                    "train.checkpoint_layers=\"auto\"".into(),
                    format!("train.memory_budget_gib={gib}"),
                ],
                "bench-plan",
            )?;
            let event = std::fs::read_to_string(tmp.join("bench-plan/metrics.jsonl"))?
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["event"] == "memory_plan")
                .context("the planned run logged no memory plan")?;
            Some(PlanRuns {
                full,
                planned,
                budget_mib: gib * 1024.0,
                recompute: event["recompute"].as_u64().unwrap_or(0) as usize,
                layers: event["layers"].as_u64().unwrap_or(0) as usize,
            })
        }
    };
    let threads = tch::get_num_threads();
    let sat = match &o.vs_sat {
        None => None,
        Some(py) => {
            let spec = tmp.join("sat_bench.json");
            crate::io::write_json_atomic(
                &spec,
                &serde_json::json!({
                    "batch": o.batch, "steps": o.steps, "warm": o.warm, "pad_to": 320,
                    "image_size": cfg.sat.eva_args.image_size[0], "lora_layers": lora_layers,
                    "rank": xrayglm_lora.rank, "preset": o.preset, "samples": samples,
                }),
            )?;
            let out = super::SatScript::run(
                py,
                "bench_train_sat.py",
                &[spec.as_os_str()],
                &[("THREADS", threads.to_string())],
            )?;
            let get = |k: &str| out.get(k);
            Some(TrainSide {
                samples_per_s: get("sat_samples_per_s")?,
                tokens_per_s: get("sat_tokens_per_s")?,
                step_ms: get("sat_step_ms")?,
                peak_rss_mib: get("sat_peak_rss_mib")?,
                peak_gpu_mib: None,
                utilization: None,
            })
        }
    };
    Ok(TrainBench {
        preset: o.preset.clone(),
        batch: o.batch,
        steps: o.steps,
        warm: o.warm,
        threads,
        mean_len: len_sum as f64 / (o.steps * o.batch).max(1) as f64,
        setting: format!(
            "{} weights, {} precision, on {}",
            given(&sets, "model.dtype", "fp32"),
            given(&sets, "train.precision", "fp32"),
            given(&sets, "model.device", "cpu")
        ),
        ours,
        sat,
        plan,
    })
}

/// The value of `key` as the trainer takes it from `--set` overrides (the last one wins), quotes
/// removed.
fn given(sets: &[String], key: &str, default: &str) -> String {
    sets.iter()
        .rev()
        .find_map(|s| s.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| default.to_string())
}

/// The benchmark's training list in `tmp`: films from the synthetic generator, reports from
/// OpenI-zh (a seeded sample, cycled), `steps × batch` records.
fn write_list(o: &TrainArgs, tmp: &Path) -> Result<PathBuf> {
    use crate::data::records::FIXED_PROMPT;
    let reports_path = o.reports.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/Xray/openi-zh.json")
    });
    let n = o.films.max(o.batch);
    crate::data::synthetic::generate(tmp, n, 256, 11)?;
    // Only the reports are used (their films are not needed).
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&reports_path)
            .with_context(|| format!("reading {}", reports_path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", reports_path.display()))?;
    let reports: Vec<String> = v["annotations"]
        .as_array()
        .with_context(|| {
            format!(
                "{}: expected {{\"annotations\": [...]}}",
                reports_path.display()
            )
        })?
        .iter()
        .filter_map(|a| a["caption"].as_str().map(str::to_string))
        .filter(|c| !c.trim().is_empty())
        .collect();
    anyhow::ensure!(
        !reports.is_empty(),
        "{}: no reports",
        reports_path.display()
    );
    let mut order: Vec<usize> = (0..reports.len()).collect();
    PyRandom::new(5).shuffle(&mut order);
    let list: Vec<serde_json::Value> = (0..o.steps * o.batch)
        .map(|i| {
            serde_json::json!({
                "img": format!("Xray/synth_{:05}.png", i % n),
                "prompt": FIXED_PROMPT,
                "label": reports[order[i % order.len()]],
            })
        })
        .collect();
    let data = tmp.join("bench.json");
    crate::io::write_json_atomic(&data, &serde_json::Value::Array(list))?;
    Ok(data)
}

/// The list's samples as xrayglm builds them, for the original (which pads them to 320 tokens),
/// and their total length.
fn samples_as_built(
    data: &Path,
    tokenizer: &Path,
    image_length: i64,
) -> Result<(Vec<serde_json::Value>, usize)> {
    use crate::data::records::{load_records, LoadOptions};
    let tok = crate::tokenizer::ChatGlmTokenizer::from_path(tokenizer)?;
    let builder = SampleBuilder::new(
        tok,
        SampleConfig {
            image_length: image_length as usize,
            ..Default::default()
        },
    )?;
    let mut samples = Vec::new();
    let mut len_sum = 0usize;
    for r in &load_records(data, &LoadOptions::default())?.records {
        let s = builder.build(&r.prompt, &r.label)?;
        len_sum += s.input_ids.len();
        samples.push(serde_json::json!({
            "image": r.images[0], "input_ids": s.input_ids, "labels": s.labels,
        }));
    }
    Ok((samples, len_sum))
}

/// xrayglm's side: its trainer as a user runs it (this program's `finetune` as a child, so its
/// peak memory is its own), the steady state read from its metrics after the warm-up steps.
fn run_ours(
    o: &TrainArgs,
    sets: &[String],
    tokenizer: &Path,
    tmp: &Path,
    name: &str,
) -> Result<TrainSide> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("finetune").arg("--tokenizer").arg(tokenizer);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.output().context("running xrayglm finetune")?;
    if !out.status.success() {
        anyhow::bail!(
            "xrayglm finetune failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metrics = std::fs::read_to_string(tmp.join(name).join("metrics.jsonl"))?;
    let recs: Vec<serde_json::Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("samples_per_s").is_some())
        .collect();
    let at = |step: usize| -> Result<&serde_json::Value> {
        recs.iter()
            .find(|r| r["step"] == step)
            .with_context(|| format!("no metrics for step {step}"))
    };
    let (t0, t1) = (
        at(o.warm)?["elapsed_s"].as_f64().unwrap_or(0.0),
        at(o.steps)?["elapsed_s"].as_f64().unwrap_or(0.0),
    );
    let mut tokens = 0.0;
    // Time-weighted sums of MFU, HFU and 6·N over the timed steps.
    let mut util: Option<[f64; 3]> = Some([0.0; 3]);
    let mut prev = t0;
    for s in o.warm + 1..=o.steps {
        let r = at(s)?;
        let e = r["elapsed_s"].as_f64().unwrap_or(prev);
        tokens += r["tokens_per_s"].as_f64().unwrap_or(0.0) * (e - prev);
        let got = ["mfu", "hfu", "mfu_6n"].map(|k| r[k].as_f64());
        util = match (util, got) {
            (Some(u), [Some(a), Some(b), Some(c)]) => {
                let dt = e - prev;
                Some([u[0] + a * dt, u[1] + b * dt, u[2] + c * dt])
            }
            _ => None,
        };
        prev = e;
    }
    let secs = (t1 - t0).max(1e-9);
    let timed = (o.steps - o.warm) as f64;
    Ok(TrainSide {
        utilization: util.map(|u| u.map(|v| v / secs)),
        samples_per_s: timed * o.batch as f64 / secs,
        tokens_per_s: tokens / secs,
        step_ms: secs * 1e3 / timed,
        peak_rss_mib: recs
            .iter()
            .filter_map(|r| r["peak_rss_mib"].as_f64())
            .fold(0.0, f64::max),
        peak_gpu_mib: recs
            .iter()
            .filter_map(|r| r["peak_gpu_used_mib"].as_f64())
            .reduce(f64::max),
    })
}
