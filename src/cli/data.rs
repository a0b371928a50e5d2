//! `xrayglm prepare-data` and `xrayglm tokenize`: records → training list, text ↔ token ids.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use xrayglm::config::{Config, PromptMode};
use xrayglm::tokenizer::{self, ChatGlmTokenizer};

use super::{load_tokenizer, ConfigArgs};

#[derive(Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Records file (`{"annotations": [...]}` or `[{"img","prompt","label"}]`); overrides data.path.
    pub input: Option<PathBuf>,
    /// Folder for relative image paths (default: the records file's folder).
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Prompt policy for annotations: fixed or random (XrayGLM's 6 prompts, seeded).
    #[arg(long, value_parser = ["fixed", "random"])]
    pub prompt: Option<String>,
    /// Seed of the random prompt policy (`random.seed(N)` in Python picks the same prompts).
    #[arg(long)]
    pub prompt_seed: Option<i64>,
    /// The prompt of the fixed policy.
    #[arg(long)]
    pub fixed_prompt: Option<String>,
    /// Training list to write (default: <input stem>-prompt.json beside the input).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip and count bad records instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Replace an existing --out file (an input — the records file or an image — never is).
    #[arg(long)]
    pub force: bool,
    /// Accept image paths outside the image root (absolute, or `..` climbing out of it).
    #[arg(long)]
    pub allow_outside_root: bool,
    /// Generate N synthetic films first and prepare those.
    #[arg(long, value_name = "N")]
    pub synthetic: Option<usize>,
    /// Where --synthetic writes (default data/synthetic).
    #[arg(long)]
    pub synthetic_out: Option<PathBuf>,
    /// Tokenizer for token statistics (ice_text.model or tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// ice_text.model or tokenizer.json (default: $XRAYGLM_TOKENIZER or the search paths).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Treat TEXT as a JSON list of ids and print the decoded text.
    #[arg(long)]
    pub decode: bool,
    /// With --decode, apply ChatGLM's process_response.
    #[arg(long)]
    pub process_response: bool,
    /// Print the pieces as well.
    #[arg(long)]
    pub pieces: bool,
    /// Save the tokenizer as a tokenizer.json here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    pub text: Option<String>,
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let mut cfg = Config::load(a.cfg.config.as_deref(), &a.cfg.overrides)?;
    if let Some(dir) = a.synthetic_out {
        cfg.synthetic.out_dir = dir;
        cfg.data.path = xrayglm::prepare::default_synthetic_path(&cfg);
    }
    if let Some(n) = a.synthetic {
        cfg.synthetic.count = n;
        xrayglm::data::synthetic::generate_views(
            &cfg.synthetic.out_dir,
            n,
            cfg.synthetic.size,
            cfg.synthetic.seed,
            cfg.synthetic.lateral,
        )?;
        cfg.data.path = xrayglm::prepare::default_synthetic_path(&cfg);
        xrayglm::errln!(
            "generated {n} synthetic films in {}",
            cfg.synthetic.out_dir.display()
        );
    }
    if let Some(p) = a.input {
        cfg.data.path = p;
    }
    if let Some(r) = a.image_root {
        cfg.data.image_root = r;
    }
    if let Some(p) = a.prompt {
        cfg.data.prompt = if p == "random" {
            PromptMode::Random
        } else {
            PromptMode::Fixed
        };
    }
    if let Some(s) = a.prompt_seed {
        cfg.data.prompt_seed = s;
    }
    if let Some(p) = a.fixed_prompt {
        cfg.data.fixed_prompt = p;
    }
    if let Some(o) = a.out {
        cfg.data.out = o;
    }
    cfg.data.skip_bad |= a.skip_bad;
    cfg.data.allow_outside_root |= a.allow_outside_root;
    xrayglm::io::Inputs::new()
        .flag("--config", a.cfg.config.as_deref())
        .flag("--tokenizer", a.tokenizer.as_deref())
        .check("--out", &cfg.data.out_path())?;
    let tok = load_tokenizer(a.tokenizer.as_ref(), Some(&cfg.tokenizer.path))?;
    let summary = xrayglm::prepare::run(&cfg, tok.as_ref(), a.force)?;
    if a.json {
        xrayglm::outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        xrayglm::out!("{summary}");
    }
    Ok(())
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let path = tokenizer::find(a.tokenizer.as_deref())
        .with_context(|| format!("no tokenizer: pass --tokenizer PATH (ChatGLM-6B's ice_text.model) or set XRAYGLM_TOKENIZER ({})", xrayglm::tokenizer::HOW_TO_GET))?;
    let tok = ChatGlmTokenizer::from_path(&path)?;
    if let Some(out) = &a.save {
        xrayglm::io::Inputs::new()
            .flag("--tokenizer", Some(&path))
            .check("--save", out)?;
        tok.save(out)?;
        xrayglm::errln!("saved {}", out.display());
    }
    let Some(text) = a.text else {
        anyhow::ensure!(
            a.save.is_some(),
            "nothing to do: give TEXT (or --save PATH)"
        );
        return Ok(());
    };
    if a.decode {
        let ids: Vec<i64> = serde_json::from_str(&text)
            .context("--decode expects a JSON list of ids, e.g. [46, 2265, 33]")?;
        let s = tok.decode(&ids)?;
        xrayglm::outln!(
            "{}",
            if a.process_response {
                tokenizer::process_response(&s)
            } else {
                s
            }
        );
    } else {
        xrayglm::outln!("{}", serde_json::to_string(&tok.encode(&text)?)?);
        if a.pieces {
            xrayglm::outln!("{}", serde_json::to_string(&tok.pieces(&text)?)?);
        }
    }
    Ok(())
}
