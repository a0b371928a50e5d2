//! Run configuration: a TOML file in `configs/` plus `--set key=value` overrides.
//!
//! Every section rejects unknown keys, so a typo is an error that names the key. Relative paths
//! are taken from the current directory. `Config::default()` is the embedded default: the
//! synthetic chest X-ray demo set made by `xrayglm prepare-data`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::batch::LoaderConfig;
use crate::data::image::{ImageProcessor, SixteenBit};
use crate::data::records::{ImageCheck, LoadOptions, PromptPolicy, FIXED_PROMPT};
use crate::data::sample::SampleConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptMode {
    #[default]
    Fixed,
    Random,
}

/// Where the records come from and how they are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Records file: `{"annotations": [...]}` or a training list `[{"img","prompt","label"}]`.
    pub path: PathBuf,
    /// Folder for relative image paths; empty = the records file's folder.
    pub image_root: PathBuf,
    /// Extension of `<image_id>` images (annotations schema).
    pub image_ext: String,
    /// Prompt for annotations: `fixed` (`fixed_prompt`) or `random` (one of XrayGLM's 6, seeded).
    pub prompt: PromptMode,
    pub fixed_prompt: String,
    pub prompt_seed: i64,
    /// `exists` or `decode` (default): how image files are checked before anything starts.
    pub check_images: ImageCheck,
    /// Skip and count bad records instead of failing.
    pub skip_bad: bool,
    /// Accept image paths outside the image root (absolute paths, `..` climbing out of it).
    pub allow_outside_root: bool,
    /// Training list written by `prepare-data`; empty = `<records stem>-prompt.json` beside it.
    pub out: PathBuf,
    /// Pad every sample to this many tokens (the reference: 320 = 64 + 256); 0 = `loader.padding`
    /// decides (dynamic by default).
    pub pad_to: usize,
    /// Conversation files (LLaVA, ShareGPT): `every` assistant turn is a target (one sample per
    /// turn, the earlier turns as its history), or the `last` only.
    pub conversation_turns: crate::data::records::ConversationTurns,
    /// Annotations: one sample per study — the films `<report>_<k>` of one OpenI report, in `k`
    /// order, each in its own `<img>` block, with one target report — instead of one per film.
    pub group_views: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/synthetic/Xray/synth-zh.json"),
            image_root: PathBuf::new(),
            image_ext: "png".into(),
            prompt: PromptMode::Fixed,
            fixed_prompt: FIXED_PROMPT.into(),
            prompt_seed: 1234,
            check_images: ImageCheck::Decode,
            skip_bad: false,
            allow_outside_root: false,
            out: PathBuf::new(),
            pad_to: 0,
            conversation_turns: Default::default(),
            group_views: false,
        }
    }
}

impl DataSection {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            image_root: (!self.image_root.as_os_str().is_empty()).then(|| self.image_root.clone()),
            prompt: match self.prompt {
                PromptMode::Fixed => PromptPolicy::Fixed {
                    prompt: self.fixed_prompt.clone(),
                },
                PromptMode::Random => PromptPolicy::Random {
                    seed: self.prompt_seed,
                },
            },
            image_ext: self.image_ext.clone(),
            check_images: self.check_images,
            skip_bad: self.skip_bad,
            allow_outside_root: self.allow_outside_root,
            threads: 0,
            conversation_turns: self.conversation_turns,
            group_views: self.group_views,
            max_history_turns: None,
        }
    }

    /// The training list path `prepare-data` writes.
    pub fn out_path(&self) -> PathBuf {
        if !self.out.as_os_str().is_empty() {
            return self.out.clone();
        }
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into());
        self.path.with_file_name(format!("{stem}-prompt.json"))
    }
}

/// `synthetic.kind`: which synthetic set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticKind {
    /// Heart size and pleural effusion, one report per finding set (`Xray/synth-zh.json`).
    #[default]
    Basic,
    /// Six findings, several phrasings and orders per report (`Xray/synth-hard-zh.json`).
    Hard,
}

/// The synthetic demo set (`prepare-data --synthetic N`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSection {
    /// basic (the demo's) or hard (data::synthetic_hard).
    pub kind: SyntheticKind,
    /// Films generated when the records file is missing (0 = never generate).
    pub count: usize,
    pub size: usize,
    pub seed: i64,
    pub out_dir: PathBuf,
    /// A lateral film per study besides the PA one (`<study>_1`, `<study>_2`; two-view samples
    /// with `data.group_views`).
    pub lateral: bool,
}

impl Default for SyntheticSection {
    fn default() -> Self {
        Self {
            kind: SyntheticKind::Basic,
            count: 512,
            size: 256,
            seed: 1234,
            out_dir: PathBuf::from("data/synthetic"),
            lateral: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// `ice_text.model` or a `tokenizer.json`; empty = search (see `tokenizer::find`).
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSection {
    pub size: usize,
    /// `scale` (default) or `pillow` (clip like PIL's `convert('RGB')` of a 16-bit PNG).
    pub sixteen_bit: SixteenBit,
    /// Train on other films than the records' own: `none` (default), `blank` (a black film for
    /// every record: a text-only baseline) or `shuffled` (a fixed derangement). What a model
    /// learns without its images, to compare with `eval --image_ablation`.
    pub ablation: crate::data::batch::ImageAblation,
}

impl Default for ImageSection {
    fn default() -> Self {
        Self {
            size: 224,
            sixteen_bit: SixteenBit::Scale,
            ablation: Default::default(),
        }
    }
}

impl ImageSection {
    pub fn processor(&self) -> ImageProcessor {
        ImageProcessor {
            size: self.size,
            sixteen_bit: self.sixteen_bit,
        }
    }
}

/// Which model to train or run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A preset with random weights (`tiny`, `small`, `visualglm-6b`) when `path` is empty.
    pub preset: String,
    /// A model directory (xrayglm, sat or HF format).
    pub path: PathBuf,
    /// Kind of the frozen weights: fp32, bf16 or fp16.
    pub dtype: crate::device::Dtype,
    /// `[Q|K|V]` ChatGLM weights (sat ≥ 0.4): "blocks"; else "interleaved".
    pub qkv_layout: crate::model::config::QkvLayout,
    pub rotary: crate::model::config::RotaryPrecision,
    pub fused_attention: bool,
    /// auto, cpu, cuda, cuda:N
    pub device: crate::device::DeviceSpec,
    /// Dropout in train mode: the vision tower and Q-Former, and ChatGLM (reference: 0.1 each).
    pub vision_dropout: f64,
    pub glm_dropout: f64,
    /// The adapters (XrayGLM: rank 10, alpha 1, layers [0, 14], q/k/v + dense).
    pub lora: crate::model::config::LoraConfig,
    /// Frozen ChatGLM linears as "none" or "int8" (weight-only, per-row scales; the original's
    /// `--quant 8`).
    pub quantize: crate::model::config::Quantize,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            path: PathBuf::new(),
            dtype: crate::device::Dtype::Fp32,
            qkv_layout: Default::default(),
            rotary: Default::default(),
            fused_attention: false,
            device: crate::device::DeviceSpec::Auto,
            vision_dropout: 0.1,
            glm_dropout: 0.1,
            lora: crate::model::config::LoraConfig {
                layers: vec![0, 1],
                rank: 4,
                ..Default::default()
            },
            quantize: crate::model::config::Quantize::None,
        }
    }
}

/// `train.checkpoint_layers`: a count of layers to recompute (-1: every layer) or "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CheckpointLayers {
    Count(i64),
    Planned(Planned),
}

/// The word `auto` of `train.checkpoint_layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Planned {
    Auto,
}

impl CheckpointLayers {
    /// "auto": the memory plan decides.
    pub const AUTO: CheckpointLayers = CheckpointLayers::Planned(Planned::Auto);

    /// The layers to recompute as the model takes them: `None` for every layer; for "auto" the
    /// plan's (`planned`).
    pub fn recompute(self, planned: Option<usize>) -> Option<usize> {
        match self {
            CheckpointLayers::Count(k) => usize::try_from(k).ok(),
            CheckpointLayers::Planned(_) => planned,
        }
    }
}

impl TrainSection {
    /// Whether steps run the checkpointed backward: `checkpoint_activations`, or the memory plan.
    pub fn checkpointed(&self) -> bool {
        self.checkpoint_activations || self.checkpoint_layers == CheckpointLayers::AUTO
    }
}

/// `train.resume`: "auto" (the run folder's latest complete checkpoint, if any), "never" (a fresh
/// run; refused over existing checkpoints) or a checkpoint / run folder.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Resume {
    #[default]
    Auto,
    Never,
    From(PathBuf),
}

impl From<String> for Resume {
    fn from(s: String) -> Self {
        match s.as_str() {
            "auto" => Self::Auto,
            "never" => Self::Never,
            _ => Self::From(PathBuf::from(s)),
        }
    }
}

impl From<Resume> for String {
    fn from(r: Resume) -> String {
        match r {
            Resume::Auto => "auto".into(),
            Resume::Never => "never".into(),
            Resume::From(p) => p.display().to_string(),
        }
    }
}

/// A closed set spelled on the command line exactly as in TOML: `--rotary sat_fp16` parses like
/// `rotary = "sat_fp16"`, and an unknown value names the allowed ones (clap's `value_parser`).
pub fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(s)).map_err(|e| e.to_string())
}

/// The flags every command that reads a config takes: `--config FILE` and `--set KEY=VALUE`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file (see configs/); without it the embedded default (synthetic demo) is used.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set loader.batch_size=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// `train.schedule`: the learning-rate schedule (see `train::schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Sat,
    WarmupCosine,
    Constant,
}

/// `train.method`: what the adapters are trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Supervised fine-tuning: the reports' likelihood (XrayGLM's recipe).
    #[default]
    Sft,
    /// Group-relative policy optimization on sampled reports and the `[rl]` reward.
    Grpo,
    /// Direct preference optimization on the pairs of `rl.pairs`.
    Dpo,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Grpo => "grpo",
            Self::Dpo => "dpo",
        }
    }
}

/// The training recipe (docs/reference.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Run folder: `<out_dir>/<name>`.
    pub out_dir: PathBuf,
    pub name: String,
    /// sft, grpo or dpo (the last two read `[rl]`).
    pub method: Method,
    /// A checkpoint (or a run folder: its latest; `RUN/best`) to start from: its base is this
    /// run's base, its adapters this run's first ones — and, for grpo and dpo, the frozen
    /// reference policy. Empty: a fresh start on `model.path` / `model.preset`.
    pub init_from: PathBuf,
    pub train_iters: i64,
    pub lr: f64,
    pub schedule: ScheduleKind,
    /// Warmup as a fraction of train_iters (XrayGLM 0.02).
    pub warmup: f64,
    pub min_lr_ratio: f64,
    /// sat's finetune-mode auto warmup: steps at `auto_warmup_rate · lr` (XrayGLM: 100 at 5 %).
    pub auto_warmup_steps: i64,
    pub auto_warmup_rate: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (XrayGLM 0.1; 0 = off).
    pub clip_grad: f64,
    /// Micro-batches per rank per step, read only when the global batch comes from it (a fresh
    /// run with `global_batch_size = 0`); otherwise derived from the global batch and the world
    /// size (the start line says which).
    pub grad_accum: i64,
    /// Samples per optimizer step over every rank: accumulation is derived as
    /// `global_batch_size / (ranks · loader.batch_size)`, so a run restarted on another number of
    /// ranks trains the same recipe. 0: the checkpoint's when resuming, else
    /// `ranks · loader.batch_size · grad_accum`.
    pub global_batch_size: usize,
    /// fp32, bf16 (no scaling) or fp16 (dynamic loss scaling).
    pub precision: crate::device::Dtype,
    pub initial_scale_power: u32,
    pub loss_scale_window: i64,
    pub hysteresis: i64,
    pub min_loss_scale: f64,
    pub log_interval: i64,
    pub save_interval: i64,
    pub keep_last: usize,
    pub eval_interval: i64,
    pub eval_batches: usize,
    /// Fraction of records held out for validation.
    pub val_fraction: f64,
    pub seed: u64,
    /// "auto" (continue the run folder's latest checkpoint if any), "never", or a checkpoint folder.
    pub resume: Resume,
    /// Print a progress bar (off: one log line per log_interval).
    pub progress: bool,
    /// Data-parallel backend: auto (with >1 rank under mpirun/srun: NCCL on CUDA, MPI on CPU),
    /// single, mpi (CUDA tensors staged through the host) or nccl.
    pub backend: crate::dist::Backend,
    /// Seconds a collective may wait for the other ranks before the job is aborted.
    pub dist_timeout_s: u64,
    /// Recompute each ChatGLM layer in the backward pass instead of keeping its activations
    /// (sat's `--checkpoint-activations`; same gradients, less memory, ~1/3 more compute).
    pub checkpoint_activations: bool,
    /// With `checkpoint_activations`, recompute only the first this-many ChatGLM layers and keep
    /// the others' activations (memory for speed, like Megatron's `recompute_num_layers`);
    /// -1: every layer; "auto": as few as fit `memory_budget_gib` (a probe at start measures a
    /// step with every layer recomputed and what a kept layer adds; implies
    /// `checkpoint_activations`).
    pub checkpoint_layers: CheckpointLayers,
    /// The memory a step may use with `checkpoint_layers = "auto"`, GiB; 0: what the device has
    /// free at start (CUDA: free device memory; CPU: available RAM), with what the run holds.
    pub memory_budget_gib: f64,
    /// Compute each film's image embeddings once and reuse them (only when
    /// `model.vision_dropout = 0`: XrayGLM's 0.1 makes them differ at every step).
    pub vision_cache: bool,
    /// The device's peak TFLOP/s at the model's precision, for the logged MFU and HFU (an H100
    /// or H200 in dense bf16: 989); 0: measured at start (a dense matmul at the model's dtype, so
    /// the utilization is of what this device reaches on one large matmul).
    pub peak_tflops: f64,
    /// Stop (with a checkpoint) once this many iterations are done, without changing the schedule;
    /// 0 = run to train_iters. For splitting a run over several sessions.
    pub stop_at: i64,
    /// Every this many steps (and at the end): greedy reports on a fixed set of held-out films,
    /// their BLEU-4 / ROUGE-L / CIDEr-D / CE metrics logged as `gen/*`; 0 = never.
    pub eval_generate_interval: i64,
    /// How many held-out films (the first of the split) those reports are made for.
    pub eval_generate_films: usize,
    /// New tokens per report at most, during training.
    pub eval_max_new_tokens: usize,
    /// The metric that picks the run's `best` checkpoint (judged at every save; never pruned):
    /// none, val_loss, ce_f1, bleu_4, rouge_l or cider_d.
    pub best_metric: BestMetric,
    /// Stop (with a checkpoint) after this many saves in a row without a better `best_metric`;
    /// 0 = never.
    pub early_stop_patience: usize,
}

/// `train.best_metric`: what makes a checkpoint the run's best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    #[default]
    None,
    ValLoss,
    CeF1,
    #[serde(rename = "bleu_4")]
    Bleu4,
    RougeL,
    CiderD,
}

impl BestMetric {
    /// Larger is better for every metric but the loss.
    pub fn higher_is_better(self) -> bool {
        self != BestMetric::ValLoss
    }

    /// Whether the metric needs generated reports.
    pub fn generates(self) -> bool {
        !matches!(self, BestMetric::None | BestMetric::ValLoss)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ValLoss => "val_loss",
            Self::CeF1 => "ce_f1",
            Self::Bleu4 => "bleu_4",
            Self::RougeL => "rouge_l",
            Self::CiderD => "cider_d",
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("checkpoints"),
            name: "demo".into(),
            method: Method::Sft,
            init_from: PathBuf::new(),
            train_iters: 200,
            lr: 1e-4,
            schedule: Default::default(),
            warmup: 0.02,
            min_lr_ratio: 0.1,
            auto_warmup_steps: 100,
            auto_warmup_rate: 0.05,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip_grad: 0.1,
            grad_accum: 1,
            global_batch_size: 0,
            precision: crate::device::Dtype::Fp32,
            initial_scale_power: 16,
            loss_scale_window: 400,
            hysteresis: 2,
            min_loss_scale: 1.0,
            log_interval: 10,
            save_interval: 100,
            keep_last: 3,
            eval_interval: 50,
            eval_batches: 4,
            val_fraction: 0.1,
            seed: 1234,
            resume: Resume::Auto,
            progress: true,
            backend: crate::dist::Backend::Auto,
            dist_timeout_s: 30,
            checkpoint_activations: false,
            checkpoint_layers: CheckpointLayers::Count(-1),
            memory_budget_gib: 0.0,
            vision_cache: true,
            peak_tflops: 0.0,
            stop_at: 0,
            eval_generate_interval: 0,
            eval_generate_films: 32,
            eval_max_new_tokens: 128,
            best_metric: BestMetric::None,
            early_stop_patience: 0,
        }
    }
}

/// `[rl]`: how `train.method = "grpo"` samples, scores and updates, and where
/// `train.method = "dpo"` finds its pairs (docs/rl.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlSection {
    /// Replies sampled per prompt (GRPO's G; at least 2).
    pub group: usize,
    /// Sampling of the replies (their log-probs are taken at the same temperature).
    pub temperature: f64,
    pub top_p: f64,
    /// 0: no top-k cut.
    pub top_k: usize,
    /// New tokens per reply at most (also Dr. GRPO's constant).
    pub max_new_tokens: usize,
    /// Rows decoded together at most (at least one prompt's group).
    pub max_batch: usize,
    /// Token-level normalization of the loss: grpo, bnpo, dr_grpo or dapo.
    pub loss_type: crate::train::loss::GrpoNorm,
    /// How a group's rewards become advantages: group (÷ its std), batch (÷ the batch's std) or
    /// none (mean subtracted only).
    pub scale_rewards: crate::train::loss::RewardScale,
    /// The KL coefficient towards the reference (k3 estimator); 0: no reference forward.
    pub beta: f64,
    /// The ratio is clipped to `[1 − epsilon_low, 1 + epsilon_high]`.
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Optimizer updates per rollout batch (TRL's num_iterations, μ).
    pub mu: usize,
    /// Mixed into the seeds replies are sampled from (GRPO, `rl-pairs`), so runs can differ in
    /// their samples alone — `train.seed` also picks the held-out split.
    pub seed: u64,
    /// The reward's weighted terms.
    pub reward: crate::eval::reward::RewardWeights,
    /// A findings rules file for the reward's labeler (`xrayglm findings --rules`); empty: the
    /// built-in rules of `sample.language`.
    pub rules: PathBuf,
    /// Threads that score replies beside the model; 0: one per core.
    pub reward_threads: usize,
    /// DPO: the pair file (`xrayglm rl-pairs` writes one).
    pub pairs: PathBuf,
    /// DPO: sigmoid or ipo, and β.
    pub dpo_loss: crate::train::loss::DpoKind,
    pub dpo_beta: f64,
}

impl Default for RlSection {
    fn default() -> Self {
        Self {
            group: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 128,
            max_batch: 64,
            loss_type: Default::default(),
            scale_rewards: Default::default(),
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            mu: 1,
            seed: 0,
            reward: Default::default(),
            rules: PathBuf::new(),
            reward_threads: 0,
            pairs: PathBuf::new(),
            dpo_loss: Default::default(),
            dpo_beta: 0.1,
        }
    }
}

impl RlSection {
    fn validate(&self, method: Method) -> Result<()> {
        let finite_pos = |key: &str, x: f64| -> Result<()> {
            if !(x.is_finite() && x > 0.0) {
                bail!("rl.{key} = {x}: must be finite and > 0");
            }
            Ok(())
        };
        finite_pos("temperature", self.temperature)?;
        finite_pos("dpo_beta", self.dpo_beta)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("rl.top_p = {}: must be in (0, 1]", self.top_p);
        }
        for (key, x) in [
            ("beta", self.beta),
            ("epsilon_low", self.epsilon_low),
            ("epsilon_high", self.epsilon_high),
        ] {
            if !(x.is_finite() && x >= 0.0) {
                bail!("rl.{key} = {x}: must be finite and ≥ 0");
            }
        }
        if self.epsilon_low >= 1.0 {
            bail!("rl.epsilon_low = {}: must be below 1", self.epsilon_low);
        }
        if self.mu == 0 || self.max_new_tokens == 0 {
            bail!("rl.mu and rl.max_new_tokens must be positive");
        }
        self.reward.validate("rl.reward")?;
        match method {
            Method::Grpo if self.group < 2 => bail!(
                "rl.group = {}: GRPO compares at least 2 replies per prompt",
                self.group
            ),
            Method::Grpo if self.max_batch < self.group => bail!(
                "rl.max_batch = {} is below rl.group = {}: one prompt's replies decode together",
                self.max_batch,
                self.group
            ),
            Method::Dpo if self.pairs.as_os_str().is_empty() => {
                bail!("train.method = \"dpo\" needs a pair file: set rl.pairs")
            }
            _ => Ok(()),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data: DataSection,
    pub synthetic: SyntheticSection,
    pub tokenizer: TokenizerSection,
    pub image: ImageSection,
    pub sample: SampleConfig,
    pub loader: LoaderConfig,
    pub model: ModelSection,
    pub train: TrainSection,
    pub rl: RlSection,
}

/// Parse a `--set` value: a TOML value when it parses as one, else a bare string.
fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Apply one `a.b.c=value` override to a TOML table.
/// A section an override creates (`model.lora.targets.vit=[1]` where the file has no
/// `model.lora`) starts from that section's default values — as if the key were absent — not from
/// the defaults of its type.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        bail!("override {spec:?} is not key=value");
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("override {spec:?} has an empty key part");
    }
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut default_at = Some(&defaults);
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let seed = default_at
            .and_then(|d| d.get(*p))
            .and_then(toml::Value::as_table);
        default_at = seed;
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(seed.cloned().unwrap_or_default()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("override {spec:?}: {p} is not a section"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), parse_value(raw.trim()));
    Ok(())
}

impl Config {
    /// Load `file` (or the embedded default when `None`) and apply overrides.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut table, origin) = match file {
            Some(p) => {
                let text = crate::io::read_capped(p, crate::io::MAX_CONFIG_BYTES)
                    .with_context(|| format!("reading config {}", p.display()))?;
                let t: toml::Table = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?;
                (t, p.display().to_string())
            }
            None => (
                toml::Table::new(),
                "the embedded default config".to_string(),
            ),
        };
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        // Round-trip through text so that errors point at the offending key.
        let text = toml::to_string(&table)?;
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            let with = if overrides.is_empty() {
                String::new()
            } else {
                format!(" with --set {}", overrides.join(" --set "))
            };
            anyhow::anyhow!("{origin}{with}: {e}")
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// How records load for this config: [`DataSection::load_options`] with the conversation
    /// history limit that `sample.max_source_length` sets.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            max_history_turns: Some(
                self.sample.max_source_length / crate::data::records::MIN_TOKENS_PER_TURN,
            ),
            ..self.data.load_options()
        }
    }

    /// Every numeric setting in its range, checked when a config loads — before anything is
    /// created or loaded.
    pub fn validate(&self) -> Result<()> {
        if self.image.size == 0 {
            bail!("image.size must be positive");
        }
        let probability = |key: &str, x: f64| -> Result<()> {
            if !(0.0..1.0).contains(&x) {
                bail!("{key} = {x}: a probability in [0, 1)");
            }
            Ok(())
        };
        let fraction = |key: &str, x: f64| -> Result<()> {
            if !(0.0..=1.0).contains(&x) {
                bail!("{key} = {x}: must be in [0, 1]");
            }
            Ok(())
        };
        let non_negative = |key: &str, x: f64| -> Result<()> {
            if !(x.is_finite() && x >= 0.0) {
                bail!("{key} = {x}: must be finite and ≥ 0");
            }
            Ok(())
        };
        let positive = |key: &str, x: f64| -> Result<()> {
            if !(x.is_finite() && x > 0.0) {
                bail!("{key} = {x}: must be finite and > 0");
            }
            Ok(())
        };
        let m = &self.model;
        probability("model.vision_dropout", m.vision_dropout)?;
        probability("model.glm_dropout", m.glm_dropout)?;
        m.lora.validate("model.lora")?;
        if self.synthetic.count > 0 && self.synthetic.size == 0 {
            bail!("synthetic.size must be positive");
        }
        if self.sample.max_source_length == 0 || self.sample.max_target_length == 0 {
            bail!("sample.max_source_length and sample.max_target_length must be positive");
        }
        let t = &self.train;
        fraction("train.warmup", t.warmup)?;
        fraction("train.min_lr_ratio", t.min_lr_ratio)?;
        fraction("train.auto_warmup_rate", t.auto_warmup_rate)?;
        non_negative("train.weight_decay", t.weight_decay)?;
        probability("train.beta1", t.beta1)?;
        probability("train.beta2", t.beta2)?;
        positive("train.eps", t.eps)?;
        non_negative("train.clip_grad", t.clip_grad)?;
        positive("train.min_loss_scale", t.min_loss_scale)?;
        if t.initial_scale_power > 64 {
            bail!(
                "train.initial_scale_power = {}: at most 64",
                t.initial_scale_power
            );
        }
        if t.loss_scale_window <= 0 || t.hysteresis <= 0 {
            bail!("train.loss_scale_window and train.hysteresis must be positive");
        }
        if t.stop_at < 0 || t.eval_generate_interval < 0 {
            bail!("train.stop_at and train.eval_generate_interval must be ≥ 0");
        }
        if t.dist_timeout_s == 0 {
            bail!("train.dist_timeout_s must be positive");
        }
        if self.loader.batch_size == 0 {
            bail!("loader.batch_size must be positive");
        }
        let t = &self.train;
        if t.lr <= 0.0 || !t.lr.is_finite() {
            bail!("train.lr must be positive, got {}", t.lr);
        }
        if t.train_iters <= 0 {
            bail!("train.train_iters must be positive");
        }
        if t.grad_accum <= 0 {
            bail!("train.grad_accum must be positive");
        }
        if !(0.0..1.0).contains(&t.val_fraction) {
            bail!("train.val_fraction must be in [0, 1)");
        }
        if let CheckpointLayers::Count(k) = t.checkpoint_layers {
            if k < -1 {
                bail!(
                    "train.checkpoint_layers {k}: use -1 (every layer), a layer count or \"auto\""
                );
            }
        }
        if !(t.memory_budget_gib.is_finite() && t.memory_budget_gib >= 0.0) {
            bail!(
                "train.memory_budget_gib = {}: GiB, or 0 for the device's free memory",
                t.memory_budget_gib
            );
        }
        if !(t.peak_tflops.is_finite() && t.peak_tflops >= 0.0) {
            bail!(
                "train.peak_tflops = {}: a device's peak TFLOP/s (0: measure it)",
                t.peak_tflops
            );
        }
        if t.log_interval <= 0 || t.save_interval <= 0 || t.eval_interval <= 0 {
            bail!("train.log_interval, save_interval and eval_interval must be positive");
        }
        if !t.init_from.as_os_str().is_empty() && !self.model.path.as_os_str().is_empty() {
            bail!(
                "train.init_from and model.path are both set: a run starts from one of them \
                 (init_from's checkpoint names its own base)"
            );
        }
        self.rl.validate(t.method)
    }

    /// The dropout probabilities training uses (vision side, ChatGLM): the model section's for
    /// fine-tuning; none for GRPO and DPO, which compare one policy's log-probs across forwards
    /// (sampling, reference, update) — TRL's `disable_dropout`.
    pub fn train_dropout(&self) -> (f64, f64) {
        match self.train.method {
            Method::Sft => (self.model.vision_dropout, self.model.glm_dropout),
            Method::Grpo | Method::Dpo => (0.0, 0.0),
        }
    }

    /// The config as TOML (saved beside outputs so a run can be rebuilt).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_layers_must_be_a_count_or_minus_one() {
        let ok = Config::load(None, &["train.checkpoint_layers=3".into()]).unwrap();
        assert_eq!(ok.train.checkpoint_layers, CheckpointLayers::Count(3));
        assert_eq!(
            Config::load(None, &[]).unwrap().train.checkpoint_layers,
            CheckpointLayers::Count(-1)
        );
        for auto in ["auto", "\"auto\""] {
            let c = Config::load(None, &[format!("train.checkpoint_layers={auto}")]).unwrap();
            assert_eq!(c.train.checkpoint_layers, CheckpointLayers::AUTO);
        }
        assert!(Config::load(None, &["train.checkpoint_layers=\"some\"".into()]).is_err());
        let e = Config::load(None, &["train.checkpoint_layers=-2".into()])
            .and_then(|c| c.validate())
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoint_layers"), "{e}");
    }

    /// `configs/xrayglm.toml` carries finetune_XrayGLM.sh's settings (docs/reference.md §5).
    #[test]
    fn xrayglm_config_is_the_reference_script() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/xrayglm.toml");
        let c = Config::load(Some(&path), &[]).unwrap();
        let t = &c.train;
        assert!(t.checkpoint_activations, "--checkpoint-activations");
        assert_eq!(t.train_iters, 300);
        assert_eq!(t.lr, 1e-4);
        assert_eq!(t.clip_grad, 0.1);
        assert_eq!(t.weight_decay, 0.01);
        assert_eq!(t.precision, crate::device::Dtype::Fp16);
        assert_eq!(c.loader.batch_size, 8);
        assert_eq!(c.sample.max_source_length, 64);
        assert_eq!(c.sample.max_target_length, 256);
        let lora = &c.model.lora;
        assert_eq!((lora.rank, &lora.layers[..]), (10, &[0, 14][..]));
    }

    /// Every shipped config loads and validates; the method configs name their method.
    #[test]
    fn every_shipped_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let c = Config::load(Some(&p), &[]).unwrap_or_else(|e| panic!("{e:#}"));
                let name = p.file_stem().unwrap().to_string_lossy().to_string();
                if name.ends_with("-grpo") {
                    assert_eq!(c.train.method, Method::Grpo, "{name}");
                } else if name.ends_with("-dpo") {
                    assert_eq!(c.train.method, Method::Dpo, "{name}");
                }
                n += 1;
            }
        }
        assert!(n >= 5, "{n} configs");
    }

    #[test]
    fn rl_settings_are_checked() {
        for (set, key) in [
            ("rl.group=1", "rl.group"),
            ("rl.temperature=0", "rl.temperature"),
            ("rl.top_p=1.5", "rl.top_p"),
            ("rl.mu=0", "rl.mu"),
            ("rl.max_batch=4", "rl.max_batch"),
            ("rl.reward.ce_f1=-1", "rl.reward.ce_f1"),
        ] {
            let e = Config::load(None, &["train.method=\"grpo\"".into(), set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{set}: {e}");
        }
        let e = Config::load(None, &["train.method=\"dpo\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rl.pairs"), "{e}");
        let e = Config::load(
            None,
            &["train.init_from=\"a\"".into(), "model.path=\"b\"".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("init_from") && e.contains("model.path"), "{e}");
        // For fine-tuning the [rl] sampling settings are not in play.
        assert!(Config::load(None, &["rl.group=1".into()]).is_ok());
    }

    #[test]
    fn overrides_parse_types_and_reject_unknown_keys() {
        let c = Config::load(
            None,
            &["loader.batch_size=3".into(), "data.prompt=random".into()],
        )
        .unwrap();
        assert_eq!(c.loader.batch_size, 3);
        assert_eq!(c.data.prompt, PromptMode::Random);
        let e = Config::load(None, &["loader.batchsize=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batchsize"), "{e}");
        let e = Config::load(None, &["nosuch.key=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nosuch"), "{e}");
    }

    #[test]
    fn default_round_trips() {
        let c = Config::default();
        let back: Config = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    /// The closed sets read and write the same TOML strings as before they were enums.
    #[test]
    fn enum_settings_keep_their_toml_strings() {
        use crate::device::{DeviceSpec, Dtype};
        let c = Config::load(
            None,
            &[
                "train.resume=\"runs/demo/600\"".into(),
                "model.device=\"cuda:1\"".into(),
                "model.dtype=\"bf16\"".into(),
                "train.backend=\"mpi\"".into(),
                "model.quantize=\"int8\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.resume, Resume::From("runs/demo/600".into()));
        assert_eq!(c.model.device, DeviceSpec::CudaIndex(1));
        assert_eq!(c.model.dtype, Dtype::Bf16);
        let text = c.to_toml().unwrap();
        for line in [
            "resume = \"runs/demo/600\"",
            "device = \"cuda:1\"",
            "dtype = \"bf16\"",
            "backend = \"mpi\"",
            "quantize = \"int8\"",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        for (set, want) in [
            ("train.resume=\"never\"", None),
            ("model.device=\"gpu\"", Some("auto, cpu, cuda, cuda:N")),
            ("train.backend=\"tcp\"", Some("single")),
        ] {
            let r = Config::load(None, &[set.into()]);
            match want {
                None => assert_eq!(r.unwrap().train.resume, Resume::Never),
                Some(w) => {
                    let e = format!("{:#}", r.unwrap_err());
                    assert!(e.contains(w), "{set}: {e}");
                }
            }
        }
    }
}
