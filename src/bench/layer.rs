//! `xrayglm bench layer`: a LoRA training step through ChatGLM layers at a preset's width, the
//! default kernels against each alternative in the same run.

use std::time::Instant;

use anyhow::Result;

/// One variant of `bench layer`.
#[derive(Debug, Clone)]
pub struct LayerRow {
    pub name: &'static str,
    pub ms: f64,
}

/// `xrayglm bench layer`: a LoRA training step through ChatGLM layers at a preset's width, the
/// default kernels against each alternative in the same run.
#[derive(Debug, Clone)]
pub struct LayerBench {
    pub preset: String,
    pub device: String,
    pub kind: tch::Kind,
    pub layers: i64,
    pub hidden: i64,
    pub batch: i64,
    pub seq: i64,
    pub targets: i64,
    pub checkpoint: bool,
    /// The default first.
    pub rows: Vec<LayerRow>,
}

impl std::fmt::Display for LayerBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "layer bench: {} ChatGLM layer(s) of {} (hidden {}), {} on {}, batch {} x {} tokens ({} targets each), LoRA on layer 0, dropout 0.1, {}",
            self.layers,
            self.preset,
            self.hidden,
            super::dtype_name(self.kind),
            self.device,
            self.batch,
            self.seq,
            self.targets,
            if self.checkpoint { "activation checkpointing" } else { "no checkpointing" }
        )?;
        let base = self.rows[0].ms;
        for (i, r) in self.rows.iter().enumerate() {
            writeln!(
                f,
                "  {:<52} {:9.2} ms/step  {}",
                r.name,
                r.ms,
                if i == 0 {
                    "1.00x (baseline: the default)".to_string()
                } else {
                    format!("default is {:.2}x faster", r.ms / base)
                }
            )?;
        }
        Ok(())
    }
}

/// `xrayglm bench layer`: a LoRA training step through ChatGLM layers at a preset's width, the
/// default kernels against each alternative, in one run.
#[derive(clap::Args, Debug, Clone)]
pub struct LayerArgs {
    #[arg(long, default_value = "visualglm-6b")]
    pub preset: String,
    #[arg(long, default_value_t = 2)]
    pub layers: i64,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    /// Frozen weights: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub dtype: crate::device::Dtype,
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    #[arg(long, default_value_t = 160)]
    pub seq: i64,
    /// Time without activation checkpointing as the default (and with it as the variant).
    #[arg(long)]
    pub no_checkpoint: bool,
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
}

/// Time LoRA training steps through `layers` ChatGLM layers of `preset` (random weights, a
/// vocabulary of 8,192 rows: the layers are what is measured), with the default kernels and with
/// each alternative: sat's GELU arithmetic, LoRA as a materialized ΔW, frozen weights tracked by
/// autograd, and (informative) the other checkpointing choice.
pub fn layer(a: &LayerArgs) -> Result<LayerBench> {
    let (preset, layers, batch, seq, steps) =
        (a.preset.as_str(), a.layers, a.batch, a.seq, a.steps);
    let (dev, kind, checkpoint) = (a.device.device()?, a.dtype.kind(), !a.no_checkpoint);
    use crate::model::chatglm::{ChatGlm, Dropouts, GlmInputs, Kernels};
    use crate::model::config::ModelConfig;
    use crate::model::positions::attention_mask;
    use tch::{nn::VarStore, Kind, Tensor};
    let mut cfg = ModelConfig::preset(preset)?;
    anyhow::ensure!(layers >= 1, "--layers must be at least 1");
    cfg.sat.num_layers = layers;
    cfg.sat.vocab_size = 8192;
    if let Some(l) = cfg.lora.as_mut() {
        l.layers = vec![0];
    }
    let ctx = 3 + cfg.sat.image_length + 16;
    anyhow::ensure!(seq > ctx + 1, "--seq must exceed the {ctx}-token prompt");
    tch::manual_seed(0);
    let mut base = VarStore::new(dev);
    base.set_kind(kind);
    let lora = VarStore::new(dev);
    let mut glm =
        crate::model::nn::with_fan_in_init(|| ChatGlm::new(&base.root(), &lora.root(), &cfg));
    base.freeze();
    glm.dropout = Dropouts {
        embedding: 0.1,
        attention: 0.1,
        output: 0.1,
    };
    glm.fused_attention = dev.is_cuda();
    let hidden = cfg.sat.hidden_size;
    let ids = Tensor::randint_low(10, 8192, [batch, seq], (Kind::Int64, dev));
    // Every row: a prefix of `ctx` tokens whose last is the `[gMASK]`.
    let prefix = crate::model::positions::Prefix {
        context_length: ctx,
        mask_position: ctx - 1,
    };
    let position_ids = crate::model::positions::batch(&vec![prefix; batch as usize], seq, dev);
    let mask = attention_mask(&vec![ctx; batch as usize], seq, dev);
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx).fill_(-100);
    let targets = seq - ctx;
    let inp = GlmInputs {
        input_ids: &ids,
        position_ids: &position_ids,
        attention_mask: &mask,
        image_embeds: None,
        image_at: crate::model::chatglm::ImageAt::EachRow(0),
    };
    let lora_vars: Vec<Tensor> = lora.trainable_variables();
    let one = |glm: &ChatGlm, ckpt: bool| {
        if ckpt {
            glm.loss_backward_checkpointed(&inp, &labels, true, 1.0);
        } else {
            let h = glm.hidden(&inp, true);
            glm.target_loss(&h, &labels).backward();
        }
        for v in &lora_vars {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    };
    let time = |glm: &ChatGlm, ckpt: bool| -> f64 {
        one(glm, ckpt);
        super::sync(dev);
        let t = Instant::now();
        for _ in 0..steps.max(1) {
            one(glm, ckpt);
        }
        super::sync(dev);
        t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64
    };
    let mut rows = vec![LayerRow {
        name: "default: fused GELU, one rotary, LoRA as 2 matmuls",
        ms: time(&glm, checkpoint),
    }];
    for (name, kernels) in Kernels::alternatives() {
        glm.kernels = kernels;
        rows.push(LayerRow {
            name,
            ms: time(&glm, checkpoint),
        });
    }
    glm.kernels = Kernels::default();
    rows.push(LayerRow {
        name: if checkpoint {
            "no activation checkpointing (more memory)"
        } else {
            "activation checkpointing (less memory)"
        },
        ms: time(&glm, !checkpoint),
    });
    if checkpoint && layers > 1 {
        glm.recompute_layers = Some(layers as usize / 2);
        rows.push(LayerRow {
            name: "recompute the first half of the layers only",
            ms: time(&glm, true),
        });
        glm.recompute_layers = None;
    }
    // Last: the frozen weights' gradients stay allocated afterwards.
    for v in base.variables().into_values() {
        let _ = v.set_requires_grad(true);
    }
    rows.push(LayerRow {
        name: "frozen weights tracked by autograd",
        ms: time(&glm, checkpoint),
    });
    Ok(LayerBench {
        preset: preset.into(),
        device: format!("{dev:?}"),
        kind,
        layers,
        hidden,
        batch,
        seq,
        targets,
        checkpoint,
        rows,
    })
}
