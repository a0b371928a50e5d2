//! `xrayglm bench serve`: the OpenAI-compatible server under N concurrent clients (continuous
//! batching) against the same requests sent one at a time, in the same run and process: aggregate
//! tokens/s, p50 / p95 time to first token and per-request latency; and 8 clients split over two
//! adapters against 8 on one model (the cost of batching per adapter).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::data::rng::PyRandom;
use crate::infer::engine::AdapterBatching;

/// Goals from the issue, at 8 clients: aggregate tokens/s against one at a time, and p95 time to
/// first token against a single client's.
pub const GOAL_SPEEDUP_8: f64 = 3.0;
pub const GOAL_TTFT_RATIO_8: f64 = 2.0;

/// `xrayglm bench serve`: N concurrent clients against the same requests one at a time.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Weights: fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: crate::device::Dtype,
    /// Concurrent clients, each asking for one report.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub clients: Vec<usize>,
    /// Reply tokens per request (greedy; `max_tokens`).
    #[arg(long = "new_tokens", alias = "new-tokens", default_value_t = 32)]
    pub new_tokens: usize,
    /// ChatGLM-6B's ice_text.model (default: the search paths, $XRAYGLM_TOKENIZER).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// cpu, cuda, cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
}

/// One request's timings.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttft: f64,
    latency: f64,
    tokens: usize,
}

/// A set of requests run together (or one after another).
#[derive(Debug, Clone)]
pub struct Round {
    pub clients: usize,
    pub wall_s: f64,
    pub tokens: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
}

impl Round {
    fn new(clients: usize, wall: f64, t: &[Timing]) -> Self {
        let q = |mut v: Vec<f64>, p: f64| {
            v.sort_by(f64::total_cmp);
            // Nearest rank.
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] * 1e3
        };
        let ttft: Vec<f64> = t.iter().map(|x| x.ttft).collect();
        let lat: Vec<f64> = t.iter().map(|x| x.latency).collect();
        Self {
            clients,
            wall_s: wall,
            tokens: t.iter().map(|x| x.tokens).sum(),
            ttft_p50_ms: q(ttft.clone(), 0.5),
            ttft_p95_ms: q(ttft, 0.95),
            latency_p50_ms: q(lat.clone(), 0.5),
            latency_p95_ms: q(lat, 0.95),
        }
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall_s
    }
}

/// The report.
#[derive(Debug, Clone)]
pub struct ServeBench {
    pub preset: String,
    pub dtype: &'static str,
    pub new_tokens: usize,
    pub threads: i32,
    /// The requests one at a time (as many as the most clients).
    pub sequential: Round,
    pub concurrent: Vec<Round>,
    /// 8 clients, half on the base and half on an adapter: in one batch (the default), and with
    /// one batch per adapter.
    pub mixed_8: Option<(Round, Round)>,
    /// The vision tower on 1 and on 8 films, ms (best of 3).
    pub encode_ms: (f64, f64),
}

impl std::fmt::Display for ServeBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.sequential;
        writeln!(
            f,
            "serve bench: preset {}, {}, {} threads; each client asks for a report on a 224x224 film (greedy, {} tokens, streamed)",
            self.preset, self.dtype, self.threads, self.new_tokens
        )?;
        writeln!(
            f,
            "  one at a time ({} requests): {:.1} tokens/s, time to first token p50 {:.1} ms, latency p50 {:.1} ms",
            s.clients,
            s.tokens_per_s(),
            s.ttft_p50_ms,
            s.latency_p50_ms
        )?;
        writeln!(
            f,
            "  clients | tokens/s | vs one at a time | TTFT p50 / p95 ms | p95 TTFT vs single | latency p50 / p95 ms"
        )?;
        let row = |f: &mut std::fmt::Formatter<'_>, name: String, r: &Round| {
            writeln!(
                f,
                "  {name:>7} | {:8.1} | {:15.2}x | {:8.1} / {:6.1} | {:17.2}x | {:8.1} / {:6.1}",
                r.tokens_per_s(),
                r.tokens_per_s() / s.tokens_per_s(),
                r.ttft_p50_ms,
                r.ttft_p95_ms,
                r.ttft_p95_ms / s.ttft_p50_ms,
                r.latency_p50_ms,
                r.latency_p95_ms
            )
        };
        for r in &self.concurrent {
            row(f, r.clients.to_string(), r)?;
        }
        if let Some((m, p)) = &self.mixed_8 {
            row(f, "8 mixed".into(), m)?;
            row(f, "8 mixed, per adapter".into(), p)?;
            if let Some(one) = self.concurrent.iter().find(|r| r.clients == 8) {
                writeln!(
                    f,
                    "  8 clients over two adapters, tokens/s against 8 on one: {:.2}x in one batch (per-row LoRA, the default), {:.2}x with one batch per adapter",
                    m.tokens_per_s() / one.tokens_per_s(),
                    p.tokens_per_s() / one.tokens_per_s()
                )?;
            }
        }
        if let Some(r) = self.concurrent.iter().find(|r| r.clients == 8) {
            let speedup = r.tokens_per_s() / s.tokens_per_s();
            let ttft = r.ttft_p95_ms / s.ttft_p50_ms;
            let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
            writeln!(
                f,
                "  goal at 8 clients: >= {GOAL_SPEEDUP_8}x tokens/s: {:.2}x, {}; p95 TTFT <= {GOAL_TTFT_RATIO_8}x single: {:.2}x, {}",
                speedup,
                verdict(speedup >= GOAL_SPEEDUP_8),
                ttft,
                verdict(ttft <= GOAL_TTFT_RATIO_8)
            )?;
            let (e1, e8) = self.encode_ms;
            writeln!(
                f,
                "  vision tower: 1 film {e1:.1} ms, 8 films {e8:.1} ms = {:.2}x a single request's time to first token: \
                 8 films arriving together cannot all see a first token sooner than that",
                e8 / s.ttft_p50_ms
            )?;
        }
        Ok(())
    }
}

/// A grayscale film with a few shapes, as PNG bytes.
fn film(size: u32, seed: i64) -> Result<Vec<u8>> {
    let mut rng = PyRandom::new(seed);
    let f = crate::data::synthetic::findings_for(&mut rng);
    let px = crate::data::synthetic::render(&f, size as usize, &mut rng);
    let img = image::GrayImage::from_raw(size, size, px).context("film size")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// One streamed chat completion: time to the first text, to the end, and the reply tokens.
fn request(addr: &str, body: &[u8]) -> Result<Timing> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut r = BufReader::new(s);
    let (mut ttft, mut tokens, mut line) = (None, None, String::new());
    let mut status = String::new();
    r.read_line(&mut status)?;
    anyhow::ensure!(status.contains(" 200 "), "the server answered {status:?}");
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let Some(data) = line.trim().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        let text = v
            .pointer("/choices/0/delta/content")
            .and_then(|c| c.as_str());
        if text.is_some_and(|c| !c.is_empty()) && ttft.is_none() {
            ttft = Some(t.elapsed().as_secs_f64());
        }
        if let Some(n) = v
            .pointer("/usage/completion_tokens")
            .and_then(|n| n.as_u64())
        {
            tokens = Some(n as usize);
        }
    }
    let latency = t.elapsed().as_secs_f64();
    Ok(Timing {
        ttft: ttft.unwrap_or(latency),
        latency,
        tokens: tokens.context("no usage in the stream")?,
    })
}

/// Run `bodies` at once (one thread each) or one after another.
fn round(addr: &str, bodies: &[Vec<u8>], together: bool) -> Result<Round> {
    let t = Instant::now();
    let timings: Vec<Timing> = if together {
        std::thread::scope(|sc| {
            let hs: Vec<_> = bodies
                .iter()
                .map(|b| sc.spawn(move || request(addr, b)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
                })
                .collect::<Result<Vec<_>>>()
        })?
    } else {
        bodies
            .iter()
            .map(|b| request(addr, b))
            .collect::<Result<Vec<_>>>()?
    };
    Ok(Round::new(
        bodies.len(),
        t.elapsed().as_secs_f64(),
        &timings,
    ))
}

/// An in-process server on the preset's random weights (seeded: every call builds the same
/// model) with a second random adapter, `other`; its address.
fn start(a: &ServeArgs, batching: AdapterBatching, max_batch: usize) -> Result<Started> {
    use crate::infer::chat::ChatModel;
    use crate::infer::engine::{Engine, EngineOptions, NamedAdapter};
    use crate::model::config::ModelConfig;
    use crate::model::visualglm::VisualGlm;
    let cfg = ModelConfig::preset(&a.preset)?;
    tch::manual_seed(0);
    let dev = a.device.device()?;
    let mut model = VisualGlm::new(cfg.clone(), dev, a.dtype.kind())?;
    // As `serve` runs it: fused attention, the adapters unmerged.
    model.set_fused_attention(true);
    let tokenizer = match &a.tokenizer {
        Some(p) => crate::tokenizer::ChatGlmTokenizer::from_path(p)?,
        None => crate::tokenizer::ChatGlmTokenizer::from_path(&crate::tokenizer::find(None).context(
            format!("no tokenizer: pass --tokenizer PATH (ChatGLM-6B's ice_text.model) or set XRAYGLM_TOKENIZER ({})", crate::tokenizer::HOW_TO_GET),
        )?)?,
    };
    // A second adapter over the same base: LoRA weights of the preset's shape, B drawn non-zero
    // so that it changes the model.
    let store = tch::nn::VarStore::new(dev);
    let layers = (0..cfg.sat.num_layers)
        .map(|i| crate::model::chatglm::layer_loras(&store.root(), &cfg, i))
        .collect();
    tch::no_grad(|| {
        for (_, mut t) in store.variables() {
            let _ = t.normal_(0.0, 0.02);
        }
    });
    let adapter = crate::weights::source::AdapterWeights {
        dir: PathBuf::from("(random)"),
        config: cfg.lora.clone().context("the preset has no LoRA config")?,
        store,
        layers,
    };
    let size = model.cfg.sat.eva_args.image_size[0] as u32;
    // Encoding 1 and 8 films through the vision tower (best of 3): the part of a prefill that
    // grows with the batch.
    let encode_ms = |b: i64| -> f64 {
        let px = tch::Tensor::randn([b, 3, size as i64, size as i64], (tch::Kind::Float, dev));
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let e = tch::no_grad(|| crate::infer::generate::image_embeds(&model, &px));
                let _ = e.sum(tch::Kind::Float).double_value(&[]);
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    };
    let encode = (encode_ms(1), encode_ms(8));
    let chat = ChatModel::new(model, tokenizer)?;
    let engine = Engine::start(
        chat,
        "base".into(),
        vec![NamedAdapter {
            name: "other".into(),
            weights: adapter,
        }],
        EngineOptions {
            max_batch,
            max_queue: 4 * max_batch,
            adapter_batching: batching,
        },
    )?;
    let opts = crate::infer::server::ServerOptions {
        port: 0,
        threads: 4,
        max_connections: 4 * max_batch,
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = crate::infer::server::serve(engine, opts, |addr| {
            let _ = tx.send(addr);
        });
        if let Err(e) = r {
            crate::errln!("bench serve: the server stopped: {e:#}");
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the server did not start")?;
    Ok(Started {
        addr: addr.to_string(),
        size,
        encode,
    })
}

/// A started benchmark server.
struct Started {
    addr: String,
    /// Film side, pixels.
    size: u32,
    /// Vision-tower time for 1 and 8 films, ms.
    encode: (f64, f64),
}

/// `xrayglm bench serve`.
pub fn serve(a: &ServeArgs) -> Result<ServeBench> {
    anyhow::ensure!(a.new_tokens >= 2, "--new_tokens must be at least 2");
    anyhow::ensure!(
        !a.clients.is_empty() && !a.clients.contains(&0),
        "--clients: counts ≥ 1"
    );
    let most = a.clients.iter().copied().max().unwrap_or(1).max(8);
    let Started { addr, size, encode } = start(a, AdapterBatching::PerRow, most)?;
    let bodies = |n: usize, mixed: bool| -> Result<Vec<Vec<u8>>> {
        (0..n)
            .map(|i| {
                let url = format!(
                    "data:image/png;base64,{}",
                    crate::infer::openai::base64_encode(&film(size, i as i64)?)
                );
                let model = if mixed && i % 2 == 1 { "other" } else { "base" };
                Ok(serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": [
                        {"type": "text", "text": crate::infer::chat::DEFAULT_PROMPT_ZH},
                        {"type": "image_url", "image_url": {"url": url}}]}],
                    "temperature": 0, "repetition_penalty": 1.0, "max_tokens": a.new_tokens,
                    "stream": true, "stream_options": {"include_usage": true},
                })
                .to_string()
                .into_bytes())
            })
            .collect()
    };
    // Warm up (allocator, kernels), then the baseline and the rounds.
    round(&addr, &bodies(2, false)?, false)?;
    let sequential = round(&addr, &bodies(most, false)?, false)?;
    let mut concurrent = Vec::new();
    for &n in &a.clients {
        concurrent.push(round(&addr, &bodies(n, false)?, true)?);
    }
    let mixed_8 = round(&addr, &bodies(8, true)?, true)?;
    // The same mixed round with one batch per adapter, on a second server.
    let addr2 = start(a, AdapterBatching::PerAdapter, most)?.addr;
    round(&addr2, &bodies(2, true)?, false)?;
    let mixed_8_per_adapter = round(&addr2, &bodies(8, true)?, true)?;
    Ok(ServeBench {
        preset: a.preset.clone(),
        dtype: super::dtype_name(a.dtype.kind()),
        new_tokens: a.new_tokens,
        threads: tch::get_num_threads(),
        sequential,
        concurrent,
        mixed_8: Some((mixed_8, mixed_8_per_adapter)),
        encode_ms: encode,
    })
}
