//! `xrayglm bench model`: forward time of a preset with random weights, sat's arithmetic (the
//! baseline) against the fused attention path; and the deterministic XrayGLM-layout inputs the
//! model benchmarks share.

use std::time::Instant;

use anyhow::Result;

use crate::data::rng::PyRandom;

/// Result of `bench model`.
#[derive(Debug, Clone)]
pub struct ModelBench {
    pub preset: String,
    pub batch: i64,
    pub seq: i64,
    pub sat_ms: f64,
    pub fused_ms: f64,
}

impl std::fmt::Display for ModelBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model bench: preset {}, batch {} × {} tokens + image, fp32 forward, no grad",
            self.preset, self.batch, self.seq
        )?;
        writeln!(
            f,
            "  sat arithmetic (baseline) {:9.2} ms/forward  1.00x",
            self.sat_ms
        )?;
        writeln!(
            f,
            "  fused attention           {:9.2} ms/forward  {:.2}x",
            self.fused_ms,
            self.sat_ms / self.fused_ms
        )
    }
}

/// Deterministic inputs in the XrayGLM layout: `<img>` ids, image slots, prompt, `[gMASK] <sop>`,
/// report, `<eop>`.
pub fn model_inputs(
    cfg: &crate::model::config::ModelConfig,
    batch: i64,
    seq: i64,
    dev: tch::Device,
) -> (tch::Tensor, tch::Tensor) {
    use tch::{Kind, Tensor};
    let s = &cfg.sat;
    let l = s.image_length;
    let mut rng = PyRandom::new(99);
    let mut ids = Vec::with_capacity((batch * seq) as usize);
    for _ in 0..batch {
        let ctx = 3 + l + 16;
        for i in 0..seq {
            ids.push(match i {
                i if (3..3 + l).contains(&i) => 3,
                i if i == ctx - 1 => s.gmask_token_id,
                i if i == ctx => s.bos_token_id,
                _ => 10 + rng.randbelow(20000) as i64,
            });
        }
    }
    let v = &s.eva_args;
    let image = Tensor::randn(
        [batch, 3, v.image_size[0], v.image_size[1]],
        (Kind::Float, dev),
    );
    (
        Tensor::from_slice(&ids).view([batch, seq]).to_device(dev),
        image,
    )
}

/// `xrayglm bench model`: forward time of a preset (random weights), sat arithmetic vs fused
/// attention.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    #[arg(long, default_value_t = 128)]
    pub seq: i64,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
}

/// Forward time of a preset with random weights: sat's arithmetic vs the fused attention path.
pub fn model(a: &ModelArgs) -> Result<ModelBench> {
    let (preset, batch, seq, iters) = (a.preset.as_str(), a.batch, a.seq, a.iters);
    let dev = a.device.device()?;
    use crate::model::config::ModelConfig;
    use crate::model::visualglm::VisualGlm;
    let cfg = ModelConfig::preset(preset)?;
    tch::manual_seed(0);
    let mut m = VisualGlm::new(cfg.clone(), dev, tch::Kind::Float)?;
    let (ids, image) = model_inputs(&cfg, batch, seq, dev);
    let time = |m: &VisualGlm| -> Result<f64> {
        tch::no_grad(|| m.forward(&ids, Some(&image), 3, None, None, false))?;
        super::sync(dev);
        let t = Instant::now();
        for _ in 0..iters {
            tch::no_grad(|| m.forward(&ids, Some(&image), 3, None, None, false))?;
        }
        super::sync(dev);
        Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
    };
    let sat_ms = time(&m)?;
    m.set_fused_attention(true);
    let fused_ms = time(&m)?;
    Ok(ModelBench {
        preset: preset.into(),
        batch,
        seq,
        sat_ms,
        fused_ms,
    })
}
