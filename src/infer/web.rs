//! `xrayglm web`: XrayGLM's `web_demo.py` as one self-contained page (no CDN) and JSON endpoints.
//!
//! | endpoint | does |
//! | --- | --- |
//! | `GET /` | the page |
//! | `POST /api/session` | `{"session": id}` — a new conversation |
//! | `POST /api/image?session=ID` | body = the image file (≤ `max_upload` bytes, else 413; not an image: 400) |
//! | `POST /api/chat` | `{"session", "query", "temperature"?, "top_p"?, …}` → NDJSON stream: `{"delta": "…"}` lines, then `{"done": true, "response", "history"}` |
//! | `POST /api/clear` | `{"session"}` — forget image and history |
//! | `GET /api/health` | `{"ok": true, …}` |
//!
//! One model, one generation at a time (a mutex); each conversation is checked out of the
//! session table while it is answered, so two requests can't interleave one history (the second
//! gets 409). HTTP is hyper on tokio, routed by axum: connections are tasks, not threads, so slow
//! clients hold no thread; the headers of each request and its body must arrive within
//! `body_timeout_s` (else the connection is closed / 408), and at most `max_connections` are open
//! (more are answered 503 at once). Model work runs on tokio's blocking threads; a streamed answer
//! is handed to the client line by line. Session ids are 128 bits from the OS's CSPRNG.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State as Shared};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::chat::{ChatModel, ChatSettings, Session, Turn};

const PAGE: &str = include_str!("web.html");

/// Server settings.
#[derive(Debug, Clone)]
pub struct WebOptions {
    pub host: String,
    pub port: u16,
    /// Largest accepted upload, bytes.
    pub max_upload: usize,
    /// Threads that run the HTTP tasks (model work runs on tokio's blocking threads).
    pub threads: usize,
    /// Conversations kept (the least recently used go first).
    pub max_sessions: usize,
    /// A request's headers, and then its body, must arrive within this many seconds (else the
    /// connection is closed / 408); an idle kept-alive connection closes after it too.
    pub body_timeout_s: f64,
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Defaults for questions (web_demo.py: max_length 2048, temperature 0.8, top_p 0.4, top_k 100).
    pub settings: ChatSettings,
}

impl Default for WebOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7860,
            max_upload: 10 << 20,
            threads: 8,
            max_sessions: 1000,
            body_timeout_s: 10.0,
            max_connections: 1024,
            settings: ChatSettings::default(),
        }
    }
}

enum Slot {
    Idle(Box<Session>),
    Busy,
}

/// Conversations by id, with the clock tick of their last use; and the clock.
type Sessions = (HashMap<String, (Slot, u64)>, u64);

struct State {
    model: Mutex<ChatModel>,
    sessions: Mutex<Sessions>,
    opts: WebOptions,
    /// The model's positions: the largest `max_length` a question may ask for.
    max_positions: usize,
}

/// An error answer: `{"error": message}` with its status.
struct Failure(StatusCode, String);

type Answer = std::result::Result<Response, Failure>;

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

fn fail(code: u16, msg: impl Into<String>) -> Failure {
    Failure(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        msg.into(),
    )
}

fn ok(v: Value) -> Answer {
    Ok(axum::Json(v).into_response())
}

/// 128 random bits from the operating system (getrandom), as 32 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system's random source is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl State {
    fn create_session(&self) -> String {
        let id = new_id();
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *g;
        *clock += 1;
        if map.len() >= self.opts.max_sessions {
            // Drop the least recently used idle conversation.
            if let Some(old) = map
                .iter()
                .filter(|(_, (s, _))| matches!(s, Slot::Idle(_)))
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                map.remove(&old);
            }
        }
        map.insert(id.clone(), (Slot::Idle(Box::default()), *clock));
        id
    }

    /// Take a conversation out of the table for exclusive use.
    fn checkout(&self, id: &str) -> std::result::Result<Box<Session>, Failure> {
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *g;
        *clock += 1;
        let now = *clock;
        match map.get_mut(id) {
            None => Err(fail(
                404,
                format!("unknown session {id:?}: create one with POST /api/session"),
            )),
            Some((slot, t)) => match std::mem::replace(slot, Slot::Busy) {
                Slot::Idle(s) => {
                    *t = now;
                    Ok(s)
                }
                Slot::Busy => Err(fail(409, "this conversation is answering another request")),
            },
        }
    }

    fn checkin(&self, id: &str, s: Box<Session>) {
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((slot, _)) = g.0.get_mut(id) {
            *slot = Slot::Idle(s);
        }
    }

    /// Run model work on a blocking thread; a panic becomes an error, the model stays usable.
    async fn with_model<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ChatModel) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let st = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let m = st.model.lock().unwrap_or_else(|e| e.into_inner());
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&m)))
                .unwrap_or_else(|p| Err(anyhow::anyhow!("internal error: {}", panic_text(&p))))
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("internal error: {e}")))
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The request body, at most `limit` bytes, arriving within the body timeout (else 408: a slow
/// sender is cut off).
async fn read_body(st: &State, req: Request, limit: usize) -> std::result::Result<Bytes, Failure> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return Err(fail(
            413,
            format!("upload of {n} bytes is over the limit of {limit} bytes"),
        ));
    }
    let timeout = Duration::from_secs_f64(st.opts.body_timeout_s);
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err(fail(
            408,
            format!(
                "the request body did not arrive within {} s",
                st.opts.body_timeout_s
            ),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(fail(
            413,
            format!("upload is over the limit of {limit} bytes"),
        )),
        Ok(Err(e)) => Err(fail(400, format!("reading the request: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn read_json(st: &State, req: Request) -> std::result::Result<Value, Failure> {
    let body = read_body(st, req, 1 << 20).await?;
    serde_json::from_slice(&body).map_err(|e| fail(400, format!("bad JSON: {e}")))
}

fn settings_from(
    v: &Value,
    base: &ChatSettings,
    max_positions: usize,
) -> std::result::Result<ChatSettings, String> {
    let mut s = base.clone();
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    if let Some(t) = num("temperature") {
        s.sampling.temperature = t;
    }
    if let Some(p) = num("top_p") {
        s.sampling.top_p = p;
    }
    if let Some(k) = num("top_k") {
        s.sampling.top_k = k as i64;
    }
    if let Some(r) = num("repetition_penalty") {
        s.sampling.repetition_penalty = r;
    }
    if let Some(m) = num("max_length") {
        if !(m >= 1.0 && m <= max_positions as f64) {
            return Err(format!(
                "max_length {m} is outside 1..={max_positions} (the model's positions)"
            ));
        }
        s.max_length = m as usize;
    }
    if let Some(g) = v.get("greedy").and_then(Value::as_bool) {
        s.sampling.greedy = g;
    }
    if let Some(seed) = v.get("seed").and_then(Value::as_u64) {
        s.sampling.seed = seed;
    }
    if let Some(e) = v.get("english").and_then(Value::as_bool) {
        s.english = e;
    }
    s.sampling.validate().map_err(|e| e.to_string())?;
    Ok(s)
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn health(Shared(st): Shared<Arc<State>>) -> Answer {
    let default_prompt = st
        .model
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .default_prompt
        .clone();
    let sessions = st
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .len();
    ok(
        json!({"ok": true, "sessions": sessions, "defaults": st.opts.settings,
              "default_prompt": default_prompt}),
    )
}

async fn session(Shared(st): Shared<Arc<State>>) -> Answer {
    ok(json!({ "session": st.create_session() }))
}

async fn clear(Shared(st): Shared<Arc<State>>, req: Request) -> Answer {
    let v = read_json(&st, req).await?;
    let id = v["session"]
        .as_str()
        .ok_or_else(|| fail(400, "no session"))?;
    let mut s = st.checkout(id)?;
    s.clear();
    st.checkin(id, s);
    ok(json!({"ok": true}))
}

async fn image(
    Shared(st): Shared<Arc<State>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Answer {
    let id = q
        .get("session")
        .cloned()
        .ok_or_else(|| fail(400, "missing ?session=ID"))?;
    let body = read_body(&st, req, st.opts.max_upload).await?;
    if body.is_empty() {
        return Err(fail(
            400,
            "empty upload: send the image file as the request body",
        ));
    }
    let n = body.len();
    let mut s = st.checkout(&id)?;
    let (s, r) = {
        let st2 = Arc::clone(&st);
        let out = st2
            .with_model(move |m| {
                let r = m.set_image_bytes(&mut s, &body);
                Ok((s, r))
            })
            .await;
        match out {
            Ok(x) => x,
            // The session went down with the failed call: start it afresh.
            Err(e) => (Box::default(), Err(e)),
        }
    };
    st.checkin(&id, s);
    r.map_err(|e| fail(400, format!("not a readable image: {e:#}")))?;
    ok(json!({"ok": true, "bytes": n}))
}

async fn chat(Shared(st): Shared<Arc<State>>, req: Request) -> Answer {
    let v = read_json(&st, req).await?;
    let id = v["session"]
        .as_str()
        .ok_or_else(|| fail(400, "no session"))?
        .to_string();
    let query = v["query"].as_str().unwrap_or("").trim().to_string();
    if query.is_empty() {
        return Err(fail(400, "empty question"));
    }
    let settings =
        settings_from(&v, &st.opts.settings, st.max_positions).map_err(|e| fail(400, e))?;
    let session = st.checkout(&id)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let line = |v: Value| {
        let mut b = serde_json::to_vec(&v).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    };
    let st2 = Arc::clone(&st);
    tokio::spawn(async move {
        // A failure — an error or even a panic in the model — still ends the stream with an
        // error line and gives the conversation back.
        let stream = tx.clone();
        let out = st2
            .with_model(move |m| {
                let mut session = session;
                let r = m.ask(&mut session, &query, &settings, |piece| {
                    let _ = stream.send(line(json!({ "delta": piece })));
                });
                Ok((session, r))
            })
            .await;
        let (session, result) = match out {
            Ok(x) => x,
            Err(e) => (Box::default(), Err(e)),
        };
        let history: Vec<Turn> = session.history.clone();
        st2.checkin(&id, session);
        let _ = tx.send(line(match result {
            Ok(r) => json!({"done": true, "response": r, "history": history}),
            Err(e) => json!({"done": true, "error": format!("{e:#}")}),
        }));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

async fn not_found(req: Request) -> Failure {
    fail(404, format!("no such endpoint: {}", req.uri().path()))
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
        .route("/api/health", get(health))
        .route("/api/session", post(session))
        .route("/api/image", post(image))
        .route("/api/clear", post(clear))
        .route("/api/chat", post(chat))
        .fallback(not_found)
        .with_state(state)
}

/// Serve until SIGINT / SIGTERM. `ready` gets the bound address once listening.
pub fn serve(
    chat: ChatModel,
    opts: WebOptions,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    chat.check_max_length(opts.settings.max_length)?;
    if !(opts.body_timeout_s > 0.0 && opts.body_timeout_s.is_finite()) {
        anyhow::bail!("the body timeout must be a positive number of seconds");
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
        let state = Arc::new(State {
            max_positions: chat.max_positions(),
            model: Mutex::new(chat),
            sessions: Mutex::new((HashMap::new(), 0)),
            opts,
        });
        let app = router(state);
        ready(addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    // Out of descriptors and the like: wait a moment and go on accepting.
                    Err(e) => {
                        crate::errln!("web: accepting a connection: {e}");
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
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = conn.await;
                drop(permit);
            });
        }
        Ok(())
    })
}
