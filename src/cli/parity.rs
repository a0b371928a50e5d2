//! `xrayglm parity`: a model's outputs (logits, loss, generated tokens, a training trajectory) on
//! given inputs, to compare with the original implementation.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use xrayglm::config::ScheduleKind;

use super::convert::{load_model, ModelArgs};

#[derive(Args)]
pub struct ParityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// safetensors with `input_ids` [B,S] (int64), `image` [B,3,H,W] (float), optional `labels`
    /// [B,S] and `pre_image` (default 3).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `logits` (and `loss`, `vit`, `qformer`, `image_embeds`).
    #[arg(long)]
    pub out: PathBuf,
    /// Instead: train the LoRA weights for N AdamW steps on the fixed batch (needs `labels`) and
    /// write `train_losses`, `train_lrs` and the final `lora.<name>` tensors.
    #[arg(long)]
    pub train_steps: Option<usize>,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// sat, warmup_cosine or constant
    #[arg(long, default_value = "sat", value_parser = xrayglm::config::parse_enum::<ScheduleKind>)]
    pub schedule: ScheduleKind,
    /// Schedule length (sat's num_iters).
    #[arg(long, default_value_t = 300)]
    pub train_iters: i64,
    /// Warmup as a fraction of train_iters.
    #[arg(long, default_value_t = 0.02)]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 100)]
    pub auto_warmup_steps: i64,
    #[arg(long, default_value_t = 0.05)]
    pub auto_warmup_rate: f64,
    #[arg(long, default_value_t = 0.1)]
    pub clip: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Instead: generate N tokens from `gen_input_ids` [1,S] / `gen_image` / `gen_pre_image`
    /// (KV-cached decoding) and write them as `tokens`.
    #[arg(long)]
    pub generate: Option<usize>,
    /// With --generate: arg-max decoding (sat's top_k = 1).
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// With --generate: the id that ends generation.
    #[arg(long, default_value_t = 130005)]
    pub end_token: i64,
}

/// The fixed batch read from `--inputs`, on the model's device.
pub struct ParityBatch {
    pub ids: tch::Tensor,
    pub image: Option<tch::Tensor>,
    /// Tokens before the image (`pre_image`, default 3).
    pub pre: i64,
}

pub fn parity_train(
    a: &ParityArgs,
    m: &xrayglm::model::visualglm::VisualGlm,
    inputs: &std::collections::HashMap<String, tch::Tensor>,
    batch: ParityBatch,
    steps: usize,
) -> Result<()> {
    let ParityBatch { ids, image, pre } = batch;
    let schedule = xrayglm::train::schedule::Schedule {
        kind: a.schedule,
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
        .context("--train_steps needs `labels` in the inputs")?
        .to_kind(tch::Kind::Int64)
        .to_device(dev);
    let image = image.context("--train_steps needs `image` in the inputs")?;
    let adam = xrayglm::train::optim::AdamWConfig {
        weight_decay: a.weight_decay,
        ..Default::default()
    };
    let recipe = xrayglm::train::FixedBatchRecipe {
        steps,
        schedule: &schedule,
        adam,
        clip: a.clip,
    };
    let (losses, lrs) = xrayglm::train::fixed_batch_steps(m, &ids, &image, &labels, pre, &recipe)?;
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

pub fn parity_generate(
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
        image_starts: vec![pre],
    };
    let out = generate(m, &[prompt], &cfg, |_, _| {})?;
    xrayglm::errln!("tokens {:?}", out[0].tokens);
    let t = tch::Tensor::from_slice(&out[0].tokens);
    xrayglm::weights::st::write(&a.out, &[("tokens".to_string(), &t)], &[])?;
    xrayglm::errln!("wrote {}", a.out.display());
    Ok(())
}

pub fn parity(a: ParityArgs) -> Result<()> {
    let mut inputs = xrayglm::io::Inputs::new();
    inputs.flag("--inputs", Some(&a.inputs));
    a.model.record_inputs(&mut inputs);
    inputs.check("--out", &a.out)?;
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
        let batch = ParityBatch { ids, image, pre };
        return parity_train(&a, &m, &inputs, batch, steps);
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
