//! The reinforcement-learning stage's pieces: per-report rewards (the clinical term cannot be
//! gamed by stating every finding, or every finding both ways), and the GRPO and DPO losses with
//! their gradients equal to TRL 1.16's on fixed log-probabilities (fixtures from
//! scripts/make_rl_fixtures.py).

mod common;

use tch::Tensor;
use xrayglm::eval::metrics::Lang;
use xrayglm::eval::reward::{RewardWeights, Rewarder};
use xrayglm::train::loss::{
    group_advantages, Completions, DpoKind, DpoLoss, GrpoLoss, GrpoNorm, Pairs, RewardScale,
};

const NORMAL: &str = "心脏大小正常。双肺清晰，未见实变。未见胸腔积液或气胸。";
const ENLARGED: &str = "心脏增大。双肺清晰，未见实变。未见胸腔积液或气胸。";
/// Every observation the Chinese rules know, stated present.
const EVERYTHING: &str =
    "纵隔增宽。心脏增大。结节。肺部阴影。肺水肿。实变。肺炎。肺不张。气胸。胸腔积液。\
                          胸膜增厚。骨折。导管。";

fn rewarder(weights: RewardWeights) -> Rewarder {
    Rewarder::new(weights, Lang::Zh, None, &[]).unwrap()
}

#[test]
fn the_right_findings_score_and_listing_or_hedging_does_not() {
    let r = rewarder(RewardWeights::default());
    // The right report scores 1 on either reference; the wrong finding scores 0.
    assert_eq!(r.score(NORMAL, NORMAL).ce_f1, 1.0);
    assert_eq!(r.score(ENLARGED, ENLARGED).ce_f1, 1.0);
    assert_eq!(r.score(NORMAL, ENLARGED).ce_f1, 0.0);
    assert_eq!(r.score(ENLARGED, NORMAL).ce_f1, 0.0);
    // Wording does not matter, the findings do.
    let reworded = "心影扩大，肺野清晰，无胸腔积液，无气胸。";
    assert_eq!(r.score(reworded, ENLARGED).ce_f1, 1.0);
    // A list of every observation: one true positive among thirteen stated.
    let all = r.score(EVERYTHING, ENLARGED);
    assert!(all.ce_f1 < 0.2, "{all:?}");
    assert_eq!(r.score(EVERYTHING, NORMAL).ce_f1, 0.0);
    // Every observation both ways is every observation stated, and a contradiction each.
    let both: String = EVERYTHING
        .split('。')
        .filter(|s| !s.is_empty())
        .map(|s| format!("{s}。未见{s}。"))
        .collect();
    let b = r.score(&both, ENLARGED);
    assert!(b.ce_f1 < 0.2 && b.contradiction > 0.5, "{b:?}");
    assert!(b.total < 0.0, "{b:?}");
    // Hedging on the one finding the reference has: the F1 is kept, the reward is not.
    let hedge = "心脏增大。心脏不大。双肺清晰，未见实变。未见胸腔积液或气胸。";
    let h = r.score(hedge, ENLARGED);
    assert_eq!(h.ce_f1, 1.0);
    assert!(
        h.contradiction > 0.0 && h.total < r.score(ENLARGED, ENLARGED).total,
        "{h:?}"
    );
}

#[test]
fn each_term_is_weighted_and_the_threads_agree() {
    let refs = [NORMAL.to_string(), ENLARGED.to_string()];
    let w = RewardWeights {
        ce_f1: 1.0,
        rouge_l: 0.5,
        bleu_4: 0.25,
        cider_d: 0.1,
        length: 0.2,
        contradiction: 1.0,
        ..Default::default()
    };
    let r = Rewarder::new(w.clone(), Lang::Zh, None, &refs).unwrap();
    let same = r.score(ENLARGED, ENLARGED);
    assert!((same.rouge_l - 1.0).abs() < 1e-12 && (same.bleu_4 - 1.0).abs() < 1e-6);
    assert!(same.cider_d > 0.0 && same.length == 0.0, "{same:?}");
    let short = r.score("心脏增大。", ENLARGED);
    assert!(
        short.length > 0.5 && short.rouge_l < same.rouge_l,
        "{short:?}"
    );
    let want = w.ce_f1 * short.ce_f1
        + w.rouge_l * short.rouge_l
        + w.bleu_4 * short.bleu_4
        + w.cider_d * short.cider_d
        - w.length * short.length
        - w.contradiction * short.contradiction;
    assert!((short.total - want).abs() < 1e-12);
    let pairs: Vec<(String, String)> = (0..9)
        .map(|i| {
            let h = [NORMAL, ENLARGED, EVERYTHING][i % 3];
            (h.to_string(), refs[i % 2].clone())
        })
        .collect();
    let one = r.score_all(&pairs, 1);
    assert_eq!(one, r.score_all(&pairs, 4));
    assert_eq!(one.len(), 9);
    // A negative weight is refused with its key.
    let e = Rewarder::new(
        RewardWeights {
            rouge_l: -1.0,
            ..Default::default()
        },
        Lang::Zh,
        None,
        &[],
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("rl.reward.rouge_l"), "{e:#}");
}

/// A user's rules file is a reward: a finding the embedded rules do not know scores once the file
/// names it.
#[test]
fn a_rules_file_is_a_reward() {
    let dir = tempfile::tempdir().unwrap();
    let builtin = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/findings/zh.toml"),
    )
    .unwrap();
    let custom = builtin.replace("positive = [\"气胸\"]", "positive = [\"气胸\", \"肺大疱\"]");
    assert_ne!(custom, builtin);
    let path = dir.path().join("mine.toml");
    std::fs::write(&path, custom).unwrap();
    let report = "心脏大小正常。右上肺大疱。";
    let reference = "心脏大小正常。右侧气胸。";
    let plain = rewarder(RewardWeights::default()).score(report, reference);
    let mine = Rewarder::new(RewardWeights::default(), Lang::Zh, Some(&path), &[])
        .unwrap()
        .score(report, reference);
    assert_eq!(plain.ce_f1, 0.0);
    assert_eq!(mine.ce_f1, 1.0);
}

#[test]
fn group_advantages_equal_trl() {
    let fx = common::read_json(&common::fixture("rl").join("trl.json"));
    for case in fx["advantages"].as_array().unwrap() {
        let rewards: Vec<f64> = case["rewards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let scale: RewardScale = serde_json::from_value(case["scale_rewards"].clone()).unwrap();
        let got = group_advantages(&rewards, case["group"].as_u64().unwrap() as usize, scale);
        let want: Vec<f64> = case["advantages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{case}: {got:?}");
        }
    }
}

fn tensor(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

fn vector(v: &serde_json::Value) -> Tensor {
    let x: Vec<f64> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice(&x)
}

/// max |got − want| / max |want|.
fn rel(got: &Tensor, want: &Tensor) -> f64 {
    common::rel_err(got, want)
}

/// The GRPO loss and its gradient with respect to the policy's log-probabilities equal TRL's
/// (float64, ≤ 1e-6 relative) for every loss type, with and without the KL term, on-policy and
/// off it (old log-probs given), with symmetric and DAPO's asymmetric clipping.
#[test]
fn grpo_loss_and_gradient_equal_trl() {
    let fx = common::read_json(&common::fixture("rl").join("trl.json"));
    let cases = fx["grpo"].as_array().unwrap();
    assert!(cases.len() >= 16, "{} cases", cases.len());
    for c in cases {
        let norm: GrpoNorm = serde_json::from_value(c["loss_type"].clone()).unwrap();
        let loss = GrpoLoss {
            norm,
            beta: c["beta"].as_f64().unwrap(),
            epsilon_low: c["epsilon_low"].as_f64().unwrap(),
            epsilon_high: c["epsilon_high"].as_f64().unwrap(),
            max_completion_length: c["max_completion_length"].as_i64().unwrap(),
        };
        let logps = tensor(&c["logps"]).set_requires_grad(true);
        let old = c.get("old_logps").filter(|v| !v.is_null()).map(tensor);
        let reference = c.get("ref_logps").filter(|v| !v.is_null()).map(tensor);
        let mask = tensor(&c["mask"]);
        let out = loss
            .compute(&Completions {
                logps: &logps,
                old_logps: old.as_ref(),
                ref_logps: reference.as_ref(),
                advantages: &vector(&c["advantages"]),
                mask: &mask,
                batch_tokens: c["num_items_in_batch"].as_f64().unwrap(),
            })
            .unwrap();
        let want = c["loss"].as_f64().unwrap();
        let got = out.loss.double_value(&[]);
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1e-12),
            "{}: loss {got} vs TRL {want}",
            c["name"]
        );
        out.loss.backward();
        let e = rel(&logps.grad(), &tensor(&c["grad"]));
        assert!(e <= 1e-6, "{}: gradient {e:.3e}", c["name"]);
        for key in ["clip_low", "clip_high", "clip_region"] {
            let got = match key {
                "clip_low" => out.clip_low,
                "clip_high" => out.clip_high,
                _ => out.clip_region,
            };
            assert!(
                (got - c[key].as_f64().unwrap()).abs() < 1e-12,
                "{}: {key}",
                c["name"]
            );
        }
        if let Some(kl) = c.get("kl").and_then(|v| v.as_f64()) {
            assert!((out.kl.unwrap() - kl).abs() <= 1e-9 * kl.abs().max(1e-12));
        }
    }
}

/// The DPO losses (sigmoid, IPO) and their gradients with respect to the sequence
/// log-probabilities equal TRL's (≤ 1e-6 relative).
#[test]
fn dpo_loss_and_gradient_equal_trl() {
    let fx = common::read_json(&common::fixture("rl").join("trl.json"));
    let cases = fx["dpo"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for c in cases {
        let kind: DpoKind = serde_json::from_value(c["loss_type"].clone()).unwrap();
        let loss = DpoLoss {
            kind,
            beta: c["beta"].as_f64().unwrap(),
        };
        let chosen = vector(&c["chosen_logps"]).set_requires_grad(true);
        let rejected = vector(&c["rejected_logps"]).set_requires_grad(true);
        let out = loss.compute(&Pairs {
            chosen: &chosen,
            rejected: &rejected,
            ref_chosen: &vector(&c["ref_chosen_logps"]),
            ref_rejected: &vector(&c["ref_rejected_logps"]),
            chosen_tokens: &vector(&c["chosen_tokens"]),
            rejected_tokens: &vector(&c["rejected_tokens"]),
        });
        let want = c["loss"].as_f64().unwrap();
        let got = out.loss.double_value(&[]);
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{}: loss {got} vs TRL {want}",
            c["name"]
        );
        out.loss.backward();
        for (t, key) in [(&chosen, "grad_chosen"), (&rejected, "grad_rejected")] {
            let e = rel(&t.grad(), &vector(&c[key]));
            assert!(e <= 1e-6, "{}: {key} {e:.3e}", c["name"]);
        }
    }
}

/// Pair files in the layouts preference data comes in — ours, RLAIF-V's `question`, a LLaVA or
/// ShareGPT conversation, LLaVA-RLHF's two outputs and preference — read to the same pairs; bad
/// pairs are named by index and kind.
#[test]
fn pair_files_read_in_every_layout() {
    use xrayglm::data::records::{load_pairs, BadKind, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    for f in ["a.png", "b.png"] {
        std::fs::write(dir.path().join(f), common::film_png(true, 2)).unwrap();
    }
    let file = dir.path().join("pairs.json");
    std::fs::write(
        &file,
        serde_json::json!([
            {"image": "a.png", "prompt": "Q", "chosen": ENLARGED, "rejected": NORMAL},
            {"image": "a.png", "question": "Q", "chosen": ENLARGED, "rejected": NORMAL, "ds_name": "x"},
            {"images": ["a.png", "b.png"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nQ0"}, {"from": "gpt", "value": "A0"},
                {"from": "human", "value": "Q"}],
             "chosen": ENLARGED, "rejected": NORMAL},
            {"id": 7, "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "the dataset's"}],
             "output_1": {"from": "llava", "value": NORMAL}, "output_2": {"from": "llava", "value": ENLARGED},
             "preference": 2},
            {"image": "a.png", "messages": [
                {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
             "chosen": ENLARGED, "rejected": NORMAL},
            {"image": "a.png", "prompt": "Q", "chosen": NORMAL, "rejected": NORMAL},
            {"image": "a.png", "prompt": "Q", "chosen": ENLARGED},
            {"image": "missing.png", "prompt": "Q", "chosen": ENLARGED, "rejected": NORMAL},
            {"image": "a.png", "prompt": 5, "chosen": ENLARGED, "rejected": NORMAL},
            {"image": "a.png", "conversations": [{"from": "human", "value": "Q"}],
             "output_1": "x", "output_2": "y", "preference": 3},
        ])
        .to_string(),
    )
    .unwrap();
    let loaded = load_pairs(
        &file,
        &LoadOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.total, 10);
    let p = &loaded.pairs;
    assert_eq!(p.len(), 5, "{:?}", loaded.bad);
    for pair in p {
        assert_eq!(
            (pair.chosen.as_str(), pair.rejected.as_str()),
            (ENLARGED, NORMAL)
        );
        assert_eq!(pair.prompt, "Q");
    }
    assert_eq!(p[2].history, vec![("Q0".to_string(), "A0".to_string())]);
    assert_eq!(p[2].images.len(), 2);
    assert_eq!(p[3].id, "7");
    assert!(p[3].history.is_empty());
    let kinds: Vec<(usize, BadKind)> = loaded.bad.iter().map(|b| (b.index, b.kind)).collect();
    assert_eq!(
        kinds,
        [
            (5, BadKind::IdenticalPair),
            (6, BadKind::MissingField),
            (7, BadKind::MissingImage),
            (8, BadKind::NotAString),
            (9, BadKind::MissingField),
        ]
    );
    assert!(loaded.bad[3]
        .message
        .contains("pair 8: field \"prompt\" is a number"));
    // Without skip_bad the first bad pair is the error.
    let e = load_pairs(&file, &LoadOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("pair 5"), "{e:#}");
}

/// Prompts of different lengths (one with a film) on the tiny random model, and sampling limited
/// to 16 tokens and `<eop>` so that replies end at different steps.
fn rollout_setup() -> (
    xrayglm::model::visualglm::VisualGlm,
    Vec<xrayglm::infer::engine::rollout::RolloutPrompt>,
    xrayglm::infer::engine::rollout::RolloutConfig,
) {
    use xrayglm::infer::engine::rollout::{RolloutConfig, RolloutPrompt};
    use xrayglm::model::positions::Prefix;
    use xrayglm::tokenizer::ids;
    let cfg = xrayglm::model::config::ModelConfig::preset("tiny").unwrap();
    // The weights are drawn from libtorch's global generator: one test at a time.
    let _one = common::serial();
    tch::manual_seed(5);
    let m =
        xrayglm::model::visualglm::VisualGlm::new(cfg.clone(), tch::Device::Cpu, tch::Kind::Float)
            .unwrap();
    let text = |n: usize| -> Vec<i64> {
        let mut v: Vec<i64> = (0..n as i64).map(|i| 20 + (i * 7) % 50).collect();
        v.extend([ids::GMASK, ids::SOP]);
        v
    };
    let mut prompts: Vec<RolloutPrompt> = [3usize, 9, 5]
        .iter()
        .map(|&n| {
            let ids = text(n);
            RolloutPrompt {
                prefix: Prefix::new(ids.len() - 1, ids.len() - 2),
                ids,
                image_starts: vec![],
                embeds: None,
            }
        })
        .collect();
    // A prompt with a film: the image slots after the first 2 tokens.
    let (_, image) = xrayglm::bench::model_inputs(&cfg, 1, 64, tch::Device::Cpu);
    let embeds = tch::no_grad(|| m.encode_image(&image, false).2);
    let l = cfg.sat.image_length as usize;
    let mut ids = vec![21, 22];
    ids.extend(std::iter::repeat_n(ids::UNK, l));
    ids.extend([23, ids::GMASK, ids::SOP]);
    prompts.push(RolloutPrompt {
        prefix: Prefix::new(ids.len() - 1, ids.len() - 2),
        ids,
        image_starts: vec![2],
        embeds: Some(embeds),
    });
    let sampling = xrayglm::infer::sampling::SamplingConfig {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        greedy: false,
        seed: 77,
        invalid: vec![0..5, 21..ids::EOP, ids::EOP + 1..ids::EMBEDDING_ROWS],
    };
    let rc = RolloutConfig {
        group: 3,
        sampling,
        max_new_tokens: 24,
        max_batch: 64,
    };
    (m, prompts, rc)
}

/// Rollouts through continuous batching: the same replies whether every row decodes together or
/// one prompt's group at a time (each sample has its own generator), replies of one prompt that
/// differ, ends at different steps; greedy replies equal a recomputation without a cache.
#[test]
fn rollouts_do_not_depend_on_the_batch_and_equal_a_full_recomputation() {
    use xrayglm::infer::engine::rollout::{rollouts, RolloutConfig};
    use xrayglm::tokenizer::ids;
    let (m, prompts, rc) = rollout_setup();
    let all = rollouts(&m.chatglm, &prompts, &rc).unwrap();
    let one_group = rollouts(
        &m.chatglm,
        &prompts,
        &RolloutConfig {
            max_batch: 3,
            ..rc.clone()
        },
    )
    .unwrap();
    assert_eq!(all, one_group);
    assert_eq!(all.len(), 12);
    assert_eq!(
        all.iter().map(|r| r.prompt).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    );
    let lengths: std::collections::BTreeSet<usize> = all.iter().map(|r| r.tokens.len()).collect();
    assert!(lengths.len() >= 4, "{lengths:?}");
    assert!(all.iter().any(|r| r.ended) && all.iter().any(|r| !r.ended));
    for r in &all {
        assert!(r.tokens.iter().all(|&t| (5..21).contains(&t)), "{r:?}");
        assert_eq!(r.ended, r.tokens.len() < 24);
    }
    for p in 0..4 {
        let g = &all[3 * p..3 * p + 3];
        assert!(
            g[0].tokens != g[1].tokens || g[1].tokens != g[2].tokens,
            "{g:?}"
        );
    }
    let other_seed = rollouts(&m.chatglm, &prompts, &{
        let mut c = rc.clone();
        c.sampling.seed = 78;
        c
    })
    .unwrap();
    assert_ne!(all, other_seed);

    // Greedy: each token the arg-max of a forward over the whole sequence so far.
    let mut greedy = rc.clone();
    greedy.sampling.greedy = true;
    greedy.group = 1;
    greedy.max_new_tokens = 8;
    let got = rollouts(&m.chatglm, &prompts, &greedy).unwrap();
    for (p, r) in prompts.iter().zip(&got) {
        let mut seq = p.ids.clone();
        let mut want = Vec::new();
        for _ in 0..8 {
            let len = seq.len() as i64;
            let input = Tensor::from_slice(&seq).view([1, len]);
            let pos = xrayglm::model::positions::batch(&[p.prefix], len, tch::Device::Cpu);
            let mask = xrayglm::model::positions::attention_mask(
                &[p.prefix.context_length],
                len,
                tch::Device::Cpu,
            );
            let starts: Vec<(i64, i64)> = p.image_starts.iter().map(|&s| (0, s)).collect();
            let logits = tch::no_grad(|| {
                m.chatglm.forward(
                    &xrayglm::model::chatglm::GlmInputs {
                        input_ids: &input,
                        position_ids: &pos,
                        attention_mask: &mask,
                        image_embeds: p.embeds.as_ref(),
                        image_at: xrayglm::model::chatglm::ImageAt::of(&starts, 1),
                    },
                    false,
                )
            });
            let last = logits.select(1, len - 1).squeeze_dim(0);
            let allowed = Tensor::cat(&[last.narrow(0, 5, 16), last.narrow(0, ids::EOP, 1)], 0);
            let k = allowed.argmax(0, false).int64_value(&[]);
            let t = if k == 16 { ids::EOP } else { 5 + k };
            if t == ids::EOP {
                break;
            }
            want.push(t);
            seq.push(t);
        }
        assert_eq!(r.tokens, want, "prompt of {} tokens", p.ids.len());
    }
}

/// GRPO on a task learnable in a few steps: the reward is the share of a reply's tokens that are
/// token 9 (one of the 17 the sampling allows). Eight steps of rollouts through the engine,
/// group advantages and the GRPO loss on the tiny model's adapters raise the mean reward.
#[test]
fn grpo_steps_raise_a_learnable_reward() {
    use xrayglm::train::grpo::{grpo_backward, GrpoConfig};
    use xrayglm::train::optim::{AdamW, AdamWConfig};
    let (m, prompts, mut rc) = rollout_setup();
    rc.group = 4;
    rc.max_new_tokens = 12;
    tch::no_grad(|| {
        for (k, mut v) in m.lora.variables() {
            if k.contains("matrix_B") {
                let _ = v.zero_();
            }
        }
    });
    let mut opt = AdamW::new(
        m.lora.variables().into_iter().collect(),
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    );
    let cfg = |seed: u64| GrpoConfig {
        rollout: xrayglm::infer::engine::rollout::RolloutConfig {
            sampling: xrayglm::infer::sampling::SamplingConfig {
                seed,
                ..rc.sampling.clone()
            },
            ..rc.clone()
        },
        loss: GrpoLoss {
            norm: GrpoNorm::Dapo,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            max_completion_length: 12,
        },
        scale: RewardScale::Group,
    };
    let reward = |rs: &[xrayglm::infer::engine::rollout::Rollout]| -> Vec<f64> {
        rs.iter()
            .map(|r| {
                if r.tokens.is_empty() {
                    0.0
                } else {
                    r.tokens.iter().filter(|&&t| t == 9).count() as f64 / r.tokens.len() as f64
                }
            })
            .collect()
    };
    let start = xrayglm::train::policy::Reference::snapshot(&m);
    let mut means = Vec::new();
    for step in 0..8 {
        opt.zero_grad();
        let (stats, replies) =
            grpo_backward(&m, &prompts, &cfg(100 + step), None, &reward).unwrap();
        assert_eq!(replies.len(), 16);
        assert!(
            stats.loss.is_finite() && stats.rollout_tokens > 0,
            "{stats:?}"
        );
        means.push(stats.rewards.mean);
        opt.step(2e-2);
    }
    eprintln!("GRPO mean reward by step: {means:?}");
    let (first, last) = (means[0], (means[6] + means[7]) / 2.0);
    assert!(first < 0.2, "{means:?}");
    assert!(last > first + 0.2, "{means:?}");
    // A KL term needs the reference policy. Against the adapters it started from the trained
    // policy has drifted (KL > 0); against itself the KL is 0 and the loss has no KL part.
    let mut with_kl = cfg(1);
    with_kl.loss.beta = 0.04;
    assert!(grpo_backward(&m, &prompts, &with_kl, None, &reward).is_err());
    // (No dropout in the tiny model's adapters: the policy's train-mode log-probs are its
    // eval-mode ones.)
    let now = xrayglm::train::policy::Reference::snapshot(&m);
    opt.zero_grad();
    let (same, _) = grpo_backward(&m, &prompts, &with_kl, Some(&now), &reward).unwrap();
    assert!(same.kl.unwrap().abs() < 1e-6, "{same:?}");
    let (drift, _) = grpo_backward(&m, &prompts, &with_kl, Some(&start), &reward).unwrap();
    assert!(drift.kl.unwrap() > 1e-3, "{drift:?}");
    // The reference's forward put the policy's adapters back.
    let (again, _) = grpo_backward(&m, &prompts, &with_kl, Some(&now), &reward).unwrap();
    assert!(again.kl.unwrap().abs() < 1e-6, "{again:?}");
}

/// DPO on token pairs (the chosen answer token 9 repeated, the rejected token 12): a few steps
/// against the starting adapters as the reference move the implicit rewards apart — the chosen
/// above the rejected for every pair — and the sigmoid loss below its starting ln 2.
#[test]
fn dpo_steps_prefer_the_chosen_answers() {
    use xrayglm::train::dpo::{dpo_backward, TokenPair};
    use xrayglm::train::optim::{AdamW, AdamWConfig};
    use xrayglm::train::policy::Reference;
    let (m, prompts, _) = rollout_setup();
    tch::no_grad(|| {
        for (k, mut v) in m.lora.variables() {
            if k.contains("matrix_B") {
                let _ = v.zero_();
            }
        }
    });
    let reference = Reference::snapshot(&m);
    let pairs: Vec<TokenPair> = prompts
        .into_iter()
        .map(|prompt| TokenPair {
            prompt,
            chosen: vec![9; 5],
            rejected: vec![12; 5],
        })
        .collect();
    let mut opt = AdamW::new(
        m.lora.variables().into_iter().collect(),
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    );
    let loss = DpoLoss {
        kind: DpoKind::Sigmoid,
        beta: 0.1,
    };
    let mut seen = Vec::new();
    for _ in 0..6 {
        opt.zero_grad();
        let out = dpo_backward(&m, &pairs, None, &loss, &reference, 1.0).unwrap();
        seen.push((
            out.loss.double_value(&[]),
            out.chosen_reward - out.rejected_reward,
            out.accuracy,
        ));
        opt.step(2e-2);
    }
    eprintln!("DPO (loss, margin, accuracy) by step: {seen:?}");
    // Policy = reference at the start: every log-ratio 0, the loss ln 2.
    assert!(
        (seen[0].0 - 2f64.ln()).abs() < 1e-6 && seen[0].1.abs() < 1e-9,
        "{seen:?}"
    );
    let last = seen[5];
    assert!(last.0 < 0.6 && last.1 > 0.5 && last.2 == 1.0, "{seen:?}");
}

/// A record's prompt for rollouts and pairs, followed by an answer's ids and `<eop>`, is the
/// training sample of that answer (films, earlier turns, positions), so GRPO and DPO score
/// answers exactly as SFT trains them.
#[test]
fn a_prompt_and_its_answer_are_the_training_sample() {
    use xrayglm::data::sample::{SampleBuilder, SampleConfig};
    use xrayglm::train::policy::{answer_ids, prompt_of};
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = xrayglm::tokenizer::ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap();
    let builder = SampleBuilder::new(
        tok,
        SampleConfig {
            image_length: 4,
            max_target_length: 20,
            ..Default::default()
        },
    )
    .unwrap();
    let history = [("早先的问题".to_string(), "早先的回答".to_string())];
    for (films, hist, answer) in [
        (1, &[][..], ENLARGED),
        (2, &history[..], NORMAL),
        (
            1,
            &history[..],
            "心脏增大。心脏增大。心脏增大。心脏增大。心脏增大。心脏增大。",
        ),
    ] {
        let want = builder
            .build_for(films, hist, "这张X光片显示什么？", answer)
            .unwrap();
        let p = prompt_of(&builder, films, hist, "这张X光片显示什么？", None).unwrap();
        let mut got = p.ids.clone();
        got.extend(answer_ids(&builder, answer).unwrap());
        got.push(xrayglm::tokenizer::ids::EOP);
        assert_eq!(got, want.input_ids);
        assert_eq!(p.prefix, want.prefix());
        let starts: Vec<i64> = want.image_starts.iter().map(|&i| i as i64).collect();
        assert_eq!(p.image_starts, starts);
    }
}

/// A short fine-tuning run on the small synthetic set, made once for the tests that start GRPO
/// and DPO from it.
struct Sft {
    dir: tempfile::TempDir,
    shared: std::path::PathBuf,
}

impl Sft {
    fn run(&self) -> std::path::PathBuf {
        self.dir.path().join("sft")
    }

    /// `xrayglm finetune` on this folder's synthetic set as run `name`, starting from the
    /// fine-tuned run with `method`, a few logged steps.
    fn finetune(&self, name: &str, method: &str, extra: &[&str]) -> std::process::Command {
        let mut c = self.fresh(name, method, extra);
        c.arg("--from_pretrained").arg(self.run());
        c
    }

    /// The same, starting afresh (the preset's random weights, adapters B = 0).
    fn fresh(&self, name: &str, method: &str, extra: &[&str]) -> std::process::Command {
        let mut sets = common::small_run(self.dir.path(), name);
        sets.extend(
            [
                format!("train.method={method:?}"),
                "train.train_iters=4".into(),
                "train.log_interval=1".into(),
                "train.save_interval=2".into(),
                "train.val_fraction=0".into(),
                "train.lr=1e-3".into(),
                "train.schedule=\"constant\"".into(),
                "loader.workers=1".into(),
            ]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string())),
        );
        let mut c = common::bin();
        c.arg("finetune")
            .args(common::set_args(sets))
            .env("XRAYGLM_TOKENIZER", common::ice_text(&self.shared))
            .env("OMP_NUM_THREADS", "1");
        c
    }
}

fn sft() -> Option<&'static Sft> {
    static SFT: std::sync::OnceLock<Option<Sft>> = std::sync::OnceLock::new();
    SFT.get_or_init(|| {
        let shared = common::shared()?;
        let dir = tempfile::tempdir().unwrap();
        let mut sets = common::small_run(dir.path(), "sft");
        sets.extend(
            [
                "train.train_iters=6",
                "train.val_fraction=0",
                "train.lr=1e-3",
                "loader.workers=1",
            ]
            .map(String::from),
        );
        common::ok(
            common::bin()
                .arg("finetune")
                .args(common::set_args(sets))
                .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
                .env("OMP_NUM_THREADS", "1"),
        );
        Some(Sft { dir, shared })
    })
    .as_ref()
}

/// The step records of a run's metrics.jsonl.
fn steps(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn final_adapters(run: &std::path::Path) -> Vec<(String, Tensor)> {
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    let mut v: Vec<(String, Tensor)> =
        common::tensors(&run.join(latest.trim()).join("lora.safetensors"))
            .into_iter()
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// GRPO as a training method: from the fine-tuned checkpoint (its adapters the reference), two
/// updates per rollout batch, every statistic logged; a run stopped after 2 steps and resumed
/// samples the same replies and ends with the same adapters bit for bit; the result chats and
/// serves like any run.
#[test]
fn grpo_runs_resume_exactly_and_the_result_chats_and_serves() {
    let Some(s) = sft() else { return };
    let _one = common::serial();
    let grpo = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "rl.group=4",
            "rl.max_new_tokens=12",
            "rl.mu=2",
            "rl.reward.rouge_l=0.5",
            "rl.reward_threads=2",
        ];
        args.extend(extra);
        s.finetune(name, "grpo", &args)
    };
    common::ok(&mut grpo("grpo", &[]));
    let run = s.dir.path().join("grpo");
    let full = steps(&run);
    assert_eq!(full.len(), 4);
    for rec in &full {
        for key in [
            "rl/reward",
            "rl/reward_std",
            "rl/reward_ce_f1",
            "rl/reward_rouge_l",
            "rl/kl",
            "rl/clip_fraction",
            "rl/entropy",
            "rl/completion_tokens",
            "rl/zero_advantage_groups",
            "rl/rollout_tokens_per_s",
        ] {
            let v = rec[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v >= 0.0, "{key} in {rec}");
        }
        assert!(rec["loss"].as_f64().unwrap().is_finite(), "{rec}");
        let tokens = rec["rl/completion_tokens"].as_f64().unwrap();
        assert!((1.0..=13.0).contains(&tokens), "{rec}");
    }
    // The run's base is the fine-tuned checkpoint it started from.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("4").join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let base = std::path::PathBuf::from(state["base_model"].as_str().unwrap());
    assert_eq!(base, std::fs::canonicalize(s.run().join("6")).unwrap());
    assert_eq!(state["opt_steps"], 8, "two updates per rollout batch");
    // Stopped at step 2 and resumed: the same trajectory.
    common::ok(&mut grpo("resumed", &["train.stop_at=2"]));
    common::ok(&mut grpo("resumed", &[]));
    let resumed = steps(&s.dir.path().join("resumed"));
    assert_eq!(resumed.len(), 4);
    for (a, b) in full.iter().zip(&resumed) {
        for key in ["loss", "rl/reward", "rl/kl", "rl/completion_tokens"] {
            assert_eq!(a[key], b[key], "{key} at step {}", a["step"]);
        }
    }
    let (a, b) = (
        final_adapters(&run),
        final_adapters(&s.dir.path().join("resumed")),
    );
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(va.equal(vb), "{ka} differs after the resume");
    }
    // The adapters moved away from the fine-tuned ones.
    let start = final_adapters(&s.run());
    assert!(a.iter().zip(&start).any(|((_, x), (_, y))| !x.equal(y)));

    // The result chats and serves.
    let film = s.dir.path().join("data/Xray/synth_00000.png");
    let out = common::ok(
        common::bin()
            .args([
                "chat",
                "--greedy",
                "--max_length",
                "120",
                "--from_pretrained",
            ])
            .arg(&run)
            .arg("--image")
            .arg(&film)
            .env("XRAYGLM_TOKENIZER", common::ice_text(&s.shared)),
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let server = common::Server::spawn(
        common::bin()
            .args([
                "serve",
                "--port",
                "0",
                "--max_length",
                "120",
                "--from_pretrained",
            ])
            .arg(&run)
            .env("XRAYGLM_TOKENIZER", common::ice_text(&s.shared)),
    );
    let b64 = xrayglm::infer::openai::base64_encode(&std::fs::read(&film).unwrap());
    let body = serde_json::json!({
        "model": "grpo",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "这张胸片显示了什么？"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}}]}],
        "max_tokens": 16,
    });
    let (code, reply) = common::http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
    );
    assert_eq!(code, 200, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{reply}");
}

/// DPO as a training method on a pair file (the film's own report chosen, a list of findings
/// rejected): at the first step the policy is the reference (loss ln 2); the updates raise the
/// chosen answers' implicit reward above the rejected ones'.
#[test]
fn dpo_trains_on_a_pair_file() {
    let Some(s) = sft() else { return };
    let _one = common::serial();
    let data = s.dir.path().join("data/Xray");
    let loaded =
        xrayglm::data::records::load_records(&data.join("synth-zh.json"), &Default::default())
            .unwrap();
    let recs = &loaded.records;
    let pairs: Vec<serde_json::Value> = recs
        .iter()
        .map(|r| {
            serde_json::json!({
                "image": r.images[0].file_name().unwrap().to_str().unwrap(),
                "prompt": r.prompt,
                "chosen": r.label,
                "rejected": "肺部阴影。气胸。骨折。",
            })
        })
        .collect();
    assert!(pairs.len() >= 20);
    let file = data.join("pairs.json");
    std::fs::write(&file, serde_json::to_vec(&pairs).unwrap()).unwrap();
    let pairs_set = format!("rl.pairs={:?}", file.display().to_string());
    common::ok(&mut s.finetune(
        "dpo",
        "dpo",
        &[&pairs_set, "train.train_iters=6", "train.lr=1e-2"],
    ));
    let log = steps(&s.dir.path().join("dpo"));
    assert_eq!(log.len(), 6);
    eprintln!(
        "DPO (loss, margin): {:?}",
        log.iter()
            .map(|r| (
                r["loss"].as_f64().unwrap(),
                r["dpo/margin"].as_f64().unwrap()
            ))
            .collect::<Vec<_>>()
    );
    let first = log[0]["loss"].as_f64().unwrap();
    assert!((first - 2f64.ln()).abs() < 1e-5, "{first}");
    let last = &log[5];
    assert!(last["dpo/margin"].as_f64().unwrap() > 0.5, "{last}");
    assert!(last["loss"].as_f64().unwrap() < 0.5, "{last}");
    assert_eq!(last["dpo/accuracy"], 1.0, "{last}");
    // A DPO run needs its pair file.
    let out = s.finetune("nopairs", "dpo", &[]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rl.pairs"));
}

/// `xrayglm rl-pairs` on the fine-tuned run: K sampled reports per training film, scored, best vs
/// worst where the gap reaches the margin — a pair file that `rl.pairs` reads and DPO trains on.
#[test]
fn rl_pairs_makes_a_pair_file_dpo_reads() {
    let Some(s) = sft() else { return };
    let _one = common::serial();
    let out = s.dir.path().join("data/Xray/self-pairs.json");
    let run = common::ok(
        common::bin()
            .args([
                "rl-pairs",
                "--samples",
                "4",
                "--limit",
                "6",
                "--margin",
                "0.05",
            ])
            .arg("--from_pretrained")
            .arg(s.run())
            .arg("--out")
            .arg(&out)
            .args(common::set_args(
                ["rl.max_new_tokens=16", "rl.reward.rouge_l=1.0"].map(String::from),
            ))
            .env("XRAYGLM_TOKENIZER", common::ice_text(&s.shared))
            .env("OMP_NUM_THREADS", "1"),
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["films"], 6, "{summary}");
    let made = summary["pairs"].as_u64().unwrap() as usize;
    assert!(made >= 3, "{summary}");
    assert_eq!(
        made + summary["below_margin"].as_u64().unwrap() as usize,
        6,
        "{summary}"
    );
    let written: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(written.len(), made);
    for p in &written {
        let (c, r) = (
            p["chosen_reward"].as_f64().unwrap(),
            p["rejected_reward"].as_f64().unwrap(),
        );
        assert!(c - r >= 0.05, "{p}");
        assert_ne!(p["chosen"], p["rejected"], "{p}");
        // Film paths relative to the pair file's folder.
        let film = p["images"][0].as_str().unwrap();
        assert!(!std::path::Path::new(film).is_absolute(), "{p}");
    }
    let loaded = xrayglm::data::records::load_pairs(&out, &Default::default()).unwrap();
    assert_eq!(loaded.pairs.len(), made);
    assert!(loaded.bad.is_empty());
    // DPO trains on them.
    let pairs_set = format!("rl.pairs={:?}", out.display().to_string());
    common::ok(&mut s.finetune(
        "self-dpo",
        "dpo",
        &[&pairs_set, "train.train_iters=2", "loader.batch_size=1"],
    ));
    let log = steps(&s.dir.path().join("self-dpo"));
    assert_eq!(log.len(), 2);
    assert!(log[1]["dpo/accuracy"].as_f64().is_some(), "{:?}", log[1]);
}

/// GRPO over an NF4 base with generation metrics (and a `best` by CE-F1), and with adapters on
/// the vision side, which learn from the policy loss through the films encoded again; a start
/// whose adapters are not the run's `model.lora` is refused.
#[test]
fn grpo_trains_quantized_bases_and_vision_adapters() {
    let Some(s) = sft() else { return };
    let _one = common::serial();
    let short = [
        "train.train_iters=1",
        "rl.group=2",
        "rl.max_new_tokens=6",
        "rl.reward.rouge_l=1.0",
    ];
    let mut nf4 = short.to_vec();
    nf4.extend([
        "model.quantize=\"nf4\"",
        "train.val_fraction=0.2",
        "train.eval_generate_interval=1",
        "train.eval_generate_films=2",
        "train.eval_max_new_tokens=8",
        "train.best_metric=\"ce_f1\"",
    ]);
    common::ok(&mut s.finetune("grpo-nf4", "grpo", &nf4));
    let run = s.dir.path().join("grpo-nf4");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gen = lines
        .iter()
        .rev()
        .find(|v| v.get("gen/ce_f1").is_some())
        .expect("generation metrics");
    for key in [
        "gen/ce_f1",
        "gen/no_finding_share",
        "gen/distinct_reports",
        "gen/length_ratio",
    ] {
        assert!(
            gen[key].as_f64().is_some_and(f64::is_finite),
            "{key}: {gen}"
        );
    }
    assert!(run.join("best").exists());
    assert!(steps(&run)[0]["rl/reward"].as_f64().is_some());

    // Adapters on the vision side: refused over a start without them, trained from a fresh start.
    // (The fresh model's replies tie on the findings; their lengths differ.)
    let mut vit = short.to_vec();
    vit.extend(["model.lora.targets.vit=[0]", "rl.reward.length=1.0"]);
    let out = s.finetune("grpo-vit-init", "grpo", &vit).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.init_from") && err.contains("model.lora"),
        "{err}"
    );
    common::ok(&mut s.fresh("grpo-vit", "grpo", &vit));
    let trained = final_adapters(&s.dir.path().join("grpo-vit"));
    let vit_b: Vec<&Tensor> = trained
        .iter()
        .filter(|(k, _)| k.starts_with("vit") || k.contains("vit."))
        .filter(|(k, _)| k.contains("matrix_B"))
        .map(|(_, v)| v)
        .collect();
    assert!(
        !vit_b.is_empty(),
        "{:?}",
        trained.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert!(
        vit_b.iter().any(|v| v.abs().max().double_value(&[]) > 0.0),
        "the vision adapters did not learn"
    );
}
