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
