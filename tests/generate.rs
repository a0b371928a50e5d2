//! Generation: KV-cached greedy decoding equals the original (sat 0.3.6 `filling_sequence` with
//! `CachedAutoregressiveMixin` and `BaseStrategy(top_k=1)`, with and without the repetition
//! penalty; fixtures from scripts/make_model_fixtures.py): tokens identical. Batched decoding,
//! merged LoRA and uncached decoding give the same tokens as one prompt alone.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use xrayglm::infer::generate::{generate, image_embeds, GenerateConfig, Prompt};
use xrayglm::infer::sampling::SamplingConfig;
use xrayglm::model::config::{ModelConfig, QkvLayout};
use xrayglm::model::visualglm::VisualGlm;
use xrayglm::weights::{load_into, read_safetensors, Require};

fn dir(name: &str) -> PathBuf {
    common::fixture("model").join(name)
}

fn map(path: PathBuf) -> HashMap<String, Tensor> {
    read_safetensors(&path).unwrap().into_iter().collect()
}

fn model(name: &str) -> VisualGlm {
    let cfg = ModelConfig::from_sat_file(&dir(name).join("model_config.json")).unwrap();
    let mut m = VisualGlm::new(cfg, Device::Cpu, Kind::Float).unwrap();
    let w = read_safetensors(&dir(name).join("weights.safetensors")).unwrap();
    load_into(
        &mut m,
        w.into_iter().map(Ok),
        QkvLayout::Interleaved,
        Require::All,
        name,
    )
    .unwrap();
    m
}

fn settings(name: &str) -> serde_json::Value {
    common::read_json(&dir(name).join("generate.json"))
}

fn greedy_cfg(name: &str, len: usize, penalty: bool) -> GenerateConfig {
    let s = settings(name);
    GenerateConfig {
        max_length: len + s["new_tokens"].as_u64().unwrap() as usize,
        end_tokens: vec![s["end_token"].as_i64().unwrap()],
        sampling: SamplingConfig {
            greedy: true,
            top_k: 1,
            temperature: if penalty {
                s["temperature"].as_f64().unwrap()
            } else {
                1.0
            },
            repetition_penalty: if penalty {
                s["penalty"].as_f64().unwrap()
            } else {
                1.0
            },
            ..Default::default()
        },
    }
}

fn fixture_prompt(m: &VisualGlm, inputs: &HashMap<String, Tensor>) -> Prompt {
    Prompt {
        input_ids: Vec::<i64>::try_from(inputs["gen_input_ids"].flatten(0, -1)).unwrap(),
        image_embeds: Some(image_embeds(m, &inputs["gen_image"])),
        image_starts: vec![inputs["gen_pre_image"].int64_value(&[0])],
    }
}

fn tokens(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64)).unwrap()
}

#[test]
fn greedy_decoding_matches_the_original_token_for_token() {
    for name in ["a", "b"] {
        let m = model(name);
        let inputs = map(dir(name).join("generate.safetensors"));
        let p = fixture_prompt(&m, &inputs);
        for (penalty, key) in [(false, "tokens_greedy"), (true, "tokens_penalty")] {
            let cfg = greedy_cfg(name, p.input_ids.len(), penalty);
            let got = generate(&m, std::slice::from_ref(&p), &cfg, |_, _| {}).unwrap();
            assert_eq!(got[0].tokens, tokens(&inputs[key]), "config {name}, {key}");
        }
    }
}

#[test]
fn the_penalty_fixture_really_differs_from_plain_greedy() {
    // Guards the test above: the penalty must change the continuation somewhere.
    for name in ["a", "b"] {
        let inputs = map(dir(name).join("generate.safetensors"));
        assert_ne!(
            tokens(&inputs["tokens_greedy"]),
            tokens(&inputs["tokens_penalty"]),
            "{name}"
        );
    }
}

#[test]
fn batched_merged_and_streamed_decoding_equal_one_prompt_alone() {
    let name = "a";
    let mut m = model(name);
    let inputs = map(dir(name).join("generate.safetensors"));
    let p0 = fixture_prompt(&m, &inputs);
    let want = tokens(&inputs["tokens_penalty"]);
    // Two more prompts: another image, and a longer text (a different length group).
    let img2 = Tensor::randn(inputs["gen_image"].size(), (Kind::Float, Device::Cpu));
    let p1 = Prompt {
        input_ids: p0.input_ids.clone(),
        image_embeds: Some(image_embeds(&m, &img2)),
        image_starts: p0.image_starts.clone(),
    };
    let mut ids2 = p0.input_ids.clone();
    let n = ids2.len();
    ids2.splice(n - 2..n - 2, [17, 18, 19]);
    let p2 = Prompt {
        input_ids: ids2,
        image_embeds: p0.image_embeds.as_ref().map(|t| t.shallow_clone()),
        image_starts: p0.image_starts.clone(),
    };
    let cfg = greedy_cfg(name, n + 3, true);
    let alone: Vec<Vec<i64>> = [&p0, &p1, &p2]
        .iter()
        .map(|p| {
            generate(&m, std::slice::from_ref(*p), &cfg, |_, _| {}).unwrap()[0]
                .tokens
                .clone()
        })
        .collect();
    // Alone with the longer max_length, p0 still starts with the fixture's tokens.
    assert_eq!(&alone[0][..want.len()], &want[..]);
    let mut streamed: Vec<Vec<i64>> = vec![Vec::new(); 3];
    let batch = generate(&m, &[p0, p1, p2], &cfg, |row, t| streamed[row].push(t)).unwrap();
    for i in 0..3 {
        assert_eq!(batch[i].tokens, alone[i], "row {i} batched");
        assert_eq!(streamed[i], alone[i], "row {i} streamed");
    }
    m.merge_lora().unwrap();
    let p = fixture_prompt(&m, &inputs);
    let merged = generate(&m, &[p], &greedy_cfg(name, n, true), |_, _| {}).unwrap();
    assert_eq!(merged[0].tokens, want, "merged LoRA");
}

#[test]
fn parity_cli_generates_from_a_sat_checkpoint() {
    let inputs = dir("a").join("generate.safetensors");
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("tokens.safetensors");
    common::ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .args(["parity", "--model"])
            .arg(dir("a").join("sat"))
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(&path)
            .args(["--generate", "24", "--greedy", "--end-token", "5"]),
    );
    let got = map(path);
    let want = map(inputs);
    assert_eq!(tokens(&got["tokens"]), tokens(&want["tokens_greedy"]));
}

#[test]
fn generate_bench_runs_and_reports_rates() {
    for dtype in ["fp32", "bf16"] {
        generate_bench_reports_rates(dtype);
    }
}

fn generate_bench_reports_rates(dtype: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .args(["bench", "generate", "--preset", "tiny", "--new-tokens", "4"])
        .args(["--dtype", dtype])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "time to first token",
        "decoding, batch 1",
        "decoding, batch 8",
        "one tiny eager op",
    ] {
        let v: f64 = text
            .lines()
            .find(|l| l.contains(row))
            .and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "xrayglm")?;
                w.get(i + 1)?.parse().ok()
            })
            .unwrap_or_else(|| panic!("{row} missing:\n{text}"));
        assert!(v > 0.0 && v.is_finite(), "{row}: {text}");
    }
    assert!(
        text.contains(&format!("preset tiny, {dtype} on cpu,")),
        "{text}"
    );
}
