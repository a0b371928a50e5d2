//! `xrayglm bench …`: each benchmark's arguments, handed to its function in `xrayglm::bench`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use clap::Subcommand;

use xrayglm::tokenizer;

use super::{load_tokenizer, parse_kind, ConfigArgs};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images/s and samples/s of the data path on 512x512 PNGs.
    Data(DataArgs),
    /// bf16 vs fp32 matmul throughput and a bf16 training step on the device (GPU check).
    Device(DeviceArgs),
    /// Forward time of a model preset (random weights): sat arithmetic vs fused attention.
    Model(ModelArgs),
    /// Correctness and bandwidth of the tensor all-reduce (under mpirun; NCCL on GPUs).
    Allreduce(AllreduceArgs),
    /// LoRA fine-tuning throughput of a preset (random weights) on the OpenI-zh report length mix:
    /// xrayglm's trainer, and with `--vs-sat PYTHON` the original's recipe (pad to 320, vision
    /// recomputed every step) in the same run.
    Train(TrainArgs),
    /// KV-cached greedy decoding of a preset (random weights): time to first token and tokens/s at
    /// batch 1 and 8; `--vs-sat PYTHON` runs the original's filling_sequence in the same run.
    Generate(GenerateArgs),
    /// 2-rank data-parallel scaling on CPU (mpirun -np 2 vs one process, 1 thread each).
    Dist(DistArgs),
    /// A LoRA training step through ChatGLM layers at a preset's width: the default kernels
    /// against sat's GELU arithmetic, the split rotary, a materialized LoRA ΔW, the other
    /// activation-checkpointing choice, recomputing half the layers, and frozen weights tracked
    /// by autograd, in one run.
    Layer(LayerArgs),
    /// LoRA training steps of a preset with random weights (GPU check: real size in bf16).
    Step(StepArgs),
}

impl BenchCommand {
    pub fn run(self) -> Result<()> {
        match self {
            Self::Data(a) => a.run(),
            Self::Device(a) => a.run(),
            Self::Model(a) => a.run(),
            Self::Allreduce(a) => a.run(),
            Self::Train(a) => a.run(),
            Self::Generate(a) => a.run(),
            Self::Dist(a) => a.run(),
            Self::Layer(a) => a.run(),
            Self::Step(a) => a.run(),
        }
    }
}

/// Images/s and samples/s of the data path on 512x512 PNGs.
#[derive(Args)]
pub struct DataArgs {
    #[arg(long, default_value_t = 200)]
    pub images: usize,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Use the PNG/JPEG images in this folder (repeated as needed) instead of generated films.
    #[arg(long)]
    pub from: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Python with torchvision and sentencepiece (scripts/fixtures_venv.sh): XrayGLM's
    /// FewShotDataset construction on the same films and reports, in the same run.
    #[arg(long)]
    pub vs_sat: Option<PathBuf>,
}

impl DataArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            images,
            threads,
            from,
            tokenizer,
            vs_sat,
        } = self;
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
}

/// bf16 vs fp32 matmul throughput and a bf16 training step on the device (GPU check).
#[derive(Args)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl DeviceArgs {
    pub fn run(self) -> Result<()> {
        let Self { device } = self;
        xrayglm::out!(
            "{}",
            xrayglm::bench::device(xrayglm::device::parse(&device)?)?
        );
        Ok(())
    }
}

/// Forward time of a model preset (random weights): sat arithmetic vs fused attention.
#[derive(Args)]
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
    pub device: String,
}

impl ModelArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            preset,
            batch,
            seq,
            iters,
            device,
        } = self;
        let dev = xrayglm::device::parse(&device)?;
        xrayglm::out!(
            "{}",
            xrayglm::bench::model(&preset, batch, seq, iters, dev)?
        );
        Ok(())
    }
}

/// Correctness and bandwidth of the tensor all-reduce (under mpirun; NCCL on GPUs).
#[derive(Args)]
pub struct AllreduceArgs {
    /// auto, single, mpi or nccl
    #[arg(long, default_value = "auto")]
    pub backend: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 64.0)]
    pub mib: f64,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

impl AllreduceArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            backend,
            device,
            mib,
            iters,
            timeout_s,
        } = self;
        if let Some(r) = xrayglm::bench::allreduce(&backend, &device, mib, iters, timeout_s)? {
            xrayglm::out!("{r}");
        }
        Ok(())
    }
}

/// LoRA fine-tuning throughput of a preset (random weights) on the OpenI-zh report length mix:
/// xrayglm's trainer, and with `--vs-sat PYTHON` the original's recipe (pad to 320, vision
/// recomputed every step) in the same run.
#[derive(Args)]
pub struct TrainArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    /// Steps left out of the timing.
    #[arg(long, default_value_t = 2)]
    pub warm: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub films: usize,
    /// OpenI-zh reports (default: ../shared/data/Xray/openi-zh.json).
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// ice_text.model (default: the search paths).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Python with SwissArmyTransformer 0.3.6 (scripts/fixtures_venv.sh).
    #[arg(long)]
    pub vs_sat: Option<PathBuf>,
    /// Overrides of xrayglm's side, e.g. `loader.padding="fixed"`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl TrainArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            preset,
            steps,
            warm,
            batch,
            films,
            reports,
            tokenizer,
            vs_sat,
            sets,
        } = self;
        let reports = reports.unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/Xray/openi-zh.json")
        });
        let tokenizer = xrayglm::tokenizer::find(tokenizer.as_deref())
            .context("no tokenizer: pass --tokenizer ice_text.model or set XRAYGLM_TOKENIZER")?;
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
}

/// KV-cached greedy decoding of a preset (random weights): time to first token and tokens/s at
/// batch 1 and 8; `--vs-sat PYTHON` runs the original's filling_sequence in the same run.
#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Weights and activations of both implementations: fp32 or bf16 (the original runs its
    /// model in half precision).
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Python with SwissArmyTransformer 0.3.6 (scripts/fixtures_venv.sh); CPU only.
    #[arg(long)]
    pub vs_sat: Option<PathBuf>,
    /// cpu, cuda, cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl GenerateArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            preset,
            new_tokens,
            dtype,
            vs_sat,
            device,
        } = self;
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
}

/// 2-rank data-parallel scaling on CPU (mpirun -np 2 vs one process, 1 thread each).
#[derive(Args)]
pub struct DistArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Micro-batch per rank.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl DistArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            cfg,
            steps,
            batch,
            tokenizer,
        } = self;
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
}

/// A LoRA training step through ChatGLM layers at a preset's width: the default kernels
/// against sat's GELU arithmetic, the split rotary, a materialized LoRA ΔW, the other
/// activation-checkpointing choice, recomputing half the layers, and frozen weights tracked
/// by autograd, in one run.
#[derive(Args)]
pub struct LayerArgs {
    #[arg(long, default_value = "visualglm-6b")]
    pub preset: String,
    #[arg(long, default_value_t = 2)]
    pub layers: i64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Frozen weights: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
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

impl LayerArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            preset,
            layers,
            device,
            dtype,
            batch,
            seq,
            no_checkpoint,
            steps,
        } = self;
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
}

/// LoRA training steps of a preset with random weights (GPU check: real size in bf16).
#[derive(Args)]
pub struct StepArgs {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Frozen weights: fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    #[arg(long, default_value_t = 96)]
    pub seq: i64,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
}

impl StepArgs {
    pub fn run(self) -> Result<()> {
        let Self {
            preset,
            device,
            dtype,
            batch,
            seq,
            steps,
        } = self;
        let dev = xrayglm::device::parse(&device)?;
        let kind = parse_kind(&dtype)?;
        xrayglm::out!(
            "{}",
            xrayglm::bench::step(&preset, dev, kind, batch, seq, steps)?
        );
        Ok(())
    }
}
