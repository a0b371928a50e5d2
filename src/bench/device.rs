//! `xrayglm bench device`: fp32 vs bf16 matmul throughput and a bf16 training step of one
//! ChatGLM-sized MLP block on the device.

use std::time::Instant;

use anyhow::Result;

/// Result of `bench device`.
#[derive(Debug, Clone)]
pub struct DeviceBench {
    pub device: String,
    pub hidden: i64,
    pub tokens: i64,
    pub fp32_tflops: f64,
    pub bf16_tflops: f64,
    pub bf16_train_step_ms: f64,
}

impl std::fmt::Display for DeviceBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "device bench on {}: ChatGLM MLP {}→{}→{}, {} tokens",
            self.device,
            self.hidden,
            4 * self.hidden,
            self.hidden,
            self.tokens
        )?;
        writeln!(
            f,
            "  fp32 matmul (baseline)   {:8.2} TFLOP/s  1.00x",
            self.fp32_tflops
        )?;
        writeln!(
            f,
            "  bf16 matmul              {:8.2} TFLOP/s  {:.2}x",
            self.bf16_tflops,
            self.bf16_tflops / self.fp32_tflops
        )?;
        writeln!(
            f,
            "  bf16 MLP fwd+bwd+AdamW (bf16 weights) {:8.2} ms/step",
            self.bf16_train_step_ms
        )
    }
}

/// Matmul throughput (fp32 baseline vs bf16) and a bf16 training step of one ChatGLM-sized MLP
/// block. Real-size on CUDA (hidden 4096, 8×320 tokens); scaled down on CPU.
/// `xrayglm bench device`: bf16 vs fp32 matmul throughput and a bf16 training step.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceSpec,
}

pub fn device(a: &DeviceArgs) -> Result<DeviceBench> {
    let dev = a.device.device()?;
    use tch::{nn, nn::Module, nn::OptimizerConfig, Kind, Tensor};
    let cuda = dev.is_cuda();
    let (hidden, tokens, iters) = if cuda {
        (4096i64, 2560i64, 20)
    } else {
        (256, 256, 5)
    };
    let flops = |n: i64| 2.0 * tokens as f64 * hidden as f64 * (4 * hidden) as f64 * n as f64;
    let tflops = |kind: Kind| -> f64 {
        let x = Tensor::randn([tokens, hidden], (kind, dev));
        let w = Tensor::randn([hidden, 4 * hidden], (kind, dev));
        let _ = x.matmul(&w);
        super::sync(dev);
        let t = Instant::now();
        for _ in 0..iters {
            let _ = x.matmul(&w);
        }
        super::sync(dev);
        flops(iters) / t.elapsed().as_secs_f64() / 1e12
    };
    let fp32_tflops = tflops(Kind::Float);
    let bf16_tflops = tflops(Kind::BFloat16);
    let mut vs = nn::VarStore::new(dev);
    let root = vs.root();
    let up = nn::linear(
        &root / "dense_h_to_4h",
        hidden,
        4 * hidden,
        Default::default(),
    );
    let down = nn::linear(
        &root / "dense_4h_to_h",
        4 * hidden,
        hidden,
        Default::default(),
    );
    vs.bfloat16();
    let mut opt = nn::AdamW::default().build(&vs, 1e-4)?;
    let x = Tensor::randn([tokens, hidden], (Kind::BFloat16, dev));
    let mut step = || {
        let y = down.forward(&up.forward(&x).gelu("tanh"));
        let loss = y
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step();
    };
    step();
    super::sync(dev);
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    super::sync(dev);
    let bf16_train_step_ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    Ok(DeviceBench {
        device: format!("{dev:?}"),
        hidden,
        tokens,
        fp32_tflops,
        bf16_tflops,
        bf16_train_step_ms,
    })
}
