//! `xrayglm web`: XrayGLM's `web_demo.py` as one self-contained page (no CDN) and JSON endpoints,
//! on the server of [`super::server`] (the same engine as the OpenAI API).
//!
//! | endpoint | does |
//! | --- | --- |
//! | `GET /` | the page |
//! | `POST /api/session` | `{"session": id}` — a new conversation |
//! | `POST /api/image?session=ID[&append=1]` | body = the image file (≤ `max_upload` bytes, else 413; not an image: 400); replaces the conversation's films and history, or with `append=1` adds another view of the study (at most 8) |
//! | `POST /api/chat` | `{"session", "query", "temperature"?, "top_p"?, …}` → NDJSON stream: `{"delta": "…"}` lines, then `{"done": true, "response", "history"}` |
//! | `POST /api/clear` | `{"session"}` — forget image and history |
//! | `GET /api/health` | `{"ok": true, …}` and the engine's counters |
//!
//! Each conversation is checked out of the session table while it is answered, so two requests
//! can't interleave one history (the second gets 409); different conversations are answered
//! together by the engine. Session ids are 128 bits from the OS's CSPRNG.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State as Shared};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::chat::{ChatSettings, Turn};
use super::engine::{Event, Job};
use super::http::{new_id, preprocess, read_body, refused_text, Slot, State, WebSession};

const PAGE: &str = include_str!("web.html");

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
    fn checkout(&self, id: &str) -> std::result::Result<Box<WebSession>, Failure> {
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

    fn checkin(&self, id: &str, s: Box<WebSession>) {
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((slot, _)) = g.0.get_mut(id) {
            *slot = Slot::Idle(s);
        }
    }
}

async fn read_json(st: &State, req: Request) -> std::result::Result<Value, Failure> {
    let body = read_body(st, req, 1 << 20)
        .await
        .map_err(|(c, m)| fail(c, m))?;
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
    let sessions = st
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .len();
    let e = &st.engine;
    let n = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::SeqCst);
    ok(json!({
        "ok": true,
        "sessions": sessions,
        "defaults": st.opts.settings,
        "default_prompt": e.info.default_prompt,
        "models": e.info.models,
        "engine": {
            "active": n(&e.stats.active),
            "queued": n(&e.stats.queued),
            "cache_bytes": n(&e.stats.cache_bytes),
            "finished": n(&e.stats.finished),
            "steps": n(&e.stats.steps),
            "step_rows": n(&e.stats.step_rows),
            "prompt_cache_bytes": n(&e.stats.prompt_cache.bytes),
            "prompt_cache_entries": n(&e.stats.prompt_cache.entries),
            "image_cache_bytes": n(&e.stats.image_cache.bytes),
            "image_cache_entries": n(&e.stats.image_cache.entries),
        },
    }))
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
    *s = WebSession::default();
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
    let body = read_body(&st, req, st.opts.max_upload)
        .await
        .map_err(|(c, m)| fail(c, m))?;
    if body.is_empty() {
        return Err(fail(
            400,
            "empty upload: send the image file as the request body",
        ));
    }
    let n = body.len();
    let pixels = preprocess(&st, body)
        .await
        .map_err(|e| fail(400, format!("not a readable image: {e}")))?;
    let append = q.get("append").is_some_and(|v| v == "1" || v == "true");
    let mut s = st.checkout(&id)?;
    if !append {
        s.images.clear();
    } else if s.images.len() >= MAX_FILMS {
        st.checkin(&id, s);
        return Err(fail(
            400,
            format!("at most {MAX_FILMS} films per conversation"),
        ));
    }
    s.images.push(pixels);
    s.history.clear();
    let films = s.images.len();
    st.checkin(&id, s);
    ok(json!({"ok": true, "bytes": n, "films": films}))
}

/// Films one conversation may carry.
const MAX_FILMS: usize = 8;

async fn chat(Shared(st): Shared<Arc<State>>, req: Request) -> Answer {
    let arrived = std::time::Instant::now();
    let v = read_json(&st, req).await?;
    let id = v["session"]
        .as_str()
        .ok_or_else(|| fail(400, "no session"))?
        .to_string();
    let query = v["query"].as_str().unwrap_or("").trim().to_string();
    if query.is_empty() {
        return Err(fail(400, "empty question"));
    }
    let settings = settings_from(&v, &st.opts.settings, st.engine.info.max_positions)
        .map_err(|e| fail(400, e))?;
    let mut session = st.checkout(&id)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let job = Job {
        constraint: None,
        model: 0,
        images: session.images.clone(),
        system: String::new(),
        history: session.history.clone(),
        query: query.clone(),
        settings,
        max_new_tokens: None,
        stop: Vec::new(),
        events: tx,
        arrived,
    };
    if let Err(r) = st.engine.submit(job) {
        st.checkin(&id, session);
        return Err(fail(503, refused_text(r)));
    }
    let line = |v: Value| {
        let mut b = serde_json::to_vec(&v).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    };
    let (out, body_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let st2 = Arc::clone(&st);
    tokio::spawn(async move {
        // Whatever happens — an error, the engine stopping — the stream ends with a `done` line
        // and the conversation goes back to the table.
        let mut last = json!({"done": true, "error": "the engine stopped"});
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Started { .. } => {}
                Event::Delta(piece) => {
                    let _ = out.send(line(json!({ "delta": piece })));
                }
                Event::Done(f) => {
                    session.history.push(Turn {
                        query: query.clone(),
                        response: f.text.clone(),
                    });
                    last = json!({"done": true, "response": f.text, "history": session.history});
                    break;
                }
                Event::Failed { message, .. } => {
                    last = json!({"done": true, "error": message});
                    break;
                }
            }
        }
        st2.checkin(&id, session);
        let _ = out.send(line(last));
    });
    let body = futures_util::stream::unfold(body_rx, |mut rx| async move {
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

/// The page and its endpoints.
pub(crate) fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
        .route("/api/health", get(health))
        .route("/api/session", post(session))
        .route("/api/image", post(image))
        .route("/api/clear", post(clear))
        .route("/api/chat", post(chat))
        .fallback(not_found)
}
