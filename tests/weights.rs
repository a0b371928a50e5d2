//! Weight import: the pickle reader on a real `torch.save` file, sat and HF checkpoint folders
//! (fixtures from scripts/make_model_fixtures.py), and the round trip through xrayglm's format.

mod common;

use std::collections::HashMap;

use tch::{Kind, Tensor};
use xrayglm::weights::pickle::Value;
use xrayglm::weights::read_safetensors;
use xrayglm::weights::source::{detect, load_model, save_xrayglm, Format, LoadOptions};
use xrayglm::weights::torch_zip::TorchCheckpoint;

#[test]
fn torch_save_pickle_loads_without_executing_anything() {
    let dir = common::fixture("torch_pickle");
    let ck = TorchCheckpoint::open(&dir.join("ckpt.pt")).unwrap();
    let expected: HashMap<String, Tensor> = read_safetensors(&dir.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let sd = ck.state_dict().unwrap();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "a.weight",
            "a.weight_t",
            "a.slice",
            "b.half",
            "c.bf16",
            "d.long",
            "e.param",
            "f.scalar"
        ]
    );
    for (name, r) in &sd {
        let t = ck.tensor(r).unwrap();
        let want = &expected[name];
        assert_eq!(t.size(), want.size(), "{name}");
        let t = if t.kind() == Kind::Int64 {
            t
        } else {
            t.to_kind(Kind::Float)
        };
        assert!(t.equal(want), "{name}");
    }
    let kinds: Vec<Kind> = sd.iter().map(|(_, r)| r.dtype.kind()).collect();
    assert_eq!(kinds[3], Kind::Half);
    assert_eq!(kinds[4], Kind::BFloat16);
    // The Namespace beside `module` is an opaque object whose state is still readable.
    match ck.root.get("args").unwrap() {
        Value::Object { class, .. } => {
            assert_eq!(
                **class,
                Value::Global {
                    module: "argparse".into(),
                    name: "Namespace".into()
                }
            )
        }
        other => panic!("args: {other:?}"),
    }
    assert_eq!(
        ck.root.get("args").unwrap().get("lr"),
        Some(&Value::Float(1e-4))
    );
    assert_eq!(ck.root.get("iteration"), Some(&Value::Int(300)));
    assert_eq!(
        ck.root.get("nested").unwrap().get("big"),
        Some(&Value::Int(1 << 40))
    );
}

fn logits(model: &xrayglm::model::visualglm::VisualGlm) -> Tensor {
    let dir = common::fixture("model").join("a");
    let inputs: HashMap<String, Tensor> = read_safetensors(&dir.join("inputs.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    common::run_inputs(model, &inputs).logits
}

fn reference_logits() -> Tensor {
    let dir = common::fixture("model").join("a");
    read_safetensors(&dir.join("outputs.safetensors"))
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "logits")
        .unwrap()
        .1
}

#[test]
fn sat_checkpoint_folder_loads_with_its_lora() {
    let dir = common::fixture("model").join("a").join("sat");
    assert_eq!(detect(&dir).unwrap(), Format::Sat);
    let (m, report) = load_model(&dir, &LoadOptions::default()).unwrap();
    assert!(m.cfg.lora.is_some());
    assert!(report
        .ignored
        .iter()
        .any(|n| n == "transformer.position_embeddings.weight"));
    let e = common::rel_err(&logits(&m), &reference_logits());
    assert!(e <= 1e-4, "sat folder logits: {e:.3e}");
}

#[test]
fn hf_folder_with_merged_lora_gives_the_same_logits() {
    let dir = common::fixture("model").join("a").join("hf");
    assert_eq!(detect(&dir).unwrap(), Format::Hf);
    let (m, _) = load_model(&dir, &LoadOptions::default()).unwrap();
    assert!(m.cfg.lora.is_none());
    let e = common::rel_err(&logits(&m), &reference_logits());
    assert!(e <= 1e-4, "hf folder logits: {e:.3e}");
}

#[test]
fn convert_round_trips_through_xrayglm_format() {
    let src = common::fixture("model").join("a").join("sat");
    let (m, _) = load_model(&src, &LoadOptions::default()).unwrap();
    let before = logits(&m);
    let out = tempfile::tempdir().unwrap();
    save_xrayglm(&m, out.path()).unwrap();
    assert_eq!(detect(out.path()).unwrap(), Format::Xrayglm);
    let (back, _) = load_model(out.path(), &LoadOptions::default()).unwrap();
    assert!(logits(&back).equal(&before));
    // Loading the converted model in bf16 keeps LoRA in fp32 and stays close.
    let (half, _) = load_model(
        out.path(),
        &LoadOptions {
            kind: Kind::BFloat16,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(half
        .lora
        .variables()
        .values()
        .all(|t| t.kind() == Kind::Float));
    assert!(half
        .base
        .variables()
        .values()
        .all(|t| t.kind() == Kind::BFloat16));
}

#[test]
fn a_missing_tensor_is_named_and_fresh_adapters_can_be_added() {
    let src = common::fixture("model").join("a").join("sat");
    let (m, _) = load_model(&src, &LoadOptions::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_xrayglm(&m, out.path()).unwrap();
    // The converted model declares LoRA, so its tensors are required.
    std::fs::remove_file(out.path().join("lora.safetensors")).unwrap();
    let err = format!(
        "{:#}",
        load_model(out.path(), &LoadOptions::default())
            .err()
            .unwrap()
    );
    assert!(
        err.contains("missing: transformer.layers.0.attention.dense.matrix_A.0"),
        "{err}"
    );
    // A base model (HF, no LoRA) gets fresh XrayGLM-style adapters (B = 0: same logits).
    let hf = common::fixture("model").join("a").join("hf");
    let lora = xrayglm::model::config::LoraConfig {
        layers: vec![0, 2],
        rank: 2,
        ..Default::default()
    };
    let (with, _) = load_model(
        &hf,
        &LoadOptions {
            lora: xrayglm::weights::source::LoraSetting::Use(lora),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(with.lora.variables().len(), 16);
    let e = common::rel_err(&logits(&with), &reference_logits());
    assert!(e <= 1e-4, "{e:.3e}");
}

#[test]
fn hf_safetensors_shards_load_like_the_bin_shards() {
    let hf = common::fixture("model").join("a").join("hf");
    let out = tempfile::tempdir().unwrap();
    std::fs::copy(hf.join("config.json"), out.path().join("config.json")).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    .iter()
    .enumerate()
    {
        let ck = TorchCheckpoint::open(&hf.join(shard)).unwrap();
        let tensors: Vec<(String, Tensor)> = ck.tensors().unwrap().map(|t| t.unwrap()).collect();
        let name = format!("model-{:05}-of-00002.safetensors", i + 1);
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
        xrayglm::weights::st::write(&out.path().join(&name), &refs, &[]).unwrap();
        for (k, _) in &tensors {
            weight_map.insert(k.clone(), serde_json::Value::String(name.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        out.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let (m, _) = load_model(out.path(), &LoadOptions::default()).unwrap();
    let e = common::rel_err(&logits(&m), &reference_logits());
    assert!(e <= 1e-4, "{e:.3e}");
}

/// A `model_config.json` with absurd sizes is an error naming the problem, not a
/// panic inside libtorch's allocator (`hidden_size` 2^40 used to abort in var_store.rs); zero or
/// negative sizes are refused by name (a zero head count used to divide by zero). The CLI exits 1.
#[test]
fn absurd_model_config_sizes_are_errors_not_panics() {
    let src = common::fixture("model").join("a").join("sat");
    let (m, _) = load_model(&src, &LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_xrayglm(&m, dir.path()).unwrap();
    let cfg_path = dir.path().join("model_config.json");
    let good: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    for (key, value, want) in [
        ("hidden_size", 1i64 << 40, "these sizes need about"),
        ("vocab_size", 1i64 << 50, "these sizes need about"),
        (
            "num_attention_heads",
            0,
            "num_attention_heads is 0; it must be positive",
        ),
        ("num_layers", -3, "num_layers is -3; it must be positive"),
    ] {
        let mut bad = good.clone();
        bad[key] = value.into();
        std::fs::write(&cfg_path, bad.to_string()).unwrap();
        let err = load_model(dir.path(), &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} loaded"));
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{key}: {msg}");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .args(["convert", "--model"])
            .arg(dir.path())
            .arg("--to")
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{key}: {stderr}");
        assert!(stderr.contains(want), "{key}: {stderr}");
    }
}
