//! The benchmark harness in CI's reduced mode: it must run and report sane numbers; speed itself
//! is never asserted (ratios are printed by `xrayglm bench …` and recorded in the README).

mod common;

use std::ffi::OsStr;
use std::process::Command;

/// Run `xrayglm bench <args>`; its stdout, after asserting that it succeeded.
fn bench<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    text
}

/// `xrayglm bench train` on the tiny preset, few steps, xrayglm's side only (the original needs the
/// fixtures venv): OpenI-zh report lengths, every number present and positive.
#[test]
fn train_bench_runs_in_reduced_mode() {
    let Some(shared) = common::shared() else {
        return;
    };
    let mut args: Vec<std::ffi::OsString> = [
        "train", "--preset", "tiny", "--steps", "3", "--warm", "1", "--batch", "2", "--films", "4",
    ]
    .map(Into::into)
    .into();
    args.extend([
        "--reports".into(),
        shared.join("data/Xray/openi-zh.json").into(),
        "--tokenizer".into(),
        common::ice_text(&shared).into(),
    ]);
    let text = bench(args);
    let mean: f64 = text
        .split("mean sample ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no mean sample length:\n{text}"));
    // OpenI-zh samples: prompt + 32 image slots + a report of ~70 tokens (spec §8.4: ~105).
    assert!((60.0..200.0).contains(&mean), "mean sample {mean}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("xrayglm"))
        .unwrap_or_else(|| panic!("no xrayglm row:\n{text}"));
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 4, "{line}");
    assert!(nums.iter().all(|v| *v > 0.0 && v.is_finite()), "{line}");
    // MFU, HFU and the 6·N figure from the trainer's log.
    let pcts: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(')').strip_suffix('%')?.parse().ok())
        .collect();
    assert_eq!(pcts.len(), 3, "{line}");
    assert!(pcts.iter().all(|v| *v > 0.0 && v.is_finite()), "{line}");
    assert_eq!(pcts[0], pcts[1], "nothing recomputed: {line}");
}

/// `xrayglm bench step`: its FLOPs per step are the accounting's for its batch (2 rows of 96
/// tokens, the 45 after the prompt counted in each, both films encoded), and its MFU is against
/// the peak given.
#[test]
fn step_bench_reports_the_accounted_flops() {
    let text = bench(["step", "--steps", "1", "--peak_tflops", "1"]);
    let cfg = xrayglm::model::config::ModelConfig::preset("tiny").unwrap();
    let shape = xrayglm::model::flops::StepShape {
        rows: 2,
        seq: 96,
        targets: 90,
        films: 2,
    };
    let f = xrayglm::model::flops::training_step(&cfg, &shape, &Default::default()).model();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("FLOPs/step"))
        .unwrap_or_else(|| panic!("no FLOPs line:\n{text}"));
    assert!(line.contains(&format!("{f:.3e}")), "{line} vs {f:.3e}");
    assert!(line.contains("of 1.00 TFLOP/s (--peak_tflops)"), "{line}");
}

/// `xrayglm bench layer` on the small preset's width: one row per kernel choice, every time
/// positive. Needs nothing from ../shared.
#[test]
fn layer_bench_times_every_kernel_choice() {
    let text = bench([
        "layer", "--preset", "small", "--layers", "2", "--batch", "2", "--seq", "80", "--steps",
        "1",
    ]);
    let times: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            l.split("ms/step")
                .next()?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(times.len(), 7, "{text}");
    assert!(times.iter().all(|t| *t > 0.0 && t.is_finite()), "{text}");
    assert!(
        text.contains("frozen weights tracked by autograd"),
        "{text}"
    );
}

/// `xrayglm bench data` on a few of the public X-rays, tokenized through the loader: every rate
/// present and positive. (`--vs-sat` needs the fixtures venv, which CI does not build.)
#[test]
fn data_bench_runs_in_reduced_mode() {
    let Some(shared) = common::shared() else {
        return;
    };
    let text = bench([
        OsStr::new("data"),
        OsStr::new("--images"),
        OsStr::new("16"),
        OsStr::new("--from"),
        shared.join("data/Xray").as_os_str(),
        OsStr::new("--tokenizer"),
        common::ice_text(&shared).as_os_str(),
    ]);
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let (head, _) = l
                .split_once(" images/s")
                .or_else(|| l.split_once(" samples/s"))?;
            head.split_whitespace().last()?.parse().ok()
        })
        .collect();
    assert_eq!(rates.len(), 4, "{text}");
    assert!(rates.iter().all(|r| *r > 0.0 && r.is_finite()), "{text}");
    // The original needs sentencepiece's model file, not a tokenizer.json.
    let out = Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .args([
            "bench",
            "data",
            "--images",
            "2",
            "--tokenizer",
            "tokenizer.json",
        ])
        .args(["--vs-sat", "python3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ice_text.model"),
        "{err}"
    );
}

/// `xrayglm bench serve` on the tiny preset with 1 and 2 clients and 4 tokens: the in-process
/// servers answer every request (one at a time, together, over two adapters both ways) and every
/// row of the report has positive numbers; the cache section has its four turns (the server with
/// caches replied as the one without, or the bench fails) and the repeated request's line.
#[test]
fn serve_bench_runs_in_reduced_mode() {
    let Some(shared) = common::shared() else {
        return;
    };
    let mut args: Vec<std::ffi::OsString> = [
        "serve",
        "--preset",
        "tiny",
        "--clients",
        "1,2",
        "--new_tokens",
        "4",
    ]
    .map(Into::into)
    .into();
    args.extend(["--tokenizer".into(), common::ice_text(&shared).into()]);
    let text = bench(args);
    let (batching, caches) = text.split_once("  caches:").expect("a cache section");
    let rows: Vec<&str> = batching
        .lines()
        .filter(|l| l.contains(" | ") && !l.contains("clients"))
        .collect();
    assert_eq!(rows.len(), 4, "1, 2, 8 mixed both ways:\n{text}");
    for r in rows {
        let nums: Vec<f64> = r
            .split(['|', '/', 'x'])
            .filter_map(|w| w.trim().parse().ok())
            .collect();
        assert!(nums.len() >= 7, "{r}");
        assert!(nums.iter().all(|v| *v > 0.0 && v.is_finite()), "{r}");
    }
    assert!(text.contains("one at a time (8 requests)"), "{text}");
    let turns: Vec<Vec<f64>> = caches
        .lines()
        .filter(|l| l.contains(" | ") && !l.contains("turn"))
        .map(|r| {
            r.split(['|', 'x'])
                .filter_map(|w| w.trim().parse().ok())
                .collect()
        })
        .collect();
    assert_eq!(turns.len(), 4, "{caches}");
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(t.len(), 5, "{caches}");
        assert_eq!(t[0], (i + 1) as f64);
        assert!(t.iter().all(|v| *v > 0.0 && v.is_finite()), "{caches}");
    }
    // Each turn's prompt holds the one before it.
    assert!(turns.windows(2).all(|w| w[1][1] > w[0][1]), "{caches}");
    assert!(caches.contains("from the prompt cache"), "{caches}");
    // The long prompt arriving while replies stream: its prompt tokens and both gaps.
    let stall = caches
        .lines()
        .find(|l| l.contains("replies stream"))
        .expect("the chunked-prefill line");
    let tokens: usize = stall
        .split_whitespace()
        .nth(1)
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(tokens > 1000, "{stall}");
    let gaps: Vec<f64> = stall
        .split(" ms")
        .filter_map(|s| s.split_whitespace().last()?.parse().ok())
        .collect();
    assert!(gaps.len() >= 4 && gaps.iter().all(|g| *g > 0.0), "{stall}");
}

/// `bench rl` in reduced mode: both ways of sampling the rollouts produce tokens, the ratio and
/// the goal line are printed, and the GRPO step's four parts add up to its time.
#[test]
fn rl_bench_runs_in_reduced_mode() {
    let text = bench([
        "rl",
        "--preset",
        "tiny",
        "--prompts",
        "2",
        "--group",
        "4",
        "--new_tokens",
        "6",
    ]);
    let tps: Vec<f64> = text
        .split("tokens/s")
        .filter_map(|s| s.split_whitespace().last()?.parse().ok())
        .collect();
    assert_eq!(tps.len(), 2, "{text}");
    assert!(tps.iter().all(|&t| t > 0.0), "{text}");
    assert!(text.contains("goal >= 3x at G = 8"), "{text}");
    let shares: Vec<f64> = text
        .split(" %")
        .filter_map(|s| s.split_whitespace().last()?.parse().ok())
        .collect();
    assert_eq!(shares.len(), 4, "{text}");
    assert!((shares.iter().sum::<f64>() - 100.0).abs() <= 2.0, "{text}");
    // The two ways to the reference's log-probs agree.
    let agree: f64 = text
        .split("log-probs agree to ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    let policy: f64 = text
        .split("the policy's differ by ")
        .nth(1)
        .and_then(|s| {
            s.trim_end_matches(|c: char| c == ')' || c.is_whitespace())
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        agree <= 1e-4 && policy > 1e-3 && policy > 100.0 * agree,
        "{text}"
    );
}
