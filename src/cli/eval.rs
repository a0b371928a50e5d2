//! `xrayglm eval`: checkpoints or hypotheses files → report metrics, `report.json` + `report.md`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::infer::quantize;

#[derive(Args)]
pub struct EvalArgs {
    /// Model folders to evaluate side by side: training runs (their latest checkpoint),
    /// checkpoints (`run/600`), XrayGLM / VisualGLM sat checkpoints, HF visualglm-6b.
    #[arg(long = "checkpoint", alias = "from_pretrained", num_args = 1.., conflicts_with = "hypotheses")]
    pub checkpoints: Vec<PathBuf>,
    /// Reports produced anywhere (lines {"id", "reference" or "references": [..], "hypothesis"[,
    /// "lang"]}), scored without a model; several files give one table row each.
    #[arg(long, num_args = 1..)]
    pub hypotheses: Vec<PathBuf>,
    /// With --hypotheses: score lines that repeat an id (otherwise an error naming both lines).
    #[arg(long)]
    pub allow_duplicates: bool,
    /// With --hypotheses: the longest reference or hypothesis scored, in characters (ROUGE-L is
    /// quadratic in the length).
    #[arg(long, default_value_t = xrayglm::eval::MAX_REPORT_CHARS)]
    pub max_chars: usize,
    /// Image-report file (either schema). Default: the first checkpoint's training data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Settings (data, prompt, sample lengths, image size). Default: the first checkpoint's
    /// training config.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `key=value` overrides of those settings.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Default: the run's held-out films for its own data, all records of --data.
    #[arg(long, value_enum)]
    pub split: Option<xrayglm::eval::checkpoint::Split>,
    /// Held-out fraction (default: the run's train.val_fraction).
    #[arg(long = "val_fraction", alias = "val-fraction")]
    pub val_fraction: Option<f64>,
    /// Split seed (default: the run's train.seed).
    #[arg(long = "split_seed", alias = "split-seed")]
    pub split_seed: Option<u64>,
    /// Only the first N films of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 8)]
    pub batch_size: usize,
    /// New tokens per report at most.
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 256
    )]
    pub max_new_tokens: usize,
    /// Sample reports (with --temperature/--top_p/--top_k/--seed) instead of greedy decoding.
    #[arg(long)]
    pub sample: bool,
    #[command(flatten)]
    pub sampling: super::SamplingArgs,
    /// sat's repetition penalty (1.0 = none, the default for evaluation; XrayGLM's chat: 1.2).
    #[arg(
        long = "repetition_penalty",
        alias = "repetition-penalty",
        default_value_t = 1.0
    )]
    pub repetition_penalty: f64,
    /// English prompt template (Q:/A:) and no CJK tokens in the reports.
    #[arg(long)]
    pub english: bool,
    /// Only the teacher-forced loss and perplexity.
    #[arg(long = "no_generate", alias = "no-generate")]
    pub no_generate: bool,
    /// Skip the teacher-forced loss.
    #[arg(long = "no_loss", alias = "no-loss")]
    pub no_loss: bool,
    /// ice_text.model or tokenizer.json (default: in the model folder, then the search paths).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: xrayglm::device::DeviceSpec,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU).
    #[arg(long)]
    pub dtype: Option<xrayglm::device::Dtype>,
    /// 8: int8 ChatGLM layer weights, 4: NF4 (to measure the quality cost of `--quant 8` / `4`).
    #[arg(long, value_parser = super::parse_quant)]
    pub quant: Option<u8>,
    /// Folder for report.json, report.md, report.html (a page to look at) and one `<name>.jsonl`
    /// of generated reports per checkpoint (each written atomically). With --checkpoint the
    /// default is `eval`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How report.html shows the films: small thumbnails inside the page linking to the full
    /// files (embed), the files copied into `films/` beside it (copy), or shown from where they
    /// are (link).
    #[arg(
        long = "page_images",
        alias = "page-images",
        value_enum,
        default_value_t
    )]
    pub page_images: xrayglm::eval::page::PageImages,
    /// Also write the metrics as TensorBoard scalars (`eval/...`) at each checkpoint's step,
    /// one folder per training run under this one.
    #[arg(long)]
    pub tensorboard: Option<PathBuf>,
    /// No progress bar.
    #[arg(long = "no_progress", alias = "no-progress")]
    pub no_progress: bool,
    /// Generate every report again with another film's image (`shuffled`, a fixed derangement),
    /// a black film (`blank`) or both, and report the metrics side by side: does the model look
    /// at the image?
    #[arg(long = "image_ablation", alias = "image-ablation", value_enum)]
    pub image_ablation: Option<AblationArg>,
    /// CE metrics: count uncertain findings ("possible effusion") as present (default: absent).
    #[arg(long = "uncertain_positive", alias = "uncertain-positive")]
    pub uncertain_positive: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AblationArg {
    Shuffled,
    Blank,
    Both,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    use xrayglm::eval::checkpoint as ck;
    if a.checkpoints.is_empty() && a.hypotheses.is_empty() {
        anyhow::bail!("xrayglm eval needs --checkpoint DIR… or --hypotheses FILE.jsonl…");
    }
    let uncertain_as = if a.uncertain_positive {
        xrayglm::eval::findings::ce::UncertainAs::Positive
    } else {
        xrayglm::eval::findings::ce::UncertainAs::Negative
    };
    let inputs = eval_inputs(&a);
    let out = a
        .out
        .clone()
        .or_else(|| (!a.checkpoints.is_empty()).then(|| PathBuf::from("eval")));
    if let Some(dir) = &out {
        inputs.check_in("--out", dir, &["report.json", "report.md"])?;
    }
    if let Some(tb) = &a.tensorboard {
        inputs.check("--tensorboard", tb)?;
    }
    let mut report = xrayglm::eval::report::EvalReport::new(uncertain_as);
    report.page_images(a.page_images);
    // Hypotheses files: scored as they are.
    for path in &a.hypotheses {
        let read = xrayglm::eval::ReadOptions {
            allow_duplicates: a.allow_duplicates,
            max_chars: a.max_chars,
        };
        let items = xrayglm::eval::read_hypotheses(path, &read)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        report.describe(format!("{name}: reports of {}", path.display()));
        let base = path.parent().unwrap_or(std::path::Path::new(""));
        report.add_hypotheses(&name, &items, base)?;
    }
    // Checkpoints: every folder must exist before anything runs.
    for d in &a.checkpoints {
        if let Some(e) = xrayglm::train::checkpoint::pointer_error(d) {
            anyhow::bail!("--checkpoint {}: {e}", d.display());
        }
        if !d.is_dir() && xrayglm::train::checkpoint::pointer(d).is_none() {
            anyhow::bail!("--checkpoint {}: no such folder", d.display());
        }
    }
    if a.image_ablation.is_some() && (a.checkpoints.is_empty() || a.no_generate) {
        anyhow::bail!(
            "--image_ablation generates reports again: it needs --checkpoint and generation"
        );
    }
    if let Some(first) = a.checkpoints.first() {
        let data = ck::resolve_data(first, &data_options(&a))?;
        xrayglm::errln!("evaluating on {}", data.split);
        report.describe(format!("Evaluated on the {}.", data.split));
        report.add_films(&data.records);
        let opts = xrayglm::weights::source::LoadOptions::on(
            a.device,
            a.dtype,
            xrayglm::device::Dtype::Bf16,
        )?;
        let run = run_options(&a, uncertain_as);
        run.settings.sampling.validate()?;
        for dir in &a.checkpoints {
            let tok = xrayglm::infer::cli::tokenizer_for(dir, a.tokenizer.as_deref())?;
            let mut chat = xrayglm::infer::chat::ChatModel::load(dir, tok, &opts, true)?;
            quantize(&mut chat.model, a.quant)?;
            let o = ck::evaluate(&chat, dir, &data, &run)
                .with_context(|| format!("evaluating {}", dir.display()))?;
            drop(chat);
            let o = report.add_checkpoint(o)?;
            xrayglm::errln!(
                "{}: {} films in {:.1}s{}",
                o.name,
                o.films,
                o.seconds,
                o.val_loss
                    .map(|l| format!(", val loss {l:.4} (ppl {:.3})", l.exp()))
                    .unwrap_or_default()
            );
            if let Some(tb) = &a.tensorboard {
                xrayglm::eval::report::log_tensorboard(tb, &o)?;
            }
        }
    }
    if let Some(dir) = &out {
        inputs.check_in("--out", dir, &report.file_names())?;
        report.write(dir)?;
        xrayglm::errln!("wrote {}", dir.display());
    }
    xrayglm::outln!("{}", serde_json::to_string_pretty(&report.json())?);
    xrayglm::err!("{}", report.markdown());
    Ok(())
}

/// Every file eval reads: hypotheses, data, config and each checkpoint with the bases it stands on.
fn eval_inputs(a: &EvalArgs) -> xrayglm::io::Inputs {
    let mut inputs = xrayglm::io::Inputs::new();
    for h in &a.hypotheses {
        inputs.flag("--hypotheses", Some(h));
    }
    inputs
        .flag("--data", a.data.as_deref())
        .flag("--config", a.config.as_deref())
        .flag("--tokenizer", a.tokenizer.as_deref());
    for c in &a.checkpoints {
        xrayglm::weights::source::model_inputs(
            &mut inputs,
            &format!("--checkpoint {}", c.display()),
            c,
        );
    }
    inputs
}

fn data_options(a: &EvalArgs) -> xrayglm::eval::checkpoint::DataOptions {
    xrayglm::eval::checkpoint::DataOptions {
        config: a.config.clone(),
        overrides: a.sets.clone(),
        data: a.data.clone(),
        split: a.split,
        val_fraction: a.val_fraction,
        seed: a.split_seed,
        limit: a.limit,
    }
}

fn run_options(
    a: &EvalArgs,
    uncertain_as: xrayglm::eval::findings::ce::UncertainAs,
) -> xrayglm::eval::checkpoint::RunOptions {
    xrayglm::eval::checkpoint::RunOptions {
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        settings: xrayglm::infer::chat::ChatSettings {
            max_length: 0,
            english: a.english,
            sampling: xrayglm::infer::sampling::SamplingConfig {
                temperature: a.sampling.temperature,
                top_p: a.sampling.top_p,
                top_k: a.sampling.top_k,
                repetition_penalty: a.repetition_penalty,
                greedy: !a.sample,
                seed: a.sampling.seed,
                invalid: Vec::new(),
            },
        },
        loss: !a.no_loss,
        generate: !a.no_generate,
        progress: !a.no_progress,
        uncertain_as,
        ablations: {
            use xrayglm::data::batch::ImageAblation;
            match a.image_ablation {
                None => vec![],
                Some(AblationArg::Shuffled) => vec![ImageAblation::Shuffled],
                Some(AblationArg::Blank) => vec![ImageAblation::Blank],
                Some(AblationArg::Both) => vec![ImageAblation::Shuffled, ImageAblation::Blank],
            }
        },
    }
}
