//! The `xrayglm` binary end to end.

mod common;

use std::process::Command;

fn run(c: &mut Command) -> (bool, String, String) {
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tokenize_prints_ids_and_decodes() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tok = common::ice_text(&shared);
    let (ok, out, err) = run(common::bin()
        .args(["tokenize", "--tokenizer"])
        .arg(&tok)
        .arg("<img>"));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "[46,2265,33]");
    let (ok, out, _) = run(common::bin()
        .args(["tokenize", "--decode", "--process-response", "--tokenizer"])
        .arg(&tok)
        .arg("[64286,12,66967,64923,6,78952,31]"));
    assert!(ok);
    assert_eq!(out.trim(), "问：心脏正常，肺部？");
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("tokenizer.json");
    let (ok, _, err) = run(common::bin()
        .args(["tokenize", "--tokenizer"])
        .arg(&tok)
        .arg("--save")
        .arg(&saved));
    assert!(ok, "{err}");
    let (ok, out, _) = run(common::bin()
        .args(["tokenize", "--tokenizer"])
        .arg(&saved)
        .arg("<img>"));
    assert!(ok);
    assert_eq!(out.trim(), "[46,2265,33]");
}

#[test]
fn tokenize_without_a_tokenizer_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(common::bin()
        .current_dir(dir.path())
        .args(["tokenize", "hi"]));
    assert!(!ok);
    assert!(
        err.contains("--tokenizer") && err.contains("XRAYGLM_TOKENIZER"),
        "{err}"
    );
}

#[test]
fn prepare_data_default_makes_and_prepares_the_synthetic_set() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(common::bin().current_dir(dir.path()).args([
        "prepare-data",
        "--set",
        "synthetic.count=10",
        "--json",
    ]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["generated"], 10);
    assert_eq!(v["usable"], 10);
    let list = dir.path().join("data/synthetic/Xray/synth-zh-prompt.json");
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
    assert_eq!(items.len(), 10);
    assert_eq!(items[0]["img"], "synth_00000.png");
    // A second run finds the set and does not regenerate it.
    let again = |count: usize| {
        let (ok, out, err) = run(common::bin().current_dir(dir.path()).args([
            "prepare-data",
            "--set",
            &format!("synthetic.count={count}"),
            "--json",
            "--force",
        ]));
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let v = again(10);
    assert!(v["generated"].is_null());
    assert_eq!(v["usable"], 10);
    // Another count, or a set drawn by an older generator, is redrawn.
    let v = again(12);
    assert_eq!(v["generated"], 12);
    assert_eq!(v["usable"], 12);
    let ann = dir.path().join("data/synthetic/Xray/synth-zh.json");
    let mut old: serde_json::Value = serde_json::from_slice(&std::fs::read(&ann).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("version");
    std::fs::write(&ann, old.to_string()).unwrap();
    assert_eq!(again(12)["generated"], 12);
    assert!(again(12)["generated"].is_null());
}

#[test]
fn prepare_data_with_shared_tokenizer_reports_token_lengths() {
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = common::five_xrays(&shared, dir.path());
    let (ok, out, err) = run(common::bin()
        .arg("prepare-data")
        .arg(&file)
        .arg("--image-root")
        .arg(shared.join("data/Xray"))
        .args([
            "--prompt",
            "random",
            "--prompt-seed",
            "3",
            "--json",
            "--tokenizer",
        ])
        .arg(common::ice_text(&shared)));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["usable"], 5);
    assert_eq!(v["tokens"]["truncated"], 0);
    assert!(v["tokens"]["source_max"].as_u64().unwrap() <= 63);
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.path().join("five-prompt.json")).unwrap())
            .unwrap();
    assert_eq!(list.len(), 5);
}

#[test]
fn bad_input_fails_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(&file, r#"[{"img":"missing.png","prompt":"p","label":"l"}]"#).unwrap();
    let out = dir.path().join("out.json");
    let (ok, _, err) = run(common::bin()
        .arg("prepare-data")
        .arg(&file)
        .arg("--out")
        .arg(&out));
    assert!(!ok);
    assert!(
        err.contains("bad.json: record 0 (img missing.png)") && err.contains("--skip_bad"),
        "{err}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn unknown_config_keys_are_errors() {
    let (ok, _, err) = run(common::bin().args(["prepare-data", "--set", "loader.batchsize=4"]));
    assert!(!ok);
    assert!(err.contains("batchsize"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[data]\npaht = \"x.json\"\n").unwrap();
    let (ok, _, err) = run(common::bin().args(["prepare-data", "--config"]).arg(&cfg));
    assert!(!ok);
    assert!(err.contains("c.toml") && err.contains("paht"), "{err}");
}

/// Closed sets on the command line are spelled as in TOML, and a wrong value is refused by the
/// parser (exit 2, before any work) with the flag and the allowed values named.
#[test]
fn closed_set_flags_name_the_allowed_values() {
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["bench", "model", "--device", "gpu"],
            &["--device", "auto, cpu, cuda, cuda:N"],
        ),
        (
            &["bench", "step", "--dtype", "fp8"],
            &["--dtype", "fp32, bf16 or fp16"],
        ),
        (
            &["bench", "allreduce", "--backend", "gloo"],
            &["--backend", "auto, single, mpi or nccl"],
        ),
        (
            &[
                "parity",
                "--model",
                "preset:tiny",
                "--inputs",
                "x",
                "--out",
                "y",
                "--schedule",
                "linear",
            ],
            &["--schedule", "`sat`, `warmup_cosine`, `constant`"],
        ),
        (
            &[
                "convert",
                "--model",
                "preset:tiny",
                "--to",
                "y",
                "--rotary",
                "fp64",
            ],
            &["--rotary", "`sat_fp32`, `sat_fp16`, `fp32`"],
        ),
    ];
    for (args, words) in cases {
        let out = common::bin().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for w in words {
            assert!(err.contains(w), "{args:?}: no {w:?} in {err}");
        }
    }
    // Each accepted spelling parses to the value TOML would give.
    use xrayglm::config::{parse_enum, ScheduleKind};
    assert_eq!(
        parse_enum::<ScheduleKind>("warmup_cosine"),
        Ok(ScheduleKind::WarmupCosine)
    );
    assert_eq!(
        parse_enum::<xrayglm::device::DeviceSpec>("cuda:3"),
        Ok(xrayglm::device::DeviceSpec::CudaIndex(3))
    );
}

#[test]
fn every_config_in_configs_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            xrayglm::config::Config::load(Some(&p), &[])
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 3);
    // The spelled-out default equals the embedded one.
    let spelled = xrayglm::config::Config::load(Some(&dir.join("synthetic.toml")), &[]).unwrap();
    assert_eq!(spelled, xrayglm::config::Config::default());
}

#[test]
fn info_runs_and_sees_a_device() {
    let (ok, out, err) = run(common::bin().arg("info"));
    assert!(ok, "{err}");
    assert!(out.contains("default device:"), "{out}");
}

#[test]
fn parity_and_convert_commands_reproduce_the_reference_logits() {
    let a = common::fixture("model").join("a");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, _, err) = run(common::bin()
        .args(["parity", "--model"])
        .arg(a.join("sat"))
        .arg("--inputs")
        .arg(a.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out));
    assert!(ok, "{err}");
    let want: std::collections::HashMap<String, tch::Tensor> =
        xrayglm::weights::read_safetensors(&a.join("outputs.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let rel = |got: &tch::Tensor, want: &tch::Tensor| {
        (got - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
    };
    let got: std::collections::HashMap<String, tch::Tensor> =
        xrayglm::weights::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
    assert!(rel(&got["logits"], &want["logits"]) <= 1e-4);
    assert!(rel(&got["loss"], &want["loss"]) <= 1e-5);
    // HF folder → xrayglm format → the same logits.
    let conv = dir.path().join("conv");
    let (ok, _, err) = run(common::bin()
        .args(["convert", "--model"])
        .arg(a.join("hf"))
        .arg("--to")
        .arg(&conv));
    assert!(ok, "{err}");
    let out2 = dir.path().join("out2.safetensors");
    let (ok, _, err) = run(common::bin()
        .args(["parity", "--model"])
        .arg(&conv)
        .arg("--inputs")
        .arg(a.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out2));
    assert!(ok, "{err}");
    let got2: std::collections::HashMap<String, tch::Tensor> =
        xrayglm::weights::read_safetensors(&out2)
            .unwrap()
            .into_iter()
            .collect();
    assert!(rel(&got2["logits"], &want["logits"]) <= 1e-4);
    // A wrong layout flag on interleaved weights changes the model: the numbers show it.
    let (ok, _, err) = run(common::bin()
        .args(["parity", "--qkv-layout", "sideways", "--model"])
        .arg(&conv)
        .arg("--inputs")
        .arg(a.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out2));
    assert!(!ok && err.contains("--qkv_layout"), "{err}");
}

/// `parity --train-steps 5` against 5 LoRA steps of the original (sat 0.3.6 model, sat's
/// AnnealingLR, AdamW, clip 0.1; tests/fixtures/model/a/train.safetensors): per-step losses and
/// final LoRA tensors within 1e-5 relative.
#[test]
fn train_steps_follow_the_original_trajectory() {
    let a = common::fixture("model").join("a");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traj.safetensors");
    let hp = common::read_json(&a.join("train.json"));
    let f = |k: &str| hp[k].to_string();
    let warmup = hp["warmup_iter"].as_f64().unwrap() / hp["train_iters"].as_f64().unwrap();
    let (ok, _, err) = run(common::bin()
        .args(["parity", "--model"])
        .arg(a.join("sat"))
        .arg("--inputs")
        .arg(a.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .args([
            "--train-steps",
            &f("steps"),
            "--lr",
            &f("lr"),
            "--schedule",
            "sat",
            "--train-iters",
            &f("train_iters"),
        ])
        .args([
            "--warmup",
            &warmup.to_string(),
            "--min-lr-ratio",
            &f("decay_ratio"),
        ])
        .args([
            "--auto-warmup-steps",
            &f("auto_warmup_steps"),
            "--auto-warmup-rate",
            &f("auto_warmup_rate"),
        ])
        .args(["--clip", &f("clip"), "--weight-decay", &f("weight_decay")]));
    assert!(ok, "{err}");
    let got = common::tensors(&out);
    let want = common::tensors(&a.join("train.safetensors"));
    let rel = |x: &tch::Tensor, y: &tch::Tensor| {
        let x = x.to_kind(tch::Kind::Double);
        let y = y.to_kind(tch::Kind::Double);
        (&x - &y).abs().max().double_value(&[]) / y.abs().max().double_value(&[])
    };
    assert!(
        rel(&got["train_lrs"], &want["train_lrs"]) < 1e-12,
        "learning rates"
    );
    let e = rel(&got["train_losses"], &want["train_losses"]);
    assert!(e <= 1e-5, "losses: {e:.3e}");
    let mut n = 0;
    for (k, v) in &want {
        let Some(name) = k.strip_prefix("final.") else {
            continue;
        };
        let ours = &got[&format!("lora.{}", xrayglm::weights::canonical_name(name).unwrap())];
        let e = rel(ours, v);
        assert!(e <= 1e-5, "final {name}: {e:.3e}");
        n += 1;
    }
    assert_eq!(n, 16);
}

/// `prepare-data` never writes its training list over an input (the records file, an image), nor
/// over another existing file without `--force` (`--out` equal to the input replaced the
/// source annotations).
#[test]
fn prepare_data_never_overwrites_inputs_or_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let prep = |extra: &[&str]| {
        let mut c = common::bin();
        c.current_dir(dir.path())
            .args([
                "prepare-data",
                "--set",
                "synthetic.count=4",
                "--set",
                "synthetic.size=32",
            ])
            .args(extra);
        run(&mut c)
    };
    let (ok, _, err) = prep(&[]);
    assert!(ok, "{err}");
    let xray = dir.path().join("data/synthetic/Xray");
    let ann = xray.join("synth-zh.json");
    let list = xray.join("synth-zh-prompt.json");
    let (ann_before, list_before) = (std::fs::read(&ann).unwrap(), std::fs::read(&list).unwrap());
    let ann_s = ann.to_str().unwrap();
    let (ok, _, err) = prep(&["--out", ann_s, "--force"]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "--out {ann_s} is the records file being read; refusing to overwrite an input"
        )),
        "{err}"
    );
    let img = xray.join("synth_00000.png");
    let img_before = std::fs::read(&img).unwrap();
    let (ok, _, err) = prep(&["--out", img.to_str().unwrap(), "--force"]);
    assert!(!ok);
    assert!(
        err.contains("is the image of record 0 (synth_00000); refusing to overwrite an input"),
        "{err}"
    );
    let (ok, _, err) = prep(&[]);
    assert!(!ok);
    assert!(
        err.contains("synth-zh-prompt.json already exists; pass --force to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ann).unwrap(), ann_before);
    assert_eq!(std::fs::read(&img).unwrap(), img_before);
    assert_eq!(std::fs::read(&list).unwrap(), list_before);
    let (ok, _, err) = prep(&["--force"]);
    assert!(ok, "{err}");
}

/// The subcommands `xrayglm PATH… --help` lists (without `help`).
fn subcommands(path: &[String]) -> Vec<String> {
    let (_, out, _) = run(common::bin().args(path).arg("--help"));
    out.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every command and subcommand shows each multi-word flag once, as `--a_b` (XrayGLM's spelling),
/// and accepts `--a-b` as well: given twice, the dashed spelling is the shown flag to the parser (a
/// usage error naming `--a_b`, exit 2: nothing runs), never an unknown argument.
#[test]
fn every_multi_word_flag_takes_both_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let mut stack: Vec<Vec<String>> = vec![vec![]];
    let (mut commands, mut checked) = (0, 0);
    while let Some(path) = stack.pop() {
        for sub in subcommands(&path) {
            let mut p = path.clone();
            p.push(sub);
            stack.push(p);
        }
        if path.is_empty() {
            continue;
        }
        commands += 1;
        let (ok, help, err) = run(common::bin().args(&path).arg("--help"));
        assert!(ok, "{path:?} --help: {err}");
        let flags: Vec<String> = help
            .lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let l = l
                    .strip_prefix("-")
                    .filter(|r| r.len() > 3 && &r[1..3] == ", ")
                    .map_or(l, |r| &r[3..]);
                l.strip_prefix("--")
                    .and_then(|r| r.split([' ', '<', '=']).next())
                    .map(str::to_string)
            })
            .collect();
        for f in &flags {
            assert!(
                !f.contains('-'),
                "{path:?} shows --{f}: multi-word flags are shown as --a_b"
            );
        }
        for f in flags.iter().filter(|f| f.contains('_')) {
            {
                let flag = format!("--{}", f.replace('_', "-"));
                let out = common::bin()
                    .current_dir(dir.path())
                    .args(&path)
                    .args([&flag, &flag])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(2), "{path:?} {flag} {flag}: {err}");
                assert!(
                    !err.contains("unexpected argument") && err.contains(&format!("--{f}")),
                    "{path:?} {flag}: {err}"
                );
                checked += 1;
            }
        }
    }
    assert!(commands >= 20, "walked {commands} commands");
    assert!(checked >= 80, "checked {checked} flags");
}
