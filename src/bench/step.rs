//! `xrayglm bench step`: LoRA training steps of a preset with random weights on one fixed batch.

use std::time::Instant;

use anyhow::Result;

/// Result of `bench step`.
#[derive(Debug, Clone)]
pub struct StepBench {
    pub preset: String,
    pub device: String,
    pub kind: tch::Kind,
    pub batch: i64,
    pub seq: i64,
    pub build_s: f64,
    pub step_ms: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The step's matmul FLOPs (`model::flops`; nothing is recomputed here), the old `6·N` per
    /// target token, and the peak TFLOP/s they are measured against (given or measured).
    pub flops: f64,
    pub flops_6n: f64,
    pub peak_tflops: f64,
    pub peak_measured: bool,
}

impl std::fmt::Display for StepBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "train-step bench: preset {} on {} ({:?} frozen weights, fp32 LoRA + AdamW), batch {} × {} tokens",
            self.preset, self.device, self.kind, self.batch, self.seq
        )?;
        writeln!(f, "  build (random weights)   {:9.2} s", self.build_s)?;
        writeln!(
            f,
            "  fwd+bwd+AdamW            {:9.2} ms/step  {:.0} tokens/s  {:.1} samples/s",
            self.step_ms,
            (self.batch * self.seq) as f64 / (self.step_ms / 1e3),
            self.batch as f64 / (self.step_ms / 1e3)
        )?;
        let secs = self.step_ms / 1e3;
        let peak = self.peak_tflops * 1e12;
        writeln!(
            f,
            "  FLOPs/step               {:.3e} ({:.2} TFLOP/s): MFU {:.1}% (6N: {:.1}%) of {:.2} TFLOP/s ({})",
            self.flops,
            self.flops / secs / 1e12,
            100.0 * self.flops / secs / peak,
            100.0 * self.flops_6n / secs / peak,
            self.peak_tflops,
            if self.peak_measured {
                "a measured matmul"
            } else {
                "--peak_tflops"
            }
        )?;
        writeln!(
            f,
            "  loss                     {:.4} → {:.4}",
            self.first_loss, self.last_loss
        )
    }
}

/// `xrayglm bench step`: LoRA training steps of a preset with random weights (GPU check: real
/// size in bf16).
#[derive(clap::Args, Debug, Clone)]
pub struct StepArgs {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    /// Frozen weights: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub dtype: crate::device::Dtype,
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    #[arg(long, default_value_t = 96)]
    pub seq: i64,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// The device's peak TFLOP/s for MFU (an H100 in dense bf16: 989); default: a measured
    /// matmul at the dtype.
    #[arg(long = "peak_tflops", alias = "peak-tflops")]
    pub peak_tflops: Option<f64>,
}

/// LoRA training steps (random weights, one fixed batch) of a preset: proves that mixed-precision
/// LoRA training runs at that size and measures the step time.
pub fn step(a: &StepArgs) -> Result<StepBench> {
    let (preset, batch, seq, steps) = (a.preset.as_str(), a.batch, a.seq, a.steps);
    let (dev, kind) = (a.device.device()?, a.dtype.kind());
    use crate::model::config::ModelConfig;
    use crate::model::visualglm::VisualGlm;
    use tch::nn::OptimizerConfig;
    let cfg = ModelConfig::preset(preset)?;
    tch::manual_seed(0);
    let t = Instant::now();
    let mut m = VisualGlm::new(cfg.clone(), dev, kind)?;
    m.set_fused_attention(dev.is_cuda());
    super::sync(dev);
    let build_s = t.elapsed().as_secs_f64();
    let (ids, image) = super::model::model_inputs(&cfg, batch, seq, dev);
    let ctx = 3 + cfg.sat.image_length + 16;
    let labels = ids.shallow_clone().copy();
    let _ = labels.narrow(1, 0, ctx).fill_(-100);
    let mut opt = tch::nn::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        wd: 0.01,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&m.lora, 1e-3)?;
    let (pos, ctx_lens) = crate::model::positions::positions_from_ids(
        &ids,
        cfg.sat.bos_token_id,
        cfg.sat.mask_token_id,
        cfg.sat.gmask_token_id,
    )?;
    let mut losses = Vec::new();
    let run = |opt: &mut tch::nn::Optimizer| -> Result<f64> {
        let inputs = crate::model::visualglm::BatchInputs {
            input_ids: &ids,
            images: crate::model::visualglm::Images::Pixels(&image),
            image_at: crate::model::chatglm::ImageAt::EachRow(3),
            position_ids: &pos,
            context_lengths: &ctx_lens,
            labels: &labels,
        };
        let loss = m.loss(&inputs, true);
        opt.zero_grad();
        loss.backward();
        opt.step();
        Ok(loss.double_value(&[]))
    };
    losses.push(run(&mut opt)?);
    super::sync(dev);
    let t = Instant::now();
    for _ in 0..steps {
        losses.push(run(&mut opt)?);
    }
    super::sync(dev);
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let targets = labels
        .narrow(1, 1, seq - 1)
        .ne(-100)
        .sum(tch::Kind::Int64)
        .int64_value(&[]);
    let shape = crate::model::flops::StepShape {
        rows: batch,
        seq,
        targets,
        films: batch,
    };
    let flops = crate::model::flops::training_step(&cfg, &shape, &Default::default()).model();
    let (params, _) = m.parameter_counts();
    let (peak_tflops, peak_measured) = match a.peak_tflops {
        Some(p) if p > 0.0 => (p, false),
        Some(p) => anyhow::bail!("--peak_tflops {p}: a device's peak TFLOP/s, above 0"),
        None => (crate::model::flops::matmul_tflops(dev, kind), true),
    };
    Ok(StepBench {
        preset: preset.into(),
        device: format!("{dev:?}"),
        kind,
        batch,
        seq,
        build_s,
        step_ms,
        first_loss: losses[0],
        last_loss: *losses.last().unwrap(),
        flops,
        flops_6n: crate::model::flops::six_n(params as f64, targets as f64),
        peak_tflops,
        peak_measured,
    })
}
