//! `xrayglm export` on the tiny XrayGLM-format sat checkpoint of the model fixtures
//! (tests/fixtures/model/a/sat, made by scripts/make_model_fixtures.py with sat 0.3.6):
//! * `peft`: the files equal the adapter that scripts/make_export_fixtures.py applied with the
//!   `peft` package (max abs error against sat's LoraLinear ≤ 1e-5, recorded there), and PEFT's
//!   `lora_alpha / r · B·A` equals sat's merged ΔW of every adapted layer (≤ 1e-6);
//! * `merged` (HF names, sharded) and `sat` reload into our model with logits identical to the sat
//!   checkpoint's with the LoRA merged in process, and equal to sat's own logits (≤ 1e-4 relative);
//! * `lora`: the checkpoint's adapters under sat names, bit for bit;
//! * bad input: unknown format, missing folder, no adapters, a non-empty target — clear errors and
//!   nothing written.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use tch::{Kind, Tensor};
use xrayglm::weights::source::{load_model, LoadOptions};

fn export(format: &str, to: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .args(["export", "--format", format, "--from_pretrained"])
        .arg(common::sat_fixture())
        .arg("--to")
        .arg(to)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    common::tensors(path)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn logits(dir: &Path, merge: bool) -> Tensor {
    let (mut m, _) = load_model(dir, &LoadOptions::default()).unwrap();
    if merge {
        m.merge_lora().unwrap();
    }
    let inputs = tensors(&common::fixture("model").join("a/inputs.safetensors"));
    tch::no_grad(|| common::run_inputs(&m, &inputs).logits)
}

#[test]
fn peft_export_is_the_adapter_peft_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let to = tmp.path().join("peft");
    ok(&export("peft", &to, &[]));
    let fx = common::fixture("export");
    // Today's export is the adapter the script applied with peft.
    let got = tensors(&to.join("adapter_model.safetensors"));
    let want = tensors(&fx.join("adapter_model.safetensors"));
    assert_eq!(got.len(), want.len());
    assert_eq!(
        got.len(),
        8,
        "lora_A and lora_B of qkv and dense in 2 layers"
    );
    for (k, w) in &want {
        let g = got.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert!(g.equal(w), "{k} differs from the PEFT-checked fixture");
    }
    let cfg = common::read_json(&to.join("adapter_config.json"));
    assert_eq!(cfg, common::read_json(&fx.join("adapter_config.json")));
    let check = common::read_json(&fx.join("peft_check.json"));
    assert!(check["max_abs_error"].as_f64().unwrap() <= check["tolerance"].as_f64().unwrap());
    assert!(check["tolerance"].as_f64().unwrap() <= 1e-5);
    let adapted = check["modules"]
        .as_object()
        .unwrap()
        .values()
        .filter(|m| m["adapted_by_peft"] == true && m["delta_norm"].as_f64().unwrap() > 0.1)
        .count();
    assert_eq!(adapted, 4, "{check}");
    // PEFT's update, as PEFT computes it from these files, is sat's merged update.
    let (m, _) = load_model(&common::sat_fixture(), &LoadOptions::default()).unwrap();
    let (r, alpha) = (
        cfg["r"].as_f64().unwrap(),
        cfg["lora_alpha"].as_f64().unwrap(),
    );
    assert_eq!(
        (r, alpha),
        (12.0, 3.0),
        "rank 3·4, alpha 3·1: scaling 1/4 as sat's"
    );
    for (name, lora) in m.chatglm.loras() {
        let kind = name
            .rsplit_once("layers.")
            .unwrap()
            .1
            .split_once('.')
            .unwrap()
            .1;
        let (r, alpha) = match cfg["rank_pattern"].get(kind) {
            Some(rp) => (
                rp.as_f64().unwrap(),
                cfg["alpha_pattern"][kind].as_f64().unwrap(),
            ),
            None => (r, alpha),
        };
        let a = &got[&format!("base_model.model.{name}.lora_A.weight")];
        let b = &got[&format!("base_model.model.{name}.lora_B.weight")];
        assert_eq!(a.size()[0] as f64, r, "{name}");
        let peft_delta = b.matmul(a) * (alpha / r);
        let d = max_diff(&peft_delta, &lora.delta_weight());
        assert!(d <= 1e-6, "{name}: PEFT's ΔW differs from sat's by {d}");
    }
}

#[test]
fn merged_exports_reload_with_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let want = logits(&common::sat_fixture(), true);
    let sat_ref = tensors(&common::fixture("model").join("a/outputs.safetensors"));
    let hf = tmp.path().join("merged");
    ok(&export(
        "merged",
        &hf,
        &["--dtype", "fp32", "--shard_mib", "1"],
    ));
    let sat = tmp.path().join("sat");
    ok(&export("sat", &sat, &["--dtype", "fp32"]));
    // HF layout: shards, an index naming each tensor's shard, HF names, per-layer inv_freq.
    let index = common::read_json(&hf.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() >= 2, "{shards:?}");
    let mut total = 0usize;
    let mut names = Vec::new();
    for s in &shards {
        for (k, t) in tensors(&hf.join(s)) {
            assert_eq!(map[&k], *s, "{k}");
            total += t.numel() * 4;
            names.push(k);
        }
    }
    assert_eq!(names.len(), map.len());
    assert_eq!(index["metadata"]["total_size"], total);
    assert!(names.contains(&"lm_head.weight".to_string()));
    assert!(names.iter().any(|n| n.starts_with("image_encoder.vit.")));
    assert!(!names
        .iter()
        .any(|n| n.contains("matrix_") || n.contains("original")));
    assert_eq!(
        names
            .iter()
            .filter(|n| n.ends_with("rotary_emb.inv_freq"))
            .count(),
        3
    );
    let config = common::read_json(&hf.join("config.json"));
    assert_eq!(config["model_type"], "chatglm");
    assert_eq!(config["torch_dtype"], "float32");
    for dir in [&hf, &sat] {
        let got = logits(dir, false);
        assert_eq!(max_diff(&got, &want), 0.0, "{}", dir.display());
        let (m, _) = load_model(dir, &LoadOptions::default()).unwrap();
        assert!(
            m.cfg.lora.is_none(),
            "{}: the LoRA is merged",
            dir.display()
        );
    }
    let e = max_diff(&want, &sat_ref["logits"]) / sat_ref["logits"].abs().max().double_value(&[]);
    assert!(e <= 1e-4, "merged logits vs sat's: relative {e:.2e}");
    // fp16 by default, like the HF release.
    let half = tmp.path().join("half");
    ok(&export("merged", &half, &[]));
    assert_eq!(
        common::read_json(&half.join("config.json"))["torch_dtype"],
        "float16"
    );
}

#[test]
fn lora_export_holds_the_checkpoint_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let to = tmp.path().join("lora");
    ok(&export("lora", &to, &[]));
    let got = tensors(&to.join("lora.safetensors"));
    let (m, _) = load_model(&common::sat_fixture(), &LoadOptions::default()).unwrap();
    let want = xrayglm::weights::lora_tensors(&m);
    assert_eq!(got.len(), want.len());
    assert_eq!(got.len(), 16, "3 + 1 partitions × A, B × 2 layers");
    for (k, w) in &want {
        assert!(k.contains(".matrix_A.") || k.contains(".matrix_B."), "{k}");
        assert!(got[k].equal(w), "{k}");
    }
    let cfg = common::read_json(&to.join("model_config.json"));
    assert_eq!(cfg["use_lora"], true);
    assert_eq!(cfg["lora_rank"], 4);
    assert_eq!(cfg["layer_range"], serde_json::json!([0, 2]));
}

#[test]
fn export_errors_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |o: std::process::Output| -> String {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let to = tmp.path().join("out");
    let e = err(export("onnx", &to, &[]));
    assert!(e.contains("unknown export format \"onnx\""), "{e}");
    // A missing checkpoint names the folder.
    let e = err(Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .args(["export", "--format", "peft", "--from_pretrained"])
        .arg(tmp.path().join("nope"))
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap());
    assert!(e.contains("nope"), "{e}");
    // A merged model has no adapters to export.
    let sat = tmp.path().join("sat");
    ok(&export("sat", &sat, &["--dtype", "fp32"]));
    let e = err(Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .args(["export", "--format", "peft", "--from_pretrained"])
        .arg(&sat)
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap());
    assert!(e.contains("no LoRA adapters"), "{e}");
    // A target that holds files is left as it was.
    let full = tmp.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let e = err(export("peft", &full, &[]));
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(
        std::fs::read_to_string(full.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);
    // Nothing else appeared: no output folder, no partial folder.
    let mut left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["full", "sat"]);
}

/// A training checkpoint whose base model is not the one its adapters were trained on, and a sat
/// checkpoint whose weights file is missing: both refused with the reason, nothing written.
#[test]
fn mismatched_base_and_missing_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = || Command::new(env!("CARGO_BIN_EXE_xrayglm"));
    // The fixture's adapters (hidden 64) over a random `tiny` base (another size).
    let ck = tmp.path().join("ck");
    ok(&export("lora", &ck, &[]));
    let base = tmp.path().join("base");
    ok(&bin()
        .args(["convert", "--model", "preset:tiny", "--to"])
        .arg(&base)
        .output()
        .unwrap());
    std::fs::write(
        ck.join("trainer_state.json"),
        serde_json::json!({"step": 300, "base_model": base.display().to_string()}).to_string(),
    )
    .unwrap();
    let to = tmp.path().join("out");
    let o = bin()
        .args(["export", "--format", "peft", "--from_pretrained"])
        .arg(&ck)
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("is not the model it was trained on")
            && e.contains("num_layers 3 (checkpoint) vs 2 (base)"),
        "{e}"
    );
    assert!(!to.exists());
    // A sat checkpoint whose `latest` names a missing weights file.
    let sat = tmp.path().join("sat");
    std::fs::create_dir_all(&sat).unwrap();
    for f in ["latest", "model_config.json"] {
        std::fs::copy(common::sat_fixture().join(f), sat.join(f)).unwrap();
    }
    let o = bin()
        .args(["export", "--format", "merged", "--from_pretrained"])
        .arg(&sat)
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains("mp_rank_00_model_states.pt") && e.contains("missing"),
        "{e}"
    );
    assert!(!to.exists());
}

/// Adapters on the vision side (EVA ViT, Q-Former, glm_proj) and ChatGLM's MLP export to
/// PEFT and load back. `adapter_config.json`'s `target_modules`, full-matched as PEFT does,
/// selects exactly the adapted linears among all the model's linears (the vision tower's
/// `attention.dense` of a non-adapted layer included); each module's rank and alpha, resolved
/// through `rank_pattern` / `alpha_pattern` as PEFT resolves them, give `alpha/r · B·A` = our
/// ΔW (≤ 1e-6); and the folder loads over its base (`--from_pretrained PEFT_DIR`) with the
/// logits of the model it came from (≤ 1e-6 relative); the merged export (sat names) too (≤ 1e-5).
#[test]
fn vision_adapters_export_to_peft_and_reload_with_identical_logits() {
    use xrayglm::model::config::{LoraTargets, ModelConfig};
    use xrayglm::model::visualglm::VisualGlm;
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    let l = cfg.lora.as_mut().unwrap();
    l.layers = vec![0];
    l.targets = LoraTargets {
        mlp: Some(vec![1]),
        vit: vec![1],
        qformer: vec![0, 1],
        glm_proj: true,
    };
    tch::manual_seed(8);
    let mut m = VisualGlm::new(cfg.clone(), tch::Device::Cpu, Kind::Float).unwrap();
    tch::no_grad(|| {
        for (k, mut v) in m.lora.variables() {
            if k.contains("matrix_B") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, tch::Device::Cpu)) * 0.1));
            }
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    xrayglm::weights::source::save_base(&m, &base).unwrap();
    let to = tmp.path().join("peft");
    let o = xrayglm::export::Options {
        format: xrayglm::export::Format::Peft,
        shard_bytes: 1 << 30,
        base_model_name: base.display().to_string(),
        tokenizer: None,
    };
    xrayglm::export::export(&mut m, &to, &o).unwrap();
    let config = common::read_json(&to.join("adapter_config.json"));
    let got = tensors(&to.join("adapter_model.safetensors"));
    // target_modules selects exactly the adapted linears.
    let target = regex::Regex::new(&format!(
        "^(?:{})$",
        config["target_modules"].as_str().unwrap()
    ))
    .unwrap();
    let adapted: std::collections::BTreeSet<String> = m
        .loras()
        .into_iter()
        .map(|(n, _)| xrayglm::export::sat_to_hf(&n))
        .collect();
    let linears: std::collections::BTreeSet<String> = m
        .base
        .variables()
        .into_iter()
        .filter(|(k, v)| k.ends_with(".weight") && v.dim() == 2 && !k.contains("embeddings"))
        .map(|(k, _)| xrayglm::export::sat_to_hf(k.strip_suffix(".weight").unwrap()))
        .collect();
    assert!(linears.contains("image_encoder.vit.transformer.layers.0.attention.dense"));
    let matched: std::collections::BTreeSet<String> = linears
        .iter()
        .filter(|n| target.is_match(n))
        .cloned()
        .collect();
    assert_eq!(
        matched, adapted,
        "target_modules {}",
        config["target_modules"]
    );
    // ChatGLM 2 + 2, ViT 4, Q-Former 7 (layer 0 has cross-attention) + 4, glm_proj 1.
    assert_eq!(adapted.len(), 2 + 2 + 4 + 7 + 4 + 1);
    // PEFT's scaling per module: the first rank_pattern key matching `.*\.{key}$`, else r.
    let (r, alpha) = (
        config["r"].as_f64().unwrap(),
        config["lora_alpha"].as_f64().unwrap(),
    );
    let pattern = |map: &serde_json::Value, name: &str| -> Option<f64> {
        map.as_object()?.iter().find_map(|(k, v)| {
            regex::Regex::new(&format!("^.*\\.{k}$"))
                .unwrap()
                .is_match(name)
                .then(|| v.as_f64().unwrap())
        })
    };
    for (name, lora) in m.loras() {
        let hf = xrayglm::export::sat_to_hf(&name);
        let rm = pattern(&config["rank_pattern"], &hf).unwrap_or(r);
        let am = pattern(&config["alpha_pattern"], &hf).unwrap_or(alpha);
        let a = &got[&format!("base_model.model.{hf}.lora_A.weight")];
        let b = &got[&format!("base_model.model.{hf}.lora_B.weight")];
        assert_eq!(a.size()[0] as f64, rm, "{hf}");
        let d = max_diff(&(b.matmul(a) * (am / rm)), &lora.delta_weight());
        assert!(d <= 1e-6, "{hf}: PEFT's ΔW differs from ours by {d}");
    }
    // Loaded back over its base: the same logits.
    let (ids, image) = xrayglm::bench::model_inputs(&cfg, 2, 64, tch::Device::Cpu);
    let logits = |m: &VisualGlm| {
        tch::no_grad(|| m.forward(&ids, Some(&image), 3, None, None, false).unwrap()).logits
    };
    let want = logits(&m);
    let (back, _) = load_model(&to, &LoadOptions::default()).unwrap();
    assert_eq!(
        back.cfg.lora, cfg.lora,
        "the LoRA config read back from the PEFT files"
    );
    let e = max_diff(&logits(&back), &want) / want.abs().max().double_value(&[]);
    assert!(e <= 1e-6, "reloaded PEFT adapter: logits differ by {e:.3e}");
    // A PEFT folder whose base is not a local folder is refused with what to do.
    let cfg_path = to.join("adapter_config.json");
    let mut c = config.clone();
    c["base_model_name_or_path"] = serde_json::json!("THUDM/visualglm-6b");
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let err = format!(
        "{:#}",
        load_model(&to, &LoadOptions::default()).err().unwrap()
    );
    assert!(err.contains("is not a local folder"), "{err}");
    // Merged (sat names): every target folded into its weight, the same logits.
    let merged = tmp.path().join("merged");
    let o = xrayglm::export::Options {
        format: xrayglm::export::Format::Sat,
        ..o
    };
    xrayglm::export::export(&mut m, &merged, &o).unwrap();
    let (flat, _) = load_model(&merged, &LoadOptions::default()).unwrap();
    assert!(flat.cfg.lora.is_none() && flat.loras().is_empty());
    let e = max_diff(&logits(&flat), &want) / want.abs().max().double_value(&[]);
    assert!(e <= 1e-5, "merged export: logits differ by {e:.3e}");
}
