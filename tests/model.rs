//! VisualGLM parity with the original implementation (SwissArmyTransformer 0.3.6, fixtures from
//! scripts/make_model_fixtures.py), fp32 on CPU. Tolerances (relative to the largest reference
//! magnitude): ViT / Q-Former / image embeddings / logits ≤ 1e-4, loss ≤ 1e-5, LoRA gradients ≤ 1e-4.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use xrayglm::model::config::{ModelConfig, QkvLayout};
use xrayglm::model::visualglm::{lm_loss, VisualGlm};
use xrayglm::weights::{canonical_name, load_into, read_safetensors, Require};

fn dir(name: &str) -> PathBuf {
    common::fixture("model").join(name)
}

fn map(path: PathBuf) -> HashMap<String, Tensor> {
    read_safetensors(&path).unwrap().into_iter().collect()
}

fn build(name: &str, layout: QkvLayout, weights: Vec<(String, Tensor)>) -> VisualGlm {
    let weights = weights.into_iter().map(Ok);
    let cfg = ModelConfig::from_sat_file(&dir(name).join("model_config.json")).unwrap();
    let mut m = VisualGlm::new(cfg, Device::Cpu, Kind::Float).unwrap();
    load_into(&mut m, weights, layout, Require::All, name).unwrap();
    m
}

/// Every LoRA gradient the fixture holds (`grad.<sat name>`) is within 1e-4 of the model's;
/// returns how many there were.
fn assert_reference_grads(m: &VisualGlm, want: &HashMap<String, Tensor>, what: &str) -> usize {
    let lora = m.lora.variables();
    let mut n = 0;
    for (k, g) in want {
        let Some(param) = k.strip_prefix("grad.") else {
            continue;
        };
        let canon = canonical_name(param).unwrap();
        let ours = lora
            .get(&canon)
            .unwrap_or_else(|| panic!("{what}: no LoRA parameter {canon}"))
            .grad();
        let e = common::rel_err(&ours, g);
        eprintln!("{what} grad {param}: relative error {e:.2e}");
        assert!(e <= 1e-4, "{what} grad {param}: relative error {e:.3e}");
        n += 1;
    }
    n
}

fn check(name: &str) {
    let inputs = map(dir(name).join("inputs.safetensors"));
    let want = map(dir(name).join("outputs.safetensors"));
    let m = build(
        name,
        QkvLayout::Interleaved,
        read_safetensors(&dir(name).join("weights.safetensors")).unwrap(),
    );
    let ids = &inputs["input_ids"];
    let pre = inputs["pre_image"].int64_value(&[0]);
    let out = m
        .forward(ids, Some(&inputs["image"]), pre, None, None, false)
        .unwrap();
    for (what, got, tol) in [
        ("vit", out.vit.as_ref().unwrap(), 1e-4),
        ("qformer", out.qformer.as_ref().unwrap(), 1e-4),
        ("image_embeds", out.image_embeds.as_ref().unwrap(), 1e-4),
        ("logits", &out.logits, 1e-4),
    ] {
        let e = common::rel_err(got, &want[what]);
        eprintln!("{name} {what}: relative error {e:.2e}");
        assert!(e <= tol, "{name} {what}: relative error {e:.3e} > {tol:e}");
    }
    let loss = lm_loss(&out.logits, &inputs["labels"]);
    let e = common::rel_err(&loss.reshape([1]), &want["loss"]);
    eprintln!("{name} loss: relative error {e:.2e}");
    assert!(
        e <= 1e-5,
        "{name} loss {} vs {}: {e:.3e}",
        loss.double_value(&[]),
        want["loss"].double_value(&[0])
    );
    loss.backward();
    let n = assert_reference_grads(&m, &want, name);
    assert_eq!(
        n,
        m.lora.variables().len(),
        "{name}: every LoRA parameter has a reference gradient"
    );
    assert!(n > 0);
}

#[test]
fn config_a_matches_sat() {
    check("a");
}

#[test]
fn config_b_matches_sat() {
    check("b");
}

/// Interleaved `[q_h k_h v_h]` rows → `[Q | K | V]` blocks (what sat ≥ 0.4 stores).
fn to_blocks(t: &Tensor, heads: i64) -> Tensor {
    let rows = t.size()[0];
    let hd = rows / 3 / heads;
    let rest: Vec<i64> = t.size()[1..].to_vec();
    let mut shape = vec![heads, 3, hd];
    shape.extend(&rest);
    let mut perm = vec![1i64, 0, 2];
    perm.extend((3..3 + rest.len() as i64).collect::<Vec<_>>());
    let mut out = vec![rows];
    out.extend(&rest);
    t.view(shape.as_slice())
        .permute(perm.as_slice())
        .reshape(out.as_slice())
}

#[test]
fn both_qkv_layouts_give_identical_logits() {
    let name = "a";
    let inputs = map(dir(name).join("inputs.safetensors"));
    let weights = read_safetensors(&dir(name).join("weights.safetensors")).unwrap();
    let heads = ModelConfig::from_sat_file(&dir(name).join("model_config.json"))
        .unwrap()
        .sat
        .num_attention_heads;
    let blocks = |weights: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        weights
            .iter()
            .map(|(k, v)| {
                let glm_qkv = k.starts_with("transformer.layers.")
                    && k.contains("attention.query_key_value")
                    && !k.contains("matrix_");
                (
                    k.clone(),
                    if glm_qkv {
                        to_blocks(v, heads)
                    } else {
                        v.shallow_clone()
                    },
                )
            })
            .collect()
    };
    let b = build(name, QkvLayout::Blocks, blocks(&weights));
    let blocks = blocks(&weights);
    let a = build(name, QkvLayout::Interleaved, weights);
    let la = common::run_inputs(&a, &inputs).logits;
    let lb = common::run_inputs(&b, &inputs).logits;
    assert!(la.equal(&lb));
    // The layout matters: block weights read as interleaved are a different model.
    let wrong = build(name, QkvLayout::Interleaved, blocks);
    let lw = common::run_inputs(&wrong, &inputs).logits;
    assert!(common::rel_err(&lw, &la) > 1e-2);
}

#[test]
fn merged_lora_gives_the_same_logits_and_unmerges() {
    let name = "b";
    let inputs = map(dir(name).join("inputs.safetensors"));
    let mut m = build(
        name,
        QkvLayout::Interleaved,
        read_safetensors(&dir(name).join("weights.safetensors")).unwrap(),
    );
    let run = |m: &VisualGlm| common::run_inputs(m, &inputs).logits;
    let before = run(&m);
    let w0 = m.base.variables()["transformer.layers.1.attention.query_key_value.weight"].copy();
    m.merge_lora().unwrap();
    let merged = run(&m);
    assert!(
        common::rel_err(&merged, &before) <= 1e-5,
        "{}",
        common::rel_err(&merged, &before)
    );
    assert!(
        !m.base.variables()["transformer.layers.1.attention.query_key_value.weight"].equal(&w0)
    );
    m.unmerge_lora().unwrap();
    let w1 = &m.base.variables()["transformer.layers.1.attention.query_key_value.weight"];
    assert!(common::rel_err(w1, &w0) <= 1e-6);
    assert!(common::rel_err(&run(&m), &before) <= 1e-5);
}

#[test]
fn load_errors_list_tensors_by_name() {
    let name = "a";
    let mut weights = read_safetensors(&dir(name).join("weights.safetensors")).unwrap();
    weights.retain(|(k, _)| k != "transformer.final_layernorm.bias");
    weights.push((
        "transformer.bogus.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    for (k, v) in weights.iter_mut() {
        if k == "mixins.eva.model.glm_proj.bias" {
            *v = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        }
    }
    let cfg = ModelConfig::from_sat_file(&dir(name).join("model_config.json")).unwrap();
    let mut m = VisualGlm::new(cfg, Device::Cpu, Kind::Float).unwrap();
    let err = load_into(
        &mut m,
        weights.into_iter().map(Ok),
        QkvLayout::Interleaved,
        Require::All,
        "fixture a",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing: transformer.final_layernorm.bias"),
        "{err}"
    );
    assert!(
        err.contains("unexpected: transformer.bogus.weight"),
        "{err}"
    );
    assert!(
        err.contains("wrong shape: mixins.eva.model.glm_proj.bias"),
        "{err}"
    );
}

#[test]
fn tiny_preset_builds_in_milliseconds() {
    let t = std::time::Instant::now();
    let m = VisualGlm::new(
        ModelConfig::preset("tiny").unwrap(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let ms = t.elapsed().as_millis();
    assert!(!m.lora.variables().is_empty());
    assert!(ms < 2000, "tiny preset took {ms} ms to build");
}

#[test]
fn fused_attention_matches_the_reference_too() {
    for name in ["a", "b"] {
        let inputs = map(dir(name).join("inputs.safetensors"));
        let want = map(dir(name).join("outputs.safetensors"));
        let mut m = build(
            name,
            QkvLayout::Interleaved,
            read_safetensors(&dir(name).join("weights.safetensors")).unwrap(),
        );
        m.set_fused_attention(true);
        let out = common::run_inputs(&m, &inputs);
        let e = common::rel_err(&out.logits, &want["logits"]);
        assert!(e <= 1e-4, "{name} fused logits: {e:.3e}");
        let loss = lm_loss(&out.logits, &inputs["labels"]);
        loss.backward();
        assert_reference_grads(&m, &want, &format!("{name} fused"));
    }
}

#[test]
fn bf16_weights_run_close_to_fp32() {
    let name = "b";
    let inputs = map(dir(name).join("inputs.safetensors"));
    let want = map(dir(name).join("outputs.safetensors"));
    let cfg = ModelConfig::from_sat_file(&dir(name).join("model_config.json")).unwrap();
    let mut m = VisualGlm::new(cfg, Device::Cpu, Kind::BFloat16).unwrap();
    let weights = read_safetensors(&dir(name).join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .map(Ok);
    load_into(&mut m, weights, QkvLayout::Interleaved, Require::All, name).unwrap();
    assert!(m
        .lora
        .variables()
        .values()
        .all(|t| t.kind() == Kind::Float && t.requires_grad()));
    assert!(m
        .base
        .variables()
        .values()
        .all(|t| t.kind() == Kind::BFloat16 && !t.requires_grad()));
    let out = common::run_inputs(&m, &inputs);
    assert_eq!(out.logits.kind(), Kind::BFloat16);
    let e = common::rel_err(&out.logits, &want["logits"]);
    assert!(e < 5e-2, "bf16 logits relative error {e:.3e}");
    // Gradients still reach the fp32 LoRA masters.
    lm_loss(&out.logits, &inputs["labels"]).backward();
    assert!(m
        .lora
        .variables()
        .values()
        .all(|t| t.grad().defined() && t.grad().kind() == Kind::Float));
}

#[test]
fn mlp_lora_targets_merge_exactly() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.lora.as_mut().unwrap().mlp = true;
    tch::manual_seed(3);
    let mut m = VisualGlm::new(cfg.clone(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(m.lora.variables().len(), 2 * (6 + 2 + 2 + 2));
    tch::no_grad(|| {
        for (k, mut v) in m.lora.variables() {
            if k.contains("matrix_B") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let (ids, image) = xrayglm::bench::model_inputs(&cfg, 2, 60, Device::Cpu);
    let run = |m: &VisualGlm| {
        m.forward(&ids, Some(&image), 3, None, None, false)
            .unwrap()
            .logits
    };
    let before = run(&m);
    m.set_fused_attention(true);
    let fused = run(&m);
    m.set_fused_attention(false);
    m.merge_lora().unwrap();
    let merged = run(&m);
    assert!(
        common::rel_err(&merged, &before) <= 1e-5,
        "{}",
        common::rel_err(&merged, &before)
    );
    assert!(
        common::rel_err(&fused, &before) <= 1e-5,
        "{}",
        common::rel_err(&fused, &before)
    );
}

/// The tiny preset with random adapters and `rows` bench inputs of `len` tokens, labelled from
/// the first reply token on with `hole.1` ignored labels at `hole.0`.
struct LabelCase {
    m: VisualGlm,
    ids: Tensor,
    image: Tensor,
    pos: Tensor,
    ctx: Vec<i64>,
    labels: Tensor,
}

impl LabelCase {
    fn new(seed: i64, rows: i64, len: i64, hole: (i64, i64)) -> Self {
        let cfg = ModelConfig::preset("tiny").unwrap();
        tch::manual_seed(seed);
        let m = VisualGlm::new(cfg.clone(), Device::Cpu, Kind::Float).unwrap();
        common::randomize_lora_b(&m, 0.05);
        let (ids, image) = xrayglm::bench::model_inputs(&cfg, rows, len, Device::Cpu);
        let (pos, ctx) =
            xrayglm::model::positions::positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
        let labels = ids.copy();
        let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
        let _ = labels.narrow(1, hole.0, hole.1).fill_(-100);
        Self {
            m,
            ids,
            image,
            pos,
            ctx,
            labels,
        }
    }

    fn inputs(&self) -> xrayglm::model::visualglm::BatchInputs<'_> {
        xrayglm::model::visualglm::BatchInputs {
            input_ids: &self.ids,
            images: xrayglm::model::visualglm::Images::Pixels(&self.image),
            image_at: xrayglm::model::chatglm::ImageAt::EachRow(3),
            position_ids: &self.pos,
            context_lengths: &self.ctx,
            labels: &self.labels,
        }
    }

    /// The full logits `[B, T, vocab]` of the reference's forward.
    fn logits(&self, train: bool) -> Tensor {
        let (ids, pos, ctx) = (&self.ids, &self.pos, &self.ctx);
        self.m
            .forward(ids, Some(&self.image), 3, Some(pos), Some(ctx), train)
            .unwrap()
            .logits
    }
}

/// The training loss applies `lm_head` at the target positions only; it equals the reference's
/// full-logits loss, and so do the LoRA gradients (labels with −100 holes inside the target too).
/// The per-token label log-probs (what GRPO and DPO take) are the full logits' log-softmax at each
/// label, and their masked mean gives the same loss and gradients.
#[test]
fn target_only_loss_equals_the_full_logits_loss() {
    let case = LabelCase::new(11, 2, 64, (60, 4));
    let (m, labels, inputs) = (&case.m, &case.labels, case.inputs());
    // 0: the reference's loss on full logits; 1: the target-only loss; 2: the masked mean of the
    // per-token label log-probs, negated.
    let grads = |way: usize| {
        common::lora_grads(m, || match way {
            0 => lm_loss(&case.logits(true), labels),
            1 => m.loss(&inputs, true),
            _ => {
                let l = m.label_logps(&inputs, true, 1.0, false);
                -(l.logps * &l.mask).sum(Kind::Float) / l.mask.sum(Kind::Float)
            }
        })
    };
    let (full, g_full) = grads(0);
    for way in [1, 2] {
        let (fast, g_fast) = grads(way);
        assert!(full > 1.0, "loss {full}");
        assert!(
            ((fast - full) / full).abs() <= 1e-6,
            "{way}: {fast} vs {full}"
        );
        for (a, b) in g_full.iter().zip(&g_fast) {
            assert!(a.abs().max().double_value(&[]) > 0.0);
            let e = common::rel_err(b, a);
            assert!(e <= 1e-5, "{way}: gradient relative error {e:.3e}");
        }
    }
    // Each token's log-prob is the full logits' log-softmax at its label, at the sampling
    // temperature, and its entropy that distribution's; ignored labels are 0.
    let logits = tch::no_grad(|| case.logits(false));
    let s = logits.size()[1];
    for temperature in [1.0, 0.7] {
        let l = tch::no_grad(|| m.label_logps(&inputs, false, temperature, true));
        let all = (logits.narrow(1, 0, s - 1) / temperature).log_softmax(-1, Kind::Float);
        let want = all
            .gather(
                2,
                &labels.narrow(1, 1, s - 1).clamp_min(0).unsqueeze(2),
                false,
            )
            .squeeze_dim(2)
            * &l.mask;
        assert_eq!(
            l.mask.sum(Kind::Float).int64_value(&[]),
            2 * (64 - case.ctx[0] - 1 - 4)
        );
        let e = common::rel_err(&l.logps, &want);
        assert!(e <= 1e-5, "per-token log-probs at {temperature}: {e:.3e}");
        let entropy = -(all.exp() * &all).sum_dim_intlist(-1, false, Kind::Float) * &l.mask;
        let e = common::rel_err(l.entropy.as_ref().unwrap(), &entropy);
        assert!(e <= 1e-5, "entropies at {temperature}: {e:.3e}");
    }
}

/// The per-token label log-probs are computed in chunks of rows with their gradient carried as a
/// slope (no vocabulary-wide graph): over more rows than one chunk holds, a policy-gradient-like
/// weighted sum of them at temperatures 1 and 0.7 has the same value and LoRA gradients as the
/// same sum over the full logits' log-softmax with autograd through it.
#[test]
fn chunked_label_logps_have_the_full_logits_gradients() {
    // 16 rows of 96 with their targets after the 51-token prompt: ~700 counted labels, more than
    // the 514 rows of ChatGLM's vocabulary in one chunk.
    let case = LabelCase::new(12, 16, 96, (70, 3));
    let (m, labels, inputs) = (&case.m, &case.labels, case.inputs());
    let s = case.ids.size()[1];
    let counted = labels.narrow(1, 1, s - 1).ne(-100);
    assert!(
        counted.sum(Kind::Int64).int64_value(&[]) > 514,
        "the check must span two chunks"
    );
    // Per-token weights of both signs, like advantages, with a sum well away from 0.
    let weights = (Tensor::arange(16 * (s - 1), (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .view([16, s - 1])
        + 0.5;
    for temperature in [1.0, 0.7] {
        let grads = |full: bool| {
            common::lora_grads(m, || {
                let logps = if full {
                    (case.logits(false).narrow(1, 0, s - 1) / temperature)
                        .log_softmax(-1, Kind::Float)
                        .gather(
                            2,
                            &labels.narrow(1, 1, s - 1).clamp_min(0).unsqueeze(2),
                            false,
                        )
                        .squeeze_dim(2)
                } else {
                    m.label_logps(&inputs, false, temperature, false).logps
                };
                (logps * &weights * counted.to_kind(Kind::Float)).sum(Kind::Float)
            })
        };
        let (want, g_want) = grads(true);
        let (got, g_got) = grads(false);
        assert!(
            ((got - want) / want).abs() <= 1e-6,
            "{temperature}: {got} vs {want}"
        );
        for (a, b) in g_want.iter().zip(&g_got) {
            assert!(a.abs().max().double_value(&[]) > 0.0);
            let e = common::rel_err(b, a);
            assert!(e <= 1e-5, "{temperature}: gradient relative error {e:.3e}");
        }
    }
}

/// Weight-only int8 (`--quant 8`, `model.quantize = "int8"`) on the sat-checked model a: logits
/// within 2 % (relative to their range) of fp32, the four layer linears held as int8 with their
/// float storage released, LoRA gradients still flowing, and merge / save refused.
#[test]
fn int8_layer_weights_stay_close_and_still_train() {
    let name = "a";
    let inputs = map(dir(name).join("inputs.safetensors"));
    let weights = || read_safetensors(&dir(name).join("weights.safetensors")).unwrap();
    let full = build(name, QkvLayout::Interleaved, weights());
    let mut q = build(name, QkvLayout::Interleaved, weights());
    q.quantize_int8();
    assert!(q.chatglm.is_quantized());
    let vars = q.base.variables();
    let w = &vars["transformer.layers.0.attention.query_key_value.weight"];
    assert_eq!(w.numel(), 0, "the float weight is released");
    let ids = &inputs["input_ids"];
    let pre = inputs["pre_image"].int64_value(&[0]);
    let run = |m: &VisualGlm| {
        m.forward(ids, Some(&inputs["image"]), pre, None, None, false)
            .unwrap()
            .logits
    };
    let (a, b) = (tch::no_grad(|| run(&full)), run(&q));
    let e = common::rel_err(&b, &a);
    eprintln!("int8 logits: relative error {e:.2e}");
    assert!(e > 0.0 && e < 2e-2, "relative error {e}");
    let loss = lm_loss(&b, &inputs["labels"]);
    loss.backward();
    let grads: f64 = q
        .lora
        .variables()
        .values()
        .map(|v| v.grad().abs().sum(Kind::Double).double_value(&[]))
        .sum();
    assert!(grads > 0.0, "LoRA gradients through int8 layers");
    let err = q.merge_lora().unwrap_err().to_string();
    assert!(err.contains("int8"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let err = xrayglm::weights::source::save_xrayglm(&q, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("int8"), "{err}");
}

/// NF4 (`--quant 4`, `model.quantize = "nf4"`, QLoRA's 4-bit base) on the sat-checked model a:
/// the four layer linears held as NF4 with their float storage released, logits within 10 % of
/// fp32 (relative to their range; measured 7.6e-2, against 5.6e-3 for int8 on the same model),
/// LoRA gradients flowing through the dequantized weights, merge refused.
#[test]
fn nf4_layer_weights_stay_close_and_still_train() {
    let name = "a";
    let inputs = map(dir(name).join("inputs.safetensors"));
    let weights = || read_safetensors(&dir(name).join("weights.safetensors")).unwrap();
    let full = build(name, QkvLayout::Interleaved, weights());
    let mut q8 = build(name, QkvLayout::Interleaved, weights());
    q8.quantize_int8();
    let mut q = build(name, QkvLayout::Interleaved, weights());
    q.quantize_nf4(true).unwrap();
    assert!(q.chatglm.is_quantized());
    let vars = q.base.variables();
    let w = &vars["transformer.layers.0.attention.query_key_value.weight"];
    assert_eq!(w.numel(), 0, "the float weight is released");
    let ids = &inputs["input_ids"];
    let pre = inputs["pre_image"].int64_value(&[0]);
    let run = |m: &VisualGlm| {
        m.forward(ids, Some(&inputs["image"]), pre, None, None, false)
            .unwrap()
            .logits
    };
    let a = tch::no_grad(|| run(&full));
    let e8 = common::rel_err(&tch::no_grad(|| run(&q8)), &a);
    let b = run(&q);
    let e = common::rel_err(&b, &a);
    eprintln!("logits relative error: nf4 {e:.2e}, int8 {e8:.2e}");
    assert!(
        e > e8 && e < NF4_LOGITS_ERR,
        "relative error {e} (int8 {e8})"
    );
    let loss = lm_loss(&b, &inputs["labels"]);
    loss.backward();
    let grads: f64 = q
        .lora
        .variables()
        .values()
        .map(|v| v.grad().abs().sum(Kind::Double).double_value(&[]))
        .sum();
    assert!(grads > 0.0, "LoRA gradients through NF4 layers");
    let err = q.merge_lora().unwrap_err().to_string();
    assert!(err.contains("nf4"), "{err}");
}

const NF4_LOGITS_ERR: f64 = 0.1;

/// Every kernel choice `xrayglm bench layer` times computes the reference's function: logits and
/// LoRA gradients within the parity tolerances of the sat fixtures (1e-4), and the two rotary
/// paths bit for bit the same.
#[test]
fn kernel_variants_match_the_reference() {
    use xrayglm::model::chatglm::Kernels;
    for name in ["a", "b"] {
        let inputs = map(dir(name).join("inputs.safetensors"));
        let want = map(dir(name).join("outputs.safetensors"));
        let mut m = build(
            name,
            QkvLayout::Interleaved,
            read_safetensors(&dir(name).join("weights.safetensors")).unwrap(),
        );
        let default = common::run_inputs(&m, &inputs).logits;
        for (what, k) in Kernels::alternatives() {
            m.chatglm.kernels = k;
            for v in m.lora.trainable_variables() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let out = common::run_inputs(&m, &inputs);
            let e = common::rel_err(&out.logits, &want["logits"]);
            assert!(e <= 1e-4, "{name} {what} logits: {e:.3e}");
            if k.split_rotary {
                assert!(
                    out.logits.equal(&default),
                    "{name}: the rotary paths differ"
                );
            }
            lm_loss(&out.logits, &inputs["labels"]).backward();
            assert_reference_grads(&m, &want, &format!("{name} {what}"));
        }
    }
}

/// Several films per sample. Each film's embeddings land on its own slots of its own row
/// and nowhere else; one film per row at one slot is the reference's splice bit for bit; a row
/// attends to both of its films; and the LoRA still trains through a two-film batch.
#[test]
fn several_films_are_spliced_at_their_own_slots() {
    use xrayglm::model::chatglm::{GlmInputs, ImageAt};
    use xrayglm::model::positions::attention_mask;
    let cfg = ModelConfig::preset("tiny").unwrap();
    tch::manual_seed(5);
    let m = VisualGlm::new(cfg.clone(), Device::Cpu, Kind::Float).unwrap();
    let (ids, _) = xrayglm::bench::model_inputs(&cfg, 2, 100, Device::Cpu);
    let l = cfg.sat.image_length;
    let h = cfg.sat.hidden_size;
    let films = Tensor::randn([3, l, h], (Kind::Float, Device::Cpu));
    let at = [(0, 3), (0, 40), (1, 3)];
    let plain = m.chatglm.embed(&ids, None, ImageAt::EachRow(0));
    let e = m.chatglm.embed(&ids, Some(&films), ImageAt::Slots(&at));
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    for (n, &(row, start)) in at.iter().enumerate() {
        let got = e.get(row).narrow(0, start, l);
        assert_eq!(max_diff(&got, &films.get(n as i64)), 0.0, "film {n}");
    }
    // Outside the slots: the token embeddings.
    let keep = Tensor::ones([2, 100], (Kind::Bool, Device::Cpu));
    for &(row, start) in &at {
        let _ = keep.get(row).narrow(0, start, l).fill_(0);
    }
    let outside = |t: &Tensor| t.masked_select(&keep.unsqueeze(-1).expand([2, 100, h], false));
    assert_eq!(max_diff(&outside(&e), &outside(&plain)), 0.0);
    // One film per row at one slot: both placements give the same embeddings exactly.
    let two = films.narrow(0, 0, 2);
    let a = m.chatglm.embed(&ids, Some(&two), ImageAt::EachRow(3));
    let b = m
        .chatglm
        .embed(&ids, Some(&two), ImageAt::Slots(&[(0, 3), (1, 3)]));
    assert_eq!(max_diff(&a, &b), 0.0);
    assert!(matches!(
        ImageAt::of(&[(0, 3), (1, 3)], 2),
        ImageAt::EachRow(3)
    ));
    assert!(matches!(ImageAt::of(&at, 2), ImageAt::Slots(_)));
    // Row 0's logits depend on its second film; row 1's do not.
    let (pos, ctx) =
        xrayglm::model::positions::positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
    let mask = attention_mask(&ctx, 100, Device::Cpu);
    let logits = |f: &Tensor| {
        tch::no_grad(|| {
            m.chatglm.forward(
                &GlmInputs {
                    input_ids: &ids,
                    position_ids: &pos,
                    attention_mask: &mask,
                    image_embeds: Some(f),
                    image_at: ImageAt::Slots(&at),
                },
                false,
            )
        })
    };
    let base = logits(&films);
    let changed = films.copy();
    let _ = changed.get(1).fill_(0.5);
    let other = logits(&changed);
    assert!(max_diff(&base.get(0), &other.get(0)) > 1e-4);
    assert_eq!(max_diff(&base.get(1), &other.get(1)), 0.0);
    // The LoRA trains through it.
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
    let px = Tensor::randn(
        [
            3,
            3,
            cfg.sat.eva_args.image_size[0],
            cfg.sat.eva_args.image_size[0],
        ],
        (Kind::Float, Device::Cpu),
    );
    let inputs = xrayglm::model::visualglm::BatchInputs {
        input_ids: &ids,
        images: xrayglm::model::visualglm::Images::Pixels(&px),
        image_at: ImageAt::Slots(&at),
        position_ids: &pos,
        context_lengths: &ctx,
        labels: &labels,
    };
    let loss = m.loss_backward(&inputs, 1.0, false).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    let grads: f64 = m
        .lora
        .variables()
        .values()
        .map(|v| v.grad().abs().sum(Kind::Double).double_value(&[]))
        .sum();
    assert!(grads > 0.0);
}

/// A tiny model with adapters everywhere `model.lora.targets` allows: ChatGLM attention (layer 0)
/// and MLP (layer 1), EVA ViT layers 0–1, Q-Former layers 0–1, glm_proj; B drawn at random so
/// every delta is non-zero.
fn everywhere(kind: Kind) -> VisualGlm {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    let l = cfg.lora.as_mut().unwrap();
    l.layers = vec![0];
    l.targets = xrayglm::model::config::LoraTargets {
        mlp: Some(vec![1]),
        vit: vec![0, 1],
        qformer: vec![0, 1],
        glm_proj: true,
    };
    tch::manual_seed(21);
    let m = VisualGlm::new(cfg, Device::Cpu, kind).unwrap();
    tch::no_grad(|| {
        for (k, mut v) in m.lora.variables() {
            if k.contains("matrix_B") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    m
}

/// Adapters on the vision side. The LoRA'd forward (ViT, Q-Former, glm_proj, ChatGLM
/// MLP) equals the forward with every delta merged into its weight (≤ 1e-5 relative) and moves
/// the output; unmerging restores it; the adapters are saved under their sat names and every
/// one of them gets a gradient. The base is float64 so that only the fp32 adapters round: the
/// merge measures 3e-7 … 7e-7 over seeds (an fp32 base adds its own rounding, up to 9e-6 on
/// some draws, and the tests of a binary share one random generator).
#[test]
fn vision_adapters_merge_exactly_and_all_train() {
    let mut m = everywhere(Kind::Double);
    let cfg = m.cfg.clone();
    let (ids, image) = xrayglm::bench::model_inputs(&cfg, 2, 64, Device::Cpu);
    let names: Vec<String> = m.loras().into_iter().map(|(n, _)| n).collect();
    for want in [
        "transformer.layers.0.attention.query_key_value",
        "transformer.layers.1.mlp.dense_4h_to_h",
        "mixins.eva.model.vit.transformer.layers.1.attention.query_key_value",
        "mixins.eva.model.qformer.transformer.layers.0.cross_attention.key_value",
        "mixins.eva.model.qformer.transformer.layers.1.mlp.dense_h_to_4h",
        "mixins.eva.model.glm_proj",
    ] {
        assert!(names.contains(&want.to_string()), "{want} not in {names:?}");
    }
    assert!(!names
        .iter()
        .any(|n| n.starts_with("transformer.layers.1.attention")));
    let vars = m.lora.variables();
    assert!(vars.contains_key("mixins.eva.model.glm_proj.matrix_A.0"));
    let out = |m: &VisualGlm| {
        tch::no_grad(|| m.forward(&ids, Some(&image), 3, None, None, false).unwrap())
    };
    let lora = out(&m);
    m.merge_lora().unwrap();
    let merged = out(&m);
    for (what, a, b) in [
        ("image embeddings", &lora.image_embeds, &merged.image_embeds),
        ("qformer", &lora.qformer, &merged.qformer),
    ] {
        let e = common::rel_err(b.as_ref().unwrap(), a.as_ref().unwrap());
        assert!(e <= 1e-5, "{what}: merged vs LoRA {e:.3e}");
    }
    let e = common::rel_err(&merged.logits, &lora.logits);
    assert!(e <= 1e-5, "logits: merged vs LoRA {e:.3e}");
    m.unmerge_lora().unwrap();
    let back = out(&m);
    assert!(common::rel_err(&back.logits, &lora.logits) <= 1e-5);
    // Without the adapters the output is another one.
    let plain = VisualGlm::new(
        ModelConfig {
            lora: None,
            ..cfg.clone()
        },
        Device::Cpu,
        Kind::Double,
    )
    .unwrap();
    let base: HashMap<String, Tensor> = m.base.variables().into_iter().collect();
    let mut p = plain;
    tch::no_grad(|| {
        for (k, mut v) in p.base.variables() {
            v.copy_(&base[&k]);
        }
    });
    p.merge_lora().unwrap();
    let e = common::rel_err(
        &out(&p).image_embeds.unwrap(),
        lora.image_embeds.as_ref().unwrap(),
    );
    assert!(
        e > 1e-3,
        "the vision adapters change the image embeddings ({e:.3e})"
    );
    // Every adapter receives a gradient through the spliced image embeddings, with and without
    // activation checkpointing, and the two agree.
    let (pos, ctx) =
        xrayglm::model::positions::positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
    let inputs = xrayglm::model::visualglm::BatchInputs {
        input_ids: &ids,
        images: xrayglm::model::visualglm::Images::Pixels(&image),
        image_at: xrayglm::model::chatglm::ImageAt::EachRow(3),
        position_ids: &pos,
        context_lengths: &ctx,
        labels: &labels,
    };
    let grads = |checkpoint: bool| {
        for (_, v) in m.lora.variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        m.loss_backward(&inputs, 1.0, checkpoint).unwrap();
        let mut v: Vec<(String, Tensor)> = m
            .lora
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.grad().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (plain_g, ckpt_g) = (grads(false), grads(true));
    for ((k, a), (_, b)) in plain_g.iter().zip(&ckpt_g) {
        assert!(
            a.defined() && a.abs().max().double_value(&[]) > 0.0,
            "{k} has no gradient"
        );
        let e = common::rel_err(b, a);
        assert!(e <= 1e-4, "{k}: checkpointed gradient differs by {e:.3e}");
    }
}

/// The vision adapters' gradients against central finite differences of the loss on a float64
/// model: for one adapter of each target (ViT qkv B, Q-Former cross-attention key/value A,
/// glm_proj B, ChatGLM MLP B) the directional derivative along a random direction agrees within
/// 1e-5 relative (measured 3e-10 … 4e-7 over runs; ε = 1e-4).
#[test]
fn vision_adapter_gradients_match_finite_differences() {
    let m = everywhere(Kind::Double);
    let mut lora = m.lora.variables();
    tch::no_grad(|| {
        for v in lora.values_mut() {
            v.set_data(&v.to_kind(Kind::Double));
        }
    });
    let cfg = m.cfg.clone();
    let (ids, image) = xrayglm::bench::model_inputs(&cfg, 2, 64, Device::Cpu);
    let image = image.to_kind(Kind::Double);
    let (pos, ctx) =
        xrayglm::model::positions::positions_from_ids(&ids, 130004, 130000, 130001).unwrap();
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
    // The next-token cross-entropy in float64 (the training loss is taken in float32).
    let loss = || {
        let out = m
            .forward(&ids, Some(&image), 3, Some(&pos), Some(&ctx), true)
            .unwrap();
        let (_, s, v) = out.logits.size3().unwrap();
        let lp = out
            .logits
            .narrow(1, 0, s - 1)
            .reshape([-1, v])
            .log_softmax(-1, Kind::Double);
        let target = labels.narrow(1, 1, s - 1).reshape([-1]);
        let keep = target.ne(-100).to_kind(Kind::Double);
        let nll = -lp
            .gather(1, &target.clamp_min(0).unsqueeze(1), false)
            .squeeze_dim(1);
        (nll * &keep).sum(Kind::Double) / keep.sum(Kind::Double)
    };
    let l = loss();
    l.backward();
    for name in [
        "mixins.eva.model.vit.transformer.layers.0.attention.query_key_value.matrix_B.0",
        "mixins.eva.model.qformer.transformer.layers.0.cross_attention.key_value.matrix_A.0",
        "mixins.eva.model.glm_proj.matrix_B.0",
        "transformer.layers.1.mlp.dense_h_to_4h.matrix_B.0",
    ] {
        let p = &lora[name];
        assert_eq!(p.kind(), Kind::Double);
        tch::manual_seed(3);
        let dir = Tensor::randn(p.size(), (Kind::Double, Device::Cpu));
        let analytic = (p.grad() * &dir).sum(Kind::Double).double_value(&[]);
        // Central differences: truncation ~ε², float64 rounding ~1e-16/ε.
        let eps = 1e-4;
        let at = |s: f64| {
            tch::no_grad(|| {
                let mut q = p.shallow_clone();
                let _ = q.g_add_(&(&dir * s));
                let v = loss().double_value(&[]);
                let _ = q.g_sub_(&(&dir * s));
                v
            })
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (analytic - numeric).abs() / analytic.abs().max(1e-8);
        eprintln!("{name}: analytic {analytic:.6e}, finite differences {numeric:.6e} ({err:.1e})");
        assert!(
            analytic.abs() > 1e-6,
            "{name}: gradient along the direction is {analytic:.3e}"
        );
        assert!(
            err <= 1e-5,
            "{name}: analytic {analytic:.9e} vs finite differences {numeric:.9e} ({err:.2e})"
        );
    }
}

/// NF4 against bitsandbytes, which runs on this CPU (bitsandbytes 0.50.2, torch 2.11.0;
/// tests/fixtures/nf4 from scripts/make_nf4_fixtures.py: `quantize_4bit(nf4, blocksize 64)`
/// without double quantization, then `dequantize_4bit`): its 16-value code table equals ours
/// (≤ 2e-7: its table holds fp32 roundings of the published values), every weight of three
/// matrices (N(0, 0.02); Student-t with 1,850 elements, not a whole number of blocks; blocks with
/// zeros and an all-zero block) gets the same code index, the same block absmax, and dequantizes
/// to bitsandbytes' values (≤ 2e-7 × the largest absmax: the code tables' difference; measured
/// 1.5e-8 on absmax 0.089).
#[test]
fn nf4_matches_bitsandbytes() {
    use xrayglm::model::nf4::{code_values, Nf4, Scales};
    let f = map(common::fixture("nf4").join("bnb_nf4.safetensors"));
    let code = &f["code"];
    for (k, &c) in code_values().iter().enumerate() {
        let theirs = code.double_value(&[k as i64]);
        assert!((theirs - c).abs() <= 2e-7, "code {k}: {theirs} vs {c}");
    }
    for case in ["normal", "heavy", "sparse"] {
        let w = &f[&format!("{case}.weight")];
        let q = Nf4::quantize(w, false).unwrap();
        let n = w.numel() as i64;
        let packed = q.packed.to_kind(Kind::Int64);
        let ours = Tensor::stack(&[packed.floor_divide_scalar(16), packed.remainder(16)], 1)
            .reshape([-1])
            .narrow(0, 0, n);
        let theirs = f[&format!("{case}.index")].to_kind(Kind::Int64);
        let differ = ours.ne_tensor(&theirs).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differ, 0, "{case}: {differ} of {n} code indices differ");
        let Scales::Plain(absmax) = &q.scales else {
            panic!("plain scales asked for")
        };
        let bnb_absmax = &f[&format!("{case}.absmax")];
        assert_eq!(
            (absmax - bnb_absmax).abs().max().double_value(&[]),
            0.0,
            "{case}: absmax"
        );
        let d = q.dequantize(Kind::Float);
        let bnb = &f[&format!("{case}.dequantized")];
        // The only difference left is the code tables' (≤ 2e-7), times the block's absmax.
        let tol = 2e-7 * bnb_absmax.abs().max().double_value(&[]);
        let e = (&d - bnb).abs().max().double_value(&[]);
        assert!(
            e <= tol,
            "{case}: dequantized differ by {e:.3e} (tolerance {tol:.1e})"
        );
    }
}
