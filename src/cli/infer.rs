//! `xrayglm chat`, `serve` and `web`: loading a model for inference and its decoding settings.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Loading a model for inference, and its decoding settings (XrayGLM's cli/web defaults).
#[derive(Args, Clone)]
pub struct InferArgs {
    /// Model directory: a training run or checkpoint folder (resolved against its base model),
    /// xrayglm format, an XrayGLM/VisualGLM sat checkpoint, or HF visualglm-6b.
    #[arg(long = "from_pretrained", alias = "from-pretrained", alias = "model")]
    pub from_pretrained: PathBuf,
    /// ice_text.model or tokenizer.json (default: in the model folder, then the search paths).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: xrayglm::device::DeviceSpec,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (default: fp16 on GPU, fp32 on CPU).
    #[arg(long)]
    pub dtype: Option<xrayglm::device::Dtype>,
    /// Keep the LoRA adapters separate instead of merging them into the weights.
    #[arg(long = "no_merge", alias = "no-merge")]
    pub no_merge: bool,
    /// 8: hold ChatGLM's layer weights in int8 (weight-only, per-row scales; the original's
    /// `--quant 8`), about a quarter of their memory; 4: NF4 (QLoRA's 4-bit NormalFloat, double-
    /// quantized scales), about an eighth.
    #[arg(long, value_parser = super::parse_quant)]
    pub quant: Option<u8>,
    #[arg(long = "max_length", alias = "max-length", default_value_t = 2048)]
    pub max_length: usize,
    #[command(flatten)]
    pub sampling: super::SamplingArgs,
    #[arg(
        long = "repetition_penalty",
        alias = "repetition-penalty",
        default_value_t = 1.2
    )]
    pub repetition_penalty: f64,
    /// Arg-max decoding instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    /// English prompts (Q:/A:) and no CJK tokens in replies.
    #[arg(long)]
    pub english: bool,
}

impl InferArgs {
    pub fn settings(&self) -> xrayglm::infer::chat::ChatSettings {
        xrayglm::infer::chat::ChatSettings {
            max_length: self.max_length,
            english: self.english,
            sampling: xrayglm::infer::sampling::SamplingConfig {
                temperature: self.sampling.temperature,
                top_p: self.sampling.top_p,
                top_k: self.sampling.top_k,
                repetition_penalty: self.repetition_penalty,
                greedy: self.greedy,
                seed: self.sampling.seed,
                invalid: Vec::new(),
            },
        }
    }

    pub fn load(&self) -> Result<xrayglm::infer::chat::ChatModel> {
        let opts = xrayglm::weights::source::LoadOptions::on(
            self.device,
            self.dtype,
            xrayglm::device::Dtype::Fp16,
        )?;
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

/// `--quant 8` → int8 layer weights, `--quant 4` → NF4 (after any LoRA merge).
pub fn quantize(model: &mut xrayglm::model::visualglm::VisualGlm, quant: Option<u8>) -> Result<()> {
    match quant {
        None => Ok(()),
        Some(8) => {
            model.quantize_int8();
            Ok(())
        }
        Some(4) => model.quantize_nf4(true),
        Some(b) => anyhow::bail!("--quant {b}: 8 (int8 weights) or 4 (NF4, QLoRA's 4-bit)"),
    }
}

/// What `serve` and `web` share: the model, its adapters, the engine's and the server's limits.
#[derive(Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// An adapter served beside the base model, chosen by `"model": NAME`: a training run or
    /// checkpoint folder (or an xrayglm folder with lora.safetensors) trained on the same base.
    /// Repeatable. The base's own adapters, if any, stay in place for the base name.
    #[arg(long = "lora", value_name = "NAME=DIR")]
    pub lora: Vec<String>,
    /// The base model's name in `/v1/models` (default: the model folder's name).
    #[arg(long = "served_model_name", alias = "served-model-name")]
    pub served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: $XRAYGLM_API_KEY, else none).
    #[arg(long = "api_key", alias = "api-key")]
    pub api_key: Option<String>,
    /// Rows decoded together at most (continuous batching); more requests wait.
    #[arg(long = "max_batch", alias = "max-batch", default_value_t = 16)]
    pub max_batch: usize,
    /// Rows of different adapters: per_row (one batch; each adapter's LoRA on its own rows) or
    /// per_adapter (one batch and one forward per adapter).
    #[arg(
        long = "adapter_batching",
        alias = "adapter-batching",
        default_value = "per_row",
        value_parser = xrayglm::config::parse_enum::<xrayglm::infer::engine::AdapterBatching>
    )]
    pub adapter_batching: xrayglm::infer::engine::AdapterBatching,
    /// Requests waiting at most; more are answered 503.
    #[arg(long = "max_queue", alias = "max-queue", default_value_t = 64)]
    pub max_queue: usize,
    /// MiB of whole prompts' keys and values kept for prompts asked again (a regenerated reply,
    /// the same question about the same films): those skip their prefill. 0: off.
    #[arg(
        long = "cache_mib",
        alias = "cache-mib",
        default_value_t = xrayglm::infer::engine::EngineOptions::PROMPT_CACHE_MIB
    )]
    pub cache_mib: usize,
    /// MiB of film embeddings kept by content: a film sent again (every turn of a conversation
    /// re-sends it) is not encoded again. 0: off.
    #[arg(
        long = "image_cache_mib",
        alias = "image-cache-mib",
        default_value_t = xrayglm::infer::engine::EngineOptions::IMAGE_CACHE_MIB
    )]
    pub image_cache_mib: usize,
    /// Token budget of one engine step while replies stream: a decoding row costs a token, a
    /// prefill its prompt tokens; a prefill beyond the budget runs a few of its layers per step
    /// (chunked prefill: exact, as it splits by layers) so that the streams keep their pace.
    /// 0: prefills run whole.
    #[arg(
        long = "max_step_tokens",
        alias = "max-step-tokens",
        default_value_t = xrayglm::infer::engine::EngineOptions::STEP_TOKENS
    )]
    pub max_step_tokens: usize,
    /// Largest API request body, MiB (images travel inside as base64).
    #[arg(long = "max_body_mib", alias = "max-body-mib", default_value_t = 20)]
    pub max_body_mib: usize,
    /// Largest web-page image upload, MiB.
    #[arg(
        long = "max_upload_mib",
        alias = "max-upload-mib",
        default_value_t = 10
    )]
    pub max_upload_mib: usize,
    /// Image URLs that are local paths are read from inside this folder only (default: refused).
    #[arg(long = "allowed_local_media_path", alias = "allowed-local-media-path")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Fetch http(s):// image URLs (at most --max_upload_mib, within --body_timeout_s); off by
    /// default: the server makes no requests on a client's behalf.
    #[arg(long = "allow_remote_images", alias = "allow-remote-images")]
    pub allow_remote_images: bool,
    /// Request threads.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Seconds a request body may take to arrive (else 408); idle connections close after it.
    #[arg(
        long = "body_timeout_s",
        alias = "body-timeout-s",
        default_value_t = 10.0
    )]
    pub body_timeout_s: f64,
    /// Seconds the replies in flight get to finish after SIGTERM / Ctrl-C.
    #[arg(
        long = "shutdown_grace_s",
        alias = "shutdown-grace-s",
        default_value_t = 30.0
    )]
    pub shutdown_grace_s: f64,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// 0 picks a free port (printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

#[derive(Args)]
pub struct WebArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// 0 picks a free port (printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// One-shot: report on this image and exit. Repeat for the views of one study (frontal,
    /// lateral, …): each film gets its own <img> block, in order.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// The question (default: XrayGLM's 详细描述这张胸部X光片的诊断结果 / Describe the image.).
    #[arg(long, alias = "prompt_zh", alias = "prompt_en")]
    pub prompt: Option<String>,
}

/// `xrayglm serve`: the OpenAI-compatible API (and the page) until stopped.
pub fn serve(a: ServeArgs) -> Result<()> {
    run_server(a.server, a.port, "xrayglm serve: OpenAI-compatible API on")
}

/// `xrayglm web`: the page and its endpoints (and the API) until stopped.
pub fn web(a: WebArgs) -> Result<()> {
    run_server(a.server, a.port, "XrayGLM web demo on")
}

fn run_server(a: ServerArgs, port: u16, banner: &str) -> Result<()> {
    use xrayglm::infer::engine::{Engine, EngineOptions, NamedAdapter};
    let mut infer = a.infer.clone();
    // Adapters swap over the base's weights: the base's own must stay unmerged beside them.
    infer.no_merge |= !a.lora.is_empty();
    let chat = infer.load()?;
    let mut adapters = Vec::new();
    for spec in &a.lora {
        let (name, dir) = spec
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--lora {spec:?}: expected NAME=DIR"))?;
        let weights = xrayglm::weights::source::load_adapter(
            std::path::Path::new(dir),
            &chat.model.cfg,
            chat.model.device(),
        )?;
        xrayglm::errln!("adapter {name}: {}", weights.dir.display());
        adapters.push(NamedAdapter {
            name: name.to_string(),
            weights,
        });
    }
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let p = std::fs::canonicalize(&a.infer.from_pretrained)
            .unwrap_or_else(|_| a.infer.from_pretrained.clone());
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "xrayglm".into())
    });
    let engine = Engine::start(
        chat,
        name,
        adapters,
        EngineOptions {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            adapter_batching: a.adapter_batching,
            prompt_cache_bytes: a.cache_mib << 20,
            image_cache_bytes: a.image_cache_mib << 20,
            step_tokens: a.max_step_tokens,
        },
    )?;
    let opts = xrayglm::infer::server::ServerOptions {
        host: a.host,
        port,
        max_upload: a.max_upload_mib << 20,
        max_body: a.max_body_mib << 20,
        threads: a.threads,
        body_timeout_s: a.body_timeout_s,
        settings: a.infer.settings(),
        api_key: a
            .api_key
            .or_else(|| std::env::var("XRAYGLM_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        local_media: a.allowed_local_media_path,
        remote_images: a.allow_remote_images,
        shutdown_grace_s: a.shutdown_grace_s,
        ..Default::default()
    };
    xrayglm::infer::server::serve(engine, opts, |addr| {
        xrayglm::outln!("{banner} http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
}

/// `xrayglm chat`: one-shot with `--image`, else interactive on stdin / stdout.
pub fn chat(a: ChatArgs) -> Result<()> {
    let chat = a.infer.load()?;
    let opts = xrayglm::infer::cli::CliOptions {
        image: a.image,
        prompt: a.prompt,
        settings: a.infer.settings(),
    };
    let stdin = std::io::stdin();
    xrayglm::infer::cli::run(&chat, &opts, &mut stdin.lock(), &mut std::io::stdout())
}
