//! `xrayglm bench …`: each benchmark's arguments live beside it in `xrayglm::bench` and are handed
//! to it whole; this file only names the subcommands and prints the reports.

use anyhow::Result;
use clap::Subcommand;

use xrayglm::bench;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images/s and samples/s of the data path on 512x512 PNGs.
    Data(bench::DataArgs),
    /// bf16 vs fp32 matmul throughput and a bf16 training step on the device (GPU check).
    Device(bench::DeviceArgs),
    /// Forward time of a model preset (random weights): sat arithmetic vs fused attention.
    Model(bench::ModelArgs),
    /// Correctness and bandwidth of the tensor all-reduce (under mpirun; NCCL on GPUs).
    Allreduce(bench::AllreduceArgs),
    /// LoRA fine-tuning throughput of a preset (random weights) on the OpenI-zh report length mix:
    /// xrayglm's trainer, and with `--vs_sat PYTHON` the original's recipe (pad to 320, vision
    /// recomputed every step) in the same run.
    Train(bench::TrainArgs),
    /// KV-cached greedy decoding of a preset (random weights): time to first token and tokens/s at
    /// batch 1 and 8; `--vs_sat PYTHON` runs the original's filling_sequence in the same run.
    Generate(bench::GenerateArgs),
    /// The OpenAI-compatible server (continuous batching) under 1, 4, 8, 16 concurrent clients
    /// against the same requests one at a time: tokens/s, time to first token, latency.
    Serve(bench::ServeArgs),
    /// 2-rank data-parallel scaling on CPU (mpirun -np 2 vs one process, 1 thread each).
    Dist(bench::DistArgs),
    /// A LoRA training step through ChatGLM layers at a preset's width: the default kernels
    /// against sat's GELU arithmetic, the split rotary, a materialized LoRA ΔW, the other
    /// activation-checkpointing choice, recomputing half the layers, and frozen weights tracked
    /// by autograd, in one run.
    Layer(bench::LayerArgs),
    /// LoRA training steps of a preset with random weights (GPU check: real size in bf16).
    Step(bench::StepArgs),
    /// GRPO rollouts (G replies per film) through the engine's continuous batching against one
    /// reply at a time, and the time split of a GRPO step.
    Rl(bench::RlArgs),
}

impl BenchCommand {
    pub fn run(self) -> Result<()> {
        match self {
            Self::Data(a) => xrayglm::out!("{}", bench::data(&a)?),
            Self::Device(a) => xrayglm::out!("{}", bench::device(&a)?),
            Self::Model(a) => xrayglm::out!("{}", bench::model(&a)?),
            // Only rank 0 reports.
            Self::Allreduce(a) => {
                if let Some(r) = bench::allreduce(&a)? {
                    xrayglm::out!("{r}")
                }
            }
            Self::Train(a) => xrayglm::out!("{}", bench::train(&a)?),
            Self::Generate(a) => xrayglm::out!("{}", bench::generate(&a)?),
            Self::Serve(a) => xrayglm::out!("{}", bench::serve(&a)?),
            Self::Dist(a) => xrayglm::out!("{}", bench::dist(&a)?),
            Self::Layer(a) => xrayglm::out!("{}", bench::layer(&a)?),
            Self::Step(a) => xrayglm::out!("{}", bench::step(&a)?),
            Self::Rl(a) => xrayglm::out!("{}", bench::rl(&a)?),
        }
        Ok(())
    }
}
