//! Report metrics against pycocoevalcap (fixtures from scripts/make_metric_fixtures.py): corpus
//! BLEU-1..4, ROUGE-L and CIDEr-D equal to 1e-6 on Chinese and English corpora with identical,
//! empty, unrelated, truncated and shuffled hypotheses; NLTK's character BLEU-4 with smoothing
//! method3 per pair and ChatGLM's rounded ×100 mean; LLaMA-Factory's ROUGE-1/2/L (rouge-chinese on
//! jieba words, incl. `3-5` ranges, ordinals like `2nd-3rd`, units glued to numbers and blank
//! lines — the jieba words themselves equal Python jieba's); the tokenization equals the script's.

mod common;

use xrayglm::eval::metrics::{
    bleu, chatglm_bleu4, chatglm_rouge, cider_d, jieba_words, nltk_char_bleu4, rouge_chinese,
    rouge_l, tokenize, Lang,
};

#[test]
fn coco_metrics_equal_pycocoevalcap() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/coco.json"
    );
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    assert!(cases.iter().any(|c| c["name"] == "mixed-ascii-runs"));
    let strs = common::strings;
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let lang = if c["lang"] == "en" {
            Lang::En
        } else {
            Lang::Zh
        };
        let hyps: Vec<Vec<String>> = strs(&c["hyps"]).iter().map(|h| tokenize(h, lang)).collect();
        let refs: Vec<Vec<Vec<String>>> = c["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rs| strs(rs).iter().map(|r| tokenize(r, lang)).collect())
            .collect();
        assert_eq!(hyps[0], strs(&c["tokens_first_hyp"]), "{name}: tokens");
        for (h, want) in strs(&c["hyps"])
            .iter()
            .zip(c["jieba_hyps"].as_array().unwrap())
        {
            assert_eq!(jieba_words(h), strs(want), "{name}: jieba words of {h:?}");
        }
        let close = |got: f64, want: &serde_json::Value, what: &str| {
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-6,
                "{name} {what}: {got} vs pycocoevalcap {want}"
            );
        };
        let b = bleu(&hyps, &refs);
        for k in 0..4 {
            close(b[k], &c["bleu"][k], &format!("BLEU-{}", k + 1));
        }
        close(rouge_l(&hyps, &refs), &c["rouge_l"], "ROUGE-L");
        close(cider_d(&hyps, &refs), &c["cider"], "CIDEr-D");
        // ChatGLM-style: characters, first reference, per sample.
        let pairs: Vec<(String, String)> = strs(&c["hyps"])
            .into_iter()
            .zip(c["refs"].as_array().unwrap())
            .map(|(h, rs)| (h, rs[0].as_str().unwrap().to_string()))
            .collect();
        for (i, (h, r)) in pairs.iter().enumerate() {
            close(
                nltk_char_bleu4(h, r),
                &c["nltk_char_bleu4"][i],
                &format!("nltk BLEU-4 of pair {i}"),
            );
        }
        close(chatglm_bleu4(&pairs), &c["chatglm_bleu4"], "ChatGLM bleu-4");
        for (i, (h, r)) in pairs.iter().enumerate() {
            let got = rouge_chinese(h, r);
            for k in 0..3 {
                close(
                    got[k],
                    &c["rouge_chinese"][i][k],
                    &format!("rouge-chinese {k} of pair {i}"),
                );
            }
        }
        let got = chatglm_rouge(&pairs);
        for k in 0..3 {
            close(
                got[k],
                &c["chatglm_rouge"][k],
                &format!("ChatGLM rouge {k}"),
            );
        }
    }
}

/// `xrayglm eval --hypotheses` scores JSONL files without a model: the same numbers as
/// pycocoevalcap (every reference, `"references": [..]`) and nltk / rouge-chinese (the first
/// reference), one row per file in the n-gram table and in the CE table, one scored line per
/// report; bad lines and empty files are errors naming the file (and line), and leave no report
/// behind.
#[test]
fn eval_cli_scores_hypotheses_files() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/coco.json"
    );
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut want = Vec::new();
    let mut several = 0;
    for c in fx["cases"].as_array().unwrap() {
        several += c["refs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r.as_array().unwrap().len() > 1)
            .count();
        let lines: Vec<String> = c["hyps"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["refs"].as_array().unwrap())
            .enumerate()
            .map(|(i, (h, r))| {
                serde_json::json!({"id": i.to_string(), "references": r, "hypothesis": h, "lang": c["lang"]})
                    .to_string()
            })
            .collect();
        let f = dir
            .path()
            .join(format!("{}.jsonl", c["name"].as_str().unwrap()));
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        files.push(f);
        want.push(c.clone());
    }
    assert!(files.len() >= 2 && several > 0);
    let out_dir = dir.path().join("report");
    let out = common::ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .arg("eval")
            .arg("--hypotheses")
            .args(&files)
            .arg("--out")
            .arg(&out_dir),
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (r, c) in got["reports"].as_array().unwrap().iter().zip(&want) {
        let m = &r["metrics"];
        let close = |a: &serde_json::Value, b: &serde_json::Value| {
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-6,
                "{a} vs {b}"
            )
        };
        for k in 0..4 {
            close(&m[format!("bleu_{}", k + 1)], &c["bleu"][k]);
        }
        close(&m["rouge_l"], &c["rouge_l"]);
        close(&m["cider_d"], &c["cider"]);
        close(&m["chatglm_bleu_4"], &c["chatglm_bleu4"]);
        for (k, key) in ["chatglm_rouge_1", "chatglm_rouge_2", "chatglm_rouge_l"]
            .iter()
            .enumerate()
        {
            close(&m[*key], &c["chatglm_rouge"][k]);
        }
    }
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    let tables: Vec<&str> = md
        .split("\n\n")
        .map(str::trim)
        .filter(|t| t.starts_with('|'))
        .collect();
    assert_eq!(tables.len(), 2, "{md}");
    assert_eq!(tables[0].lines().count(), 2 + files.len(), "{md}");
    assert!(tables[1].contains("CE-F1"), "{md}");
    assert_eq!(tables[1].lines().count(), 2 + files.len(), "{md}");
    assert!(out_dir.join("report.json").is_file());
    // One scored line per report, with its own BLEU-4 / ROUGE-L and both sides' findings.
    for (f, c) in files.iter().zip(&want) {
        let stem = f.file_stem().unwrap().to_string_lossy();
        let text = std::fs::read_to_string(out_dir.join(format!("{stem}.scores.jsonl"))).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), c["hyps"].as_array().unwrap().len());
        for l in &lines {
            let b = l["bleu_4"].as_f64().unwrap();
            let r = l["rouge_l"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&b) && (0.0..=1.0).contains(&r), "{l}");
            assert!(l["hypothesis_findings"].is_object() && l["reference_findings"].is_object());
        }
    }

    // A bad line names the file and line; an empty file is refused; nothing is written.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"1\", \"reference\": \"a\", \"hypothesis\": \"a\"}\n{\"id\": 2}\n",
    )
    .unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    for (f, msg) in [(&bad, "bad.jsonl:2"), (&empty, "no hypotheses")] {
        let o = dir.path().join("never");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .arg("eval")
            .arg("--hypotheses")
            .arg(f)
            .arg("--out")
            .arg(&o)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(msg), "{err}");
        assert!(!o.exists());
    }
}

/// `xrayglm eval --checkpoint` refuses bad input before writing anything: a missing folder, a
/// checkpoint without a training config and no `--data`, an unknown split, a file without records, and
/// `--checkpoint` together with `--hypotheses`.
#[test]
fn eval_checkpoint_errors_name_the_problem_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sat = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/model/a/sat");
    let o = dir.path().join("never");
    let data = dir.path().join("none.json");
    std::fs::write(&data, "[]").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--checkpoint".into(),
                dir.path().join("nope").display().to_string(),
            ],
            "nope: no such folder",
        ),
        (
            vec!["--checkpoint".into(), sat.into()],
            "has no training config.toml",
        ),
        (
            vec![
                "--checkpoint".into(),
                sat.into(),
                "--data".into(),
                data.display().to_string(),
                "--split".into(),
                "sideways".into(),
            ],
            "invalid value 'sideways' for '--split",
        ),
        (
            vec![
                "--checkpoint".into(),
                sat.into(),
                "--data".into(),
                data.display().to_string(),
            ],
            "none.json: no usable records",
        ),
        (
            vec![
                "--checkpoint".into(),
                sat.into(),
                "--hypotheses".into(),
                "x.jsonl".into(),
            ],
            "cannot be used with",
        ),
    ];
    for (args, msg) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .arg("eval")
            .args(&args)
            .arg("--out")
            .arg(&o)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(msg),
            "{args:?}: {err}"
        );
        assert!(!o.exists());
    }
}

/// CIDEr-D sums floats over n-grams: in a fixed order, so the same corpus gives the same bits
/// every time (re-scoring a JSONL reproduces a report exactly).
#[test]
fn cider_is_bitwise_reproducible() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/coco.json"
    );
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for c in fx["cases"].as_array().unwrap() {
        let lang = if c["lang"] == "en" {
            Lang::En
        } else {
            Lang::Zh
        };
        let tok = |v: &serde_json::Value| tokenize(v.as_str().unwrap(), lang);
        let hyps: Vec<Vec<String>> = c["hyps"].as_array().unwrap().iter().map(tok).collect();
        let refs: Vec<Vec<Vec<String>>> = c["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rs| rs.as_array().unwrap().iter().map(tok).collect())
            .collect();
        let first = cider_d(&hyps, &refs);
        for _ in 0..20 {
            assert_eq!(
                cider_d(&hyps, &refs).to_bits(),
                first.to_bits(),
                "{}",
                c["name"]
            );
        }
    }
}

/// A repeated id is an error naming both lines (or scored twice with
/// `--allow-duplicates`); a report over the length limit is refused at once with the limit and how
/// to raise it (a 200,000-character pair took over 300 s before), nothing written.
#[test]
fn eval_hypotheses_refuses_duplicate_ids_and_overlong_reports() {
    let dir = tempfile::tempdir().unwrap();
    let line = |id: &str, r: &str, h: &str| {
        serde_json::json!({"id": id, "reference": r, "hypothesis": h}).to_string() + "\n"
    };
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(
        &dup,
        line("a", "心脏大小正常", "心脏大小正常")
            + &line("b", "肺野清晰", "肺野清晰")
            + &line("a", "心脏大小正常", "心脏增大"),
    )
    .unwrap();
    let long = dir.path().join("long.jsonl");
    std::fs::write(
        &long,
        line("a", "心脏大小正常", "心脏大小正常") + &line("x", &"肺".repeat(200_000), "肺野清晰"),
    )
    .unwrap();
    let eval = |f: &std::path::Path, extra: &[&str], out: &std::path::Path| {
        let t = std::time::Instant::now();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .arg("eval")
            .arg("--hypotheses")
            .arg(f)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            t.elapsed(),
        )
    };
    let never = dir.path().join("never");
    let (ok, err, _) = eval(&dup, &[], &never);
    assert!(!ok);
    assert!(
        err.contains("dup.jsonl: id \"a\" appears on lines 1 and 3")
            && err.contains("--allow_duplicates"),
        "{err}"
    );
    let (ok, err, took) = eval(&long, &[], &never);
    assert!(!ok);
    assert!(
        err.contains(
            "long.jsonl:2: the reference of \"x\" has 200000 characters, over the limit of 20000"
        ) && err.contains("--max_chars"),
        "{err}"
    );
    assert!(took.as_secs() < 30, "refused after {took:?}");
    assert!(!never.exists());
    let both = dir.path().join("both");
    let (ok, err, _) = eval(&dup, &["--allow-duplicates"], &both);
    assert!(ok, "{err}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(both.join("report.json")).unwrap()).unwrap();
    assert!(report.to_string().contains("\"count\":3"), "{report}");
}

/// `eval --hypotheses` writes report.html: two models' reports of ten studies (three with
/// films named by their lines), read in headless Chromium. The page makes no request beyond its
/// own file, shows every study and film, its chips are the per-report lines' findings (right:
/// both present; missed: reference only; invented: report only), "only errors" leaves exactly the
/// studies with a CE error, the observation and disagreement filters and the sorting do what they
/// say, j/k move between studies, and the chart has one bar group per observation. Copied and
/// linked films, a missing film (an error naming it; nothing written) and the agreement page of
/// `findings --against --page` are checked without the browser.
#[test]
fn eval_page_shows_studies_findings_and_filters_in_headless_chromium() {
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().unwrap();
    let films = dir.path().join("films");
    std::fs::create_dir_all(&films).unwrap();
    for (i, cm) in [true, false, false, true].iter().enumerate() {
        std::fs::write(
            films.join(format!("f{i}.png")),
            common::film_png(*cm, i as i64),
        )
        .unwrap();
    }
    // (id, reference, model A, model B).
    let studies = [
        (
            "s1",
            "心影增大。左侧胸腔积液。",
            "心影增大。左侧胸腔积液。",
            "心影增大。左侧胸腔积液。",
        ),
        (
            "s2",
            "心脏大小正常。双肺清晰。",
            "心脏大小正常。双肺清晰。",
            "心脏大小正常。双肺清晰。",
        ),
        ("s3", "右侧气胸。", "双肺清晰。", "右侧气胸。"),
        ("s4", "心影增大。", "心影增大。右侧气胸。", "心影增大。"),
        (
            "s5",
            "双肺清晰，心脏大小正常。",
            "双肺清晰，心脏大小正常。",
            "双肺清晰，心脏大小正常。",
        ),
        ("s6", "左侧胸腔积液。", "左侧胸腔积液。", "心影增大。"),
        ("s7", "心影增大。", "双肺清晰。", "双肺清晰。"),
        ("s8", "右侧气胸。", "心影增大。", "左侧胸腔积液。"),
        // Only a miss: no finding invented in its place.
        (
            "s9",
            "心影增大。左侧胸腔积液。",
            "心影增大。",
            "心影增大。左侧胸腔积液。",
        ),
        // Both normal; only model A denies an effusion.
        (
            "s10",
            "双肺清晰。",
            "双肺清晰，未见胸腔积液。",
            "双肺清晰。",
        ),
    ];
    let images = |id: &str| match id {
        "s1" => serde_json::json!("films/f0.png"),
        "s2" => serde_json::json!(["films/f1.png", "films/f2.png"]),
        "s3" => serde_json::json!(["films/f3.png"]),
        _ => serde_json::Value::Null,
    };
    let write = |name: &str, model_b: bool| {
        let f = dir.path().join(format!("{name}.jsonl"));
        let lines: Vec<String> = studies
            .iter()
            .map(|s| {
                let mut v = serde_json::json!({"id": s.0, "reference": s.1, "hypothesis": if model_b { s.3 } else { s.2 }});
                if !images(s.0).is_null() {
                    // One film as "image", several as "images".
                    let key = if s.0 == "s1" { "image" } else { "images" };
                    v[key] = images(s.0);
                }
                v.to_string()
            })
            .collect();
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        f
    };
    let (a, b) = (write("a", false), write("b", true));
    let eval = |out: &std::path::Path, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
            .arg("eval")
            .arg("--hypotheses")
            .args([&a, &b])
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = dir.path().join("report");
    let o = eval(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = out.join("report.html");
    let size = std::fs::metadata(&html).unwrap().len();
    // The lines echo the films they were given.
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("a.scores.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["images"], serde_json::json!(["films/f0.png"]));

    let Some(browser) = common::browser() else {
        return;
    };
    let shot = common::test_output().join("eval_page_hypotheses.png");
    let url = format!("file://{}", html.canonicalize().unwrap().display());
    let v = common::browser_script(
        &browser,
        "eval_page.mjs",
        &[url.as_ref(), shot.as_os_str(), "CM".as_ref()],
    );
    eprintln!("page: {size} bytes; {}", v["shown_text"]);
    let errors = common::check_eval_page(
        &v,
        &[
            ("a", out.join("a.scores.jsonl")),
            ("b", out.join("b.scores.jsonl")),
        ],
    );
    assert_eq!(errors, ["s3", "s4", "s6", "s7", "s8", "s9"]);
    assert_eq!(
        (v["images"].as_u64(), v["images_loaded"].as_u64()),
        (Some(4), Some(4))
    );
    let ids = common::strings;
    let set = |x: &serde_json::Value| -> BTreeSet<String> { ids(x).into_iter().collect() };
    // A known study: s4's model A states cardiomegaly rightly and invents a right pneumothorax,
    // with the phrase on hover.
    let s4 = &v["chips"]["s4"]["models"][0];
    assert_eq!(
        (set(&s4["right"]), set(&s4["invented"])),
        (["CM".to_string()].into(), ["PX".to_string()].into())
    );
    assert!(
        s4["titles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t.as_str().unwrap().contains("气胸")),
        "{s4}"
    );
    // The observation, its errors and the disagreement filters.
    assert_eq!(ids(&v["observation"]), ["s1", "s4", "s6", "s7", "s8", "s9"]);
    assert_eq!(ids(&v["observation_errors"]), ["s6", "s7", "s8"]);
    assert_eq!(ids(&v["disagreements"]), ["s3", "s4", "s6", "s8", "s9"]);
    // Worst CE first (ties in the evaluation's order), and back.
    let worst: Vec<(String, f64)> = v["worst_first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x[0].as_str().unwrap().to_string(), x[1].as_f64().unwrap()))
        .collect();
    assert!(worst.windows(2).all(|w| w[0].1 <= w[1].1), "{worst:?}");
    assert_eq!(worst[0].0, "s3");
    assert_eq!(worst.last().unwrap().1, 1.0);
    assert_eq!(ids(&v["restored"]), ids(&v["all"]));
    assert_eq!(
        (v["after_jj"].as_str(), v["after_jjk"].as_str()),
        (Some("s2"), Some("s1"))
    );
    // Three bars per model in each observation's group.
    assert_eq!(v["chart_bars"], 14 * 2 * 3);
    assert!(v["best_cells"].as_u64().unwrap() > 0, "{v}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot"
    );

    // Films copied beside the page, or linked where they are.
    let copy = dir.path().join("copy");
    assert!(eval(&copy, &["--page_images", "copy"]).status.success());
    let n = std::fs::read_dir(copy.join("films")).unwrap().count();
    let page = std::fs::read_to_string(copy.join("report.html")).unwrap();
    assert_eq!(n, 4);
    assert!(
        page.contains("src=\"films/0-f0.png\"") && !page.contains("data:image"),
        "copy"
    );
    let link = dir.path().join("link");
    assert!(eval(&link, &["--page-images", "link"]).status.success());
    let page = std::fs::read_to_string(link.join("report.html")).unwrap();
    assert!(
        page.contains("src=\"../films/f3.png\"") && !link.join("films").exists(),
        "link"
    );
    // A film that is not there: an error naming it, and nothing written.
    std::fs::remove_file(films.join("f3.png")).unwrap();
    let never = dir.path().join("never");
    let o = eval(&never, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("f3.png"), "{err}");
    assert!(!never.join("report.json").exists() && !never.join("report.html").exists());

    // The agreement page of two labellings: the reports they read differently.
    let agreement = dir.path().join("agree/a-vs-b.html");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .arg("findings")
        .arg(&a)
        .arg("--against")
        .arg(&b)
        .arg("--page")
        .arg(&agreement)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = std::fs::read_to_string(&agreement).unwrap();
    // The two read s10's effusion differently (denied against not mentioned) but both as absent:
    // shown, and not a present / absent disagreement.
    let differ = ["s3", "s4", "s6", "s8", "s9", "s10"];
    for s in &studies {
        let at = page.find(&format!("data-id=\"{}\"", s.0));
        assert_eq!(at.is_some(), differ.contains(&s.0), "{}", s.0);
        if let Some(at) = at {
            let tag = &page[at..at + page[at..].find('>').unwrap()];
            let presence = s.0 != "s10";
            assert!(
                tag.contains(&format!("data-error=\"{}\"", presence as u8)),
                "{tag}"
            );
        }
    }
    assert!(
        page.contains("class=\"chip nuance\" data-obs=\"PE\""),
        "s10's chip"
    );
    assert!(
        page.contains("Pneumothorax - → +") || page.contains("Pneumothorax . → +"),
        "{page}"
    );
}
