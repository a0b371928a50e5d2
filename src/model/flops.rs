//! FLOPs of a LoRA training step as this code runs it, for MFU and HFU (PaLM, Chowdhery et al.
//! 2022, appendix B: model FLOPs utilization counts the FLOPs the model needs, hardware FLOPs
//! utilization adds what recomputation costs again). Matmuls only — 2 FLOPs per multiply-add;
//! norms, softmax, GELU, rotary and optimizer updates are left out (well under 1 % here).
//!
//! What is counted, per step of `rows × seq` tokens (dynamic padding: `seq` is the batch's own
//! longest row, and padded positions are computed like any other):
//! * ChatGLM layer forward: its four frozen linears (`4h² + 2h·f` weights: 2 FLOPs each per
//!   token) and the attention products `q·kᵀ` and `p·v` over the whole `seq × seq` (GLM's
//!   bidirectional context is masked, not skipped): `4·seq²·h` per row.
//! * Backward of the frozen weights: activation gradients only (frozen weights need no weight
//!   gradient) — one matmul per linear (2 FLOPs per weight per token) and four attention products
//!   (`8·seq²·h` per row) — in the layers the gradient passes through: none below the lowest
//!   adapted layer (with or without activation checkpointing), and in that layer only as far
//!   down as its earliest adapted linear.
//! * LoRA's own matmuls: `x·Aᵀ` and `·Bᵀ` per partition forward; their two weight gradients and
//!   the two input gradients (the last only where the gradient goes on below) backward.
//! * Recompute: the forward again (LoRA included) of every recomputed layer that has a backward
//!   — in HFU, not in MFU.
//! * `lm_head` at the target positions only (`target_loss`), forward and its input gradient.
//! * The vision side per film it encodes (none when the frozen-vision cache serves the film): the
//!   patch embedding, every ViT layer's linears and attention over its `1 + patches` tokens, the
//!   Q-Former's self- and cross-attention and MLPs over its queries, `glm_proj`. With adapters on
//!   the vision side its backward is counted as activation gradients through all of it (their own
//!   LoRA matmuls are not counted).
//!
//! The old figure, `6·N` per token with N every parameter of the model, is [`six_n`].

use serde::Serialize;

use super::config::ModelConfig;

/// One step's batch as the model computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShape {
    /// Rows (samples) in the step, over all micro-batches.
    pub rows: i64,
    /// Padded length of a row (with several micro-batches of different lengths, count each with
    /// its own shape and add).
    pub seq: i64,
    /// Positions whose next label is counted (the loss's tokens): `lm_head` runs on these only.
    pub targets: i64,
    /// Films encoded through the vision tower in the step (0 when all came from the cache).
    pub films: i64,
}

/// How the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepPlan {
    /// Activation checkpointing (`train.checkpoint_activations`).
    pub checkpointed: bool,
    /// With checkpointing, how many of the first ChatGLM layers are recomputed (the rest keep
    /// their activations).
    pub recompute_layers: usize,
}

/// A step's FLOPs by part.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct StepFlops {
    /// ChatGLM's frozen linears and attention products, forward.
    pub glm_forward: f64,
    /// Their activation gradients.
    pub glm_backward: f64,
    /// LoRA's matmuls, forward and backward.
    pub lora_forward: f64,
    pub lora_backward: f64,
    /// `lm_head` at the target positions, forward and input gradient.
    pub head: f64,
    /// ViT, Q-Former and `glm_proj`, forward (and backward with vision adapters).
    pub vision: f64,
    /// The forward again of the recomputed layers.
    pub recompute: f64,
}

impl StepFlops {
    /// Model FLOPs: what the step needs, without recomputation (MFU's numerator).
    pub fn model(&self) -> f64 {
        self.glm_forward
            + self.glm_backward
            + self.lora_forward
            + self.lora_backward
            + self.head
            + self.vision
    }

    /// Hardware FLOPs: with the recomputed forwards (HFU's numerator).
    pub fn hardware(&self) -> f64 {
        self.model() + self.recompute
    }

    /// The sum of two steps' (micro-batches of different shapes).
    pub fn add(&self, o: &StepFlops) -> StepFlops {
        StepFlops {
            glm_forward: self.glm_forward + o.glm_forward,
            glm_backward: self.glm_backward + o.glm_backward,
            lora_forward: self.lora_forward + o.lora_forward,
            lora_backward: self.lora_backward + o.lora_backward,
            head: self.head + o.head,
            vision: self.vision + o.vision,
            recompute: self.recompute + o.recompute,
        }
    }
}

/// `6·N` FLOPs per token, N every parameter of the model (ViT, Q-Former, ChatGLM with its
/// embeddings): the figure earlier GPU checks reported.
pub fn six_n(parameters: f64, tokens: f64) -> f64 {
    6.0 * parameters * tokens
}

#[cfg(flop_trace)]
extern "C" {
    fn xrayglm_flop_trace_start() -> i32;
    fn xrayglm_flop_trace_stop(calls: *mut i64) -> f64;
}

/// The matmul and convolution FLOPs libtorch runs while `f` runs, on any thread, from its own
/// operator record (`aten::mm`, `addmm`, `bmm`, `baddbmm`, `convolution`, by their input shapes;
/// src/model/flop_trace.cpp), and how many such calls there were. Every operator call pays for
/// the record while it counts: for tests and benchmarks, one count at a time per process.
pub fn trace<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, f64, u64)> {
    #[cfg(flop_trace)]
    {
        // SAFETY: plain C functions over the counter's own state, guarded by its mutex.
        if unsafe { xrayglm_flop_trace_start() } != 0 {
            anyhow::bail!("a FLOP count is already running in this process");
        }
        let out = f();
        let mut calls = 0i64;
        // SAFETY: `calls` is a valid i64 to write.
        let flops = unsafe { xrayglm_flop_trace_stop(&mut calls) };
        Ok((out, flops, calls.max(0) as u64))
    }
    #[cfg(not(flop_trace))]
    {
        let _ = f;
        anyhow::bail!("this build has no FLOP counter (libtorch's headers were not found)")
    }
}

/// The dense matmul throughput of `dev` at `kind`, TFLOP/s: `[m, k] × [k, n]` products repeated
/// (4096 × 4096 × 16,384 on CUDA; 1024 × 1024 × 4096 on the CPU), the best of the tries — the
/// denominator of MFU when no peak is given.
pub fn matmul_tflops(dev: tch::Device, kind: tch::Kind) -> f64 {
    use tch::Tensor;
    let (m, k, n, tries) = if dev.is_cuda() {
        (4096, 4096, 16384, 10)
    } else {
        (1024, 1024, 4096, 3)
    };
    let a = Tensor::randn([m, k], (kind, dev));
    let b = Tensor::randn([k, n], (kind, dev));
    let sync = || {
        if let tch::Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let _ = a.matmul(&b);
    sync();
    let mut best = f64::MAX;
    for _ in 0..tries {
        let t = std::time::Instant::now();
        let _ = a.matmul(&b);
        sync();
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best.max(1e-12) / 1e12
}

/// One adapted linear: `in → out` in `parts` output partitions of rank `rank` each.
#[derive(Debug, Clone, Copy)]
struct Adapter {
    input: f64,
    output: f64,
    parts: f64,
    rank: f64,
}

impl Adapter {
    /// Forward FLOPs per token: `x·Aᵀ` (`in → parts·r`) and each partition's `·Bᵀ` (`r → out/parts`).
    fn forward(&self) -> f64 {
        2.0 * (self.input * self.parts * self.rank + self.rank * self.output)
    }

    /// Backward FLOPs per token: the gradients of B and of `x·Aᵀ`, of A, and (when the gradient
    /// goes on below) of x through A.
    fn backward(&self, input_grad: bool) -> f64 {
        let through_b = 2.0 * 2.0 * self.rank * self.output;
        let a = 2.0 * self.input * self.parts * self.rank;
        through_b + a + if input_grad { a } else { 0.0 }
    }
}

/// The FLOPs of one training step of `cfg` (its LoRA) on `shape`, run as `plan` says.
pub fn training_step(cfg: &ModelConfig, shape: &StepShape, plan: &StepPlan) -> StepFlops {
    let s = &cfg.sat;
    let (h, f, layers) = (
        s.hidden_size as f64,
        cfg.inner_hidden_size() as f64,
        s.num_layers as usize,
    );
    let (rows, seq) = (shape.rows as f64, shape.seq as f64);
    let tokens = rows * seq;
    let lora = cfg.lora.as_ref();
    let vision_grad = lora.is_some_and(|l| l.targets.vision());
    // The four linears of a layer in the order the forward runs them, and their adapters.
    let widths = [(h, 3.0 * h), (h, h), (h, f), (f, h)];
    let adapters = |i: i64| -> [Option<Adapter>; 4] {
        let Some(l) = lora else {
            return [None; 4];
        };
        let (att, mlp) = (l.layers.contains(&i), l.mlp_layers().contains(&i));
        let rank = l.rank as f64;
        let mk = |k: usize, on: bool, parts: f64| {
            on.then_some(Adapter {
                input: widths[k].0,
                output: widths[k].1,
                parts,
                rank,
            })
        };
        [
            mk(0, att, 3.0),
            mk(1, att, 1.0),
            mk(2, mlp, 1.0),
            mk(3, mlp, 1.0),
        ]
    };
    let linear_weights = |k: usize| widths[k].0 * widths[k].1;
    let layer_weights: f64 = (0..4).map(linear_weights).sum();
    let attention_forward = 4.0 * rows * seq * seq * h;
    let mut out = StepFlops::default();
    let mut below_adapted = false;
    for i in 0..layers {
        let ad = adapters(i as i64);
        let lora_fwd: f64 = ad.iter().flatten().map(|a| a.forward()).sum::<f64>() * tokens;
        let fwd = 2.0 * layer_weights * tokens + attention_forward;
        out.glm_forward += fwd;
        out.lora_forward += lora_fwd;
        // Does this layer's input ask for a gradient?
        let input_grad = vision_grad || below_adapted;
        let earliest = ad.iter().position(Option::is_some);
        below_adapted |= earliest.is_some();
        if plan.checkpointed && i < plan.recompute_layers && (input_grad || earliest.is_some()) {
            out.recompute += fwd + lora_fwd;
        }
        // The linears whose input gradient runs, and whether the attention backward runs: all of
        // them when the gradient goes on below, else those above the earliest adapted linear.
        let (from, attention) = match (input_grad, earliest) {
            (true, _) => (0, true),
            (false, Some(e)) => (e + 1, e == 0),
            (false, None) => continue,
        };
        out.glm_backward += (from..4).map(linear_weights).sum::<f64>() * 2.0 * tokens;
        if attention {
            out.glm_backward += 2.0 * attention_forward;
        }
        for (k, a) in ad.iter().enumerate() {
            if let Some(a) = a {
                out.lora_backward += a.backward(k >= from) * tokens;
            }
        }
    }
    // lm_head at the targets: forward and the gradient of its input.
    out.head = 2.0 * 2.0 * shape.targets as f64 * h * s.vocab_size as f64;
    let per_film = vision_forward(cfg);
    // Activation gradients through everything: one matmul per linear, two per attention product.
    let backward = if vision_grad {
        per_film.0 + 2.0 * per_film.1
    } else {
        0.0
    };
    out.vision = shape.films as f64 * (per_film.0 + per_film.1 + backward);
    out
}

/// The vision side's forward FLOPs per film: (linears and the patch embedding, attention
/// products).
fn vision_forward(cfg: &ModelConfig) -> (f64, f64) {
    let v = &cfg.sat.eva_args;
    let q = &cfg.sat.qformer_args;
    let (hv, fv) = (v.hidden_size as f64, v.inner_hidden_size as f64);
    let grid = (v.image_size[0] / v.patch_size) * (v.image_size[1] / v.patch_size);
    let tv = (v.pre_len + grid + v.post_len) as f64;
    let patch = 2.0 * grid as f64 * (v.in_channels * v.patch_size * v.patch_size) as f64 * hv;
    let vit_linears = v.num_layers as f64 * 2.0 * tv * (4.0 * hv * hv + 2.0 * hv * fv);
    let vit_attention = v.num_layers as f64 * 4.0 * tv * tv * hv;
    let (hq, nq) = (q.hidden_size as f64, q.vocab_size as f64);
    let fq = q.inner_hidden_size.unwrap_or(4 * q.hidden_size) as f64;
    let cross_in = q.cross_attn_hidden_size as f64;
    let mut q_linears = 0.0;
    let mut q_attention = 0.0;
    for l in 0..q.num_layers as usize {
        q_linears += 2.0 * nq * (4.0 * hq * hq + 2.0 * hq * fq);
        q_attention += 4.0 * nq * nq * hq;
        if q.is_decoder.get(l).copied().unwrap_or(false) {
            // query and dense on the queries, key_value on the ViT's tokens.
            q_linears += 2.0 * nq * 2.0 * hq * hq + 2.0 * tv * cross_in * 2.0 * hq;
            q_attention += 4.0 * nq * tv * hq;
        }
    }
    let proj = 2.0 * nq * hq * cfg.sat.hidden_size as f64;
    (
        patch + vit_linears + q_linears + proj,
        vit_attention + q_attention,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-layer ChatGLM with attention LoRA on layer 1 only, counted by hand.
    #[test]
    fn chatglm_counts_follow_the_hand_count() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        let (h, f, v) = (
            cfg.sat.hidden_size as f64,
            cfg.inner_hidden_size() as f64,
            cfg.sat.vocab_size as f64,
        );
        let layers = cfg.sat.num_layers as f64;
        let l = cfg.lora.as_mut().unwrap();
        l.layers = vec![1];
        l.mlp = false;
        l.targets = Default::default();
        let r = l.rank as f64;
        let shape = StepShape {
            rows: 3,
            seq: 50,
            targets: 40,
            films: 0,
        };
        let (t, s) = (150.0, 50.0);
        let got = training_step(&cfg, &shape, &StepPlan::default());
        let w = 4.0 * h * h + 2.0 * h * f;
        assert_eq!(
            got.glm_forward,
            layers * (2.0 * w * t + 4.0 * 3.0 * s * s * h)
        );
        // Backward in layers ≥ 1: the layer-1 block is the lowest adapted, its earliest adapted
        // linear is qkv: dense and both MLP linears give input gradients, the attention runs
        // backward, the qkv's own input gradient does not; layers above run whole.
        let above = layers - 2.0;
        let first = 2.0 * (h * h + 2.0 * h * f) * t + 8.0 * 3.0 * s * s * h;
        let whole = 2.0 * w * t + 8.0 * 3.0 * s * s * h;
        assert_eq!(got.glm_backward, first + above * whole);
        // LoRA: qkv (3 partitions) and dense on layer 1.
        let qkv_fwd = 2.0 * (h * 3.0 * r + r * 3.0 * h);
        let dense_fwd = 2.0 * (h * r + r * h);
        assert_eq!(got.lora_forward, (qkv_fwd + dense_fwd) * t);
        let qkv_bwd = 4.0 * r * 3.0 * h + 2.0 * h * 3.0 * r; // no input gradient below
        let dense_bwd = 2.0 * dense_fwd; // its input gradient goes on to the attention
        assert_eq!(got.lora_backward, (qkv_bwd + dense_bwd) * t);
        assert_eq!(got.head, 4.0 * 40.0 * h * v);
        assert_eq!((got.recompute, got.vision), (0.0, 0.0));
        // Checkpointing every layer: the same backward; the forward runs again in the layers
        // that have one (not in layer 0, below the adapters).
        let plan = StepPlan {
            checkpointed: true,
            recompute_layers: cfg.sat.num_layers as usize,
        };
        let ck = training_step(&cfg, &shape, &plan);
        assert_eq!(
            (ck.glm_backward, ck.lora_backward),
            (got.glm_backward, got.lora_backward)
        );
        let per_layer = 2.0 * w * t + 4.0 * 3.0 * s * s * h;
        assert_eq!(
            ck.recompute,
            (layers - 1.0) * per_layer + (qkv_fwd + dense_fwd) * t
        );
        assert_eq!(ck.model(), got.model());
        assert_eq!(ck.hardware(), got.model() + ck.recompute);
    }

    /// The vision side on the tiny preset, counted by hand from its dimensions.
    #[test]
    fn vision_counts_follow_the_hand_count() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let v = &cfg.sat.eva_args;
        let q = &cfg.sat.qformer_args;
        let grid = ((v.image_size[0] / v.patch_size) * (v.image_size[1] / v.patch_size)) as f64;
        let tv = grid + v.pre_len as f64 + v.post_len as f64;
        let (hv, fv) = (v.hidden_size as f64, v.inner_hidden_size as f64);
        let vit = 2.0 * grid * 3.0 * (v.patch_size * v.patch_size) as f64 * hv
            + v.num_layers as f64
                * (2.0 * tv * (3.0 * hv * hv + hv * hv + 2.0 * hv * fv) + 4.0 * tv * tv * hv);
        let (hq, nq) = (q.hidden_size as f64, q.vocab_size as f64);
        let fq = q.inner_hidden_size.unwrap_or(4 * q.hidden_size) as f64;
        let cross = q.is_decoder.iter().filter(|&&d| d).count() as f64;
        let qf = q.num_layers as f64
            * (2.0 * nq * (4.0 * hq * hq + 2.0 * hq * fq) + 4.0 * nq * nq * hq)
            + cross
                * (2.0 * nq * 2.0 * hq * hq
                    + 2.0 * tv * q.cross_attn_hidden_size as f64 * 2.0 * hq
                    + 4.0 * nq * tv * hq);
        let proj = 2.0 * nq * hq * cfg.sat.hidden_size as f64;
        let shape = StepShape {
            rows: 2,
            seq: 40,
            targets: 10,
            films: 2,
        };
        let got = training_step(&cfg, &shape, &StepPlan::default());
        let want = 2.0 * (vit + qf + proj);
        assert!(
            (got.vision - want).abs() <= 1e-9 * want,
            "{} vs {want}",
            got.vision
        );
        // The cache serving the films: no vision FLOPs.
        let cached = training_step(&cfg, &StepShape { films: 0, ..shape }, &StepPlan::default());
        assert_eq!(cached.vision, 0.0);
    }
}
