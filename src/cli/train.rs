//! `xrayglm finetune`: the arguments, then the library's trainer (`xrayglm::train`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use xrayglm::config::Config;

use super::{load_tokenizer, ConfigArgs};

#[derive(Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Continue from a checkpoint: auto (the run folder's latest), never, or a checkpoint folder.
    #[arg(long)]
    pub resume: Option<String>,
    /// Start from a checkpoint (RUN, RUN/best or RUN/<step>): its base and adapters, and for
    /// grpo / dpo the reference policy (train.init_from).
    #[arg(long = "from-pretrained", value_name = "CHECKPOINT")]
    pub from_pretrained: Option<PathBuf>,
    /// A findings rules file for GRPO's reward (rl.rules; see `xrayglm findings --rules`).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Tokenizer (ice_text.model or tokenizer.json); default: tokenizer.path or the search paths.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    let mut cfg = Config::load(a.cfg.config.as_deref(), &a.cfg.overrides)?;
    if let Some(r) = a.resume {
        cfg.train.resume = r.into();
    }
    if let Some(p) = a.from_pretrained {
        cfg.train.init_from = p;
    }
    if let Some(p) = a.rules {
        cfg.rl.rules = p;
    }
    cfg.validate()?;
    // The run folder's own files are never one of the run's inputs.
    xrayglm::io::Inputs::new()
        .flag("--config", a.cfg.config.as_deref())
        .flag("data.path", Some(&cfg.data.path))
        .flag("rl.pairs", Some(&cfg.rl.pairs))
        .flag("rl.rules", Some(&cfg.rl.rules))
        .flag("--tokenizer", a.tokenizer.as_deref())
        .check_in(
            "the run folder",
            &cfg.train.out_dir.join(&cfg.train.name),
            &["config.toml", "model_config.json", "metrics.jsonl"],
        )?;
    let tok = load_tokenizer(a.tokenizer.as_ref(), Some(&cfg.tokenizer.path))?.context(
        format!("no tokenizer: set tokenizer.path, pass --tokenizer PATH (ChatGLM-6B's ice_text.model) or set XRAYGLM_TOKENIZER ({})", xrayglm::tokenizer::HOW_TO_GET),
    )?;
    let s = xrayglm::train::finetune(&cfg, &tok)?;
    // An interrupted run exits 128 + signal after its save (130 SIGINT, 143 SIGTERM), like a
    // process the signal ended, so `&&` chains and Slurm requeue see it did not finish.
    let interrupted = s.signal;
    if a.json {
        xrayglm::outln!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        xrayglm::outln!(
            "run {}: {} steps ({} skipped) in {:.1}s; train loss {} → {:.4}; val loss {} → {}",
            s.run_dir.display(),
            s.steps,
            s.skipped,
            s.seconds,
            s.first_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or("-".into()),
            s.last_loss,
            s.first_val_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or("-".into()),
            s.last_val_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or("-".into()),
        );
    }
    if let Some(sig) = interrupted {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::process::exit(128 + sig);
    }
    Ok(())
}

#[derive(Args)]
pub struct RlPairsArgs {
    /// The model that writes the reports: a training run (its latest checkpoint), `RUN/best`, a
    /// checkpoint folder.
    #[arg(long = "from_pretrained", value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Settings (data, prompt, sample lengths, `[rl]` sampling and reward). Default: the
    /// checkpoint's training config.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `key=value` overrides of those settings, e.g. --set rl.temperature=0.9.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Image-report file (either schema). Default: the run's training data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Default: the run's training films (its held-out films stay unseen), all records of --data.
    #[arg(long, value_enum)]
    pub split: Option<xrayglm::eval::checkpoint::Split>,
    /// Only the first N films of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Reports sampled per film (K).
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// The smallest reward gap between the chosen and the rejected report of a pair.
    #[arg(long, default_value_t = 0.1)]
    pub margin: f64,
    /// Films whose reports are sampled together.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// A findings rules file for the reward (default: rl.rules, else the built-in rules).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// The pair file to write (atomically). Default: `<data stem>-pairs.json` beside the data.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// ice_text.model or tokenizer.json (default: in the model folder, then the search paths).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: xrayglm::device::DeviceSpec,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU).
    #[arg(long)]
    pub dtype: Option<xrayglm::device::Dtype>,
    /// 8: int8 ChatGLM layer weights, 4: NF4.
    #[arg(long, value_parser = super::parse_quant)]
    pub quant: Option<u8>,
}

pub fn rl_pairs(a: RlPairsArgs) -> Result<()> {
    use std::sync::Arc;
    use xrayglm::train::rl_pairs::{make_pairs, write_pairs, PairsConfig};
    anyhow::ensure!(
        a.samples >= 2,
        "--samples {}: at least 2 reports per film",
        a.samples
    );
    anyhow::ensure!(
        a.margin.is_finite() && a.margin >= 0.0,
        "--margin {}: finite and ≥ 0",
        a.margin
    );
    let opts = xrayglm::eval::checkpoint::DataOptions {
        config: a.config.clone(),
        overrides: a.sets.clone(),
        data: a.data.clone(),
        split: Some(a.split.unwrap_or(if a.data.is_some() {
            xrayglm::eval::checkpoint::Split::All
        } else {
            xrayglm::eval::checkpoint::Split::Train
        })),
        limit: a.limit,
        ..Default::default()
    };
    let data = xrayglm::eval::checkpoint::resolve_data(&a.checkpoint, &opts)?;
    let cfg = &data.cfg;
    let out = a.out.clone().unwrap_or_else(|| {
        let p = std::path::Path::new(&data.file);
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default();
        p.with_file_name(format!("{stem}-pairs.json"))
    });
    let mut inputs = xrayglm::io::Inputs::new();
    inputs
        .flag("--data", Some(std::path::Path::new(&data.file)))
        .flag("--config", a.config.as_deref())
        .flag("--rules", a.rules.as_deref())
        .flag("--tokenizer", a.tokenizer.as_deref());
    xrayglm::weights::source::model_inputs(&mut inputs, "--from_pretrained", &a.checkpoint);
    inputs.check("--out", &out)?;
    xrayglm::errln!("making pairs on {}", data.split);
    // The model.
    let load =
        xrayglm::weights::source::LoadOptions::on(a.device, a.dtype, xrayglm::device::Dtype::Bf16)?;
    let tok = xrayglm::infer::cli::tokenizer_for(&a.checkpoint, a.tokenizer.as_deref())?;
    let mut chat = xrayglm::infer::chat::ChatModel::load(&a.checkpoint, tok.clone(), &load, true)?;
    super::infer::quantize(&mut chat.model, a.quant)?;
    // The films as training samples, and the reward.
    let mut sample_cfg = cfg.sample.clone();
    sample_cfg.image_length = chat.model.cfg.sat.image_length as usize;
    let builder = xrayglm::data::sample::SampleBuilder::new(tok, sample_cfg)?;
    let ds = xrayglm::data::batch::Dataset::new(
        data.records.clone(),
        &builder,
        cfg.image.processor(),
        &data.file,
    )?;
    let corpus: Vec<String> = data.records.iter().map(|r| r.label.clone()).collect();
    let rules = a.rules.clone().unwrap_or_else(|| cfg.rl.rules.clone());
    let rewarder = xrayglm::eval::reward::Rewarder::new(
        cfg.rl.reward.clone(),
        data.lang,
        (!rules.as_os_str().is_empty()).then_some(rules.as_path()),
        &corpus,
    )
    .with_context(|| format!("rules {}", rules.display()))?;
    let r = &cfg.rl;
    let pc = PairsConfig {
        rollout: xrayglm::infer::engine::rollout::RolloutConfig {
            group: a.samples,
            sampling: xrayglm::infer::sampling::SamplingConfig {
                temperature: r.temperature,
                top_p: r.top_p,
                top_k: r.top_k as i64,
                repetition_penalty: 1.0,
                greedy: false,
                seed: cfg.train.seed ^ r.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                invalid: if data.lang == xrayglm::eval::metrics::Lang::En {
                    vec![xrayglm::infer::sampling::ENGLISH_INVALID]
                } else {
                    Vec::new()
                },
            },
            max_new_tokens: r.max_new_tokens,
            max_batch: r.max_batch.max(a.samples),
        },
        margin: a.margin,
        films_per_call: a.batch_size.max(1),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        english: data.lang == xrayglm::eval::metrics::Lang::En,
    };
    let films = ds.len();
    let progress = xrayglm::train::progress::Progress::new(
        true,
        true,
        films as u64,
        0,
        "{bar:30} {pos}/{len} films [{elapsed_precise}<{eta_precise}]",
    );
    let (pairs, summary) = make_pairs(
        &chat,
        Arc::new(ds),
        &cfg.loader,
        &rewarder,
        &pc,
        &mut |done| progress.set(done as u64, String::new),
    )?;
    progress.finish();
    let absolute = write_pairs(&out, &pairs)?;
    if absolute > 0 {
        xrayglm::errln!(
            "note: {absolute} film path(s) lie outside {}'s folder and are written absolute: \
             reading them needs data.allow_outside_root = true",
            out.display()
        );
    }
    xrayglm::errln!(
        "{} pairs from {} films ({} below the margin {}) in {}; mean reward {:.4}, chosen {:.4}, rejected {:.4}",
        summary.pairs,
        summary.films,
        summary.below_margin,
        a.margin,
        out.display(),
        summary.mean_reward,
        summary.mean_chosen,
        summary.mean_rejected
    );
    xrayglm::outln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
