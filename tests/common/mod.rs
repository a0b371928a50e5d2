//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

/// `../shared` beside the checkout. Under CI (`CI=true`) a missing folder fails the test loudly;
/// elsewhere the test is reported as skipped on stderr and returns early.
pub fn shared() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared");
    if dir.join("reference").is_dir() {
        return Some(dir);
    }
    if std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
    {
        panic!(
            "CI=true but {} is missing: parity tests need ../shared beside the checkout",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: {} is missing (parity test needs ../shared)",
        dir.display()
    );
    None
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub fn read_gz(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    out
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ice_text(shared: &Path) -> PathBuf {
    shared.join("reference/tokenizer/ice_text.model")
}

/// A JSON list of integers.
pub fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The five OpenI X-rays that ../shared has images for, written as an annotations file in `dir`.
pub fn five_xrays(shared: &Path, dir: &Path) -> PathBuf {
    let zh = read_json(&shared.join("data/Xray/openi-zh.json"));
    let keep = ["2_1", "2_2", "2577_1", "2882_1", "861_1"];
    let anns: Vec<serde_json::Value> = zh["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| keep.contains(&a["image_id"].as_str().unwrap()))
        .cloned()
        .collect();
    assert_eq!(anns.len(), 5);
    let p = dir.join("five.json");
    std::fs::write(&p, serde_json::json!({ "annotations": anns }).to_string()).unwrap();
    p
}

/// All tensors of a safetensors file by name.
pub fn tensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    xrayglm::weights::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Run a model on a fixture's inputs (`input_ids`, `image`, `pre_image`), eval mode.
pub fn run_inputs(
    m: &xrayglm::model::visualglm::VisualGlm,
    inputs: &std::collections::HashMap<String, tch::Tensor>,
) -> xrayglm::model::visualglm::Outputs {
    let pre = inputs["pre_image"].int64_value(&[0]);
    m.forward(
        &inputs["input_ids"],
        Some(&inputs["image"]),
        pre,
        None,
        None,
        false,
    )
    .unwrap()
}

/// Config overrides for a quick tiny-preset run on CPU in `dir/<name>`, on a synthetic set of 24
/// 64-pixel films generated once into `dir/data`.
pub fn small_run(dir: &Path, name: &str) -> Vec<String> {
    let data = dir.join("data");
    vec![
        format!(
            "data.path={:?}",
            data.join("Xray/synth-zh.json").display().to_string()
        ),
        format!("synthetic.out_dir={:?}", data.display().to_string()),
        "synthetic.count=24".into(),
        "synthetic.size=64".into(),
        "loader.batch_size=2".into(),
        "model.device=\"cpu\"".into(),
        format!("train.out_dir={:?}", dir.display().to_string()),
        format!("train.name={name:?}"),
        "train.progress=false".into(),
    ]
}

/// `--set K=V` arguments.
pub fn set_args(overrides: impl IntoIterator<Item = String>) -> Vec<String> {
    overrides
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// Training seeds libtorch's global generator per step and some tests are timed: tests that train
/// hold this lock so they run one at a time even when the harness runs tests in parallel.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `xrayglm` binary, without a tokenizer from the environment.
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_xrayglm"));
    c.env_remove("XRAYGLM_TOKENIZER");
    c
}

/// The tiny XrayGLM-format sat checkpoint of the model fixtures (made with sat 0.3.6).
pub fn sat_fixture() -> PathBuf {
    fixture("model").join("a").join("sat")
}

/// max |got − want| / max |want| (shapes must agree).
pub fn rel_err(got: &tch::Tensor, want: &tch::Tensor) -> f64 {
    use tch::Kind;
    assert_eq!(got.size(), want.size());
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    let scale = want
        .to_kind(Kind::Double)
        .abs()
        .max()
        .double_value(&[])
        .max(1e-12);
    diff / scale
}

/// Run a command to its end; it must succeed (its stderr is the failure message).
pub fn ok(c: &mut std::process::Command) -> std::process::Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command with a time limit (a command that reads without bound must not hang the
/// suite); its output once it ends.
pub fn run_limited(c: &mut std::process::Command, secs: u64) -> std::process::Output {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "the command ran over {secs} s: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running server (`xrayglm web` / `serve` with `--port 0`), stopped on drop.
pub struct Server {
    pub child: std::process::Child,
    /// `host:port`, from the first line the server prints.
    pub addr: String,
}

impl Server {
    /// Start a server command; its address from the first line it prints.
    pub fn spawn(c: &mut std::process::Command) -> Server {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small synthetic chest film (PNG bytes), with or without an enlarged heart.
pub fn film_png(cardiomegaly: bool, seed: i64) -> Vec<u8> {
    use image::ImageEncoder;
    let pixels = xrayglm::data::synthetic::render(
        &xrayglm::data::synthetic::Findings {
            cardiomegaly,
            effusion: xrayglm::data::synthetic::Effusion::None,
        },
        32,
        &mut xrayglm::data::rng::PyRandom::new(seed),
    );
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&pixels, 32, 32, image::ExtendedColorType::L8)
        .unwrap();
    out
}

/// One HTTP/1.0 request (the server closes after the body; no chunked encoding).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

/// Sets every LoRA `B` of `m` to N(0, `std`²) (from the global generator), so that the adapters
/// change the model's outputs and have gradients in both factors.
pub fn randomize_lora_b(m: &xrayglm::model::visualglm::VisualGlm, std: f64) {
    tch::no_grad(|| {
        for (k, mut v) in m.lora.variables() {
            if k.contains("matrix_B") {
                v.copy_(&(v.randn_like() * std));
            }
        }
    });
}

/// The value of `loss()` and the LoRA gradients it gives (in name order), the gradients zeroed
/// first.
pub fn lora_grads(
    m: &xrayglm::model::visualglm::VisualGlm,
    loss: impl FnOnce() -> tch::Tensor,
) -> (f64, Vec<tch::Tensor>) {
    for (_, v) in m.lora.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let loss = loss();
    loss.backward();
    let mut vars: Vec<(String, tch::Tensor)> = m.lora.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    (
        loss.double_value(&[]),
        vars.into_iter().map(|(_, v)| v.grad().copy()).collect(),
    )
}

/// Headless Chromium and playwright-core (scripts/setup.sh installs both): `(chromium binary,
/// playwright-core's package.json)`. Missing, the test fails under CI and is reported as skipped
/// elsewhere.
pub fn browser() -> Option<(String, String)> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let pw = std::env::var("PLAYWRIGHT_CORE")
        .unwrap_or_else(|_| "/opt/xrayglm/node/package.json".into());
    let pw_ok = Path::new(&pw)
        .parent()
        .is_some_and(|p| p.join("node_modules/playwright-core").is_dir());
    if !Path::new(&chromium).exists() || !pw_ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs chromium and playwright-core (scripts/setup.sh installs them)"
        );
        eprintln!("skipping: no chromium / playwright-core here (scripts/setup.sh installs them)");
        return None;
    }
    Some((chromium, pw))
}

/// Run a browser script of tests/browser with Chromium; its last stdout line as JSON.
pub fn browser_script(
    (chromium, pw): &(String, String),
    script: &str,
    args: &[&std::ffi::OsStr],
) -> serde_json::Value {
    let out = std::process::Command::new("node")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/browser")
                .join(script),
        )
        .args(args)
        .env("CHROMIUM", chromium)
        .env("PLAYWRIGHT_CORE", pw)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap()
}

/// The folder for screenshots and other artifacts a person looks at after the tests.
pub fn test_output() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A JSON list of strings.
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect()
}

/// The positive observations (codes) of a per-report line's findings object.
fn positive_codes(v: &serde_json::Value) -> std::collections::BTreeSet<String> {
    v.as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| *s == "positive")
        .map(|(k, _)| {
            xrayglm::eval::findings::Observation::from_name(k)
                .unwrap()
                .code()
                .to_string()
        })
        .collect()
}

/// What tests/browser/eval_page.mjs read off an evaluation page, checked against eval's per-report
/// lines (`(model name, JSONL file)` in the page's order): one study per line id, each study's
/// reference chips and each model's right / missed / invented chips equal to the lines' findings,
/// and "only errors" showing exactly the studies where a model's findings differ from the
/// reference's. Gives back those studies' ids.
pub fn check_eval_page(v: &serde_json::Value, models: &[(&str, PathBuf)]) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    type Sides = (BTreeSet<String>, BTreeSet<String>);
    let mut order: Vec<String> = Vec::new();
    let lines: Vec<BTreeMap<String, Sides>> = models
        .iter()
        .map(|(_, f)| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let id = v["id"].as_str().unwrap().to_string();
                    if !order.contains(&id) {
                        order.push(id.clone());
                    }
                    let sides = (
                        positive_codes(&v["hypothesis_findings"]),
                        positive_codes(&v["reference_findings"]),
                    );
                    (id, sides)
                })
                .collect()
        })
        .collect();
    let set = |x: &serde_json::Value| -> BTreeSet<String> { strings(x).into_iter().collect() };
    let ids = strings;
    assert_eq!(v["studies"].as_u64(), Some(order.len() as u64), "{v}");
    assert_eq!(ids(&v["all"]), order);
    let chips = v["chips"].as_object().unwrap();
    for id in &order {
        let c = &chips[id];
        for (k, ((name, _), l)) in models.iter().zip(&lines).enumerate() {
            let Some((h, r)) = l.get(id) else { continue };
            let m = &c["models"][k];
            assert_eq!(m["model"], *name);
            assert_eq!(set(&c["stated"]), *r, "{id}");
            assert_eq!(set(&m["right"]), h & r, "{id} {name}");
            assert_eq!(set(&m["missed"]), r - h, "{id} {name}");
            assert_eq!(set(&m["invented"]), h - r, "{id} {name}");
        }
    }
    let errors: Vec<String> = order
        .iter()
        .filter(|id| {
            lines
                .iter()
                .any(|l| l.get(*id).is_some_and(|(h, r)| h != r))
        })
        .cloned()
        .collect();
    assert_eq!(ids(&v["only_errors"]), errors);
    assert!(
        v["only_errors_text"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} of {}", errors.len(), order.len())),
        "{v}"
    );
    // Nothing but the page itself is requested; the films are inside it.
    let page = v["url"].as_str().unwrap();
    for r in v["requests"].as_array().unwrap() {
        let r = r.as_str().unwrap();
        assert!(
            r == page || r.starts_with("data:"),
            "the page requested {r}"
        );
    }
    assert!(v["console"].as_array().unwrap().is_empty(), "{v}");
    // One bar group per observation.
    let codes: Vec<String> = xrayglm::eval::findings::Observation::ALL
        .iter()
        .map(|o| o.code().to_string())
        .collect();
    assert_eq!(ids(&v["chart_groups"]), codes);
    errors
}

/// This machine's host name, as MPI reports it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Overrides for the short runs the data-parallel tests compare: the small run with a constant
/// learning rate (a run stopped early is a prefix of a longer one), a log line per step, no
/// held-out split, one loader thread.
pub fn dp_run(dir: &Path, name: &str) -> Vec<String> {
    let mut v = small_run(dir, name);
    v.extend(
        [
            "train.log_interval=1",
            "train.val_fraction=0",
            "train.lr=1e-3",
            "train.schedule=\"constant\"",
            "loader.workers=1",
        ]
        .map(String::from),
    );
    v
}

/// Step records of two runs have the same losses within `tol` relative, step by step; the largest
/// relative difference.
pub fn same_losses(
    what: &str,
    want: &[serde_json::Value],
    got: &[serde_json::Value],
    tol: f64,
) -> f64 {
    assert_eq!(want.len(), got.len(), "{what}: step counts");
    let mut worst = 0.0f64;
    for (x, y) in want.iter().zip(got) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        let d = (lx - ly).abs() / lx.abs();
        assert!(d <= tol, "{what}: step {}: {lx} vs {ly}", x["step"]);
        worst = worst.max(d);
    }
    worst
}

/// Two sets of LoRA weights are equal within `tol`, relative to each tensor's largest value.
pub fn same_lora(
    what: &str,
    want: &std::collections::HashMap<String, tch::Tensor>,
    got: &std::collections::HashMap<String, tch::Tensor>,
    tol: f64,
) {
    assert_eq!(want.len(), got.len(), "{what}: tensor counts");
    for (k, v) in want {
        let e = (&got[k] - v).abs().max().double_value(&[])
            / v.abs().max().double_value(&[]).max(1e-12);
        assert!(e <= tol, "{what}: {k}: {e:.3e}");
    }
}
