//! The `xrayglm` command line: one file per command family, each with its `#[derive(Args)]`
//! structs and a short handler that calls the library; this file parses and dispatches.

pub mod bench;
pub mod convert;
pub mod data;
pub mod eval;
pub mod export;
pub mod findings;
pub mod infer;
pub mod parity;
pub mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

pub use xrayglm::config::ConfigArgs;
use xrayglm::tokenizer::{self, ChatGlmTokenizer};

#[derive(Parser)]
#[command(
    name = "xrayglm",
    version,
    about = "XrayGLM (VisualGLM-6B + LoRA) for chest X-ray reports, in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Sampling settings shared by `chat`, `web` and `eval` (XrayGLM's cli/web defaults). The
/// repetition penalty and greedy/sampling switch stay with each command: their defaults differ.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.4)]
    pub top_p: f64,
    #[arg(long = "top_k", alias = "top-k", default_value_t = 100)]
    pub top_k: i64,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
}

#[derive(Subcommand)]
pub enum Command {
    /// Validate records (either OpenI schema) and write XrayGLM's training list. With no input,
    /// makes and prepares the synthetic demo set.
    PrepareData(data::PrepareArgs),
    /// Fine-tune LoRA weights (XrayGLM's recipe). `--config configs/demo.toml` trains the tiny
    /// preset on the synthetic X-ray set on CPU.
    Finetune(train::FinetuneArgs),
    /// DPO pairs made by a model itself: K sampled reports per film of a training list, scored
    /// by the `[rl]` reward against the film's report, best vs worst where they differ by at
    /// least --margin; written as a pair file for `train.method = "dpo"` (`rl.pairs`).
    RlPairs(train::RlPairsArgs),
    /// Print the ChatGLM-6B token ids of TEXT as JSON (or decode ids with --decode).
    Tokenize(data::TokenizeArgs),
    /// Benchmarks: data, model, step, layer, device, dist, allreduce, generate, train (each against a baseline measured in the same run).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Convert a model directory (xrayglm, sat or HF format) into xrayglm's format.
    Convert(convert::ConvertArgs),
    /// Export a fine-tuned model: `peft` (HF PEFT adapter), `merged` (HF names, sharded
    /// safetensors), `sat` (merged, sat names) or `lora` (the adapters alone, sat names).
    Export(export::ExportArgs),
    /// Run a model on the inputs in a safetensors file and write its logits (and loss), to
    /// compare with the original implementation on the same inputs.
    Parity(parity::ParityArgs),
    /// Chat about an X-ray (XrayGLM's cli_demo.py): one-shot with --image, else interactive.
    Chat(infer::ChatArgs),
    /// The web demo (XrayGLM's web_demo.py): one page and JSON endpoints, http://HOST:PORT
    /// (the same server as `serve`, on port 7860).
    Web(infer::WebArgs),
    /// An OpenAI-compatible API server (GET /v1/models, POST /v1/chat/completions, streaming)
    /// with continuous batching and several LoRA adapters over one base (--lora NAME=DIR).
    Serve(infer::ServeArgs),
    /// Score generated reports: `--hypotheses FILE.jsonl` (lines {"id", "reference",
    /// "hypothesis"[, "lang"]}) → BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap conventions) and
    /// ChatGLM's bleu-4, as JSON on stdout (and report.json + report.md with --out).
    Eval(eval::EvalArgs),
    /// Label the findings of reports (14 CheXpert observations: positive, negative, uncertain,
    /// not mentioned) with readable rules (rules/findings/*.toml); with --against, the agreement
    /// with a second labelling of the same reports.
    Findings(findings::FindingsArgs),
    /// Print versions and the devices libtorch sees.
    Info,
}

/// `--quant`: 8 (int8) or 4 (NF4), refused on the command line before any model loads.
pub fn parse_quant(s: &str) -> Result<u8, String> {
    match s {
        "8" => Ok(8),
        "4" => Ok(4),
        _ => Err(format!("{s:?}: 8 (int8 weights) or 4 (NF4, QLoRA's 4-bit)")),
    }
}

pub fn load_tokenizer(
    explicit: Option<&PathBuf>,
    cfg_path: Option<&PathBuf>,
) -> Result<Option<ChatGlmTokenizer>> {
    let explicit = explicit.or(cfg_path.filter(|p| !p.as_os_str().is_empty()));
    match tokenizer::find(explicit.map(|p| p.as_path())) {
        Some(p) => Ok(Some(ChatGlmTokenizer::from_path(&p)?)),
        None => Ok(None),
    }
}

pub fn info() -> Result<()> {
    let cuda_lib = xrayglm::device::register_cuda();
    xrayglm::outln!(
        "xrayglm {} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("XRAYGLM_GIT_REV")
    );
    xrayglm::outln!("libtorch_cuda loaded: {cuda_lib}");
    match xrayglm::dist::nccl_version() {
        Ok(v) => xrayglm::outln!("nccl: {v}"),
        Err(e) => xrayglm::outln!("nccl: unavailable ({e})"),
    }
    xrayglm::outln!(
        "cuda available: {}  devices: {}",
        tch::Cuda::is_available(),
        tch::Cuda::device_count()
    );
    xrayglm::outln!(
        "default device: {:?}",
        xrayglm::device::DeviceSpec::Auto.device()?
    );
    Ok(())
}

/// Every multi-word flag in both spellings: `--a_b` (XrayGLM's scripts; the one `--help` shows)
/// and `--a-b` (a hidden alias), on every command and subcommand.
pub fn both_spellings(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|arg| {
        let Some(long) = arg
            .get_long()
            .filter(|l| l.contains(['-', '_']))
            .map(str::to_string)
        else {
            return arg;
        };
        let (shown, other) = (long.replace('-', "_"), long.replace('_', "-"));
        let known: Vec<String> = arg
            .get_all_aliases()
            .unwrap_or_default()
            .into_iter()
            .map(str::to_string)
            .collect();
        // clap keeps flag names for the life of the program.
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let mut arg = arg.long(leak(shown.clone()));
        for name in [other, long] {
            if name != shown && !known.contains(&name) {
                arg = arg.alias(leak(name));
            }
        }
        arg
    })
    .mut_subcommands(both_spellings)
}

pub fn run() -> Result<()> {
    xrayglm::device::register_cuda();
    let matches = both_spellings(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Bench { what } => what.run(),
        Command::PrepareData(a) => data::prepare(a),
        Command::Tokenize(a) => data::tokenize(a),
        Command::Finetune(a) => train::finetune(a),
        Command::RlPairs(a) => train::rl_pairs(a),
        Command::Convert(a) => convert::convert(a),
        Command::Export(a) => export::export(a),
        Command::Parity(a) => parity::parity(a),
        Command::Web(a) => infer::web(a),
        Command::Serve(a) => infer::serve(a),
        Command::Eval(a) => eval::eval(a),
        Command::Chat(a) => infer::chat(a),
        Command::Findings(a) => findings::findings(a),
        Command::Info => info(),
    }
}

pub fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            xrayglm::errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
