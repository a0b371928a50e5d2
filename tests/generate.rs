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

/// An engine on the tiny preset's random weights (seeded: every call builds the same model) with
/// a second random adapter, `other` (model 1), whose B matrices are non-zero so that it answers
/// differently.
fn tiny_engine(
    tok: &xrayglm::tokenizer::ChatGlmTokenizer,
    opts: xrayglm::infer::engine::EngineOptions,
) -> xrayglm::infer::engine::Engine {
    use xrayglm::infer::chat::ChatModel;
    use xrayglm::infer::engine::{Engine, NamedAdapter};
    let cfg = ModelConfig::preset("tiny").unwrap();
    tch::manual_seed(11);
    let model = VisualGlm::new(cfg.clone(), Device::Cpu, Kind::Float).unwrap();
    let store = tch::nn::VarStore::new(Device::Cpu);
    let layers = (0..cfg.sat.num_layers)
        .map(|i| xrayglm::model::chatglm::layer_loras(&store.root(), &cfg, i))
        .collect();
    // In name order: the store's map has no order of its own.
    let vars: std::collections::BTreeMap<String, Tensor> = store.variables().into_iter().collect();
    tch::no_grad(|| {
        for (_, mut t) in vars {
            let _ = t.normal_(0.0, 0.3);
        }
    });
    let other = xrayglm::weights::source::AdapterWeights {
        dir: PathBuf::from("(random)"),
        config: cfg.lora.clone().unwrap(),
        store,
        layers,
    };
    Engine::start(
        ChatModel::new(model, tok.clone()).unwrap(),
        "base".into(),
        vec![NamedAdapter {
            name: "other".into(),
            weights: other,
        }],
        opts,
    )
    .unwrap()
}

/// One request to an engine: model `model`, `film` (preprocessed pixels), `history` made-up
/// turns, greedy or sampled with `seed` at temperature 1, free text or held to `format`; its
/// events arrive on the receiver.
#[allow(clippy::too_many_arguments)]
fn submit(
    e: &xrayglm::infer::engine::Engine,
    model: usize,
    film: &std::sync::Arc<Vec<f32>>,
    history: usize,
    q: &str,
    seed: Option<u64>,
    max_new: usize,
    format: Option<xrayglm::infer::structured::ResponseFormat>,
) -> tokio::sync::mpsc::UnboundedReceiver<xrayglm::infer::engine::Event> {
    let constraint = format.map(|f| e.info.grammars.get().unwrap().constraint(&f).unwrap());
    use xrayglm::infer::chat::{ChatSettings, Turn};
    let mut settings = ChatSettings {
        max_length: 400,
        ..ChatSettings::default()
    };
    settings.sampling.greedy = seed.is_none();
    settings.sampling.temperature = 1.0;
    settings.sampling.top_p = 1.0;
    settings.sampling.top_k = 0;
    settings.sampling.seed = seed.unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let history = (0..history)
        .map(|i| Turn {
            query: format!("问题{i}，请详细说明。"),
            response: format!("回答{i}：心影大小正常，双肺野清晰。"),
        })
        .collect();
    e.submit(xrayglm::infer::engine::Job {
        constraint,
        model,
        images: vec![film.clone()],
        system: String::new(),
        history,
        query: q.into(),
        settings,
        max_new_tokens: Some(max_new),
        stop: vec![],
        events: tx,
        arrived: std::time::Instant::now(),
    })
    .unwrap();
    rx
}

/// The reply text a request's events end with.
fn reply(rx: &mut tokio::sync::mpsc::UnboundedReceiver<xrayglm::infer::engine::Event>) -> String {
    use xrayglm::infer::engine::Event;
    loop {
        match rx.blocking_recv().expect("the engine answers") {
            Event::Done(f) => return f.text,
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
}

/// Films of the tiny preset's size (224): random pixels, one scale per film.
fn random_films(n: usize) -> Vec<std::sync::Arc<Vec<f32>>> {
    (0..n)
        .map(|f| {
            let t = Tensor::randn([3 * 224 * 224], (Kind::Float, Device::Cpu)) * (0.5 + f as f64);
            std::sync::Arc::new(Vec::<f32>::try_from(t).unwrap())
        })
        .collect()
}

fn count(a: &std::sync::atomic::AtomicUsize) -> usize {
    a.load(std::sync::atomic::Ordering::SeqCst)
}

/// The serving engine's prompt and image caches change nothing a client sees: a sequence of
/// requests — repeated prompts, the same prompt under another adapter, greedy and seeded
/// sampling, two films, a budget that holds two prompts so that entries are evicted and asked
/// for again — gets the replies an engine without caches gives, while the caches answer some
/// lookups (hits), evict, and never serve one adapter's prompt to another (its replies differ).
#[test]
fn the_engine_caches_return_what_the_uncached_engine_computes() {
    use xrayglm::infer::engine::{Engine, EngineOptions};
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = xrayglm::tokenizer::ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let _one = common::serial();
    // One prompt's entry on the tiny preset is ~0.6 MB (2 layers of keys and values, 130,528
    // logits): a 1.5 MiB budget holds two.
    let opts = |prompt_bytes: usize, image_bytes: usize| EngineOptions {
        max_batch: 4,
        max_queue: 8,
        prompt_cache_bytes: prompt_bytes,
        image_cache_bytes: image_bytes,
        ..EngineOptions::default()
    };
    let plain = tiny_engine(&tok, opts(0, 0));
    let cached = tiny_engine(&tok, opts(3 << 19, 64 << 20));
    let films = random_films(2);
    // (model, film, history turns, question, seed)
    let requests: &[(usize, usize, usize, &str, Option<u64>)] = &[
        (0, 0, 0, "描述这张胸片", None),
        (0, 0, 0, "描述这张胸片", None), // the prompt again: a hit
        (1, 0, 0, "描述这张胸片", None), // the other adapter: its own entry
        (0, 0, 1, "描述这张胸片", None), // a second turn: the film from the image cache
        (0, 1, 0, "心脏大小正常吗", Some(7)),
        (0, 1, 0, "心脏大小正常吗", Some(7)),
        (0, 1, 0, "心脏大小正常吗", Some(8)), // another seed, the same prompt: a hit
        (0, 0, 0, "描述这张胸片", None),      // evicted meanwhile: computed again
        (1, 0, 0, "描述这张胸片", Some(3)),
        (1, 0, 0, "描述这张胸片", Some(3)),
    ];
    let ask = |e: &Engine, &(m, f, h, q, seed): &(usize, usize, usize, &str, Option<u64>)| {
        reply(&mut submit(e, m, &films[f], h, q, seed, 12, None))
    };
    let mut replies = Vec::new();
    for r in requests {
        let want = ask(&plain, r);
        assert_eq!(ask(&cached, r), want, "request {r:?}");
        replies.push(want);
    }
    // The adapters answer differently, so a shared entry would have shown.
    assert_ne!(replies[0], replies[2]);
    let s = &cached.stats;
    // Hits: requests 2, 6, 7 and 10; request 8 finds its prompt evicted.
    let prompts = (count(&s.prompt_cache.hits), count(&s.prompt_cache.misses));
    assert_eq!(prompts, (4, 6), "prompt cache");
    assert!(count(&s.prompt_cache.entries) <= 2);
    assert!(count(&s.prompt_cache.bytes) <= 3 << 19);
    // Films are looked up on a prompt miss: the second film's first request and the first
    // film's first miss encode; the other four misses find their film.
    let images = (count(&s.image_cache.hits), count(&s.image_cache.misses));
    assert_eq!(images, (4, 2), "image cache");
    assert_eq!(count(&s.image_cache.entries), 2);
    let p = &plain.stats.prompt_cache;
    assert_eq!(count(&p.hits) + count(&p.misses), 0);
    for e in [&plain, &cached] {
        e.drain(std::time::Duration::from_secs(1));
        e.join();
    }
}

/// Chunked prefill: long prompts that arrive while a reply streams are prefilled a layer per
/// step (a budget of one token) between its decoding steps, and every reply equals the one of an
/// engine whose prefills run whole.
#[test]
fn prefills_split_by_layers_give_the_replies_of_whole_prefills() {
    use xrayglm::infer::engine::{EngineOptions, Event};
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = xrayglm::tokenizer::ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let _one = common::serial();
    let films = random_films(2);
    let run = |step_tokens: usize| {
        let e = tiny_engine(
            &tok,
            EngineOptions {
                step_tokens,
                ..EngineOptions::default()
            },
        );
        // A long reply streams; once it has begun, two long prompts (6 and 9 turns of
        // history) and a sampled one on the other adapter arrive.
        let mut a = submit(&e, 0, &films[0], 0, "描述这张胸片", None, 150, None);
        while !matches!(a.blocking_recv(), Some(Event::Delta(_))) {}
        let mut b = submit(&e, 0, &films[1], 6, "心脏大小正常吗", None, 8, None);
        let mut c = submit(&e, 1, &films[0], 9, "有没有积液", Some(5), 8, None);
        let replies = [reply(&mut b), reply(&mut c), reply(&mut a)];
        let chunks = count(&e.stats.prefill_chunks);
        e.drain(std::time::Duration::from_secs(1));
        e.join();
        (replies, chunks)
    };
    let (whole, whole_chunks) = run(0);
    let (split, split_chunks) = run(1);
    assert_eq!(split, whole);
    // Whole: one pass per prefill. Split: the first (nothing decoding) whole, the two that
    // arrived during the stream one layer per pass (the tiny preset has two).
    assert_eq!(whole_chunks, 3);
    assert_eq!(split_chunks, 5);
}

/// Constrained decoding on the tiny random model: a findings schema (two observations, each one of
/// three values, nothing else) gives a reply that parses and validates, greedy and sampled, under
/// both adapters and from the prompt cache; `json_object` gives a reply that opens an object; a
/// schema that does not compile is an error naming what is wrong.
#[test]
fn replies_follow_the_response_format() {
    use xrayglm::infer::engine::EngineOptions;
    use xrayglm::infer::structured::ResponseFormat;
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = xrayglm::tokenizer::ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let _one = common::serial();
    let e = tiny_engine(&tok, EngineOptions::default());
    let films = random_films(1);
    let states = ["present", "absent", "uncertain"];
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "Cardiomegaly": {"enum": states},
            "Pleural Effusion": {"enum": states},
        },
        "required": ["Cardiomegaly", "Pleural Effusion"],
        "additionalProperties": false,
    });
    let format = ResponseFormat::JsonSchema(schema);
    for (model, seed) in [(0, None), (0, None), (1, None), (0, Some(3)), (1, Some(4))] {
        let mut rx = submit(
            &e,
            model,
            &films[0],
            0,
            "描述这张胸片",
            seed,
            64,
            Some(format.clone()),
        );
        let text = reply(&mut rx);
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{text}");
        for k in ["Cardiomegaly", "Pleural Effusion"] {
            assert!(states.contains(&o[k].as_str().unwrap()), "{text}");
        }
    }
    assert!(count(&e.stats.prompt_cache.hits) >= 1);
    // Any object: the first character opens it (a random model may not close it in 16 tokens).
    let mut rx = submit(
        &e,
        0,
        &films[0],
        0,
        "描述",
        None,
        16,
        Some(ResponseFormat::JsonObject),
    );
    let text = reply(&mut rx);
    assert!(text.starts_with('{'), "{text:?}");
    // A schema the grammar engine cannot compile (the API answers 400 before queueing).
    let bad = ResponseFormat::JsonSchema(serde_json::json!({"type": "no-such-type"}));
    let err = e
        .info
        .grammars
        .get()
        .unwrap()
        .constraint(&bad)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("no-such-type"), "{err:#}");
    e.drain(std::time::Duration::from_secs(1));
    e.join();
}
