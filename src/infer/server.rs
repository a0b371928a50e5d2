//! The HTTP server of `xrayglm serve` and `xrayglm web`: the OpenAI-compatible API
//! ([`super::openai`]) and the web page with its own endpoints ([`super::web`]) on one port, both
//! answered by one [`Engine`] (continuous batching).
//!
//! HTTP is hyper on tokio, routed by axum: connections are tasks, not threads, so slow clients
//! hold no thread; the headers of each request and its body must arrive within `body_timeout_s`
//! (else the connection is closed / 408), and at most `max_connections` are open (more are
//! answered 503 at once). On SIGTERM or Ctrl-C the server stops accepting, the engine refuses
//! new requests (503) and lets the replies in flight finish for `shutdown_grace_s` (then they end
//! with an error), open connections are closed once answered, and the process exits 0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::header;
use axum::Router;
use http_body_util::BodyExt;

use super::chat::{ChatSettings, Turn};
use super::engine::Engine;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    /// Largest web-page image upload, bytes.
    pub max_upload: usize,
    /// Largest API request body (images come inside as base64), bytes.
    pub max_body: usize,
    /// Threads that run the HTTP tasks (the model runs on the engine's own thread).
    pub threads: usize,
    /// Web-page conversations kept (the least recently used go first).
    pub max_sessions: usize,
    /// A request's headers, and then its body, must arrive within this many seconds (else the
    /// connection is closed / 408); an idle kept-alive connection closes after it too.
    pub body_timeout_s: f64,
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Defaults for questions (web_demo.py: max_length 2048, temperature 0.8, top_p 0.4, top_k 100,
    /// repetition_penalty 1.2).
    pub settings: ChatSettings,
    /// With a key, `/v1/*` requests must carry `Authorization: Bearer KEY` (else 401).
    pub api_key: Option<String>,
    /// Image URLs that are local paths (`file://…` or absolute) are read only from inside this
    /// folder; without it they are refused.
    pub local_media: Option<PathBuf>,
    /// Fetch `http(s)://` image URLs (at most `max_upload` bytes, within `body_timeout_s`);
    /// without it they are refused (no server-side requests on a client's behalf).
    pub remote_images: bool,
    /// Seconds the replies in flight get to finish after SIGTERM.
    pub shutdown_grace_s: f64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            max_upload: 10 << 20,
            max_body: 20 << 20,
            threads: 8,
            max_sessions: 1000,
            body_timeout_s: 10.0,
            max_connections: 1024,
            settings: ChatSettings::default(),
            api_key: None,
            local_media: None,
            remote_images: false,
            shutdown_grace_s: 30.0,
        }
    }
}

/// A web-page conversation: its image (preprocessed once) and its history.
#[derive(Default)]
pub(crate) struct WebSession {
    /// The conversation's films in order (the views of one study), preprocessed.
    pub images: Vec<Arc<Vec<f32>>>,
    pub history: Vec<Turn>,
}

pub(crate) enum Slot {
    Idle(Box<WebSession>),
    Busy,
}

/// Conversations by id, with the clock tick of their last use; and the clock.
pub(crate) type Sessions = (HashMap<String, (Slot, u64)>, u64);

pub(crate) struct State {
    pub engine: Engine,
    pub opts: ServerOptions,
    pub sessions: Mutex<Sessions>,
    /// The client that fetches remote image URLs, when they are allowed.
    pub http: Option<reqwest::Client>,
}

/// 128 random bits from the operating system (getrandom), as 32 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system's random source is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The request body, at most `limit` bytes, arriving within the body timeout. Errors are
/// `(status, message)`: 413 over the limit, 408 too slow, 400 broken.
pub(crate) async fn read_body(
    st: &State,
    req: Request,
    limit: usize,
) -> std::result::Result<Bytes, (u16, String)> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return Err((
            413,
            format!("the request body of {n} bytes is over the limit of {limit} bytes"),
        ));
    }
    let timeout = Duration::from_secs_f64(st.opts.body_timeout_s);
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err((
            408,
            format!(
                "the request body did not arrive within {} s",
                st.opts.body_timeout_s
            ),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err((
            413,
            format!("the request body is over the limit of {limit} bytes"),
        )),
        Ok(Err(e)) => Err((400, format!("reading the request: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Preprocess an image file's bytes off the async threads.
pub(crate) async fn preprocess(
    st: &Arc<State>,
    bytes: Bytes,
) -> std::result::Result<Arc<Vec<f32>>, String> {
    let images = st.engine.info.images;
    tokio::task::spawn_blocking(move || images.process_bytes(&bytes))
        .await
        .map_err(|e| format!("internal error: {e}"))?
        .map(Arc::new)
        .map_err(|e| format!("{e:#}"))
}

fn router(state: Arc<State>) -> Router {
    super::web::routes()
        .merge(super::openai::routes())
        .with_state(state)
}

/// Serve until SIGINT / SIGTERM. `ready` gets the bound address once listening.
pub fn serve(
    engine: Engine,
    opts: ServerOptions,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let max = engine.info.max_positions;
    anyhow::ensure!(
        opts.settings.max_length <= max,
        "max_length {} is beyond the model's {max} positions (max_sequence_length in its \
         model_config.json): use at most {max}",
        opts.settings.max_length
    );
    opts.settings.sampling.validate()?;
    for (what, v) in [
        ("the body timeout", opts.body_timeout_s),
        ("the shutdown grace", opts.shutdown_grace_s),
    ] {
        anyhow::ensure!(
            v >= 0.0 && v.is_finite() && (v > 0.0 || what != "the body timeout"),
            "{what} must be a positive number of seconds"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads.max(1))
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", opts.host, opts.port))?;
        let addr = listener.local_addr().context("the server has no address")?;
        let timeout = Duration::from_secs_f64(opts.body_timeout_s);
        let open = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
        let grace = Duration::from_secs_f64(opts.shutdown_grace_s);
        let http = if opts.remote_images {
            Some(
                reqwest::Client::builder()
                    .timeout(timeout)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .build()
                    .context("starting the HTTP client for remote images")?,
            )
        } else {
            None
        };
        let state = Arc::new(State {
            engine,
            sessions: Mutex::new((HashMap::new(), 0)),
            opts,
            http,
        });
        let app = router(Arc::clone(&state));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        ready(addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    // Out of descriptors and the like: wait a moment and go on accepting.
                    Err(e) => {
                        crate::errln!("serve: accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                let _ = stream.try_write(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                continue;
            };
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
        }
        // Shut down: no new connections; the replies in flight finish (or fail after the grace
        // period); answered connections close; then the engine thread ends.
        drop(listener);
        crate::errln!("serve: shutting down (replies in flight get {:.0} s)", grace.as_secs_f64());
        state.engine.drain(grace);
        let _ = tokio::time::timeout(grace + Duration::from_secs(5), graceful.shutdown()).await;
        let st = Arc::clone(&state);
        let _ = tokio::task::spawn_blocking(move || st.engine.join()).await;
        Ok(())
    })
}
