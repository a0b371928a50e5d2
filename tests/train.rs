//! The trainer: exact resume, checkpoints that load, atomic saves under SIGKILL, SIGTERM, fp16
//! loss scaling, logs, and bad configs. Uses the `tiny` preset on a small synthetic set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use xrayglm::config::Config;
use xrayglm::tokenizer::ChatGlmTokenizer;

/// A config for a quick run in `dir` (synthetic set of 24 films shared across runs in `data`).
fn cfg(dir: &Path, name: &str, extra: &[&str]) -> Config {
    let mut o = common::small_run(dir, name);
    o.extend(
        [
            "loader.workers=1",
            "model.preset=\"tiny\"",
            "model.vision_dropout=0.1",
            "model.glm_dropout=0.1",
            "train.train_iters=10",
            "train.lr=1e-3",
            "train.schedule=\"warmup_cosine\"",
            "train.log_interval=1",
            "train.save_interval=5",
            "train.eval_interval=5",
            "train.eval_batches=1",
            "train.val_fraction=0.1",
        ]
        .map(String::from),
    );
    o.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &o).unwrap()
}

fn tokenizer() -> Option<ChatGlmTokenizer> {
    let shared = common::shared()?;
    Some(ChatGlmTokenizer::from_path(&common::ice_text(&shared)).unwrap())
}

fn losses(run: &Path) -> Vec<(i64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_i64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The frozen-vision cache (vision dropout off): the same losses as encoding every batch
/// (≤ 1e-5 relative: films are encoded one at a time instead of in batches), hits once films
/// repeat, and resuming with an empty cache continues bit for bit.
#[test]
fn vision_cache_keeps_the_losses_and_resumes_exactly() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "model.vision_dropout=0.0",
        "train.train_iters=16",
        "train.save_interval=8",
    ];
    let with = |name: &str, extra: &[&str]| {
        let mut e: Vec<&str> = common.to_vec();
        e.extend(extra);
        cfg(dir.path(), name, &e)
    };
    let cached = xrayglm::train::finetune(&with("cached", &[]), &tok).unwrap();
    let plain =
        xrayglm::train::finetune(&with("plain", &["train.vision_cache=false"]), &tok).unwrap();
    let start = std::fs::read_to_string(cached.run_dir.join("metrics.jsonl")).unwrap();
    assert!(start.contains("\"vision_cache\":true"), "{start}");
    let last: serde_json::Value = start
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v.get("loss").is_some())
        .unwrap();
    assert_eq!(last["step"], 16);
    // 21 training films: epoch 1 is 11 steps (the last with one film), steps 12-16 hit.
    assert_eq!(last["vision_cache_films"], 21, "{last}");
    assert_eq!(last["vision_cache_hits"], 5 * 2, "{last}");
    let (a, b) = (losses(&cached.run_dir), losses(&plain.run_dir));
    assert_eq!(a.len(), 16);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs(),
            "step {s}: {x} cached vs {y}"
        );
    }
    xrayglm::train::finetune(&with("halves", &["train.stop_at=8"]), &tok).unwrap();
    let cont = xrayglm::train::finetune(&with("halves", &[]), &tok).unwrap();
    for ((s, x), (_, y)) in a.iter().zip(&losses(&cont.run_dir)) {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "step {s}: {x} vs {y} after resume"
        );
    }
}

#[test]
fn ten_steps_equal_five_plus_resume_plus_five_bitwise() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let straight = xrayglm::train::finetune(&cfg(dir.path(), "straight", &[]), &tok).unwrap();
    assert_eq!(straight.steps, 10);
    let a = losses(&straight.run_dir);
    assert_eq!(a.len(), 10);
    let half =
        xrayglm::train::finetune(&cfg(dir.path(), "halves", &["train.stop_at=5"]), &tok).unwrap();
    assert_eq!(half.steps, 5);
    let cont = xrayglm::train::finetune(&cfg(dir.path(), "halves", &[]), &tok).unwrap();
    assert_eq!(cont.steps, 10);
    let b = losses(&cont.run_dir);
    assert_eq!(b.len(), 10);
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert_eq!(la.to_bits(), lb.to_bits(), "step {sa}: {la} vs {lb}");
    }
    let lr = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()?
                    .get("lr")?
                    .as_f64()
            })
            .collect()
    };
    assert_eq!(lr(&straight.run_dir), lr(&cont.run_dir));
    // The final checkpoint loads into a model with the trained LoRA.
    let latest = std::fs::read_to_string(cont.run_dir.join("latest")).unwrap();
    let ck = cont.run_dir.join(latest.trim());
    let (m, _) = xrayglm::weights::source::load_model(&ck, &Default::default()).unwrap();
    let saved = xrayglm::weights::read_safetensors(&ck.join("lora.safetensors")).unwrap();
    let vars = m.lora.variables();
    for (k, v) in saved {
        assert!(vars[&k].equal(&v), "{k}");
    }
    // Logs: TensorBoard scalars are readable by an independent reader.
    // (one event file per process: the run was resumed once)
    let files: Vec<_> = std::fs::read_dir(cont.run_dir.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2);
    let scalars: Vec<(i64, String, f32)> = files
        .iter()
        .flat_map(|f| xrayglm::train::metrics::read_scalars(f).unwrap())
        .collect();
    assert!(scalars
        .iter()
        .any(|(s, t, _)| *s == 10 && t == "train/loss"));
    assert!(scalars.iter().any(|(_, t, _)| t == "val/loss"));
}

#[test]
fn fp16_overflow_skips_steps_and_lowers_the_scale() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(
        dir.path(),
        "fp16",
        &[
            "train.precision=\"fp16\"",
            "train.initial_scale_power=24",
            "train.hysteresis=2",
            "train.train_iters=12",
        ],
    );
    let s = xrayglm::train::finetune(&c, &tok).unwrap();
    assert!(
        s.skipped >= 2,
        "scale 2^24 must overflow fp16 at first: {s:?}"
    );
    assert!(s.skipped < 12, "…and come down until steps succeed: {s:?}");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(s.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scales: Vec<f64> = log
        .iter()
        .filter_map(|v| v.get("loss_scale")?.as_f64())
        .collect();
    assert!(scales.last().unwrap() < &2f64.powi(24));
    assert!(
        scales.windows(2).all(|w| w[1] <= w[0]),
        "the scale only falls here: {scales:?}"
    );
}

fn xrayglm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xrayglm"))
}

fn cli_args(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut o = common::small_run(dir, name);
    o.push("train.eval_interval=1000".into());
    o.extend(extra.iter().map(|s| s.to_string()));
    let mut a = vec!["finetune".to_string()];
    a.extend(common::set_args(o));
    a
}

#[test]
fn killing_the_trainer_at_any_moment_leaves_a_loadable_checkpoint() {
    let _serial = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let args = cli_args(
        dir.path(),
        "kill",
        &[
            "train.train_iters=400",
            "train.save_interval=1",
            "train.keep_last=2",
        ],
    );
    let run = dir.path().join("kill");
    for (i, extra_ms) in [0u64, 170, 430].iter().enumerate() {
        let before = std::fs::read_to_string(run.join("latest")).unwrap_or_default();
        let mut child = xrayglm()
            .args(&args)
            .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this process has written a checkpoint of its own, then kill it at some
        // moment of its save-every-step loop.
        let t = std::time::Instant::now();
        while std::fs::read_to_string(run.join("latest")).unwrap_or_default() == before {
            assert!(
                t.elapsed().as_secs() < 120,
                "kill {i}: no checkpoint written"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(*extra_ms));
        child.kill().unwrap(); // SIGKILL: no chance to clean up
        child.wait().unwrap();
        let latest = std::fs::read_to_string(run.join("latest"))
            .unwrap_or_else(|_| panic!("kill {i}: no latest"));
        let ck = run.join(latest.trim());
        xrayglm::weights::source::load_model(&ck, &Default::default()).unwrap_or_else(|e| {
            panic!(
                "kill {i}: latest checkpoint {} does not load: {e:#}",
                ck.display()
            )
        });
    }
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_143() {
    let _serial = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let args = cli_args(
        dir.path(),
        "term",
        &["train.train_iters=400", "train.save_interval=1000"],
    );
    let child = xrayglm()
        .args(&args)
        .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = dir.path().join("term");
    let t = std::time::Instant::now();
    while !run.join("metrics.jsonl").exists() || losses(&run).len() < 2 {
        assert!(t.elapsed().as_secs() < 60, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // Saved, then exit 128 + 15 so schedulers and `&&` see an interrupted run.
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by signal"));
    let latest: i64 = std::fs::read_to_string(run.join("latest"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (2..400).contains(&latest),
        "saved at the step it stopped: {latest}"
    );
}

#[test]
fn bad_configs_fail_before_any_work() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    for (set, want) in [
        ("train.lr=0", "train.lr must be positive"),
        ("loader.batch_size=0", "batch_size must be positive"),
        ("train.lr=\"fast\"", "train.lr"),
        ("train.learning_rate=1e-4", "learning_rate"),
        ("train.precision=\"fp8\"", "precision"),
    ] {
        let out = xrayglm()
            .args(["finetune", "--set", set])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{set}: {err}");
    }
    let Some(shared) = common::shared() else {
        return;
    };
    let out = xrayglm()
        .args([
            "finetune",
            "--set",
            "data.path=\"missing.json\"",
            "--set",
            "synthetic.count=0",
        ])
        .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.json"),
        "{err}"
    );
    assert!(
        !dir.path().join("checkpoints").exists(),
        "nothing is written before the inputs check out"
    );
    // Inputs that only the data or the model can refute, caught before anything is written:
    // data.pad_to shorter than a sample; more layers to recompute than the model has.
    for (set, want) in [
        ("data.pad_to=40", "data.pad_to 40 is shorter"),
        ("train.checkpoint_layers=9", "checkpoint_layers 9 exceeds"),
    ] {
        let out = xrayglm()
            .args(["finetune", "--set", set])
            .args(["--set", "train.checkpoint_activations=true"])
            .args(["--set", "synthetic.count=8", "--set", "synthetic.size=32"])
            .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{set}: {err}");
        assert!(!dir.path().join("checkpoints").exists(), "{set}");
    }
}

/// `model.quantize = "int8"`: the trainer runs on int8 layer weights (the random preset's base is
/// saved in float before quantizing), the loss falls like the float run's (within 2 % per step),
/// and the saved adapters load over the float base.
#[test]
fn int8_training_runs_and_saves_loadable_adapters() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let float = xrayglm::train::finetune(&cfg(dir.path(), "float", &[]), &tok).unwrap();
    let int8 =
        xrayglm::train::finetune(&cfg(dir.path(), "int8", &["model.quantize=\"int8\""]), &tok)
            .unwrap();
    assert_eq!(int8.steps, 10);
    for ((s, a), (_, b)) in losses(&float.run_dir).iter().zip(&losses(&int8.run_dir)) {
        assert!(
            (a - b).abs() <= 0.02 * a.abs(),
            "step {s}: float {a}, int8 {b}"
        );
    }
    let (m, _) = xrayglm::weights::source::load_model(&int8.run_dir, &Default::default()).unwrap();
    assert!(!m.chatglm.is_quantized());
    assert!(!m.lora.variables().is_empty());
}

/// `model.quantize = "nf4"` (QLoRA): the trainer runs on NF4 layer weights with double-quantized
/// scales, the loss falls like the float run's (within 2 % per step; measured 0.44 % at most), and
/// the saved adapters load over the float base.
#[test]
fn nf4_training_runs_and_saves_loadable_adapters() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let float = xrayglm::train::finetune(&cfg(dir.path(), "float", &[]), &tok).unwrap();
    let nf4 = xrayglm::train::finetune(&cfg(dir.path(), "nf4", &["model.quantize=\"nf4\""]), &tok)
        .unwrap();
    assert_eq!(nf4.steps, 10);
    let mut worst: f64 = 0.0;
    for ((s, a), (_, b)) in losses(&float.run_dir).iter().zip(&losses(&nf4.run_dir)) {
        worst = worst.max((a - b).abs() / a.abs());
        assert!(
            (a - b).abs() <= 0.02 * a.abs(),
            "step {s}: float {a}, nf4 {b}"
        );
    }
    eprintln!("nf4 vs float training loss: at most {worst:.2e} relative per step");
    let (m, _) = xrayglm::weights::source::load_model(&nf4.run_dir, &Default::default()).unwrap();
    assert!(!m.chatglm.is_quantized());
    assert!(!m.lora.variables().is_empty());
}

/// A broken `latest` (missing, empty, or naming a folder that is gone) never
/// restarts the run: it resumes from the newest complete step folder and says so; with no
/// complete checkpoint left it stops with a clear error and touches nothing. Leftovers of a dead
/// process (`.<step>.partial/`, `.<name>.<pid>.tmp`) are removed on the next start.
#[test]
fn a_broken_latest_resumes_from_the_newest_complete_checkpoint() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = xrayglm::train::finetune(&cfg(dir.path(), "r", &[]), &tok)
        .unwrap()
        .run_dir;
    let mut iters = 10;
    for breakage in ["missing", "empty", "gone"] {
        match breakage {
            "missing" => std::fs::remove_file(run.join("latest")).unwrap(),
            "empty" => std::fs::write(run.join("latest"), "").unwrap(),
            _ => std::fs::write(run.join("latest"), "99").unwrap(),
        }
        std::fs::create_dir_all(run.join(format!(".{}.partial", iters + 5))).unwrap();
        std::fs::write(run.join(".latest.4000000.tmp"), "x").unwrap();
        iters += 5;
        let s = xrayglm::train::finetune(
            &cfg(
                dir.path(),
                "r",
                &[&format!("train.train_iters={iters}"), "train.keep_last=1"],
            ),
            &tok,
        )
        .unwrap();
        assert_eq!(s.steps, iters, "{breakage}");
        // Resumed, not restarted: this process logged only the new steps.
        let first_new = losses(&run).iter().rev().nth(4).unwrap().0;
        assert_eq!(first_new, iters - 4, "{breakage}");
        assert_eq!(
            std::fs::read_to_string(run.join("latest")).unwrap(),
            iters.to_string()
        );
        assert!(!run.join(format!(".{iters}.partial")).exists());
        assert!(!run.join(".latest.4000000.tmp").exists());
    }
    // No complete checkpoint left (a file missing in every step folder): a clear error, nothing
    // deleted or written.
    for s in xrayglm::train::checkpoint::step_folders(&run) {
        std::fs::remove_file(run.join(s.to_string()).join("trainer_state.json")).unwrap();
    }
    let before = xrayglm::train::checkpoint::step_folders(&run);
    let err = xrayglm::train::finetune(&cfg(dir.path(), "r", &["train.train_iters=30"]), &tok)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no complete checkpoint") && msg.contains("--resume DIR"),
        "{msg}"
    );
    assert_eq!(xrayglm::train::checkpoint::step_folders(&run), before);
}

/// Pruning to `keep_last` never deletes the checkpoint `latest` names nor the
/// newest complete one (a run resumed from an older checkpoint used to delete its own new save).
#[test]
fn pruning_keeps_latest_and_the_newest_complete_checkpoint() {
    use xrayglm::train::checkpoint::{prune, step_folders, CHECKPOINT_FILES};
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    for s in [2, 38, 39, 40, 41] {
        let d = run.join(s.to_string());
        std::fs::create_dir_all(&d).unwrap();
        // 41 is incomplete: a folder left behind, not a checkpoint.
        for f in CHECKPOINT_FILES.iter().filter(|_| s != 41) {
            std::fs::write(d.join(f), "").unwrap();
        }
    }
    // keep_last = 2 after a save of step 2 (resumed from an old checkpoint): 2 and 40 stay, the
    // oldest others go (by step number: 38, 39, then the incomplete 41).
    prune(run, 2, 2);
    assert_eq!(step_folders(run), vec![2, 40]);
    prune(run, 1, 40);
    assert_eq!(step_folders(run), vec![40]);
    // The checkpoint `best` names is never pruned either, and `RUN/best` resolves to it.
    for s in [10, 20, 30] {
        let d = run.join(s.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for f in CHECKPOINT_FILES {
            std::fs::write(d.join(f), "").unwrap();
        }
    }
    let record = xrayglm::train::checkpoint::BestRecord {
        metric: xrayglm::config::BestMetric::CeF1,
        value: 0.9,
        step: 10,
    };
    xrayglm::train::checkpoint::write_best(run, &record).unwrap();
    prune(run, 1, 40);
    assert_eq!(step_folders(run), vec![10, 40]);
    assert_eq!(
        xrayglm::weights::source::resolve_run(&run.join("best")),
        run.join("10")
    );
    assert_eq!(xrayglm::train::checkpoint::read_best(run), Some(record));
}

/// The adapters of a fresh start depend on train.seed alone. A run that died
/// before its first checkpoint (its random base already saved in `base/`) starts again from the
/// same LoRA weights, bit for bit.
#[test]
fn a_fresh_start_is_the_same_every_time() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), "f", &["train.train_iters=5"]);
    let lora = |run: &Path| {
        let mut v = xrayglm::weights::read_safetensors(&run.join("5/lora.safetensors")).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let run = xrayglm::train::finetune(&c, &tok).unwrap().run_dir;
    let first = lora(&run);
    let first_loss = losses(&run)[0].1;
    for _ in 0..2 {
        // Died before its first checkpoint: base/, config and logs are there, no checkpoint.
        std::fs::remove_dir_all(run.join("5")).unwrap();
        std::fs::remove_file(run.join("latest")).unwrap();
        assert!(run.join("base/model.safetensors").is_file());
        xrayglm::train::finetune(&c, &tok).unwrap();
        let again = lora(&run);
        for ((n, a), (_, b)) in first.iter().zip(&again) {
            assert!(a.equal(b), "{n} differs after a fresh restart");
        }
        assert_eq!(
            losses(&run).last_chunk::<5>().unwrap()[0].1.to_bits(),
            first_loss.to_bits()
        );
    }
}

/// `finetune … 2>&1 | head` — stdout and stderr closed early — never panics: the run trains to its
/// end and saves; what could not be printed is dropped.
#[test]
fn closed_stdout_and_stderr_do_not_stop_training() {
    let _serial = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let args = cli_args(
        dir.path(),
        "pipe",
        &["train.train_iters=3", "train.log_interval=1"],
    );
    let mut child = xrayglm()
        .args(&args)
        .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reading end goes away before the first line, like `head` after its lines.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("pipe/latest")).unwrap(),
        "3"
    );
    let out = xrayglm()
        .args(["info"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            drop(c.stdout.take());
            c.wait()
        })
        .unwrap();
    assert!(out.success(), "info: {out:?}");
}

/// Every rename that publishes a file or folder (run config, random base,
/// checkpoint files and folder, `latest`, export folders, eval reports) comes after an fsync of
/// what is renamed and is followed by an fsync of the folder it lands in — watched with strace.
#[test]
fn every_published_file_is_fsynced_before_and_after_its_rename() {
    let _serial = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    if Command::new("strace").arg("-V").output().is_err() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "CI=true but strace is missing (scripts/setup.sh installs it)"
        );
        eprintln!("SKIPPED: no strace");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::fs::canonicalize(dir.path()).unwrap();
    let hyp = cwd.join("h.jsonl");
    std::fs::write(
        &hyp,
        "{\"id\":\"1\",\"reference\":\"心脏正常\",\"hypothesis\":\"心脏正常\"}\n",
    )
    .unwrap();
    let mut cmds: Vec<Vec<String>> = vec![cli_args(&cwd, "d", &["train.train_iters=2"])];
    cmds.push(
        [
            "export",
            "--from_pretrained",
            "d",
            "--format",
            "lora",
            "--to",
            "exp",
        ]
        .map(String::from)
        .to_vec(),
    );
    cmds.push(
        ["eval", "--hypotheses", "h.jsonl", "--out", "ev"]
            .map(String::from)
            .to_vec(),
    );
    for args in cmds {
        let trace = cwd.join("trace.txt");
        let out = Command::new("strace")
            .args([
                "-f",
                "-y",
                "-qq",
                "-e",
                "trace=fsync,rename,renameat,renameat2",
                "-o",
            ])
            .arg(&trace)
            .arg(env!("CARGO_BIN_EXE_xrayglm"))
            .args(&args)
            .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
            .current_dir(&cwd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&trace).unwrap();
        let mut events: Vec<(bool, std::path::PathBuf, std::path::PathBuf)> = Vec::new();
        // Threads interleave: `… <unfinished ...>` lines carry the arguments, `<... resumed>` not.
        for l in text.lines().filter(|l| !l.contains("resumed>")) {
            if let Some(i) = l.find("fsync(") {
                let p = &l[i..];
                let a = p.find('<').unwrap() + 1;
                let b = a + p[a..].find('>').unwrap();
                events.push((false, p[a..b].into(), Default::default()));
            } else if l.contains("rename") && l.contains('"') {
                let q: Vec<&str> = l.split('"').collect();
                events.push((true, cwd.join(q[1]), cwd.join(q[3])));
            }
        }
        let renames = events.iter().filter(|e| e.0).count();
        assert!(renames >= 2, "{args:?}: {renames} renames seen\n{text}");
        for (i, (is_rename, from, to)) in events.iter().enumerate() {
            if !is_rename {
                continue;
            }
            assert!(
                events[..i].iter().any(|e| !e.0 && &e.1 == from),
                "{args:?}: {} renamed without an fsync first",
                from.display()
            );
            let parent = to.parent().unwrap();
            assert!(
                events[i + 1..].iter().any(|e| !e.0 && e.1 == parent),
                "{args:?}: {} not followed by an fsync of {}",
                to.display(),
                parent.display()
            );
        }
    }
}

/// Where no terminal is (mpirun, Slurm, `nohup … > log`) the default `train.progress =
/// true` prints plain lines — step, loss, lr, tokens/s, ETA — every `log_interval`, instead of a
/// hidden bar and silence.
#[test]
fn without_a_terminal_progress_is_plain_log_lines() {
    let _serial = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut args = cli_args(
        dir.path(),
        "log",
        &["train.train_iters=4", "train.log_interval=2"],
    );
    args.extend(["--set".into(), "train.progress=true".into()]);
    let out = xrayglm()
        .args(&args)
        .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for step in ["step 2/4 loss", "step 4/4 loss"] {
        let line = err
            .lines()
            .find(|l| l.starts_with(step))
            .unwrap_or_else(|| panic!("no {step:?} line in\n{err}"));
        assert!(
            line.contains(" lr ") && line.contains(" tok/s ") && line.contains(" eta "),
            "{line}"
        );
    }
}

/// `train.early_stop_patience`: a run whose `best_metric` stops improving ends (with a checkpoint)
/// after that many saves without a better value. An untrained tiny model's 4-token reports state
/// no finding, so its CE-F1 is the same at every save: the first save is the best, the second
/// misses, and patience 1 stops there — at step 4 of 10; `best` names step 2.
#[test]
fn early_stop_ends_a_run_whose_best_metric_stops_improving() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(
        dir.path(),
        "es",
        &[
            "train.save_interval=2",
            "train.val_fraction=0.25",
            "train.eval_generate_films=3",
            "train.eval_max_new_tokens=4",
            "train.best_metric=\"ce_f1\"",
            "train.early_stop_patience=1",
        ],
    );
    let summary = xrayglm::train::finetune(&c, &tok).unwrap();
    assert_eq!(summary.steps, 4);
    let run = summary.run_dir;
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap().trim(),
        "4"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("best")).unwrap().trim(),
        "2"
    );
    let best = xrayglm::train::checkpoint::read_best(&run).unwrap();
    assert_eq!(
        (best.metric, best.step),
        (xrayglm::config::BestMetric::CeF1, 2)
    );
}

/// Adapters on the vision side (`model.lora.targets`: EVA ViT layer 1, both Q-Former
/// layers, glm_proj; vision dropout on) train — every one moves, and the validation loss falls —
/// and resume exactly (ten steps = five + resume + five, bitwise); the run exports to PEFT and
/// `chat --from_pretrained PEFT_DIR` (the adapter over its base) writes the report `chat` writes
/// from the run.
#[test]
fn vision_adapters_train_resume_and_chat_through_peft() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let targets = [
        "model.lora.targets.vit=[1]",
        "model.lora.targets.qformer=[0, 1]",
        "model.lora.targets.glm_proj=true",
        "train.lr=1e-2",
    ];
    let straight = xrayglm::train::finetune(&cfg(dir.path(), "straight", &targets), &tok).unwrap();
    let mut half_args = targets.to_vec();
    half_args.push("train.stop_at=5");
    xrayglm::train::finetune(&cfg(dir.path(), "halves", &half_args), &tok).unwrap();
    let cont = xrayglm::train::finetune(&cfg(dir.path(), "halves", &targets), &tok).unwrap();
    let (a, b) = (losses(&straight.run_dir), losses(&cont.run_dir));
    assert_eq!(a.len(), 10);
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(
            (sa, la.to_bits()),
            (sb, lb.to_bits()),
            "step {sa}: {la} vs {lb}"
        );
    }
    let (first, last) = (
        straight.first_val_loss.unwrap(),
        straight.last_val_loss.unwrap(),
    );
    assert!(last < first, "val loss {first} → {last}");
    let ck = xrayglm::weights::source::resolve_run(&straight.run_dir);
    let saved = xrayglm::weights::read_safetensors(&ck.join("lora.safetensors")).unwrap();
    for name in [
        "mixins.eva.model.vit.transformer.layers.1.attention.query_key_value.matrix_B.0",
        "mixins.eva.model.qformer.transformer.layers.0.cross_attention.key_value.matrix_B.0",
        "mixins.eva.model.qformer.transformer.layers.1.mlp.dense_4h_to_h.matrix_B.0",
        "mixins.eva.model.glm_proj.matrix_B.0",
    ] {
        let (_, t) = saved
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("{name}"));
        assert!(
            t.abs().max().double_value(&[]) > 0.0,
            "{name} did not train"
        );
    }
    assert!(!saved
        .iter()
        .any(|(k, _)| k.contains("vit.transformer.layers.0.")));
    // PEFT export, then chat through it.
    let base = xrayglm::weights::source::checkpoint_base(&ck).unwrap();
    let peft = dir.path().join("peft");
    let st = xrayglm()
        .args(["export", "--format", "peft", "--from_pretrained"])
        .arg(&straight.run_dir)
        .arg("--to")
        .arg(&peft)
        .arg("--base_model_name")
        .arg(&base)
        .status()
        .unwrap();
    assert!(st.success());
    let film = dir.path().join("data/Xray/synth_00003.png");
    let chat = |from: &Path| {
        let out = common::ok(
            xrayglm()
                .env(
                    "XRAYGLM_TOKENIZER",
                    common::ice_text(&common::shared().unwrap()),
                )
                .args(["chat", "--greedy", "--max_length", "160"])
                .args([
                    "--prompt",
                    xrayglm::data::records::FIXED_PROMPT,
                    "--from_pretrained",
                ])
                .arg(from)
                .arg("--image")
                .arg(&film),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (run_says, peft_says) = (chat(&straight.run_dir), chat(&peft));
    assert!(!run_says.is_empty());
    assert_eq!(peft_says, run_says);
}

/// A conversation file whose samples have two films (a study's PA and lateral, two
/// `<image>` markers) trains the tiny model, and the result chats about two films: the same greedy
/// reply from a chat session, from `answer_batch` (as eval asks) and from
/// `xrayglm chat --image PA --image LATERAL`; `xrayglm eval` scores every two-film study.
#[test]
fn a_two_film_conversation_file_trains_and_the_result_chats() {
    use xrayglm::infer::chat::{ChatModel, ChatSettings, Session};
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let list = xrayglm::data::synthetic::generate_views(&data, 12, 64, 7, true).unwrap();
    let ann: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    let convs: Vec<serde_json::Value> = ann["annotations"]
        .as_array()
        .unwrap()
        .chunks(2)
        .map(|study| {
            let film = |k: usize| format!("{}.png", study[k]["image_id"].as_str().unwrap());
            serde_json::json!({
                "messages": [
                    {"role": "user", "content": "<image>\n<image>\n正侧位胸片的诊断结果是什么？"},
                    {"role": "assistant", "content": study[0]["caption"]},
                ],
                "images": [film(0), film(1)],
            })
        })
        .collect();
    let path = list.with_file_name("two-films.json");
    std::fs::write(&path, serde_json::to_string(&convs).unwrap()).unwrap();
    let c = cfg(
        dir.path(),
        "two-films",
        &[
            &format!("data.path={:?}", path.display().to_string()),
            "sample.max_source_length=112",
            "train.lr=1e-2",
            "train.train_iters=20",
            "train.eval_interval=20",
        ],
    );
    let loaded =
        xrayglm::data::records::load_records(&c.data.path, &c.data.load_options()).unwrap();
    assert_eq!(loaded.records.len(), 12);
    assert!(loaded.records.iter().all(|r| r.images.len() == 2));
    let s = xrayglm::train::finetune(&c, &tok).unwrap();
    assert_eq!(s.steps, 20);
    let (first, last) = (s.first_val_loss.unwrap(), s.last_val_loss.unwrap());
    eprintln!("two films: val loss {first:.3} → {last:.3}");
    assert!(last < first - 1.0, "val loss {first} → {last}");
    let chat = ChatModel::load(&s.run_dir, tok.clone(), &Default::default(), true).unwrap();
    let r = &loaded.records[0];
    let films: Vec<&Path> = r.images.iter().map(|p| p.as_path()).collect();
    let mut settings = ChatSettings {
        max_length: 200,
        ..Default::default()
    };
    settings.sampling.greedy = true;
    let ask = |films: &[&Path]| {
        let mut session = Session::default();
        chat.set_image_files(&mut session, films).unwrap();
        assert_eq!(session.films(), films.len());
        chat.ask(&mut session, &r.prompt, &settings, |_| {})
            .unwrap()
    };
    let said = ask(&films);
    assert!(!said.is_empty());
    let embeds: Vec<tch::Tensor> = films
        .iter()
        .map(|p| chat.encode_image_bytes(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    let prompt_len = chat.prompt_ids(&[], &r.prompt, false, 2).unwrap().0.len();
    let batch = chat
        .answer_batch(
            &[tch::Tensor::cat(&embeds, 0)],
            &[(r.history.as_slice(), r.prompt.as_str())],
            &settings,
            200 - prompt_len,
        )
        .unwrap();
    assert_eq!(batch, vec![said.clone()]);
    let out = common::ok(
        xrayglm()
            .env(
                "XRAYGLM_TOKENIZER",
                common::ice_text(&common::shared().unwrap()),
            )
            .args([
                "chat",
                "--greedy",
                "--max_length",
                "200",
                "--prompt",
                &r.prompt,
            ])
            .arg("--from_pretrained")
            .arg(&s.run_dir)
            .arg("--image")
            .arg(films[0])
            .arg("--image")
            .arg(films[1]),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), said);
    // `eval` on the run's two-film records: the loss and a report for every study, in batches
    // that mix rows of two films each.
    let out = common::ok(
        xrayglm()
            .env(
                "XRAYGLM_TOKENIZER",
                common::ice_text(&common::shared().unwrap()),
            )
            .arg("eval")
            .arg("--checkpoint")
            .arg(&s.run_dir)
            .args([
                "--split",
                "all",
                "--batch_size",
                "5",
                "--max_new_tokens",
                "24",
            ])
            .args(["--no_progress", "--out"])
            .arg(dir.path().join("eval")),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r0 = &report["reports"][0];
    assert_eq!(r0["films"], 12, "{r0}");
    assert!(r0["val_loss"].as_f64().unwrap() < first, "{r0}");
    assert_eq!(r0["metrics"]["count"], 12, "{r0}");
    // The prompt holds two image blocks.
    let (ids2, starts) = chat.prompt_ids(&[], &r.prompt, false, 2).unwrap();
    assert_eq!(starts.len(), 2);
    assert!(ids2.len() > chat.prompt_ids(&[], &r.prompt, false, 1).unwrap().0.len() + 32);
}

/// A LLaVA conversation file (two turns per film: the report, then a follow-up about the
/// heart) trains the tiny model — one sample per answer — and the result answers the second turn
/// of a conversation, in a chat session and as eval asks a conversation record (the same greedy
/// reply: the record's history is part of the question).
#[test]
fn a_llava_conversation_file_trains_and_the_result_chats() {
    use xrayglm::infer::chat::{ChatModel, ChatSettings, Session};
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let list = xrayglm::data::synthetic::generate(&data, 12, 64, 7).unwrap();
    let ann: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    let convs: Vec<serde_json::Value> = ann["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let report = a["caption"].as_str().unwrap();
            let heart = report.split('。').next().unwrap().to_string() + "。";
            serde_json::json!({
                "id": a["image_id"],
                "image": format!("{}.png", a["image_id"].as_str().unwrap()),
                "conversations": [
                    {"from": "human", "value": format!("<image>\n{}", xrayglm::data::records::FIXED_PROMPT)},
                    {"from": "gpt", "value": report},
                    {"from": "human", "value": "心脏大小如何？"},
                    {"from": "gpt", "value": heart},
                ],
            })
        })
        .collect();
    let path = list.with_file_name("llava.json");
    std::fs::write(&path, serde_json::to_string(&convs).unwrap()).unwrap();
    let c = cfg(
        dir.path(),
        "llava",
        &[
            &format!("data.path={:?}", path.display().to_string()),
            "train.lr=1e-2",
            "train.train_iters=20",
            "train.eval_interval=20",
        ],
    );
    let loaded =
        xrayglm::data::records::load_records(&c.data.path, &c.data.load_options()).unwrap();
    assert_eq!(loaded.records.len(), 24, "two answers per film");
    let s = xrayglm::train::finetune(&c, &tok).unwrap();
    assert_eq!(s.steps, 20);
    let (first, last) = (s.first_val_loss.unwrap(), s.last_val_loss.unwrap());
    eprintln!("conversations: val loss {first:.3} → {last:.3}");
    assert!(last < first - 1.0, "val loss {first} → {last}");
    let chat = ChatModel::load(&s.run_dir, tok.clone(), &Default::default(), true).unwrap();
    let mut session = Session::default();
    chat.set_image_file(&mut session, &loaded.records[0].images[0])
        .unwrap();
    // The second turn after the first one's reference answer — in a chat session, and as eval
    // and the training-time report metrics ask a conversation record (its history included).
    let r = &loaded.records[1];
    assert_eq!(r.history.len(), 1);
    session.history = xrayglm::infer::chat::turns(&r.history);
    let mut settings = ChatSettings {
        max_length: 200,
        ..Default::default()
    };
    settings.sampling.greedy = true;
    let said = chat
        .ask(&mut session, &r.prompt, &settings, |_| {})
        .unwrap();
    let bytes = std::fs::read(&r.images[0]).unwrap();
    let embeds = chat.encode_image_bytes(&bytes).unwrap();
    let prompt_len = chat
        .prompt_ids(
            &xrayglm::infer::chat::turns(&r.history),
            &r.prompt,
            false,
            1,
        )
        .unwrap()
        .0
        .len();
    let batch = chat
        .answer_batch(
            &[embeds],
            &[(r.history.as_slice(), r.prompt.as_str())],
            &settings,
            200 - prompt_len,
        )
        .unwrap();
    assert_eq!(batch, vec![said]);
    assert_eq!(session.history.len(), 2);
}

/// The log's utilization: MFU and HFU from the FLOP accounting against the device's peak (given,
/// or measured at start), and the old 6·N figure. Activation checkpointing computes the same
/// (equal losses) with the forward again: HFU above MFU, which stays as it was per step.
#[test]
fn training_logs_mfu_and_hfu() {
    let _serial = common::serial();
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("mfu").is_some())
            .collect()
    };
    let measured = xrayglm::train::finetune(&cfg(dir.path(), "measured", &[]), &tok).unwrap();
    let given = ["train.peak_tflops=0.5", "train.checkpoint_activations=true"];
    let ck = xrayglm::train::finetune(&cfg(dir.path(), "ck", &given), &tok).unwrap();
    let (m, c) = (rows(&measured.run_dir), rows(&ck.run_dir));
    assert_eq!((m.len(), c.len()), (10, 10));
    for r in &m {
        let (mfu, hfu) = (r["mfu"].as_f64().unwrap(), r["hfu"].as_f64().unwrap());
        assert!(mfu > 0.0 && mfu.is_finite() && hfu == mfu, "{r}");
        assert!(r["peak_tflops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["mfu_6n"].as_f64().unwrap() > 0.0, "{r}");
    }
    for r in &c {
        let f = |k: &str| r[k].as_f64().unwrap();
        assert_eq!(f("peak_tflops"), 0.5);
        assert!(
            (f("mfu") - f("model_tflops_per_s") / 0.5).abs() <= 1e-12,
            "{r}"
        );
        assert!(f("hfu") > f("mfu") && f("hardware_tflops_per_s") > f("model_tflops_per_s"));
    }
    assert_eq!(losses(&measured.run_dir), losses(&ck.run_dir));
}

/// `train.checkpoint_layers = "auto"` on the `small` preset (4 layers): a first run with room for
/// everything keeps every layer and logs what the probe measured; under a budget with room for
/// two and a half kept layers, the plan recomputes some layers but not all, and the run's peak
/// resident set stays under the budget. The losses are the first run's (the plan changes memory,
/// not results).
#[test]
fn the_memory_plan_recomputes_what_the_budget_needs() {
    let _serial = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let small = [
        "model.preset=\"small\"",
        // A kept layer of 8 × 320 tokens holds ~50 MiB: well above the few MiB by which the
        // resident set of one probe differs from the next.
        "loader.batch_size=8",
        "train.train_iters=2",
        "train.eval_interval=2",
        "train.save_interval=2",
        "train.checkpoint_layers=\"auto\"",
    ];
    // Each run in a process of its own: the resident set the probe reads is then the run's alone.
    let run = |name: &str, extra: &[String]| -> PathBuf {
        let mut o: Vec<&str> = small.to_vec();
        o.extend(extra.iter().map(String::as_str));
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, cfg(dir.path(), name, &o).to_toml().unwrap()).unwrap();
        common::ok(
            xrayglm()
                .args(["finetune", "--config"])
                .arg(&file)
                .env("XRAYGLM_TOKENIZER", common::ice_text(&shared)),
        );
        dir.path().join(name)
    };
    let records = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let plan_of = |run: &Path| {
        records(run)
            .into_iter()
            .find(|r| r["event"] == "memory_plan")
            .expect("a memory_plan record")
    };
    let roomy = run("roomy", &["train.memory_budget_gib=1000".into()]);
    let p = plan_of(&roomy);
    assert_eq!(
        (p["layers"].as_u64(), p["recompute"].as_u64()),
        (Some(4), Some(0)),
        "{p}"
    );
    let (base, per_layer) = (
        p["base_mib"].as_f64().unwrap(),
        p["per_layer_mib"].as_f64().unwrap(),
    );
    eprintln!("probe: {base:.0} MiB with every layer recomputed, {per_layer:.1} MiB a kept layer");
    assert!(
        per_layer > 20.0,
        "a kept layer of 8 × 320 tokens holds tens of megabytes: {p}"
    );
    // Room for two and a half kept layers under the margin: two kept, two recomputed.
    let margin = xrayglm::train::memory_plan::MARGIN;
    let budget_mib = (base + 2.5 * per_layer) / (1.0 - margin);
    let tight = run(
        "tight",
        &[format!("train.memory_budget_gib={}", budget_mib / 1024.0)],
    );
    // Two recomputed as planned from the first run's probe; the run probes again itself, and
    // what the first run left in the process may move it by a layer.
    let p = plan_of(&tight);
    let recompute = p["recompute"].as_u64().unwrap();
    assert!((1..4).contains(&recompute), "partial recompute: {p}");
    let peak = records(&tight)
        .iter()
        .filter_map(|r| r["peak_rss_mib"].as_f64())
        .fold(0.0, f64::max);
    eprintln!("budget {budget_mib:.0} MiB: peak resident set {peak:.0} MiB");
    assert!(
        peak > 0.0 && peak <= budget_mib,
        "peak {peak} MiB over {budget_mib} MiB"
    );
    assert_eq!(losses(&roomy), losses(&tight));
}
