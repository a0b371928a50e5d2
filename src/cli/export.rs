//! `xrayglm export`: a fine-tuned model as a PEFT adapter, a merged HF or sat model, or the adapters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct ExportArgs {
    /// Model folder: a training run (its latest checkpoint) or checkpoint, an XrayGLM / VisualGLM
    /// sat checkpoint, xrayglm format or HF.
    #[arg(
        long = "from_pretrained",
        alias = "from-pretrained",
        alias = "model",
        alias = "checkpoint"
    )]
    pub from_pretrained: PathBuf,
    /// peft, merged, sat or lora.
    #[arg(long)]
    pub format: String,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    pub to: PathBuf,
    /// Kind of the exported base weights (merged, sat): fp16 (like the HF release), bf16 or fp32.
    /// LoRA weights are always written in fp32.
    #[arg(long, default_value = "fp16")]
    pub dtype: xrayglm::device::Dtype,
    /// Largest shard of a merged export, MiB.
    #[arg(long = "shard_mib", alias = "shard-mib", default_value_t = 4096)]
    pub shard_mib: usize,
    /// Tokenizer to save beside a merged model (default: found like `chat` finds it; none: skipped).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `base_model_name_or_path` of a PEFT adapter.
    #[arg(
        long = "base_model_name",
        alias = "base-model-name",
        default_value = "THUDM/visualglm-6b"
    )]
    pub base_model_name: String,
}

pub fn export(a: ExportArgs) -> Result<()> {
    use xrayglm::export::{export, Format, Options};
    let format: Format = a.format.parse()?;
    if a.shard_mib == 0 {
        anyhow::bail!("--shard_mib 0: a shard holds at least 1 MiB (default 4096)");
    }
    let mut inputs = xrayglm::io::Inputs::new();
    let what = format!("--from_pretrained {}", a.from_pretrained.display());
    xrayglm::weights::source::model_inputs(&mut inputs, &what, &a.from_pretrained);
    inputs.check("--to", &a.to)?;
    if a.to.is_file() || (a.to.is_dir() && a.to.read_dir()?.next().is_some()) {
        anyhow::bail!(
            "--to {} already exists and is not empty: export into a new folder",
            a.to.display()
        );
    }
    let kind = match format {
        Format::Merged | Format::Sat => a.dtype.kind(),
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
