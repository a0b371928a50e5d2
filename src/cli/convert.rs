//! `xrayglm convert`: any model folder into xrayglm's format; and `--model DIR|preset:NAME` loading
//! shared with `parity`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use xrayglm::tokenizer::ChatGlmTokenizer;

use xrayglm::config::parse_enum;
use xrayglm::device::{DeviceSpec, Dtype};
use xrayglm::model::config::{QkvLayout, RotaryPrecision};

#[derive(Args)]
pub struct ModelArgs {
    /// Model directory: xrayglm format, a sat checkpoint (`latest` + `<iter>/mp_rank_00_model_states.pt`)
    /// or an HF folder (config.json + pytorch_model*.bin / *.safetensors); or `preset:NAME`
    /// (visualglm-6b, small, tiny) with random weights.
    #[arg(long)]
    pub model: PathBuf,
    /// Kind of the frozen weights: fp32, bf16 or fp16 (LoRA weights stay fp32).
    #[arg(long, default_value = "fp32")]
    pub dtype: Dtype,
    /// Fused-qkv layout of ChatGLM in the files: interleaved (sat 0.3.6, HF, XrayGLM) or blocks (sat >= 0.4).
    #[arg(long, value_parser = parse_enum::<QkvLayout>)]
    pub qkv_layout: Option<QkvLayout>,
    /// Rotary table rounding: sat_fp32 (default), sat_fp16 (the reference's fp16 model), fp32 (exact).
    #[arg(long, default_value = "sat_fp32", value_parser = parse_enum::<RotaryPrecision>)]
    pub rotary: RotaryPrecision,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (xrayglm format).
    #[arg(long)]
    pub to: PathBuf,
    /// Fold the LoRA weights into the base weights and drop them.
    #[arg(long)]
    pub merge_lora: bool,
    /// Tokenizer to save beside the weights as tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    /// Record `--model`'s folders (the folder, its checkpoint, its bases) as inputs.
    pub fn record_inputs(&self, inputs: &mut xrayglm::io::Inputs) {
        if !self.model.to_string_lossy().starts_with("preset:") {
            let what = format!("--model {}", self.model.display());
            xrayglm::weights::source::model_inputs(inputs, &what, &self.model);
        }
    }
}

pub fn load_model(a: &ModelArgs) -> Result<xrayglm::model::visualglm::VisualGlm> {
    let kind = a.dtype.kind();
    let opts = xrayglm::weights::source::LoadOptions {
        device: a.device.device()?,
        kind,
        qkv_layout: a.qkv_layout,
        lora: Default::default(),
        rotary: a.rotary,
    };
    let t = std::time::Instant::now();
    if let Some(preset) = a.model.to_str().and_then(|s| s.strip_prefix("preset:")) {
        let mut cfg = xrayglm::model::config::ModelConfig::preset(preset)?;
        cfg.rotary = a.rotary;
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

pub fn convert(a: ConvertArgs) -> Result<()> {
    let mut inputs = xrayglm::io::Inputs::new();
    a.model.record_inputs(&mut inputs);
    inputs
        .flag("--tokenizer", a.tokenizer.as_deref())
        .check_in(
            "--to",
            &a.to,
            &[
                "model.safetensors",
                "lora.safetensors",
                "model_config.json",
                "tokenizer.json",
            ],
        )?;
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
