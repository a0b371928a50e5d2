//! Hostile and careless input, end to end: no command writes over its inputs; PEFT folders are
//! verified (base chain, dtypes, finiteness, byte ranges, options, target modules, numbers);
//! config ranges are checked before anything is written; input files must be regular and
//! size-capped; long conversations are refused before their samples are built; counts, rules,
//! study grouping, checkpoint pointers and small inputs say what they mean.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use xrayglm::data::records::{load_records, BadKind, LoadOptions};

/// Run with a time limit (a command that reads without bound must not hang the suite).
fn run(c: &mut Command) -> Output {
    common::run_limited(c, 120)
}

/// The command fails with an ordinary error (exit 1, not a panic or an abort) whose message
/// holds every one of `want`.
fn fails(o: &Output, want: &[&str]) -> String {
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "want exit 1: {e}");
    assert!(!e.contains("panicked"), "{e}");
    for w in want {
        assert!(e.contains(w), "want {w:?} in: {e}");
    }
    e
}

fn succeeds(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{e}");
    e
}

/// A PEFT export of the fixture's adapters whose base is a local folder.
fn peft_folder(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    succeeds(&run(common::bin()
        .args(["export", "--format", "peft", "--from_pretrained"])
        .arg(common::sat_fixture())
        .arg("--to")
        .arg(&to)
        .arg("--base_model_name")
        .arg(common::sat_fixture())));
    to
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v = common::read_json(path);
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match xrayglm::weights::source::load_model(dir, &Default::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A file's bytes before and after a command that must leave it alone.
struct Unchanged(PathBuf, Vec<u8>);

impl Unchanged {
    fn new(p: &Path) -> Self {
        Self(p.to_path_buf(), std::fs::read(p).unwrap())
    }
    fn check(&self) {
        assert_eq!(
            std::fs::read(&self.0).unwrap(),
            self.1,
            "{} was written over",
            self.0.display()
        );
    }
}

const REFUSED: &str = "is an input of this command";

/// A safetensors header as JSON.
type Header = serde_json::Map<String, serde_json::Value>;

#[test]
fn no_command_writes_over_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // findings: --out is the --against file, the --rules file, or FILE itself.
    let a = d.join("a.json");
    let b = d.join("b.json");
    for p in [&a, &b] {
        std::fs::write(
            p,
            r#"{"annotations": [{"image_id": "1", "caption": "No effusion."}]}"#,
        )
        .unwrap();
    }
    let rules = d.join("rules.toml");
    std::fs::write(
        &rules,
        "language = \"en\"\n[[observation]]\nname = \"Pleural Effusion\"\npositive = [\"effusion\"]\n",
    )
    .unwrap();
    let keep = [
        Unchanged::new(&a),
        Unchanged::new(&b),
        Unchanged::new(&rules),
    ];
    let findings = |extra: &[&Path]| {
        let mut c = common::bin();
        c.args(["findings", "--lang", "en"]).arg(&a);
        for pair in extra.chunks(2) {
            c.arg(pair[0]).arg(pair[1]);
        }
        run(&mut c)
    };
    let flag = |s: &str| PathBuf::from(s);
    fails(
        &findings(&[&flag("--against"), &b, &flag("--out"), &b]),
        &[REFUSED, "--against", "b.json"],
    );
    fails(
        &findings(&[&flag("--rules"), &rules, &flag("--out"), &rules]),
        &[REFUSED, "--rules"],
    );
    fails(&findings(&[&flag("--out"), &a]), &[REFUSED, "FILE"]);
    // A link to an input is the input.
    let link = d.join("link.json");
    std::os::unix::fs::symlink(&b, &link).unwrap();
    fails(
        &findings(&[&flag("--against"), &b, &flag("--out"), &link]),
        &[REFUSED],
    );
    // eval: a second hypotheses file is where the first's scores would go; a report.json input.
    let h = d.join("h");
    std::fs::create_dir_all(&h).unwrap();
    let line = r#"{"id": "1", "reference": "心脏正常。", "hypothesis": "心脏正常。"}"#;
    for n in ["a.jsonl", "a.scores.jsonl", "report.json"] {
        std::fs::write(h.join(n), format!("{line}\n")).unwrap();
    }
    let keep_h: Vec<Unchanged> = ["a.jsonl", "a.scores.jsonl", "report.json"]
        .iter()
        .map(|n| Unchanged::new(&h.join(n)))
        .collect();
    fails(
        &run(common::bin()
            .args(["eval", "--hypotheses"])
            .arg(h.join("a.jsonl"))
            .arg(h.join("a.scores.jsonl"))
            .arg("--out")
            .arg(&h)),
        &[REFUSED, "a.scores.jsonl", "--hypotheses"],
    );
    fails(
        &run(common::bin()
            .args(["eval", "--hypotheses"])
            .arg(h.join("report.json"))
            .arg("--out")
            .arg(&h)),
        &[REFUSED, "report.json"],
    );
    // prepare-data: --out is the config file.
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, "[synthetic]\ncount = 4\nsize = 32\n").unwrap();
    let keep_cfg = Unchanged::new(&cfg);
    fails(
        &run(common::bin()
            .current_dir(d)
            .args(["prepare-data", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&cfg)
            .arg("--force")),
        &[REFUSED, "--config"],
    );
    // convert / parity / export: an output over the model's own files or the inputs file.
    let model = d.join("model");
    succeeds(&run(common::bin()
        .args(["convert", "--model", "preset:tiny", "--to"])
        .arg(&model)));
    let weights = Unchanged::new(&model.join("model.safetensors"));
    fails(
        &run(common::bin()
            .args(["convert", "--model"])
            .arg(&model)
            .arg("--to")
            .arg(&model)),
        &[REFUSED, "--model", "model.safetensors"],
    );
    fails(
        &run(common::bin()
            .args(["parity", "--model"])
            .arg(common::sat_fixture())
            .arg("--inputs")
            .arg(common::fixture("model").join("a/inputs.safetensors"))
            .arg("--out")
            .arg(common::fixture("model").join("a/inputs.safetensors"))),
        &[REFUSED, "--inputs"],
    );
    fails(
        &run(common::bin()
            .args(["parity", "--model"])
            .arg(&model)
            .arg("--inputs")
            .arg(common::fixture("model").join("a/inputs.safetensors"))
            .arg("--out")
            .arg(model.join("model.safetensors"))),
        &[REFUSED, "--model"],
    );
    fails(
        &run(common::bin()
            .args(["export", "--format", "merged", "--from_pretrained"])
            .arg(&model)
            .arg("--to")
            .arg(model.join("model.safetensors"))),
        &[REFUSED],
    );
    // tokenize --save over the tokenizer it reads.
    let tok = d.join("tokenizer.json");
    if let Some(shared) = common::shared() {
        succeeds(&run(common::bin()
            .args(["tokenize", "--tokenizer"])
            .arg(common::ice_text(&shared))
            .arg("--save")
            .arg(&tok)));
        let keep_tok = Unchanged::new(&tok);
        fails(
            &run(common::bin()
                .args(["tokenize", "--tokenizer"])
                .arg(&tok)
                .arg("--save")
                .arg(&tok)),
            &[REFUSED, "--tokenizer"],
        );
        keep_tok.check();
    }
    // finetune: the config is the run folder's own config.toml.
    let run_dir = d.join("runs/r");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("config.toml"), "[train]\nname = \"r\"\n").unwrap();
    let keep_run_cfg = Unchanged::new(&run_dir.join("config.toml"));
    fails(
        &run(common::bin()
            .current_dir(d)
            .args(["finetune", "--config"])
            .arg(run_dir.join("config.toml"))
            .args(["--set", "train.out_dir=\"runs\""])),
        &[REFUSED, "config.toml"],
    );
    for k in keep.iter().chain(&keep_h) {
        k.check();
    }
    keep_cfg.check();
    weights.check();
    keep_run_cfg.check();
}

#[test]
fn peft_folders_are_verified_before_they_load() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = peft_folder(d, "good");
    // The unchanged export loads, and serve takes it as an adapter over the same base.
    xrayglm::weights::source::load_model(&good, &Default::default()).unwrap();
    let base = xrayglm::weights::source::read_config(&common::sat_fixture()).unwrap();
    let ad = xrayglm::weights::source::load_adapter(&good, &base, tch::Device::Cpu).unwrap();
    let (m, _) =
        xrayglm::weights::source::load_model(&common::sat_fixture(), &Default::default()).unwrap();
    let mut compared = 0;
    for (name, lora) in m.chatglm.loras() {
        let rest = name.rsplit_once("layers.").unwrap().1;
        let (i, linear) = rest.split_once('.').unwrap();
        let l = &ad.layers[i.parse::<usize>().unwrap()];
        let served = match linear {
            "attention.query_key_value" => l.qkv.as_ref(),
            "attention.dense" => l.dense.as_ref(),
            _ => None,
        }
        .unwrap_or_else(|| panic!("no served adapter for {name}"));
        let diff = (served.delta_weight() - lora.delta_weight())
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff <= 1e-6,
            "{name}: the served PEFT adapter differs by {diff}"
        );
        compared += 1;
    }
    assert_eq!(compared, 4);
    let copy = |name: &str| -> PathBuf {
        let to = d.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(good.join(f), to.join(f)).unwrap();
        }
        to
    };
    // A base chain that loops: itself, and A → B → A. Not a crash: an error naming the loop.
    let own = copy("own");
    edit_json(&own.join("adapter_config.json"), |v| {
        v["base_model_name_or_path"] = own.display().to_string().into()
    });
    let (x, y) = (copy("x"), copy("y"));
    edit_json(&x.join("adapter_config.json"), |v| {
        v["base_model_name_or_path"] = y.display().to_string().into()
    });
    edit_json(&y.join("adapter_config.json"), |v| {
        v["base_model_name_or_path"] = x.display().to_string().into()
    });
    for dir in [&own, &x] {
        let e = fails(
            &run(common::bin()
                .args(["export", "--format", "merged", "--from_pretrained"])
                .arg(dir)
                .arg("--to")
                .arg(d.join("out"))),
            &["the base models loop"],
        );
        assert!(e.contains(&dir.display().to_string()), "{e}");
    }
    assert!(!d.join("out").exists());
    // Options that change the maths are refused by name; so are bad numbers.
    for (key, value, want) in [
        (
            "use_dora",
            serde_json::json!(true),
            "use_dora = true is not supported",
        ),
        (
            "use_rslora",
            serde_json::json!(true),
            "use_rslora = true is not supported",
        ),
        (
            "fan_in_fan_out",
            serde_json::json!(true),
            "fan_in_fan_out = true is not supported",
        ),
        (
            "bias",
            serde_json::json!("all"),
            "bias = \"all\" is not supported",
        ),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save",
        ),
        (
            "r",
            serde_json::json!(0),
            "r = 0: must be a whole number ≥ 1",
        ),
        (
            "lora_alpha",
            serde_json::json!(-48),
            "lora_alpha = -48: must be > 0",
        ),
        ("target_modules", serde_json::json!([]), "does not select"),
        (
            "target_modules",
            serde_json::json!(["nothing_here"]),
            "does not select",
        ),
    ] {
        let dir = copy("opt");
        edit_json(&dir.join("adapter_config.json"), |v| v[key] = value.clone());
        let e = load_err(&dir);
        assert!(e.contains(want), "{key}: want {want:?} in: {e}");
        assert!(e.contains("opt"), "the message names the folder: {e}");
        assert!(!e.contains("    "), "no runs of spaces: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // Tensors: relabelled integer dtype, a NaN, overlapping byte ranges.
    let tamper = |name: &str, f: &dyn Fn(&mut Header, &mut Vec<u8>)| {
        let dir = copy(name);
        let file = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut data = bytes[8 + n..].to_vec();
        f(&mut header, &mut data);
        let mut h = serde_json::to_vec(&header).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        std::fs::write(&file, out).unwrap();
        load_err(&dir)
    };
    let first_a = |h: &serde_json::Map<String, serde_json::Value>| -> String {
        h.keys().find(|k| k.contains("lora_A")).unwrap().clone()
    };
    let e = tamper("i32", &|h, _| {
        let k = first_a(h);
        h[&k]["dtype"] = "I32".into();
    });
    assert!(
        e.contains("not floating point") && e.contains("lora_A"),
        "{e}"
    );
    let e = tamper("nan", &|h, data| {
        let k = first_a(h);
        let begin = h[&k]["data_offsets"][0].as_u64().unwrap() as usize;
        data[begin..begin + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(e.contains("NaN or infinite") && e.contains("lora_A"), "{e}");
    let e = tamper("overlap", &|h, _| {
        // Two tensors of one size: the second made to read the first's bytes.
        let size = |k: &String| {
            h[k]["data_offsets"][1].as_u64().unwrap() - h[k]["data_offsets"][0].as_u64().unwrap()
        };
        let keys: Vec<String> = h.keys().filter(|k| k.contains("lora_")).cloned().collect();
        let (a, b) = keys
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                keys[i + 1..]
                    .iter()
                    .find(|b| size(b) == size(a))
                    .map(|b| (a, b))
            })
            .unwrap();
        let same = h[a]["data_offsets"].clone();
        h[b]["data_offsets"] = same;
    });
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn config_values_are_checked_before_anything_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tokenizer: Vec<String> = match common::shared() {
        Some(s) => vec![
            "--tokenizer".into(),
            common::ice_text(&s).display().to_string(),
        ],
        None => vec![],
    };
    for (set, want) in [
        (
            "model.lora.dropout=1.5",
            "model.lora.dropout = 1.5: a probability in [0, 1)",
        ),
        (
            "model.lora.alpha=nan",
            "model.lora.alpha = NaN: must be finite and > 0",
        ),
        (
            "model.glm_dropout=-0.5",
            "model.glm_dropout = -0.5: a probability in [0, 1)",
        ),
        ("model.lora.rank=0", "model.lora.rank = 0: must be ≥ 1"),
        (
            "model.lora.targets.vit=[999]",
            "targets.vit: layer 999 is not among its",
        ),
        ("train.beta2=1.5", "train.beta2 = 1.5"),
        ("train.eps=0", "train.eps = 0"),
    ] {
        let o = run(common::bin()
            .current_dir(d)
            .args([
                "finetune",
                "--set",
                set,
                "--set",
                "train.out_dir=\"runs\"",
                "--set",
                "synthetic.count=4",
                "--set",
                "synthetic.size=32",
            ])
            .args(&tokenizer));
        if tokenizer.is_empty() && set.contains("targets") {
            continue;
        }
        fails(&o, &[want]);
        assert!(!d.join("runs").exists(), "{set} left a run folder behind");
    }
    // --quant takes 8 or 4, refused before any model is looked at.
    for cmd in ["chat", "eval"] {
        let o = run(common::bin().args([cmd, "--quant", "3", "--from_pretrained", "/nonexistent"]));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            e.contains("8 (int8 weights) or 4") && !e.contains("nonexistent"),
            "{e}"
        );
    }
}

#[test]
fn inputs_must_be_regular_files() {
    // A device that never ends, a FIFO, a folder: refused before reading, naming the path.
    for p in ["/dev/zero", "/tmp"] {
        let e = format!(
            "{:#}",
            xrayglm::io::read_bytes_capped(Path::new(p), 1 << 20).unwrap_err()
        );
        assert!(e.contains(p) && e.contains("not a regular file"), "{e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.png");
    std::fs::write(&big, vec![0u8; 2048]).unwrap();
    let e = format!(
        "{:#}",
        xrayglm::io::read_bytes_capped(&big, 1024).unwrap_err()
    );
    assert!(e.contains("more than the") && e.contains("big.png"), "{e}");
    // chat --image /dev/zero: an error, not gigabytes of memory.
    if let Some(shared) = common::shared() {
        let o = run(common::bin()
            .args(["chat", "--from_pretrained"])
            .arg(common::sat_fixture())
            .arg("--tokenizer")
            .arg(common::ice_text(&shared))
            .args(["--max_length", "256", "--image", "/dev/zero"]));
        fails(&o, &["/dev/zero", "not a regular file"]);
    }
    // A training list whose film is a device: a bad record.
    let list = tmp.path().join("list.json");
    std::fs::write(
        &list,
        serde_json::json!([{"img": "/dev/zero", "prompt": "p", "label": "l"}]).to_string(),
    )
    .unwrap();
    let opts = LoadOptions {
        allow_outside_root: true,
        ..Default::default()
    };
    let e = format!("{:#}", load_records(&list, &opts).unwrap_err());
    assert!(e.contains("/dev/zero") && e.contains("not a file"), "{e}");
}

fn write_png(path: &Path) {
    image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]))
        .save(path)
        .unwrap();
}

#[test]
fn conversations_count_and_refuse_what_can_never_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_png(&d.join("a.png"));
    let conv = |turns: Vec<serde_json::Value>| serde_json::json!({"image": "a.png", "conversations": turns});
    let h = |s: &str| serde_json::json!({"from": "human", "value": s});
    let g = |s: &str| serde_json::json!({"from": "gpt", "value": s});
    // A conversation of 5,000 answers: refused without building its samples.
    let long: Vec<serde_json::Value> = (0..5000)
        .flat_map(|i| [h(&format!("q{i}")), g(&format!("a{i}"))])
        .collect();
    let file = d.join("long.json");
    std::fs::write(&file, serde_json::json!([conv(long)]).to_string()).unwrap();
    let opts = LoadOptions {
        max_history_turns: Some(32),
        ..Default::default()
    };
    let e = format!("{:#}", load_records(&file, &opts).unwrap_err());
    assert!(
        e.contains("record 0")
            && e.contains("4999 earlier turns")
            && e.contains("max_source_length"),
        "{e}"
    );
    let skipped = load_records(
        &file,
        &LoadOptions {
            skip_bad: true,
            ..opts.clone()
        },
    );
    // The only record is bad: nothing usable, said as such.
    assert!(format!("{:#}", skipped.unwrap_err()).contains("no usable records"));
    // Counts: 2 conversations → 3 samples; an unknown role is its own kind; an `<image>` in an
    // answer is said to be one; a trailing question and a late system turn are counted.
    let file = d.join("c.json");
    std::fs::write(
        &file,
        serde_json::json!([
            conv(vec![h("q1"), g("a1"), h("q2"), g("a2"), h("unanswered")]),
            conv(vec![
                h("q"),
                g("a"),
                serde_json::json!({"from": "system", "value": "late"})
            ]),
            conv(vec![
                h("q"),
                serde_json::json!({"from": "robot", "value": "x"})
            ]),
            conv(vec![h("q"), g("<image> here")]),
        ])
        .to_string(),
    )
    .unwrap();
    let o = run(common::bin()
        .current_dir(d)
        .args(["prepare-data", "--skip-bad", "--json"])
        .arg(&file));
    succeeds(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total"], 4, "{v}");
    assert_eq!(v["usable"], 2, "{v}");
    assert_eq!(v["samples"], 3, "{v}");
    assert_eq!(v["dropped_turns"], 2, "{v}");
    let bad: Vec<String> = v["bad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bad, ["unknown_role", "marker_in_answer"], "{v}");
    let o = run(common::bin()
        .current_dir(d)
        .args(["prepare-data", "--skip-bad", "--force"])
        .arg(&file));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("total 4 conversations  usable 2 → 3 samples")
            && text.contains("2 turn(s) make no sample"),
        "{text}"
    );
    let strict = load_records(&file, &LoadOptions::default()).unwrap_err();
    let e = format!("{strict:#}");
    assert!(e.contains("unknown from \"robot\""), "{e}");
    // A film reached through a link that leaves the image root.
    let root = d.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(d.join("a.png"), root.join("link.png")).unwrap();
    let file = root.join("l.json");
    std::fs::write(
        &file,
        serde_json::json!([{"image": "link.png", "conversations": [h("q"), g("a")]}]).to_string(),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        load_records(&file, &LoadOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("is a link to") && e.contains("outside the image root"),
        "{e}"
    );
}

#[test]
fn rule_files_and_report_files_are_validated_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let reports = d.join("r.json");
    std::fs::write(
        &reports,
        r#"{"annotations": [{"image_id": "1", "caption": "右侧胸腔积液。"}]}"#,
    )
    .unwrap();
    let rules = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        run(common::bin()
            .args(["findings"])
            .arg(&reports)
            .arg("--rules")
            .arg(&p))
    };
    let head = "language = \"zh\"\n";
    fails(
        &rules(
            "tilde.toml",
            &format!("{head}[[observation]]\nname = \"Pleural Effusion\"\npositive = [\"~\"]\n"),
        ),
        &["tilde.toml:4", "\"~\"", "empty part"],
    );
    fails(
        &rules(
            "dup.toml",
            &format!(
                "{head}[[observation]]\nname = \"Edema\"\npositive = [\"水肿\"]\n\n[[observation]]\nname = \"Edema\"\npositive = [\"肺水肿\"]\n"
            ),
        ),
        &["dup.toml:7", "a second [[observation]] \"Edema\"", "dup.toml:3"],
    );
    fails(
        &rules(
            "gap.toml",
            &format!("gap = 99999999999\n{head}[[observation]]\nname = \"Edema\"\npositive = [\"水~肿\"]\n"),
        ),
        &["gap.toml:1", "gap = 99999999999: at most"],
    );
    // One mention once, however many phrases match it.
    let out = d.join("labels.jsonl");
    succeeds(&run(common::bin()
        .args(["findings"])
        .arg(&reports)
        .arg("--evidence")
        .arg("--out")
        .arg(&out)));
    let line = common::read_json(&out);
    let texts: Vec<&str> = line["mentions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["observation"] == "Pleural Effusion")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["胸腔积液"], "{line}");
    // Duplicate report ids, a BOM, reference beside references.
    let dup = d.join("dup.json");
    std::fs::write(
        &dup,
        r#"{"annotations": [{"image_id": "1", "caption": "a"}, {"image_id": "1", "caption": "b"}]}"#,
    )
    .unwrap();
    fails(
        &run(common::bin().args(["findings"]).arg(&dup)),
        &["dup.json", "report 2 repeats the id \"1\" of report 1"],
    );
    let line = r#"{"id": "1", "reference": "心脏正常。", "hypothesis": "心脏正常。"}"#;
    let bom = d.join("bom.jsonl");
    std::fs::write(&bom, format!("\u{feff}{line}\n")).unwrap();
    succeeds(&run(common::bin().args(["eval", "--hypotheses"]).arg(&bom)));
    succeeds(&run(common::bin().args(["findings"]).arg(&bom)));
    let both = d.join("both.jsonl");
    std::fs::write(
        &both,
        r#"{"id": "1", "reference": "a", "references": ["b"], "hypothesis": "a"}"#,
    )
    .unwrap();
    for cmd in ["eval", "findings"] {
        let mut c = common::bin();
        if cmd == "eval" {
            c.args(["eval", "--hypotheses"]);
        } else {
            c.arg("findings");
        }
        fails(
            &run(c.arg(&both)),
            &["both.jsonl:1", "both \"reference\" and \"references\""],
        );
    }
}

#[test]
fn ids_that_are_not_per_study_and_dangling_pointers_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 20 films with running numbers: not studies.
    let anns: Vec<serde_json::Value> = (1..=20)
        .map(|i| {
            let id = format!("synth_{i:05}");
            write_png(&d.join(format!("{id}.png")));
            serde_json::json!({"image_id": id, "caption": "c"})
        })
        .collect();
    let file = d.join("s.json");
    std::fs::write(
        &file,
        serde_json::json!({ "annotations": anns }).to_string(),
    )
    .unwrap();
    let opts = LoadOptions {
        group_views: true,
        ..Default::default()
    };
    let e = format!("{:#}", load_records(&file, &opts).unwrap_err());
    assert!(
        e.contains("synth_00001")
            && e.contains("is not <report>_<k>")
            && !e.contains("max_source_length"),
        "{e}"
    );
    let skipped = load_records(
        &file,
        &LoadOptions {
            skip_bad: true,
            ..opts.clone()
        },
    )
    .unwrap_err();
    assert!(format!("{skipped:#}").contains("no usable records"));
    // 20 views of one report are not one study either.
    let anns: Vec<serde_json::Value> = (1..=20)
        .map(|i| {
            let id = format!("7_{i}");
            write_png(&d.join(format!("{id}.png")));
            serde_json::json!({"image_id": id, "caption": "c"})
        })
        .collect();
    std::fs::write(
        &file,
        serde_json::json!({ "annotations": anns }).to_string(),
    )
    .unwrap();
    let e = format!("{:#}", load_records(&file, &opts).unwrap_err());
    assert!(
        e.contains("would have 20 films") && e.contains("not per study"),
        "{e}"
    );
    let loaded = load_records(&file, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.records.len(), 20);
    // With one more study of two views beside them, skipping keeps that study only.
    let mut anns = anns;
    for k in 1..=2 {
        write_png(&d.join(format!("8_{k}.png")));
        anns.push(serde_json::json!({"image_id": format!("8_{k}"), "caption": "c"}));
    }
    std::fs::write(
        &file,
        serde_json::json!({ "annotations": anns }).to_string(),
    )
    .unwrap();
    let kept = load_records(
        &file,
        &LoadOptions {
            skip_bad: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(kept.records.len(), 1);
    assert_eq!(kept.records[0].images.len(), 2);
    assert_eq!(kept.bad_counts(), vec![(BadKind::NotAStudy, 20)]);
    // RUN/best naming a missing step; a RUN whose `latest` dangles.
    let run_dir = d.join("run");
    std::fs::create_dir_all(run_dir.join("3")).unwrap();
    for f in xrayglm::train::checkpoint::CHECKPOINT_FILES {
        std::fs::write(run_dir.join("3").join(f), "{}").unwrap();
    }
    std::fs::write(run_dir.join("best"), "5").unwrap();
    std::fs::write(run_dir.join("latest"), "7").unwrap();
    let best = run_dir.join("best");
    fails(
        &run(common::bin().args(["eval", "--checkpoint"]).arg(&best)),
        &["the pointer", "best names step 5", "run/5 is missing"],
    );
    let o = run(common::bin()
        .args(["export", "--format", "lora", "--from_pretrained"])
        .arg(&run_dir)
        .arg("--to")
        .arg(d.join("out")));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("warning")
            && e.contains("latest names step 7")
            && e.contains("newest complete checkpoint"),
        "{e}"
    );
}

#[test]
fn small_inputs_mean_what_they_say() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(common::bin()
        .args([
            "export",
            "--format",
            "merged",
            "--shard_mib",
            "0",
            "--from_pretrained",
        ])
        .arg(common::sat_fixture())
        .arg("--to")
        .arg(tmp.path().join("out")));
    fails(&o, &["--shard_mib 0"]);
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn eval_names_the_record_whose_history_leaves_no_room() {
    let Some(shared) = common::shared() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = d.join("tiny");
    succeeds(&run(common::bin()
        .args(["convert", "--model", "preset:tiny", "--to"])
        .arg(&model)));
    write_png(&d.join("a.png"));
    let long_q = "心脏大小正常，双肺纹理清晰，未见明显实变影。".repeat(8);
    let mut turns = Vec::new();
    for i in 0..30 {
        turns.push(serde_json::json!({"from": "human", "value": format!("{i}{long_q}")}));
        turns.push(serde_json::json!({"from": "gpt", "value": "心脏正常。"}));
    }
    let short = serde_json::json!({"id": "short", "image": "a.png", "conversations": [
        {"from": "human", "value": "描述这张胸片"}, {"from": "gpt", "value": "心脏正常。"}]});
    let long = serde_json::json!({"id": "long", "image": "a.png", "conversations": turns});
    let data = d.join("conv.json");
    std::fs::write(&data, serde_json::json!([short, long]).to_string()).unwrap();
    let o = run(common::bin()
        .args(["eval", "--no_loss", "--no_progress", "--checkpoint"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--tokenizer")
        .arg(common::ice_text(&shared))
        .args([
            "--set",
            "sample.max_source_length=4096",
            "--set",
            "data.conversation_turns=\"last\"",
            "--out",
        ])
        .arg(d.join("eval")));
    fails(
        &o,
        &[
            "conv.json",
            "record 1 (long#29, 29 earlier turns)",
            "leaving no room for a report",
        ],
    );
    assert!(!d.join("eval").exists());
}
