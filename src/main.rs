//! The `xrayglm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use xrayglm::config::{Config, PromptMode};
use xrayglm::tokenizer::{self, ChatGlmTokenizer};

#[derive(Parser)]
#[command(
    name = "xrayglm",
    version,
    about = "XrayGLM (VisualGLM-6B + LoRA) for chest X-ray reports, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct ConfigArgs {
    /// TOML config file (see configs/); without it the embedded default (synthetic demo) is used.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set loader.batch_size=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate records (either OpenI schema) and write XrayGLM's training list. With no input,
    /// makes and prepares the synthetic demo set.
    PrepareData(PrepareArgs),
    /// Fine-tune LoRA weights (XrayGLM's recipe). `--config configs/demo.toml` trains the tiny
    /// preset on the synthetic X-ray set on CPU.
    Finetune(FinetuneArgs),
    /// Print the ChatGLM-6B token ids of TEXT as JSON (or decode ids with --decode).
    Tokenize(TokenizeArgs),
    /// Benchmarks: data, model, step, layer, device, dist, allreduce, generate, train (each against a baseline measured in the same run).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Convert a model directory (xrayglm, sat or HF format) into xrayglm's format.
    Convert(ConvertArgs),
    /// Export a fine-tuned model: `peft` (HF PEFT adapter), `merged` (HF names, sharded
    /// safetensors), `sat` (merged, sat names) or `lora` (the adapters alone, sat names).
    Export(ExportArgs),
    /// Run a model on the inputs in a safetensors file and write its logits (and loss), to
    /// compare with the original implementation on the same inputs.
    Parity(ParityArgs),
    /// Chat about an X-ray (XrayGLM's cli_demo.py): one-shot with --image, else interactive.
    Chat(ChatArgs),
    /// The web demo (XrayGLM's web_demo.py): one page and JSON endpoints, http://HOST:PORT.
    Web(WebArgs),
    /// Score generated reports: `--hypotheses FILE.jsonl` (lines {"id", "reference",
    /// "hypothesis"[, "lang"]}) → BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap conventions) and
    /// ChatGLM's bleu-4, as JSON on stdout (and report.json + report.md with --out).
    Eval(EvalArgs),
    /// Print versions and the devices libtorch sees.
    Info,
}

#[derive(Args)]
struct EvalArgs {
    /// Model folders to evaluate side by side: training runs (their latest checkpoint),
    /// checkpoints (`run/600`), XrayGLM / VisualGLM sat checkpoints, HF visualglm-6b.
    #[arg(long = "checkpoint", alias = "from_pretrained", num_args = 1.., conflicts_with = "hypotheses")]
    checkpoints: Vec<PathBuf>,
    /// Reports produced anywhere (lines {"id", "reference", "hypothesis"[, "lang"]}), scored
    /// without a model; several files give one table row each.
    #[arg(long, num_args = 1..)]
    hypotheses: Vec<PathBuf>,
    /// With --hypotheses: score lines that repeat an id (otherwise an error naming both lines).
    #[arg(long)]
    allow_duplicates: bool,
    /// With --hypotheses: the longest reference or hypothesis scored, in characters (ROUGE-L is
    /// quadratic in the length).
    #[arg(long, default_value_t = xrayglm::eval::MAX_REPORT_CHARS)]
    max_chars: usize,
    /// Image-report file (either schema). Default: the first checkpoint's training data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Settings (data, prompt, sample lengths, image size). Default: the first checkpoint's
    /// training config.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `key=value` overrides of those settings.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// heldout or all. Default: the run's held-out films for its own data, all records of --data.
    #[arg(long)]
    split: Option<String>,
    /// Held-out fraction (default: the run's train.val_fraction).
    #[arg(long = "val_fraction", alias = "val-fraction")]
    val_fraction: Option<f64>,
    /// Split seed (default: the run's train.seed).
    #[arg(long = "split_seed", alias = "split-seed")]
    split_seed: Option<u64>,
    /// Only the first N films of the split.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 8)]
    batch_size: usize,
    /// New tokens per report at most.
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 256
    )]
    max_new_tokens: usize,
    /// Sample reports (with --temperature/--top_p/--top_k/--seed) instead of greedy decoding.
    #[arg(long)]
    sample: bool,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.4)]
    top_p: f64,
    #[arg(long = "top_k", alias = "top-k", default_value_t = 100)]
    top_k: i64,
    /// sat's repetition penalty (1.0 = none, the default for evaluation; XrayGLM's chat: 1.2).
    #[arg(
        long = "repetition_penalty",
        alias = "repetition-penalty",
        default_value_t = 1.0
    )]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// English prompt template (Q:/A:) and no CJK tokens in the reports.
    #[arg(long)]
    english: bool,
    /// Only the teacher-forced loss and perplexity.
    #[arg(long = "no_generate", alias = "no-generate")]
    no_generate: bool,
    /// Skip the teacher-forced loss.
    #[arg(long = "no_loss", alias = "no-loss")]
    no_loss: bool,
    /// ice_text.model or tokenizer.json (default: in the model folder, then the search paths).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// 8: int8 ChatGLM layer weights (to measure the quality cost of `--quant 8`).
    #[arg(long)]
    quant: Option<u8>,
    /// Folder for report.json, report.md and one `<name>.jsonl` of generated reports per
    /// checkpoint (each written atomically). With --checkpoint the default is `eval`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the metrics as TensorBoard scalars (`eval/...`) at each checkpoint's step,
    /// one folder per training run under this one.
    #[arg(long)]
    tensorboard: Option<PathBuf>,
    /// No progress bar.
    #[arg(long = "no_progress", alias = "no-progress")]
    no_progress: bool,
}

/// Loading a model for inference, and its decoding settings (XrayGLM's cli/web defaults).
#[derive(Args, Clone)]
struct InferArgs {
    /// Model directory: a training run or checkpoint folder (resolved against its base model),
    /// xrayglm format, an XrayGLM/VisualGLM sat checkpoint, or HF visualglm-6b.
    #[arg(long = "from_pretrained", alias = "from-pretrained", alias = "model")]
    from_pretrained: PathBuf,
    /// ice_text.model or tokenizer.json (default: in the model folder, then the search paths).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (default: fp16 on GPU, fp32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Keep the LoRA adapters separate instead of merging them into the weights.
    #[arg(long = "no_merge", alias = "no-merge")]
    no_merge: bool,
    /// 8: hold ChatGLM's layer weights in int8 (weight-only, per-row scales; the original's
    /// `--quant 8`), about a quarter of their memory.
    #[arg(long)]
    quant: Option<u8>,
    #[arg(long = "max_length", alias = "max-length", default_value_t = 2048)]
    max_length: usize,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.4)]
    top_p: f64,
    #[arg(long = "top_k", alias = "top-k", default_value_t = 100)]
    top_k: i64,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(
        long = "repetition_penalty",
        alias = "repetition-penalty",
        default_value_t = 1.2
    )]
    repetition_penalty: f64,
    /// Arg-max decoding instead of sampling.
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// English prompts (Q:/A:) and no CJK tokens in replies.
    #[arg(long)]
    english: bool,
}

impl InferArgs {
    fn settings(&self) -> xrayglm::infer::chat::ChatSettings {
        xrayglm::infer::chat::ChatSettings {
            max_length: self.max_length,
            english: self.english,
            sampling: xrayglm::infer::sampling::SamplingConfig {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                repetition_penalty: self.repetition_penalty,
                greedy: self.greedy,
                seed: self.seed,
                invalid: Vec::new(),
            },
        }
    }

    fn load(&self) -> Result<xrayglm::infer::chat::ChatModel> {
        let device = xrayglm::device::parse(&self.device)?;
        let dtype = self
            .dtype
            .clone()
            .unwrap_or_else(|| if device.is_cuda() { "fp16" } else { "fp32" }.into());
        let opts = xrayglm::weights::source::LoadOptions {
            device,
            kind: parse_kind(&dtype)?,
            ..Default::default()
        };
        self.settings().sampling.validate()?;
        let tok =
            xrayglm::infer::cli::tokenizer_for(&self.from_pretrained, self.tokenizer.as_deref())?;
        let mut chat = xrayglm::infer::chat::ChatModel::load(
            &self.from_pretrained,
            tok,
            &opts,
            !self.no_merge,
        )?;
        quantize(&mut chat.model, self.quant)?;
        Ok(chat)
    }
}

/// `--quant 8` → int8 layer weights (after any LoRA merge).
fn quantize(model: &mut xrayglm::model::visualglm::VisualGlm, quant: Option<u8>) -> Result<()> {
    match quant {
        None => Ok(()),
        Some(8) => {
            model.quantize_int8();
            Ok(())
        }
        Some(b) => anyhow::bail!("--quant {b}: only 8 (int8 weights) is supported"),
    }
}

#[derive(Args)]
struct WebArgs {
    #[command(flatten)]
    infer: InferArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Largest image upload, MiB.
    #[arg(
        long = "max_upload_mib",
        alias = "max-upload-mib",
        default_value_t = 10
    )]
    max_upload_mib: usize,
    /// Request threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Seconds a request body may take to arrive (else 408); idle connections close after it.
    #[arg(
        long = "body_timeout_s",
        alias = "body-timeout-s",
        default_value_t = 10.0
    )]
    body_timeout_s: f64,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    infer: InferArgs,
    /// One-shot: report on this image and exit.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The question (default: XrayGLM's 详细描述这张胸部X光片的诊断结果 / Describe the image.).
    #[arg(long, alias = "prompt_zh", alias = "prompt_en")]
    prompt: Option<String>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory: xrayglm format, a sat checkpoint (`latest` + `<iter>/mp_rank_00_model_states.pt`)
    /// or an HF folder (config.json + pytorch_model*.bin / *.safetensors); or `preset:NAME`
    /// (visualglm-6b, small, tiny) with random weights.
    #[arg(long)]
    model: PathBuf,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (LoRA weights stay fp32).
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// Fused-qkv layout of ChatGLM in the files: interleaved (sat 0.3.6, HF, XrayGLM) or blocks (sat >= 0.4).
    #[arg(long)]
    qkv_layout: Option<String>,
    /// Rotary table rounding: sat_fp32 (default), sat_fp16 (the reference's fp16 model), fp32 (exact).
    #[arg(long, default_value = "sat_fp32")]
    rotary: String,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct ExportArgs {
    /// Model folder: a training run (its latest checkpoint) or checkpoint, an XrayGLM / VisualGLM
    /// sat checkpoint, xrayglm format or HF.
    #[arg(
        long = "from_pretrained",
        alias = "from-pretrained",
        alias = "model",
        alias = "checkpoint"
    )]
    from_pretrained: PathBuf,
    /// peft, merged, sat or lora.
    #[arg(long)]
    format: String,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    to: PathBuf,
    /// Kind of the exported base weights (merged, sat): fp16 (like the HF release), bf16 or fp32.
    /// LoRA weights are always written in fp32.
    #[arg(long, default_value = "fp16")]
    dtype: String,
    /// Largest shard of a merged export, MiB.
    #[arg(long = "shard_mib", alias = "shard-mib", default_value_t = 4096)]
    shard_mib: usize,
    /// Tokenizer to save beside a merged model (default: found like `chat` finds it; none: skipped).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// `base_model_name_or_path` of a PEFT adapter.
    #[arg(
        long = "base_model_name",
        alias = "base-model-name",
        default_value = "THUDM/visualglm-6b"
    )]
    base_model_name: String,
}

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory (xrayglm format).
    #[arg(long)]
    to: PathBuf,
    /// Fold the LoRA weights into the base weights and drop them.
    #[arg(long)]
    merge_lora: bool,
    /// Tokenizer to save beside the weights as tokenizer.json.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct ParityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors with `input_ids` [B,S] (int64), `image` [B,3,H,W] (float), optional `labels`
    /// [B,S] and `pre_image` (default 3).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `logits` (and `loss`, `vit`, `qformer`, `image_embeds`).
    #[arg(long)]
    out: PathBuf,
    /// Instead: train the LoRA weights for N AdamW steps on the fixed batch (needs `labels`) and
    /// write `train_losses`, `train_lrs` and the final `lora.<name>` tensors.
    #[arg(long)]
    train_steps: Option<usize>,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// sat, warmup_cosine or constant
    #[arg(long, default_value = "sat")]
    schedule: String,
    /// Schedule length (sat's num_iters).
    #[arg(long, default_value_t = 300)]
    train_iters: i64,
    /// Warmup as a fraction of train_iters.
    #[arg(long, default_value_t = 0.02)]
    warmup: f64,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 100)]
    auto_warmup_steps: i64,
    #[arg(long, default_value_t = 0.05)]
    auto_warmup_rate: f64,
    #[arg(long, default_value_t = 0.1)]
    clip: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Instead: generate N tokens from `gen_input_ids` [1,S] / `gen_image` / `gen_pre_image`
    /// (KV-cached decoding) and write them as `tokens`.
    #[arg(long)]
    generate: Option<usize>,
    /// With --generate: arg-max decoding (sat's top_k = 1).
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// With --generate: the id that ends generation.
    #[arg(long, default_value_t = 130005)]
    end_token: i64,
}

#[derive(Args)]
struct PrepareArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Records file (`{"annotations": [...]}` or `[{"img","prompt","label"}]`); overrides data.path.
    input: Option<PathBuf>,
    /// Folder for relative image paths (default: the records file's folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Prompt policy for annotations: fixed or random (XrayGLM's 6 prompts, seeded).
    #[arg(long, value_parser = ["fixed", "random"])]
    prompt: Option<String>,
    /// Seed of the random prompt policy (`random.seed(N)` in Python picks the same prompts).
    #[arg(long)]
    prompt_seed: Option<i64>,
    /// The prompt of the fixed policy.
    #[arg(long)]
    fixed_prompt: Option<String>,
    /// Training list to write (default: <input stem>-prompt.json beside the input).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip and count bad records instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Replace an existing --out file (an input — the records file or an image — never is).
    #[arg(long)]
    force: bool,
    /// Accept image paths outside the image root (absolute, or `..` climbing out of it).
    #[arg(long)]
    allow_outside_root: bool,
    /// Generate N synthetic films first and prepare those.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    /// Where --synthetic writes (default data/synthetic).
    #[arg(long)]
    synthetic_out: Option<PathBuf>,
    /// Tokenizer for token statistics (ice_text.model or tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FinetuneArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Continue from a checkpoint: auto (the run folder's latest), never, or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
    /// Tokenizer (ice_text.model or tokenizer.json); default: tokenizer.path or the search paths.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// ice_text.model or tokenizer.json (default: $XRAYGLM_TOKENIZER or the search paths).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Treat TEXT as a JSON list of ids and print the decoded text.
    #[arg(long)]
    decode: bool,
    /// With --decode, apply ChatGLM's process_response.
    #[arg(long)]
    process_response: bool,
    /// Print the pieces as well.
    #[arg(long)]
    pieces: bool,
    /// Save the tokenizer as a tokenizer.json here.
    #[arg(long)]
    save: Option<PathBuf>,
    text: Option<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Images/s and samples/s of the data path on 512x512 PNGs.
    Data {
        #[arg(long, default_value_t = 200)]
        images: usize,
        /// Threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Use the PNG/JPEG images in this folder (repeated as needed) instead of generated films.
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Python with torchvision and sentencepiece (scripts/fixtures_venv.sh): XrayGLM's
        /// FewShotDataset construction on the same films and reports, in the same run.
        #[arg(long)]
        vs_sat: Option<PathBuf>,
    },
    /// bf16 vs fp32 matmul throughput and a bf16 training step on the device (GPU check).
    Device {
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Forward time of a model preset (random weights): sat arithmetic vs fused attention.
    Model {
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 2)]
        batch: i64,
        #[arg(long, default_value_t = 128)]
        seq: i64,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Correctness and bandwidth of the tensor all-reduce (under mpirun; NCCL on GPUs).
    Allreduce {
        /// auto, single, mpi or nccl
        #[arg(long, default_value = "auto")]
        backend: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 64.0)]
        mib: f64,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// LoRA fine-tuning throughput of a preset (random weights) on the OpenI-zh report length mix:
    /// xrayglm's trainer, and with `--vs-sat PYTHON` the original's recipe (pad to 320, vision
    /// recomputed every step) in the same run.
    Train {
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 12)]
        steps: usize,
        /// Steps left out of the timing.
        #[arg(long, default_value_t = 2)]
        warm: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        films: usize,
        /// OpenI-zh reports (default: ../shared/data/Xray/openi-zh.json).
        #[arg(long)]
        reports: Option<PathBuf>,
        /// ice_text.model (default: the search paths).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Python with SwissArmyTransformer 0.3.6 (scripts/fixtures_venv.sh).
        #[arg(long)]
        vs_sat: Option<PathBuf>,
        /// Overrides of xrayglm's side, e.g. `loader.padding="fixed"`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// KV-cached greedy decoding of a preset (random weights): time to first token and tokens/s at
    /// batch 1 and 8; `--vs-sat PYTHON` runs the original's filling_sequence in the same run.
    Generate {
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Weights and activations of both implementations: fp32 or bf16 (the original runs its
        /// model in half precision).
        #[arg(long, default_value = "fp32")]
        dtype: String,
        /// Python with SwissArmyTransformer 0.3.6 (scripts/fixtures_venv.sh); CPU only.
        #[arg(long)]
        vs_sat: Option<PathBuf>,
        /// cpu, cuda, cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// 2-rank data-parallel scaling on CPU (mpirun -np 2 vs one process, 1 thread each).
    Dist {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Micro-batch per rank.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// A LoRA training step through ChatGLM layers at a preset's width: the default kernels
    /// against sat's GELU arithmetic, the split rotary, a materialized LoRA ΔW, the other
    /// activation-checkpointing choice, recomputing half the layers, and frozen weights tracked
    /// by autograd, in one run.
    Layer {
        #[arg(long, default_value = "visualglm-6b")]
        preset: String,
        #[arg(long, default_value_t = 2)]
        layers: i64,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Frozen weights: fp32, bf16 or fp16.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        #[arg(long, default_value_t = 1)]
        batch: i64,
        #[arg(long, default_value_t = 160)]
        seq: i64,
        /// Time without activation checkpointing as the default (and with it as the variant).
        #[arg(long)]
        no_checkpoint: bool,
        #[arg(long, default_value_t = 2)]
        steps: usize,
    },
    /// LoRA training steps of a preset with random weights (GPU check: real size in bf16).
    Step {
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Frozen weights: fp32, bf16 or fp16.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        #[arg(long, default_value_t = 2)]
        batch: i64,
        #[arg(long, default_value_t = 96)]
        seq: i64,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
}

fn load_tokenizer(
    explicit: Option<&PathBuf>,
    cfg_path: Option<&PathBuf>,
) -> Result<Option<ChatGlmTokenizer>> {
    let explicit = explicit.or(cfg_path.filter(|p| !p.as_os_str().is_empty()));
    match tokenizer::find(explicit.map(|p| p.as_path())) {
        Some(p) => Ok(Some(ChatGlmTokenizer::from_path(&p)?)),
        None => Ok(None),
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let mut cfg = Config::load(a.cfg.config.as_deref(), &a.cfg.overrides)?;
    if let Some(dir) = a.synthetic_out {
        cfg.synthetic.out_dir = dir;
        cfg.data.path = xrayglm::prepare::default_synthetic_path(&cfg);
    }
    if let Some(n) = a.synthetic {
        cfg.synthetic.count = n;
        xrayglm::data::synthetic::generate(
            &cfg.synthetic.out_dir,
            n,
            cfg.synthetic.size,
            cfg.synthetic.seed,
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
    let tok = load_tokenizer(a.tokenizer.as_ref(), Some(&cfg.tokenizer.path))?;
    let summary = xrayglm::prepare::run(&cfg, tok.as_ref(), a.force)?;
    if a.json {
        xrayglm::outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        xrayglm::out!("{summary}");
    }
    Ok(())
}

fn finetune(a: FinetuneArgs) -> Result<()> {
    let mut cfg = Config::load(a.cfg.config.as_deref(), &a.cfg.overrides)?;
    if let Some(r) = a.resume {
        cfg.train.resume = r;
    }
    let tok = load_tokenizer(a.tokenizer.as_ref(), Some(&cfg.tokenizer.path))?.context(
        "no tokenizer: set tokenizer.path, pass --tokenizer PATH (ChatGLM-6B's ice_text.model) or set XRAYGLM_TOKENIZER",
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

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let path = tokenizer::find(a.tokenizer.as_deref())
        .context("no tokenizer: pass --tokenizer PATH (ChatGLM-6B's ice_text.model) or set XRAYGLM_TOKENIZER")?;
    let tok = ChatGlmTokenizer::from_path(&path)?;
    if let Some(out) = &a.save {
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

fn parse_kind(s: &str) -> Result<tch::Kind> {
    Ok(match s {
        "fp32" | "float32" => tch::Kind::Float,
        "bf16" | "bfloat16" => tch::Kind::BFloat16,
        "fp16" | "float16" => tch::Kind::Half,
        other => anyhow::bail!("--dtype {other:?}: use fp32, bf16 or fp16"),
    })
}

fn load_model(a: &ModelArgs) -> Result<xrayglm::model::visualglm::VisualGlm> {
    use xrayglm::model::config::{QkvLayout, RotaryPrecision};
    let kind = parse_kind(&a.dtype)?;
    let qkv_layout = match a.qkv_layout.as_deref() {
        None => None,
        Some("interleaved") => Some(QkvLayout::Interleaved),
        Some("blocks") => Some(QkvLayout::Blocks),
        Some(other) => anyhow::bail!("--qkv-layout {other:?}: use interleaved or blocks"),
    };
    let rotary = match a.rotary.as_str() {
        "sat_fp32" => RotaryPrecision::SatFp32,
        "sat_fp16" => RotaryPrecision::SatFp16,
        "fp32" => RotaryPrecision::Fp32,
        other => anyhow::bail!("--rotary {other:?}: use sat_fp32, sat_fp16 or fp32"),
    };
    let opts = xrayglm::weights::source::LoadOptions {
        device: xrayglm::device::parse(&a.device)?,
        kind,
        qkv_layout,
        lora: None,
        rotary,
    };
    let t = std::time::Instant::now();
    if let Some(preset) = a.model.to_str().and_then(|s| s.strip_prefix("preset:")) {
        let mut cfg = xrayglm::model::config::ModelConfig::preset(preset)?;
        cfg.rotary = rotary;
        let m = xrayglm::model::visualglm::VisualGlm::new(cfg, opts.device, kind)?;
        xrayglm::errln!(
            "built preset {preset} with random weights in {:.2}s",
            t.elapsed().as_secs_f64()
        );
        return Ok(m);
    }
    let (m, report) = xrayglm::weights::source::load_model(&a.model, &opts)?;
    xrayglm::errln!(
        "loaded {} tensors from {} in {:.1}s ({} ignored)",
        report.loaded,
        a.model.display(),
        t.elapsed().as_secs_f64(),
        report.ignored.len()
    );
    Ok(m)
}

fn export(a: ExportArgs) -> Result<()> {
    use xrayglm::export::{export, Format, Options};
    let format: Format = a.format.parse()?;
    if a.to.is_file() || (a.to.is_dir() && a.to.read_dir()?.next().is_some()) {
        anyhow::bail!(
            "--to {} already exists and is not empty: export into a new folder",
            a.to.display()
        );
    }
    let kind = match format {
        Format::Merged | Format::Sat => parse_kind(&a.dtype)?,
        // Only the fp32 adapters are written; the base is held in half precision meanwhile.
        Format::Peft | Format::Lora => tch::Kind::Half,
    };
    let opts = xrayglm::weights::source::LoadOptions {
        kind,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let (mut model, report) = xrayglm::weights::source::load_model(&a.from_pretrained, &opts)
        .with_context(|| format!("loading {}", a.from_pretrained.display()))?;
    xrayglm::errln!(
        "loaded {} tensors from {} in {:.1}s",
        report.loaded,
        a.from_pretrained.display(),
        t.elapsed().as_secs_f64()
    );
    let tokenizer = match (&a.tokenizer, format) {
        (Some(t), _) => Some(t.clone()),
        (None, Format::Merged | Format::Sat) => {
            xrayglm::infer::cli::tokenizer_path_for(&a.from_pretrained)
        }
        _ => None,
    };
    let files = export(
        &mut model,
        &a.to,
        &Options {
            format,
            shard_bytes: a.shard_mib << 20,
            base_model_name: a.base_model_name.clone(),
            tokenizer,
        },
    )?;
    xrayglm::errln!("wrote {}: {}", a.to.display(), files.join(", "));
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let mut m = load_model(&a.model)?;
    if a.merge_lora {
        m.merge_lora()?;
        m.cfg.lora = None;
        m.lora = tch::nn::VarStore::new(m.lora.device());
    }
    xrayglm::weights::source::save_xrayglm(&m, &a.to)?;
    if let Some(t) = &a.tokenizer {
        ChatGlmTokenizer::from_path(t)?.save(&a.to.join("tokenizer.json"))?;
    }
    xrayglm::errln!("wrote {}", a.to.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn parity_train(
    a: &ParityArgs,
    m: &xrayglm::model::visualglm::VisualGlm,
    inputs: &std::collections::HashMap<String, tch::Tensor>,
    ids: &tch::Tensor,
    image: Option<tch::Tensor>,
    pre: i64,
    steps: usize,
) -> Result<()> {
    use xrayglm::train::schedule::{Schedule, ScheduleKind};
    let kind = match a.schedule.as_str() {
        "sat" => ScheduleKind::Sat,
        "warmup_cosine" => ScheduleKind::WarmupCosine,
        "constant" => ScheduleKind::Constant,
        other => anyhow::bail!("--schedule {other:?}: use sat, warmup_cosine or constant"),
    };
    let schedule = Schedule {
        kind,
        lr: a.lr,
        train_iters: a.train_iters,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        auto_warmup_steps: a.auto_warmup_steps,
        auto_warmup_rate: a.auto_warmup_rate,
    };
    let dev = m.base.device();
    let labels = inputs
        .get("labels")
        .context("--train-steps needs `labels` in the inputs")?
        .to_kind(tch::Kind::Int64)
        .to_device(dev);
    let image = image.context("--train-steps needs `image` in the inputs")?;
    let adam = xrayglm::train::optim::AdamWConfig {
        weight_decay: a.weight_decay,
        ..Default::default()
    };
    let (losses, lrs) = xrayglm::train::fixed_batch_steps(
        m, ids, &image, &labels, pre, steps, &schedule, adam, a.clip,
    )?;
    xrayglm::errln!("losses {losses:?}");
    let mut list: Vec<(String, tch::Tensor)> = vec![
        ("train_losses".into(), tch::Tensor::from_slice(&losses)),
        ("train_lrs".into(), tch::Tensor::from_slice(&lrs)),
    ];
    for (k, v) in m.lora.variables() {
        list.push((format!("lora.{k}"), v.detach()));
    }
    list.sort_by(|x, y| x.0.cmp(&y.0));
    let refs: Vec<(String, &tch::Tensor)> = list.iter().map(|(k, v)| (k.clone(), v)).collect();
    xrayglm::weights::st::write(&a.out, &refs, &[])?;
    xrayglm::errln!("wrote {}", a.out.display());
    Ok(())
}

fn parity_generate(
    a: &ParityArgs,
    m: &xrayglm::model::visualglm::VisualGlm,
    inputs: &std::collections::HashMap<String, tch::Tensor>,
    n: usize,
) -> Result<()> {
    use xrayglm::infer::generate::{generate, image_embeds, GenerateConfig, Prompt};
    use xrayglm::infer::sampling::SamplingConfig;
    let ids = inputs
        .get("gen_input_ids")
        .context("--generate needs `gen_input_ids` in the inputs")?;
    let ids: Vec<i64> = Vec::<i64>::try_from(ids.to_kind(tch::Kind::Int64).flatten(0, -1))?;
    let pre = inputs
        .get("gen_pre_image")
        .map(|t| t.int64_value(&[0]))
        .unwrap_or(3);
    let embeds = inputs.get("gen_image").map(|img| image_embeds(m, img));
    let cfg = GenerateConfig {
        max_length: ids.len() + n,
        end_tokens: vec![a.end_token],
        sampling: SamplingConfig {
            greedy: a.greedy,
            temperature: a.temperature,
            repetition_penalty: a.repetition_penalty,
            top_k: if a.greedy { 1 } else { 0 },
            top_p: 1.0,
            ..Default::default()
        },
    };
    let prompt = Prompt {
        input_ids: ids,
        image_embeds: embeds,
        pre_image: pre,
    };
    let out = generate(m, &[prompt], &cfg, |_, _| {})?;
    xrayglm::errln!("tokens {:?}", out[0].tokens);
    let t = tch::Tensor::from_slice(&out[0].tokens);
    xrayglm::weights::st::write(&a.out, &[("tokens".to_string(), &t)], &[])?;
    xrayglm::errln!("wrote {}", a.out.display());
    Ok(())
}

fn parity(a: ParityArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let inputs: std::collections::HashMap<String, tch::Tensor> =
        xrayglm::weights::read_safetensors(&a.inputs)?
            .into_iter()
            .collect();
    if let Some(n) = a.generate {
        return parity_generate(&a, &m, &inputs, n);
    }
    let dev = m.base.device();
    let ids = inputs
        .get("input_ids")
        .context("inputs: no input_ids")?
        .to_kind(tch::Kind::Int64)
        .to_device(dev);
    let image = inputs.get("image").map(|t| t.to_device(dev));
    let pre = inputs
        .get("pre_image")
        .map(|t| t.int64_value(&[0]))
        .unwrap_or(3);
    if let Some(steps) = a.train_steps {
        return parity_train(&a, &m, &inputs, &ids, image, pre, steps);
    }

    let out = tch::no_grad(|| m.forward(&ids, image.as_ref(), pre, None, None, false))?;
    let mut list: Vec<(String, tch::Tensor)> =
        vec![("logits".into(), out.logits.to_kind(tch::Kind::Float))];
    if let Some(labels) = inputs.get("labels") {
        let loss = xrayglm::model::visualglm::lm_loss(
            &out.logits,
            &labels.to_kind(tch::Kind::Int64).to_device(dev),
        );
        xrayglm::errln!("loss {:.6}", loss.double_value(&[]));
        list.push(("loss".into(), loss.reshape([1])));
    }
    for (k, v) in [
        ("vit", out.vit),
        ("qformer", out.qformer),
        ("image_embeds", out.image_embeds),
    ] {
        if let Some(v) = v {
            list.push((k.into(), v.to_kind(tch::Kind::Float)));
        }
    }
    let refs: Vec<(String, &tch::Tensor)> = list.iter().map(|(k, v)| (k.clone(), v)).collect();
    xrayglm::weights::st::write(&a.out, &refs, &[])?;
    xrayglm::errln!("wrote {}", a.out.display());
    Ok(())
}

fn info() -> Result<()> {
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
    xrayglm::outln!("default device: {:?}", xrayglm::device::parse("auto")?);
    Ok(())
}

fn run() -> Result<()> {
    xrayglm::device::register_cuda();
    let cli = Cli::parse();
    match cli.command {
        Command::PrepareData(a) => prepare(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Finetune(a) => finetune(a),
        Command::Bench {
            what:
                BenchCommand::Data {
                    images,
                    threads,
                    from,
                    tokenizer,
                    vs_sat,
                },
        } => {
            let ice_text = match &vs_sat {
                None => None,
                Some(_) => {
                    let p = tokenizer::find(tokenizer.as_deref())
                        .filter(|p| p.extension().is_some_and(|e| e == "model"))
                        .context(
                            "--vs-sat: the original tokenizes with ice_text.model; pass --tokenizer path/to/ice_text.model",
                        )?;
                    Some(p)
                }
            };
            let tok = load_tokenizer(tokenizer.as_ref(), None)?;
            let sat = vs_sat.as_deref().zip(ice_text.as_deref());
            xrayglm::out!(
                "{}",
                xrayglm::bench::data(images, threads, from.as_deref(), tok.as_ref(), sat)?
            );
            Ok(())
        }
        Command::Bench {
            what: BenchCommand::Device { device },
        } => {
            xrayglm::out!(
                "{}",
                xrayglm::bench::device(xrayglm::device::parse(&device)?)?
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Model {
                    preset,
                    batch,
                    seq,
                    iters,
                    device,
                },
        } => {
            let dev = xrayglm::device::parse(&device)?;
            xrayglm::out!(
                "{}",
                xrayglm::bench::model(&preset, batch, seq, iters, dev)?
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Layer {
                    preset,
                    layers,
                    device,
                    dtype,
                    batch,
                    seq,
                    no_checkpoint,
                    steps,
                },
        } => {
            let dev = xrayglm::device::parse(&device)?;
            let kind = parse_kind(&dtype)?;
            xrayglm::out!(
                "{}",
                xrayglm::bench::layer(
                    &preset,
                    layers,
                    dev,
                    kind,
                    batch,
                    seq,
                    !no_checkpoint,
                    steps
                )?
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Step {
                    preset,
                    device,
                    dtype,
                    batch,
                    seq,
                    steps,
                },
        } => {
            let dev = xrayglm::device::parse(&device)?;
            let kind = parse_kind(&dtype)?;
            xrayglm::out!(
                "{}",
                xrayglm::bench::step(&preset, dev, kind, batch, seq, steps)?
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Dist {
                    cfg,
                    steps,
                    batch,
                    tokenizer,
                },
        } => {
            let tok = tokenizer::find(tokenizer.as_deref());
            xrayglm::out!(
                "{}",
                xrayglm::bench::dist(
                    cfg.config.as_deref(),
                    &cfg.overrides,
                    steps,
                    batch,
                    tok.as_deref()
                )?
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Allreduce {
                    backend,
                    device,
                    mib,
                    iters,
                    timeout_s,
                },
        } => {
            if let Some(r) = xrayglm::bench::allreduce(&backend, &device, mib, iters, timeout_s)? {
                xrayglm::out!("{r}");
            }
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Train {
                    preset,
                    steps,
                    warm,
                    batch,
                    films,
                    reports,
                    tokenizer,
                    vs_sat,
                    sets,
                },
        } => {
            let reports = reports.unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/Xray/openi-zh.json")
            });
            let tokenizer = xrayglm::tokenizer::find(tokenizer.as_deref()).context(
                "no tokenizer: pass --tokenizer ice_text.model or set XRAYGLM_TOKENIZER",
            )?;
            let r = xrayglm::bench::train(&xrayglm::bench::TrainBenchOptions {
                preset,
                steps,
                warm,
                batch,
                films,
                reports,
                tokenizer,
                binary: std::env::current_exe()?,
                sat_python: vs_sat,
                overrides: sets,
            })?;
            xrayglm::out!("{r}");
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Generate {
                    preset,
                    new_tokens,
                    dtype,
                    vs_sat,
                    device,
                },
        } => {
            anyhow::ensure!(new_tokens >= 2, "--new-tokens must be at least 2");
            anyhow::ensure!(
                vs_sat.is_none() || device == "cpu",
                "bench generate: --vs-sat compares on the CPU only (the original runs there from scripts/fixtures_venv.sh)"
            );
            let kind = parse_kind(&dtype)?;
            anyhow::ensure!(
                matches!(kind, tch::Kind::Float | tch::Kind::BFloat16),
                "bench generate: --dtype fp32 or bf16"
            );
            xrayglm::out!(
                "{}",
                xrayglm::bench::generate(&preset, new_tokens, kind, &device, vs_sat.as_deref())?
            );
            Ok(())
        }
        Command::Convert(a) => convert(a),
        Command::Export(a) => export(a),
        Command::Parity(a) => parity(a),
        Command::Web(a) => {
            let chat = a.infer.load()?;
            let opts = xrayglm::infer::web::WebOptions {
                host: a.host,
                port: a.port,
                max_upload: a.max_upload_mib << 20,
                threads: a.threads,
                body_timeout_s: a.body_timeout_s,
                settings: a.infer.settings(),
                ..Default::default()
            };
            xrayglm::infer::web::serve(chat, opts, |addr| {
                xrayglm::outln!("XrayGLM web demo on http://{addr}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })
        }
        Command::Eval(a) => eval(a),
        Command::Chat(a) => {
            let chat = a.infer.load()?;
            let opts = xrayglm::infer::cli::CliOptions {
                image: a.image,
                prompt: a.prompt,
                settings: a.infer.settings(),
            };
            let stdin = std::io::stdin();
            xrayglm::infer::cli::run(&chat, &opts, &mut stdin.lock(), &mut std::io::stdout())
        }
        Command::Info => info(),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            xrayglm::errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn eval(a: EvalArgs) -> Result<()> {
    use xrayglm::eval::Row;
    if a.checkpoints.is_empty() && a.hypotheses.is_empty() {
        anyhow::bail!("xrayglm eval needs --checkpoint DIR… or --hypotheses FILE.jsonl…");
    }
    let mut rows = Vec::new();
    let mut entries = Vec::new();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if !a.hypotheses.is_empty() {
        for path in &a.hypotheses {
            let items = xrayglm::eval::read_hypotheses(
                path,
                &xrayglm::eval::ReadOptions {
                    allow_duplicates: a.allow_duplicates,
                    max_chars: a.max_chars,
                },
            )?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let r = xrayglm::eval::score(&items)?;
            entries.push(serde_json::json!({"name": name, "metrics": r}));
            rows.push(Row {
                name,
                val_loss: None,
                metrics: Some(r),
            });
        }
    } else {
        use xrayglm::eval::checkpoint as ck;
        // Every folder must exist before anything runs.
        for d in &a.checkpoints {
            if !d.is_dir() {
                anyhow::bail!("--checkpoint {}: no such folder", d.display());
            }
        }
        let data = ck::resolve_data(
            &a.checkpoints[0],
            &ck::DataOptions {
                config: a.config.clone(),
                overrides: a.sets.clone(),
                data: a.data.clone(),
                split: a.split.clone(),
                val_fraction: a.val_fraction,
                seed: a.split_seed,
                limit: a.limit,
            },
        )?;
        xrayglm::errln!("evaluating on {}", data.split);
        let device = xrayglm::device::parse(&a.device)?;
        let dtype = a
            .dtype
            .clone()
            .unwrap_or_else(|| if device.is_cuda() { "bf16" } else { "fp32" }.into());
        let opts = xrayglm::weights::source::LoadOptions {
            device,
            kind: parse_kind(&dtype)?,
            ..Default::default()
        };
        let run = ck::RunOptions {
            batch_size: a.batch_size,
            max_new_tokens: a.max_new_tokens,
            settings: xrayglm::infer::chat::ChatSettings {
                max_length: 0,
                english: a.english,
                sampling: xrayglm::infer::sampling::SamplingConfig {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    top_k: a.top_k,
                    repetition_penalty: a.repetition_penalty,
                    greedy: !a.sample,
                    seed: a.seed,
                    invalid: Vec::new(),
                },
            },
            loss: !a.no_loss,
            generate: !a.no_generate,
            progress: !a.no_progress,
        };
        run.settings.sampling.validate()?;
        let mut names = std::collections::HashSet::new();
        for dir in &a.checkpoints {
            let tok = xrayglm::infer::cli::tokenizer_for(dir, a.tokenizer.as_deref())?;
            let mut chat = xrayglm::infer::chat::ChatModel::load(dir, tok, &opts, true)?;
            quantize(&mut chat.model, a.quant)?;
            let mut o = ck::evaluate(&chat, dir, &data, &run)
                .with_context(|| format!("evaluating {}", dir.display()))?;
            drop(chat);
            // Distinct names: they name the table rows and the report files.
            let base = o.name.clone();
            let mut k = 2;
            while !names.insert(o.name.clone()) {
                o.name = format!("{base}-{k}");
                k += 1;
            }
            xrayglm::errln!(
                "{}: {} films in {:.1}s{}",
                o.name,
                o.films,
                o.seconds,
                o.val_loss
                    .map(|l| format!(", val loss {l:.4} (ppl {:.3})", l.exp()))
                    .unwrap_or_default()
            );
            if !o.generations.is_empty() {
                let mut text = String::new();
                for g in &o.generations {
                    text.push_str(&serde_json::to_string(g)?);
                    text.push('\n');
                }
                files.push((
                    format!("{}.jsonl", o.name.replace('/', "_")),
                    text.into_bytes(),
                ));
            }
            if let Some(tb) = &a.tensorboard {
                let run_name = o.name.split('/').next().unwrap_or(&o.name).to_string();
                let mut w = xrayglm::train::metrics::TensorBoard::create(&tb.join(run_name))?;
                let mut values: Vec<(&str, f64)> = Vec::new();
                if let Some(l) = o.val_loss {
                    values.extend([("eval/val_loss", l), ("eval/val_ppl", l.exp())]);
                }
                if let Some(m) = &o.metrics {
                    values.extend([
                        ("eval/bleu_1", m.bleu_1),
                        ("eval/bleu_4", m.bleu_4),
                        ("eval/rouge_l", m.rouge_l),
                        ("eval/cider_d", m.cider_d),
                        ("eval/chatglm_bleu_4", m.chatglm_bleu_4),
                        ("eval/chatglm_rouge_l", m.chatglm_rouge_l),
                    ]);
                }
                w.scalars(o.step.unwrap_or(0), &values)?;
            }
            rows.push(Row {
                name: o.name.clone(),
                val_loss: o.val_loss,
                metrics: o.metrics.clone(),
            });
            entries.push(serde_json::to_value(&o)?);
        }
    }
    let json = serde_json::json!({ "reports": entries });
    let md = xrayglm::eval::markdown(&rows);
    let out = a
        .out
        .clone()
        .or_else(|| (!a.checkpoints.is_empty()).then(|| PathBuf::from("eval")));
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        xrayglm::io::remove_dead_leftovers(dir);
        for (name, bytes) in &files {
            xrayglm::io::write_atomic(&dir.join(name), bytes)?;
        }
        xrayglm::io::write_json_atomic(&dir.join("report.json"), &json)?;
        xrayglm::io::write_atomic(&dir.join("report.md"), md.as_bytes())?;
        xrayglm::errln!("wrote {}", dir.display());
    }
    xrayglm::outln!("{}", serde_json::to_string_pretty(&json)?);
    xrayglm::err!("{md}");
    Ok(())
}
