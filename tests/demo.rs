//! Inference on the CPU demo, on one `configs/demo.toml` training shared by the tests here:
//! * `xrayglm chat` one-shot and interactive;
//! * `xrayglm web`: upload limits (413), bad images (400), unknown sessions (404), independent
//!   concurrent conversations, 32 concurrent requests;
//! * the page in headless Chromium (playwright-core): upload an X-ray, ask, see the answer; the
//!   screenshot goes to target/test-output/web_demo.png;
//! * the quality check: greedy reports on the held-out films state the right findings (≥ 90 %).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use xrayglm::config::Config;
use xrayglm::data::records::FIXED_PROMPT;
use xrayglm::data::records::{load_records, Record};

struct Demo {
    run: PathBuf,
    /// The demo recipe on an NF4 base (`model.quantize = "nf4"`), for its held-out loss only.
    nf4_run: PathBuf,
    /// The demo recipe on black films (`image.ablation = "blank"`), 200 steps.
    blind_run: PathBuf,
    held_out: Vec<Record>,
    tokenizer: PathBuf,
    _dir: tempfile::TempDir,
}

/// Train the demo once for every test of this file, and beside it the two runs that tests compare
/// it with. The three train at once with one intra-op thread each: on two cores, two processes
/// of two threads each stall in each other's spin-waits (a 77 s run took over 300 s so).
fn demo() -> Option<&'static Demo> {
    static DEMO: OnceLock<Option<Demo>> = OnceLock::new();
    DEMO.get_or_init(|| {
        let shared = common::shared()?;
        let dir = tempfile::tempdir().unwrap();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.toml");
        let tokenizer = common::ice_text(&shared);
        let runs: [(&str, &str, &[&str]); 3] = [
            ("demo", "data", &[]),
            (
                "demo-nf4",
                "data-nf4",
                &[
                    "model.quantize=\"nf4\"",
                    "train.name=\"demo-nf4\"",
                    // Only the held-out loss is compared: no generated reports, one checkpoint.
                    "train.eval_generate_interval=0",
                    "train.save_interval=600",
                ],
            ),
            (
                "blind",
                "data-blind",
                &[
                    "train.name=\"blind\"",
                    "train.train_iters=200",
                    "image.ablation=\"blank\"",
                ],
            ),
        ];
        // Each run generates its own copy of the (seeded, identical) synthetic set.
        let children: Vec<(&str, std::process::Child, PathBuf)> = runs
            .iter()
            .map(|(name, data, extra)| {
                let log = dir.path().join(format!("{name}.log"));
                let overrides = demo_overrides(&dir.path().join(data), dir.path())
                    .into_iter()
                    .chain(extra.iter().map(|s| s.to_string()));
                let child = Command::new(env!("CARGO_BIN_EXE_xrayglm"))
                    .arg("finetune")
                    .arg("--config")
                    .arg(&config)
                    .args(common::set_args(overrides))
                    .env("XRAYGLM_TOKENIZER", &tokenizer)
                    .env("OMP_NUM_THREADS", "1")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap();
                (*name, child, log)
            })
            .collect();
        for (name, mut child, log) in children {
            let status = child.wait().unwrap();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(status.success(), "{name}: {text}");
        }
        // The trainer's own held-out split.
        let overrides = demo_overrides(&dir.path().join("data"), dir.path());
        let cfg = Config::load(Some(&config), &overrides).unwrap();
        let records = load_records(&cfg.data.path, &cfg.data.load_options())
            .unwrap()
            .records;
        let (_, held_out) = xrayglm::data::split(records, cfg.train.val_fraction, cfg.train.seed);
        Some(Demo {
            run: dir.path().join(&cfg.train.name),
            nf4_run: dir.path().join("demo-nf4"),
            blind_run: dir.path().join("blind"),
            held_out,
            tokenizer,
            _dir: dir,
        })
    })
    .as_ref()
}

/// The demo config's overrides for a run in `out` on the synthetic set in `data`, on the CPU.
fn demo_overrides(data: &Path, out: &Path) -> Vec<String> {
    vec![
        format!("synthetic.out_dir={:?}", data.display().to_string()),
        format!(
            "data.path={:?}",
            data.join("Xray/synth-zh.json").display().to_string()
        ),
        format!("train.out_dir={:?}", out.display().to_string()),
        "train.progress=false".to_string(),
        "model.device=\"cpu\"".to_string(),
    ]
}

/// The binary with the demo's tokenizer, on one intra-op thread (tests run two at a time on two
/// cores).
fn xrayglm(d: &Demo) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xrayglm"));
    c.env("XRAYGLM_TOKENIZER", &d.tokenizer)
        .env("OMP_NUM_THREADS", "1");
    c
}

#[test]
fn chat_answers_one_shot_and_interactively() {
    let Some(d) = demo() else { return };
    let film = &d.held_out[0];
    let out = xrayglm(d)
        .args([
            "chat",
            "--greedy",
            "--max_length",
            "200",
            "--from_pretrained",
        ])
        .arg(&d.run)
        .arg("--image")
        .arg(&film.images[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.trim().starts_with("心脏"), "{text}");
    // Interactive: an image, the automatic first question, a follow-up, clear, text-only, stop.
    let mut child = xrayglm(d)
        .args([
            "chat",
            "--greedy",
            "--max_length",
            "300",
            "--from_pretrained",
        ])
        .arg(&d.run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    write!(
        child.stdin.take().unwrap(),
        "{}\n心脏大小如何？\nclear\n\n你好\nstop\n",
        film.images[0].display()
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("用户：{FIXED_PROMPT}")), "{text}");
    assert!(text.matches("XrayGLM：").count() >= 3, "{text}");
    assert!(text.matches("请输入图像路径").count() == 2, "{text}");
}

use common::{http, Server};

fn serve(d: &Demo) -> Server {
    serve_with(d, &[])
}

fn serve_with(d: &Demo, extra: &[&str]) -> Server {
    let mut c = xrayglm(d);
    c.args([
        "web",
        "--port",
        "0",
        "--greedy",
        "--repetition_penalty",
        "1",
        "--max_length",
        "200",
        "--max_upload_mib",
        "1",
    ])
    .args(extra);
    spawn_server(d, c)
}

/// Start a server command on the demo run.
fn spawn_server(d: &Demo, mut c: Command) -> Server {
    Server::spawn(c.arg("--from_pretrained").arg(&d.run))
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s:?}"))
}

fn new_session(addr: &str) -> String {
    let (c, b) = http(addr, "POST", "/api/session", b"");
    assert_eq!(c, 200, "{b}");
    json(&b)["session"].as_str().unwrap().to_string()
}

/// The final NDJSON line of a streamed answer.
fn ask(addr: &str, session: &str, q: &str) -> serde_json::Value {
    let body = serde_json::json!({"session": session, "query": q}).to_string();
    let (c, b) = http(addr, "POST", "/api/chat", body.as_bytes());
    assert_eq!(c, 200, "{b}");
    let last = b.lines().rfind(|l| !l.is_empty()).unwrap();
    let v = json(last);
    assert_eq!(v["done"], true, "{b}");
    assert!(v.get("error").is_none(), "{b}");
    v
}

#[test]
fn web_endpoints_check_input_and_keep_conversations_apart() {
    let Some(d) = demo() else { return };
    let srv = serve(d);
    let a = &srv.addr;
    let (c, page) = http(a, "GET", "/", b"");
    assert_eq!(c, 200);
    assert!(
        page.contains("<title>XrayGLM</title>")
            && !page.contains("http://")
            && !page.contains("https://")
    );
    let s1 = new_session(a);
    let s2 = new_session(a);
    assert_ne!(s1, s2);
    let png = std::fs::read(&d.held_out[0].images[0]).unwrap();
    let (c, b) = http(a, "POST", &format!("/api/image?session={s1}"), &png);
    assert_eq!(c, 200, "{b}");
    let (c, b) = http(
        a,
        "POST",
        &format!("/api/image?session={s2}"),
        b"not an image",
    );
    assert_eq!(c, 400, "{b}");
    assert!(json(&b)["error"].as_str().unwrap().contains("image"), "{b}");
    let big = vec![0u8; (1 << 20) + 1];
    let (c, b) = http(a, "POST", &format!("/api/image?session={s2}"), &big);
    assert_eq!(c, 413, "{b}");
    let (c, _) = http(a, "POST", "/api/image?session=nope", &png);
    assert_eq!(c, 404);
    // Several views of one study: `append=1` adds a film (at most 8), a plain upload starts over.
    let s3 = new_session(a);
    let lateral = std::fs::read(&d.held_out[1].images[0]).unwrap();
    for k in 1..=8 {
        let q = if k == 1 { "" } else { "&append=1" };
        let film = if k % 2 == 1 { &png } else { &lateral };
        let (c, b) = http(a, "POST", &format!("/api/image?session={s3}{q}"), film);
        assert_eq!((c, json(&b)["films"].as_u64()), (200, Some(k)), "{b}");
    }
    let (c, b) = http(
        a,
        "POST",
        &format!("/api/image?session={s3}&append=1"),
        &png,
    );
    assert_eq!(c, 400, "{b}");
    let (c, b) = http(a, "POST", &format!("/api/image?session={s3}"), &png);
    assert_eq!((c, json(&b)["films"].as_u64()), (200, Some(1)), "{b}");
    let (c, b) = http(
        a,
        "POST",
        &format!("/api/image?session={s3}&append=1"),
        &lateral,
    );
    assert_eq!((c, json(&b)["films"].as_u64()), (200, Some(2)), "{b}");
    let two = ask(a, &s3, FIXED_PROMPT);
    assert!(!two["response"].as_str().unwrap().is_empty(), "{two}");
    let (c, _) = http(
        a,
        "POST",
        "/api/chat",
        b"{\"session\": \"nope\", \"query\": \"hi\"}",
    );
    assert_eq!(c, 404);
    let (c, _) = http(a, "POST", "/api/chat", b"{not json");
    assert_eq!(c, 400);
    // Two conversations in parallel: each history holds only its own turns.
    let (h1, h2) = std::thread::scope(|sc| {
        let t1 = sc.spawn(|| ask(a, &s1, FIXED_PROMPT));
        let t2 = sc.spawn(|| ask(a, &s2, "你好"));
        (t1.join().unwrap(), t2.join().unwrap())
    });
    let q = |v: &serde_json::Value| -> Vec<String> {
        v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["query"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(q(&h1), vec![FIXED_PROMPT.to_string()]);
    assert_eq!(q(&h2), vec!["你好".to_string()]);
    assert!(h1["response"].as_str().unwrap().starts_with("心脏"), "{h1}");
    let again = ask(a, &s1, "心脏大小如何？");
    assert_eq!(q(&again).len(), 2);
    let (c, _) = http(
        a,
        "POST",
        "/api/clear",
        format!("{{\"session\": \"{s1}\"}}").as_bytes(),
    );
    assert_eq!(c, 200);
    assert_eq!(q(&ask(a, &s1, "你好")).len(), 1);
    // 32 concurrent requests: every one is answered and the server stays up.
    let sessions: Vec<String> = (0..32).map(|_| new_session(a)).collect();
    std::thread::scope(|sc| {
        let handles: Vec<_> = sessions
            .iter()
            .map(|s| sc.spawn(move || ask(a, s, "你好")))
            .collect();
        for h in handles {
            let v = h.join().unwrap();
            assert_eq!(v["history"].as_array().unwrap().len(), 1);
        }
    });
    let (c, b) = http(a, "GET", "/api/health", b"");
    assert_eq!(c, 200);
    assert_eq!(json(&b)["ok"], true);
}

#[test]
fn the_page_works_in_headless_chromium() {
    let Some(d) = demo() else { return };
    let Some(browser) = common::browser() else {
        return;
    };
    let Some(shared) = common::shared() else {
        return;
    };
    let image = std::fs::read_dir(shared.join("data/Xray"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .min()
        .expect("an X-ray png in ../shared/data/Xray");
    let srv = serve(d);
    let shot = common::test_output().join("web_demo.png");
    let _ = std::fs::remove_file(&shot);
    let v = common::browser_script(
        &browser,
        "web_demo.mjs",
        &[
            format!("http://{}/", srv.addr).as_ref(),
            image.as_os_str(),
            shot.as_os_str(),
        ],
    );
    assert_eq!(v["state"], "done", "{v}");
    assert!(!v["answer"].as_str().unwrap().is_empty(), "{v}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot"
    );
    eprintln!("screenshot: {}", shot.display());
}

/// The demo learned to read the films: greedy reports (no repetition penalty: the templated
/// reports repeat words) on the held-out synthetic images state the
/// right heart size and the right pleural effusion (none / left / right / both) for ≥ 90 % of them.
/// An untrained or image-blind model fails this (at best it guesses the commonest findings: under
/// 40 % of the held-out films).
#[test]
fn held_out_reports_state_the_right_findings() {
    use xrayglm::infer::chat::{ChatModel, ChatSettings};
    use xrayglm::infer::findings::{agrees, stated};
    use xrayglm::weights::source::LoadOptions;
    let Some(d) = demo() else { return };
    let tokenizer = xrayglm::tokenizer::ChatGlmTokenizer::from_path(&d.tokenizer).unwrap();
    let chat = ChatModel::load(&d.run, tokenizer, &LoadOptions::default(), true).unwrap();
    let size = chat.images.size as i64;
    let pixels: Vec<tch::Tensor> = d
        .held_out
        .iter()
        .map(|r| {
            let px = chat.images.process_file(&r.images[0]).unwrap();
            tch::Tensor::from_slice(&px).view([3, size, size])
        })
        .collect();
    let embeds = chat.embed_images(&tch::Tensor::stack(&pixels, 0));
    let mut settings = ChatSettings {
        max_length: 200,
        ..Default::default()
    };
    settings.sampling.greedy = true;
    settings.sampling.repetition_penalty = 1.0;
    let reports = chat
        .answer_images(&embeds, &chat.default_prompt, &settings)
        .unwrap();
    let (mut right, mut heart) = (0, 0);
    for (r, h) in d.held_out.iter().zip(&reports) {
        let (want, got) = (stated(&r.label), stated(h));
        heart += (want.cardiomegaly == got.cardiomegaly) as usize;
        if agrees(h, &r.label) {
            right += 1;
        } else {
            eprintln!(
                "{}: wanted {want:?}, got {got:?}: {h}",
                r.images[0].display()
            );
        }
    }
    let n = d.held_out.len();
    eprintln!("held-out films: {right}/{n} all findings right, heart size {heart}/{n}");
    assert!(n >= 20, "only {n} held-out films");
    assert!(
        right * 10 >= n * 9,
        "{right}/{n} held-out reports state the right findings (heart size {heart}/{n})"
    );
}

/// `xrayglm eval --checkpoint` on the demo run: its own held-out films (the trainer's split), one
/// report per film in order, metrics equal to scoring the written JSONL with `--hypotheses`, the
/// findings right, a loss that does not depend on the batching (token-weighted), TensorBoard
/// scalars at the checkpoint's step, and two checkpoints side by side.
#[test]
fn eval_scores_the_held_out_films_of_a_run() {
    use xrayglm::infer::findings::agrees;
    let Some(d) = demo() else { return };
    let out = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| -> serde_json::Value {
        let o = xrayglm(d)
            .arg("eval")
            .arg("--checkpoint")
            .arg(&d.run)
            .args(["--no_progress", "--max_new_tokens", "150"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let dir = out.path().join("e");
    let tb = out.path().join("tb");
    let full = run(&[
        "--batch_size",
        "5",
        "--out",
        dir.to_str().unwrap(),
        "--tensorboard",
        tb.to_str().unwrap(),
    ]);
    let r = &full["reports"][0];
    let n = d.held_out.len();
    assert_eq!(r["films"], n);
    assert_eq!(r["name"], "demo/600");
    assert_eq!(r["step"], 600);
    let loss = r["val_loss"].as_f64().unwrap();
    assert!((r["val_ppl"].as_f64().unwrap() - loss.exp()).abs() < 1e-12);
    assert!(loss < 0.1, "val loss {loss}");
    // The generated reports: one per held-out film, in the split's order, with its reference.
    let jsonl = dir.join("demo_600.jsonl");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n);
    let mut right = 0;
    for (g, rec) in lines.iter().zip(&d.held_out) {
        assert_eq!(g["id"], rec.id.as_str());
        assert_eq!(g["reference"], rec.label.as_str());
        right += agrees(g["hypothesis"].as_str().unwrap(), &rec.label) as usize;
    }
    assert!(right * 10 >= n * 9, "{right}/{n} reports right");
    // Each line carries its own scores and the findings of both sides.
    assert!(lines
        .iter()
        .all(|l| l["bleu_4"].is_number() && l["rouge_l"].is_number()));
    assert!(
        lines[0]["reference_findings"]["Cardiomegaly"].is_string(),
        "{}",
        lines[0]
    );
    // Clinical efficacy: the trained demo states its films' findings.
    let ce = &r["metrics"]["ce"];
    let ce_f1 = ce["micro"]["f1"].as_f64().unwrap();
    assert!(ce_f1 >= 0.9, "CE-F1 {ce_f1}: {ce}");
    // Scoring the written reports without a model gives the same metrics.
    let o = xrayglm(d)
        .arg("eval")
        .arg("--hypotheses")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["reports"][0]["metrics"], r["metrics"]);
    assert!(r["metrics"]["bleu_4"].as_f64().unwrap() > 0.5, "{r}");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| demo/600 | "), "{md}");
    // The page: every held-out study with its film, chips equal to the lines' findings.
    let html = dir.join("report.html");
    let size = std::fs::metadata(&html).unwrap().len();
    if let Some(browser) = common::browser() {
        let shot = common::test_output().join("eval_page_demo.png");
        let url = format!("file://{}", html.canonicalize().unwrap().display());
        let v = common::browser_script(
            &browser,
            "eval_page.mjs",
            &[url.as_ref(), shot.as_os_str(), "CM".as_ref()],
        );
        let errors = common::check_eval_page(&v, &[("demo/600", jsonl.clone())]);
        eprintln!(
            "report.html: {size} bytes for {n} films; {} studies with a CE error; {}",
            errors.len(),
            shot.display()
        );
        assert_eq!(v["images_loaded"].as_u64(), Some(n as u64), "{v}");
        // The trained demo states the findings of ≥ 90 % of its films: few errors.
        assert!(errors.len() * 10 <= n, "{errors:?}");
    }
    // TensorBoard scalars at the checkpoint's step.
    let events: Vec<_> = std::fs::read_dir(tb.join("demo"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1);
    let scalars = xrayglm::train::metrics::read_scalars(&events[0]).unwrap();
    let bleu = scalars
        .iter()
        .find(|(_, tag, _)| tag == "eval/bleu_4")
        .expect("eval/bleu_4");
    assert_eq!(bleu.0, 600);
    assert!((bleu.2 as f64 - r["metrics"]["bleu_4"].as_f64().unwrap()).abs() < 1e-6);
    let tb_ce = scalars
        .iter()
        .find(|(_, tag, _)| tag == "eval/ce_f1")
        .expect("eval/ce_f1");
    assert!((tb_ce.2 as f64 - ce_f1).abs() < 1e-6);
    // The loss alone, all films in one batch: the same mean per target token.
    let one = run(&[
        "--no_generate",
        "--batch_size",
        "64",
        "--out",
        out.path().join("l").to_str().unwrap(),
    ]);
    let l1 = one["reports"][0]["val_loss"].as_f64().unwrap();
    assert!(
        (l1 - loss).abs() <= 1e-4 * loss.max(1e-3),
        "loss {loss} in batches of 5, {l1} in one batch"
    );
    assert!(one["reports"][0]["metrics"].is_null());
    // Two checkpoints side by side: the run's first save and its last.
    let o = xrayglm(d)
        .arg("eval")
        .arg("--checkpoint")
        .arg(d.run.join("200"))
        .arg(&d.run)
        .args(["--no_progress", "--no_generate", "--limit", "8", "--out"])
        .arg(out.path().join("two"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let two: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = two["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo/200", "demo/600"]);
    let (a, b) = (
        two["reports"][0]["val_loss"].as_f64().unwrap(),
        two["reports"][1]["val_loss"].as_f64().unwrap(),
    );
    assert!(
        b < a,
        "val loss after 600 steps {b} is not below after 200 {a}"
    );
    let md = std::fs::read_to_string(out.path().join("two/report.md")).unwrap();
    assert_eq!(md.lines().count(), 4, "{md}");
}

/// Lengths beyond the model's 2048 positions are refused where they enter —
/// `chat --max_length`, `eval --max_new_tokens` (nothing written), a web request's `max_length`
/// (400) — instead of a panic in the rotary lookup; the web session stays usable and
/// `/api/health` keeps its default prompt.
#[test]
fn lengths_beyond_the_models_positions_are_refused() {
    let Some(d) = demo() else { return };
    let film = &d.held_out[0];
    let out = xrayglm(d)
        .args([
            "chat",
            "--greedy",
            "--max_length",
            "6000",
            "--from_pretrained",
        ])
        .arg(&d.run)
        .arg("--image")
        .arg(&film.images[0])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("max_length 6000 is beyond the model's 2048 positions"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("ev");
    let out = xrayglm(d)
        .args([
            "eval",
            "--max_new_tokens",
            "3000",
            "--limit",
            "2",
            "--checkpoint",
        ])
        .arg(&d.run)
        .arg("--out")
        .arg(&o)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--max_new_tokens 3000 after the longest prompt")
            && err.contains("beyond the model's 2048 positions"),
        "{err}"
    );
    assert!(!o.exists());
    let srv = serve(d);
    let a = &srv.addr;
    let s = new_session(a);
    let body = serde_json::json!({"session": s, "query": "你好", "max_length": 6000}).to_string();
    let (c, b) = http(a, "POST", "/api/chat", body.as_bytes());
    assert_eq!(c, 400, "{b}");
    assert!(
        json(&b)["error"]
            .as_str()
            .unwrap()
            .contains("max_length 6000 is outside 1..=2048"),
        "{b}"
    );
    // A generation that fails (no room left for a reply) ends its stream with an error line and
    // gives the conversation back.
    let body = serde_json::json!({"session": s, "query": "你好", "max_length": 5}).to_string();
    let (c, b) = http(a, "POST", "/api/chat", body.as_bytes());
    assert_eq!(c, 200, "{b}");
    let last = json(b.lines().rfind(|l| !l.is_empty()).unwrap());
    assert_eq!(last["done"], true, "{b}");
    assert!(
        last["error"].as_str().unwrap().contains("max_length of 5"),
        "{b}"
    );
    // The conversation is free, answers, and the server's defaults are intact.
    let v = ask(a, &s, "你好");
    assert_eq!(v["history"].as_array().unwrap().len(), 1);
    let (c, b) = http(a, "GET", "/api/health", b"");
    assert_eq!(c, 200);
    assert!(
        !json(&b)["default_prompt"].as_str().unwrap().is_empty(),
        "{b}"
    );
}

/// MT19937 cloned from 624 consecutive 32-bit outputs (untempered), as an attacker would.
struct MtClone {
    mt: [u32; 624],
    i: usize,
}

impl MtClone {
    fn from_outputs(out: &[u32]) -> Self {
        let untemper = |mut y: u32| {
            y ^= y >> 18;
            y ^= (y << 15) & 0xefc6_0000;
            // Undo y ^= (y << 7) & mask, then y ^= y >> 11, each by iterating to its fixed point.
            let mut a = y;
            for _ in 0..5 {
                a = y ^ ((a << 7) & 0x9d2c_5680);
            }
            let mut b = a;
            for _ in 0..3 {
                b = a ^ (b >> 11);
            }
            b
        };
        let mut mt = [0u32; 624];
        for (m, &o) in mt.iter_mut().zip(out) {
            *m = untemper(o);
        }
        Self { mt, i: 624 }
    }

    fn next(&mut self) -> u32 {
        if self.i >= 624 {
            for k in 0..624 {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(k + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.mt[k] = v;
            }
            self.i = 0;
        }
        let mut y = self.mt[self.i];
        self.i += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// The 32-bit words behind an id of two 64-bit hex halves (low word first, like `getrandbits(64)`).
fn id_words(id: &str) -> Vec<u32> {
    [&id[..16], &id[16..]]
        .iter()
        .flat_map(|h| {
            let v = u64::from_str_radix(h, 16).unwrap();
            [v as u32, (v >> 32) as u32]
        })
        .collect()
}

fn predict_next(ids: &[String]) -> String {
    let words: Vec<u32> = ids.iter().flat_map(|i| id_words(i)).collect();
    let mut mt = MtClone::from_outputs(&words[words.len() - 624..]);
    let w: Vec<u32> = (0..4).map(|_| mt.next()).collect();
    format!(
        "{:016x}{:016x}",
        (w[1] as u64) << 32 | w[0] as u64,
        (w[3] as u64) << 32 | w[2] as u64
    )
}

/// Web session ids are 128 bits from the OS's CSPRNG. The attack that predicted
/// the next id from 156 observed ones (a Mersenne Twister seeded with time^pid) is checked to work
/// on such a generator, then fails on the server's ids.
#[test]
fn web_session_ids_cannot_be_predicted() {
    let Some(d) = demo() else { return };
    // The attack works on the former generator (PyRandom's getrandbits(64), two per id).
    let mut r = xrayglm::data::rng::PyRandom::new(12345);
    let mt_ids: Vec<String> = (0..157)
        .map(|_| format!("{:016x}{:016x}", r.getrandbits(64), r.getrandbits(64)))
        .collect();
    assert_eq!(predict_next(&mt_ids[..156]), mt_ids[156]);
    let srv = serve(d);
    let ids: Vec<String> = (0..157).map(|_| new_session(&srv.addr)).collect();
    for id in &ids {
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    assert_ne!(predict_next(&ids[..156]), ids[156]);
}

/// Clients that send their body slowly hold neither the request threads nor
/// anyone else: with 2 request threads and 9 connections trickling a chat body, other requests
/// are answered at once and the slow ones get 408 after the body timeout.
#[test]
fn slow_senders_do_not_stall_other_requests() {
    let Some(d) = demo() else { return };
    let srv = serve_with(d, &["--threads", "2", "--body_timeout_s", "2"]);
    let a = srv.addr.clone();
    let slow: Vec<TcpStream> = (0..9)
        .map(|_| {
            let mut s = TcpStream::connect(&a).unwrap();
            write!(
                s,
                "POST /api/chat HTTP/1.0\r\nHost: {a}\r\nContent-Length: 100\r\n\r\n{{"
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    let (c, _) = http(&a, "GET", "/api/health", b"");
    assert_eq!(c, 200);
    let s = new_session(&a);
    let (c, _) = http(
        &a,
        "POST",
        "/api/clear",
        format!("{{\"session\": \"{s}\"}}").as_bytes(),
    );
    assert_eq!(c, 200);
    let took = t.elapsed();
    assert!(took.as_secs_f64() < 1.5, "other requests waited {took:?}");
    for mut s in slow {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        assert!(
            raw.starts_with("HTTP/1.0 408") || raw.starts_with("HTTP/1.1 408"),
            "{raw:?}"
        );
    }
}

/// `eval --image_ablation both`: the trained demo model states its films' findings, so its CE-F1
/// falls when every film is shown another film's image or a black one (measured: 1.000 → 0.373
/// shuffled, 0.288 blank); a model trained on black films (`image.ablation = "blank"`) learnt
/// only how reports are written, and scores about the same with its own films and with others
/// (0.489 and 0.444) — the report says which is which.
#[test]
fn image_ablation_tells_a_model_that_reads_its_films_from_one_that_does_not() {
    let Some(d) = demo() else { return };
    let out = tempfile::tempdir().unwrap();
    let eval = |run: &Path, name: &str| -> (serde_json::Value, String) {
        let dir = out.path().join(name);
        let o = xrayglm(d)
            .arg("eval")
            .arg("--checkpoint")
            .arg(run)
            .args(["--no_progress", "--no_loss", "--max_new_tokens", "150"])
            .args(["--image_ablation", "both", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        (v["reports"][0].clone(), md)
    };
    let f1 = |m: &serde_json::Value| m["ce"]["micro"]["f1"].as_f64().unwrap();
    let (r, md) = eval(&d.run, "trained");
    let own = f1(&r["metrics"]);
    let abl = r["ablations"].as_array().unwrap();
    assert_eq!(abl.len(), 2);
    assert_eq!(
        (abl[0]["image"].as_str(), abl[1]["image"].as_str()),
        (Some("shuffled"), Some("blank"))
    );
    eprintln!(
        "trained: CE-F1 own {own:.3}, shuffled {:.3}, blank {:.3}; changed {} / {}",
        f1(&abl[0]["metrics"]),
        f1(&abl[1]["metrics"]),
        abl[0]["changed"],
        abl[1]["changed"]
    );
    assert!(own >= 0.9, "{own}");
    for a in abl {
        assert!(f1(&a["metrics"]) <= own - 0.25, "{a}");
        assert!(a["changed"].as_f64().unwrap() > 0.3, "{a}");
    }
    assert!(md.contains("the reports depend on the image"), "{md}");
    let page = std::fs::read_to_string(out.path().join("trained/report.html")).unwrap();
    assert!(
        page.contains("Does the model look at the film?")
            && page.contains("the reports depend on the image"),
        "the page's ablation table"
    );

    // The same recipe on black films, 200 steps (trained beside the demo).
    let (r, md) = eval(&d.blind_run, "blind");
    let own_blind = f1(&r["metrics"]);
    let abl = r["ablations"].as_array().unwrap();
    eprintln!(
        "blind: CE-F1 own {own_blind:.3}, shuffled {:.3}, blank {:.3}",
        f1(&abl[0]["metrics"]),
        f1(&abl[1]["metrics"])
    );
    assert!(own_blind < own - 0.25, "blind {own_blind} vs trained {own}");
    // Another film's image does not change how well it states the findings. (A black film, what
    // it was trained on, makes it write its one learnt report: a shift in kind, reported but not
    // the counterfactual.)
    assert!(
        (f1(&abl[0]["metrics"]) - own_blind).abs() < 0.1,
        "{}",
        abl[0]
    );
    assert!(md.contains("barely depend on the image"), "{md}");
}

/// The README's first command: the demo fine-tune (the run every test here shares) lowers the
/// held-out validation loss of the tiny model on synthetic X-rays by more than 4 nats between
/// step 0 and its last step (measured: 20.0 → 0.005 in 600 steps).
#[test]
fn the_demo_config_learns() {
    let Some(d) = demo() else { return };
    let val: Vec<(i64, f64)> = std::fs::read_to_string(d.run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_i64()?, v["val_loss"].as_f64()?)))
        .collect();
    let (first, last) = (val[0], val[val.len() - 1]);
    eprintln!(
        "demo: val loss {:.3} (step {}) → {:.3} (step {})",
        first.1, first.0, last.1, last.0
    );
    assert_eq!((first.0, last.0), (0, 600), "{val:?}");
    assert!(last.1 < first.1 - 4.0, "val loss {first:?} → {last:?}");
}

/// Training with `eval_generate_interval` and `best_metric = "ce_f1"` (the demo config): greedy
/// reports on 32 held-out films at steps 0, 200, 400 and 600, CE-F1 rising to ≥ 0.9; the run's
/// `best` names the checkpoint with the highest CE-F1, and `eval --checkpoint RUN/best` takes it.
#[test]
fn training_logs_generation_metrics_and_keeps_the_best_checkpoint() {
    let Some(d) = demo() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let gen: Vec<serde_json::Value> = std::fs::read_to_string(d.run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("gen/ce_f1").is_some())
        .collect();
    let steps: Vec<i64> = gen.iter().map(|v| v["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, vec![0, 200, 400, 600]);
    let f1: Vec<f64> = gen
        .iter()
        .map(|v| v["gen/ce_f1"].as_f64().unwrap())
        .collect();
    eprintln!("CE-F1 during training: {f1:?}");
    assert!(f1[0] < 0.5 && f1[3] >= 0.9, "{f1:?}");
    assert!(gen.iter().all(|v| v["gen_films"] == 32));
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.run.join("best.json")).unwrap()).unwrap();
    assert_eq!(best["metric"], "ce_f1");
    let top = f1[1..].iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(best["value"].as_f64().unwrap(), top);
    let step = best["step"].as_i64().unwrap();
    assert_eq!(f1[steps.iter().position(|&s| s == step).unwrap()], top);
    assert_eq!(
        std::fs::read_to_string(d.run.join("best")).unwrap().trim(),
        step.to_string()
    );
    let o = xrayglm(d)
        .arg("eval")
        .arg("--checkpoint")
        .arg(d.run.join("best"))
        .args(["--no_progress", "--no_generate", "--limit", "4", "--out"])
        .arg(scratch.path().join("e"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["reports"][0]["name"], format!("demo/{step}"));
    // chat and export take it too.
    let o = xrayglm(d)
        .args([
            "chat",
            "--greedy",
            "--max_length",
            "200",
            "--from_pretrained",
        ])
        .arg(d.run.join("best"))
        .arg("--image")
        .arg(&d.held_out[0].images[0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .trim()
        .starts_with("心脏"));
    let tmp = tempfile::tempdir().unwrap();
    let to = tmp.path().join("lora");
    let o = xrayglm(d)
        .args(["export", "--format", "lora", "--from_pretrained"])
        .arg(d.run.join("best"))
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(to.join("lora.safetensors").is_file());
}

/// `xrayglm chat --greedy --max_length 200` one-shot on `film` with the model in `dir` (and
/// `extra` flags): the report it prints.
fn chat_one_shot(d: &Demo, dir: &Path, film: &Path, extra: &[&str]) -> String {
    chat_films(d, dir, &[film], extra)
}

/// `xrayglm chat --image F1 [--image F2 …]` (one study's films): the report.
fn chat_films(d: &Demo, dir: &Path, films: &[&Path], extra: &[&str]) -> String {
    let mut c = xrayglm(d);
    c.args(["chat", "--max_length", "200"])
        .args(extra)
        .arg("--from_pretrained")
        .arg(dir);
    for f in films {
        c.arg("--image").arg(f);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running `xrayglm serve --port 0 ARGS`, killed on drop.
fn start_serve(d: &Demo, args: &[&str]) -> Server {
    let mut c = xrayglm(d);
    c.args(["serve", "--port", "0", "--max_length", "200"])
        .args(args);
    spawn_server(d, c)
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// The Python of the venv with the official `openai` client (scripts/setup.sh makes it).
fn openai_python() -> Option<PathBuf> {
    let p = std::env::var("XRAYGLM_OPENAI_PYTHON")
        .unwrap_or_else(|_| "/opt/xrayglm/openai-venv/bin/python".into());
    if Path::new(&p).exists() {
        return Some(PathBuf::from(p));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI needs the openai client venv at {p} (scripts/setup.sh makes it)"
    );
    eprintln!("skipping: no openai client venv at {p} (scripts/setup.sh makes it)");
    None
}

/// The official `openai` Python client against `xrayglm serve` on the demo run, with
/// the step-200 checkpoint and the best one served as adapters beside it
/// (tests/openai/check_serve.py): the one-shot report from a data-URL image equals `chat
/// --greedy`'s (and with two films, `chat --image A --image B`'s), streaming chunks concatenate to it, a two-turn conversation equals `chat`'s
/// second answer, a seed reproduces `chat --no_merge --seed`'s sampled reply, an adapter answers
/// as `chat` on its checkpoint does (greedy and sampled), errors come as the client's exception
/// types (401, 404, 400, 413, and 503 from a second server with a queue of one), and
/// 32 concurrent requests over the three models with streaming on and off each get the answer
/// they get alone; the findings extension equals the labeler's reading of the greedy report;
/// `parse` with a pydantic findings model returns a parsed reply; a request asked again comes from
/// the prompt cache. Afterwards the engine holds no rows and no decoding cache, and the server's
/// memory is back at its level after the first requests.
#[test]
fn the_openai_client_gets_chats_answers_from_serve() {
    let Some(d) = demo() else { return };
    let Some(py) = openai_python() else { return };
    let films: Vec<PathBuf> = d.held_out[..3]
        .iter()
        .map(|r| r.images[0].clone())
        .collect();
    let early = d.run.join("200");
    assert!(
        early.is_dir(),
        "no step-200 checkpoint in {}",
        d.run.display()
    );
    let greedy = chat_one_shot(d, &d.run, &films[0], &["--greedy"]);
    let greedy_early = chat_one_shot(d, &early, &films[0], &["--greedy"]);
    let greedy_two = chat_films(d, &d.run, &[&films[0], &films[1]], &["--greedy"]);
    // The findings the server must attach when asked: the labeler's line for the same text.
    let greedy_findings = {
        use xrayglm::eval::findings::{files::label_line, Labeler};
        let labels = Labeler::builtin(xrayglm::eval::metrics::Lang::Zh).label(&greedy);
        let mut v = label_line("", &labels, true);
        v.as_object_mut().unwrap().remove("id");
        v
    };
    // Sampled (hot enough that the two checkpoints differ), against `chat` with the adapters kept
    // apart as the server keeps them (merging moves logits by ~1e-7: a draw on a boundary moves).
    let sampled = [
        "--no_merge",
        "--temperature",
        "2",
        "--top_p",
        "1",
        "--top_k",
        "40",
        "--repetition_penalty",
        "1",
        "--seed",
        "7",
    ];
    let seed7 = chat_one_shot(d, &d.run, &films[1], &sampled);
    let seed7_early = chat_one_shot(d, &early, &films[1], &sampled);
    // `chat` interactively: the automatic first question, then a second one.
    let second = "心脏大小如何？";
    let mut child = xrayglm(d)
        .args([
            "chat",
            "--greedy",
            "--max_length",
            "200",
            "--from_pretrained",
        ])
        .arg(&d.run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    write!(
        child.stdin.take().unwrap(),
        "{}\n{second}\nstop\n",
        films[0].display()
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let turns: Vec<String> = text
        .split("XrayGLM：")
        .skip(1)
        .map(|t| t.lines().next().unwrap_or("").trim().to_string())
        .collect();
    assert_eq!(turns.len(), 2, "{text}");
    assert_eq!(turns[0], greedy);

    let best = format!("best={}", d.run.join("best").display());
    let early_arg = format!("early={}", early.display());
    let srv = start_serve(
        d,
        &[
            "--lora",
            &early_arg,
            "--lora",
            &best,
            "--api-key",
            "sekret",
            "--max_body_mib",
            "1",
        ],
    );
    let base_model = d.run.file_name().unwrap().to_string_lossy().to_string();
    let busy = start_serve(d, &["--max_batch", "1", "--max_queue", "1"]);
    // The idle level is a warm server's: what it keeps once asked for it — the grammar engine over
    // the vocabulary (built by the first structured-output request), the findings labelers, the
    // request threads' heaps (as many concurrent requests as threads) — is part of it.
    let warm = serde_json::json!({
        "model": base_model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "findings": true,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
    });
    let (c, b) = post_json(&srv.addr, "/v1/chat/completions", "sekret", &warm);
    assert_eq!(c, 200, "{b}");
    std::thread::scope(|sc| {
        for i in 0..8 {
            let (addr, model, film) = (&srv.addr, &base_model, &films[i % 2]);
            sc.spawn(move || {
                let png = std::fs::read(film).unwrap();
                let url = format!(
                    "data:image/png;base64,{}",
                    xrayglm::infer::openai::base64_encode(&png)
                );
                let body = serde_json::json!({
                    "model": model, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "text", "text": format!("{i}")},
                        {"type": "image_url", "image_url": {"url": url}}]}],
                });
                let (c, b) = post_json(addr, "/v1/chat/completions", "sekret", &body);
                assert_eq!(c, 200, "{b}");
            });
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle = rss(srv.child.id());
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("case.json");
    let case_json = serde_json::json!({
        "base_url": format!("http://{}/v1", srv.addr),
        "api_key": "sekret",
        "models": [base_model, "early", "best"],
        "base_model": base_model,
        "early_model": "early",
        "question": FIXED_PROMPT,
        "second_question": second,
        "films": films,
        "chat_greedy": greedy,
        "chat_greedy_findings": greedy_findings,
        "chat_greedy_early": greedy_early,
        "chat_greedy_two_films": greedy_two,
        "chat_turns": turns,
        "chat_seed7": seed7,
        "chat_seed7_early": seed7_early,
        "max_body": 1 << 20,
        "busy_base_url": format!("http://{}/v1", busy.addr),
    });
    std::fs::write(&case, case_json.to_string()).unwrap();
    let out = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/check_serve.py"))
        .arg(&case)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    eprintln!("{log}");
    assert!(
        out.status.success(),
        "{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("every answer = its answer alone"), "{log}");
    // Idle again: no rows, no cache; memory back near where it was.
    let (c, b) = http(&srv.addr, "GET", "/api/health", b"");
    assert_eq!(c, 200);
    let e = &json(&b)["engine"];
    assert_eq!(e["active"], 0, "{b}");
    assert_eq!(e["queued"], 0, "{b}");
    assert_eq!(e["cache_bytes"], 0, "{b}");
    // The prompt and film caches keep what they hold (bounded by --cache_mib and
    // --image_cache_mib); everything else is given back.
    let kept = e["prompt_cache_bytes"].as_u64().unwrap() + e["image_cache_bytes"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = rss(srv.child.id());
    eprintln!(
        "server RSS: {:.1} MB idle, {:.1} MB after the requests, {:.1} MB of it in the caches",
        idle as f64 / 1e6,
        after as f64 / 1e6,
        kept as f64 / 1e6
    );
    // Measured without the caches: 519.6 MB at start, 500.0 MB after (the engine trims the heap
    // when idle).
    assert!(
        after.saturating_sub(kept) as f64 <= idle as f64 * 1.05,
        "memory did not return to its idle level: {idle} → {after} bytes, {kept} in the caches"
    );
}

/// `POST path` with a JSON body and a bearer key: the status and the body.
fn post_json(addr: &str, path: &str, key: &str, body: &serde_json::Value) -> (u16, String) {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A chat-completions request body on a film with near-uniform sampling (long replies: `<eop>`
/// is one token of 130k).
fn long_request(film: &Path, stream: bool) -> Vec<u8> {
    let png = std::fs::read(film).unwrap();
    let b64 = xrayglm::infer::openai::base64_encode(&png);
    serde_json::json!({
        "model": "demo",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": FIXED_PROMPT},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}}]}],
        "temperature": 5.0, "top_p": 1.0, "top_k": 0, "max_tokens": 120, "stream": stream,
    })
    .to_string()
    .into_bytes()
}

/// A full queue is answered 503 with an OpenAI error object (the others are served),
/// and SIGTERM lets a reply in flight finish its stream (`data: [DONE]`) — or, with no grace
/// period, ends it with an error event — while new connections are refused; the server then
/// exits 0.
#[test]
fn serve_refuses_when_full_and_finishes_streams_on_sigterm() {
    let Some(d) = demo() else { return };
    let film = &d.held_out[0].images[0];
    let srv = start_serve(
        d,
        &[
            "--max_batch",
            "1",
            "--max_queue",
            "1",
            "--served_model_name",
            "demo",
        ],
    );
    let a = srv.addr.clone();
    let body = long_request(film, false);
    let codes: Vec<(u16, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| sc.spawn(|| http(&a, "POST", "/v1/chat/completions", &body)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<&(u16, String)> = codes.iter().filter(|(c, _)| *c == 503).collect();
    let served = codes.iter().filter(|(c, _)| *c == 200).count();
    assert!(!busy.is_empty() && served >= 1, "{codes:?}");
    assert_eq!(busy.len() + served, 8, "{codes:?}");
    let e = json(&busy[0].1);
    assert_eq!(e["error"]["code"], "queue_full", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("busy"),
        "{e}"
    );
    drop(srv);

    // SIGTERM during a stream: with the default grace the reply finishes; with no grace it ends
    // with an error event. Either way the stream closes cleanly and the server exits 0.
    for (grace, ends) in [("30", "data: [DONE]"), ("0", "shutting down")] {
        let mut srv = start_serve(
            d,
            &["--served_model_name", "demo", "--shutdown_grace_s", grace],
        );
        let a = srv.addr.clone();
        let body = long_request(film, true);
        let mut s = TcpStream::connect(&a).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        while !line.starts_with("data: ") {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "no first chunk");
        }
        let term = Command::new("kill")
            .args(["-TERM", &srv.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        assert!(rest.contains(ends), "grace {grace}: {rest}");
        if grace != "0" {
            assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
        }
        assert!(
            TcpStream::connect(&a).is_err(),
            "still accepting after SIGTERM"
        );
        let status = srv.child.wait().unwrap();
        assert!(status.success(), "grace {grace}: {status:?}");
    }
}

/// The content of a non-streamed chat completion on one image URL (status, content or error).
fn complete_url(addr: &str, url: &str) -> (u16, String) {
    let body = serde_json::json!({
        "model": "demo", "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": FIXED_PROMPT},
            {"type": "image_url", "image_url": {"url": url}}]}],
    })
    .to_string();
    let (c, b) = http(addr, "POST", "/v1/chat/completions", body.as_bytes());
    let v = json(&b);
    let text = if c == 200 {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    } else {
        v["error"]["message"].as_str().unwrap().to_string()
    };
    (c, text)
}

/// Image URLs other than `data:` are refused unless a flag allows them — `http(s)://`
/// with `--allow_remote_images` (fetched; the report equals the data-URL one), local paths only
/// inside `--allowed_local_media_path` (a path outside it stays refused).
#[test]
fn image_urls_are_fetched_only_where_allowed() {
    let Some(d) = demo() else { return };
    let film = d.held_out[0].images[0].canonicalize().unwrap();
    let png = std::fs::read(&film).unwrap();
    // A one-file web server for the remote URL.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = png.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let mut r = BufReader::new(s);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let mut s = r.into_inner();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                served.len()
            );
            let _ = s.write_all(&served);
        }
    });
    let remote = format!("http://127.0.0.1:{port}/film.png");
    let data = format!(
        "data:image/png;base64,{}",
        xrayglm::infer::openai::base64_encode(&png)
    );
    let local = film.display().to_string();
    let media = film.parent().unwrap().display().to_string();
    let srv = start_serve(
        d,
        &[
            "--served_model_name",
            "demo",
            "--allow_remote_images",
            "--allowed_local_media_path",
            &media,
        ],
    );
    let (c, want) = complete_url(&srv.addr, &data);
    assert_eq!(c, 200, "{want}");
    assert!(want.starts_with("心脏"), "{want}");
    assert_eq!(complete_url(&srv.addr, &remote), (200, want.clone()));
    assert_eq!(complete_url(&srv.addr, &local), (200, want.clone()));
    assert_eq!(
        complete_url(&srv.addr, &format!("file://{local}")),
        (200, want.clone())
    );
    let (c, e) = complete_url(&srv.addr, "/etc/hostname");
    assert_eq!(c, 400, "{e}");
    assert!(
        e.contains("not a file inside the allowed media folder"),
        "{e}"
    );
    let (c, e) = complete_url(&srv.addr, &format!("{media}/../../../../etc/hostname"));
    assert_eq!(c, 400, "{e}");
    drop(srv);
    // Defaults: neither.
    let srv = start_serve(d, &["--served_model_name", "demo"]);
    let (c, e) = complete_url(&srv.addr, &remote);
    assert_eq!(c, 400, "{e}");
    assert!(e.contains("--allow_remote_images"), "{e}");
    let (c, e) = complete_url(&srv.addr, &local);
    assert_eq!(c, 400, "{e}");
    assert!(e.contains("--allowed_local_media_path"), "{e}");
    assert_eq!(complete_url(&srv.addr, &data), (200, want));
}

/// QLoRA on the demo. The demo's recipe with a 4-bit NF4 base (`model.quantize =
/// "nf4"`, ChatGLM's layer linears in NF4 with double-quantized scales, LoRA in fp32 on top)
/// ends with a held-out loss within 10 % of the fp32 demo's (no worse than 1.1×; measured one run
/// each: 0.0009 vs 0.0077 at step 600 on the trainer's 4 validation batches, 0.0016 vs 0.0062 by
/// `eval` on all 52 held-out films).
#[test]
fn nf4_demo_trains_to_the_fp32_held_out_loss() {
    let Some(d) = demo() else { return };
    let final_val = |run: &Path| -> f64 {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["step"] == 600)
            .find_map(|v| v["val_loss"].as_f64())
            .unwrap()
    };
    let nf4_run = &d.nf4_run;
    let config = std::fs::read_to_string(nf4_run.join("config.toml")).unwrap();
    assert!(config.contains("quantize = \"nf4\""), "{config}");
    let (nf4, fp32) = (final_val(nf4_run), final_val(&d.run));
    eprintln!("held-out loss at step 600: NF4 base {nf4:.5}, fp32 {fp32:.5}");
    assert!(nf4 <= 1.1 * fp32, "NF4 {nf4} vs fp32 {fp32}");
}
