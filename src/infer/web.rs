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
//! gets 409). Requests are served by a pool of threads; a streamed answer is produced on its own
//! thread and handed to the client chunk by chunk.

use std::collections::HashMap;
use std::io::Read;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use super::chat::{ChatModel, ChatSettings, Session, Turn};

const PAGE: &str = include_str!("web.html");

/// Server settings.
#[derive(Debug, Clone)]
pub struct WebOptions {
    pub host: String,
    pub port: u16,
    /// Largest accepted upload, bytes.
    pub max_upload: usize,
    /// Request threads.
    pub threads: usize,
    /// Conversations kept (the least recently used go first).
    pub max_sessions: usize,
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
            settings: ChatSettings::default(),
        }
    }
}

enum Slot {
    Idle(Box<Session>),
    Busy,
}

struct State {
    model: Mutex<ChatModel>,
    sessions: Mutex<(HashMap<String, (Slot, u64)>, u64)>,
    opts: WebOptions,
    ids: Mutex<crate::data::rng::PyRandom>,
}

fn json_response(code: u16, v: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(serde_json::to_vec(v).unwrap_or_default())
        .with_status_code(StatusCode(code))
        .with_header(header("Content-Type", "application/json; charset=utf-8"))
}

fn error(code: u16, msg: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    json_response(code, &json!({ "error": msg }))
}

fn header(k: &str, v: &str) -> Header {
    Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("static header")
}

fn query_param(url: &str, key: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// A reader over chunks sent by the generating thread (the streamed body).
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl State {
    fn new_id(&self) -> String {
        let mut r = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        format!("{:016x}{:016x}", r.getrandbits(64), r.getrandbits(64))
    }

    fn create_session(&self) -> String {
        let id = self.new_id();
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
    fn checkout(&self, id: &str) -> std::result::Result<Box<Session>, (u16, String)> {
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *g;
        *clock += 1;
        let now = *clock;
        match map.get_mut(id) {
            None => Err((
                404,
                format!("unknown session {id:?}: create one with POST /api/session"),
            )),
            Some((slot, t)) => match std::mem::replace(slot, Slot::Busy) {
                Slot::Idle(s) => {
                    *t = now;
                    Ok(s)
                }
                Slot::Busy => Err((409, "this conversation is answering another request".into())),
            },
        }
    }

    fn checkin(&self, id: &str, s: Box<Session>) {
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((slot, _)) = g.0.get_mut(id) {
            *slot = Slot::Idle(s);
        }
    }
}

fn read_body(req: &mut Request, limit: usize) -> std::result::Result<Vec<u8>, (u16, String)> {
    if let Some(n) = req.body_length() {
        if n > limit {
            return Err((
                413,
                format!("upload of {n} bytes is over the limit of {limit} bytes"),
            ));
        }
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| (400, format!("reading the request: {e}")))?;
    if body.len() > limit {
        return Err((413, format!("upload is over the limit of {limit} bytes")));
    }
    Ok(body)
}

fn settings_from(v: &Value, base: &ChatSettings) -> std::result::Result<ChatSettings, String> {
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

fn handle(state: &Arc<State>, mut req: Request) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    let result = match (method, path.as_str()) {
        (Method::Get, "/") | (Method::Get, "/index.html") => {
            let r = Response::from_string(PAGE)
                .with_header(header("Content-Type", "text/html; charset=utf-8"));
            req.respond(r)
        }
        (Method::Get, "/api/health") => {
            let default_prompt = state
                .model
                .lock()
                .map(|m| m.default_prompt.clone())
                .unwrap_or_default();
            let sessions = state.sessions.lock().map(|g| g.0.len()).unwrap_or_default();
            req.respond(json_response(
                200,
                &json!({"ok": true, "sessions": sessions, "defaults": state.opts.settings,
                        "default_prompt": default_prompt}),
            ))
        }
        (Method::Post, "/api/session") => {
            let id = state.create_session();
            req.respond(json_response(200, &json!({ "session": id })))
        }
        (Method::Post, "/api/image") => {
            let r = upload(state, &mut req, &url);
            req.respond(match r {
                Ok(v) => json_response(200, &v),
                Err((c, m)) => error(c, &m),
            })
        }
        (Method::Post, "/api/clear") => {
            let r = (|| {
                let body = read_body(&mut req, 1 << 20)?;
                let v: Value =
                    serde_json::from_slice(&body).map_err(|e| (400, format!("bad JSON: {e}")))?;
                let id = v["session"]
                    .as_str()
                    .ok_or((400, "no session".to_string()))?;
                let mut s = state.checkout(id)?;
                s.clear();
                state.checkin(id, s);
                Ok(json!({"ok": true}))
            })();
            req.respond(match r {
                Ok(v) => json_response(200, &v),
                Err((c, m)) => error(c, &m),
            })
        }
        (Method::Post, "/api/chat") => return chat(state, req),
        _ => req.respond(error(404, &format!("no such endpoint: {path}"))),
    };
    if let Err(e) = result {
        crate::errln!("web: responding to {path}: {e}");
    }
}

fn upload(
    state: &Arc<State>,
    req: &mut Request,
    url: &str,
) -> std::result::Result<Value, (u16, String)> {
    let id = query_param(url, "session").ok_or((400, "missing ?session=ID".to_string()))?;
    let body = read_body(req, state.opts.max_upload)?;
    if body.is_empty() {
        return Err((
            400,
            "empty upload: send the image file as the request body".into(),
        ));
    }
    let mut s = state.checkout(&id)?;
    let r = {
        let m = state.model.lock().unwrap_or_else(|e| e.into_inner());
        m.set_image_bytes(&mut s, &body)
    };
    state.checkin(&id, s);
    r.map_err(|e| (400, format!("not a readable image: {e:#}")))?;
    Ok(json!({"ok": true, "bytes": body.len()}))
}

fn chat(state: &Arc<State>, mut req: Request) {
    let parsed = (|| {
        let body = read_body(&mut req, 1 << 20)?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| (400, format!("bad JSON: {e}")))?;
        let id = v["session"]
            .as_str()
            .ok_or((400, "no session".to_string()))?
            .to_string();
        let query = v["query"].as_str().unwrap_or("").trim().to_string();
        if query.is_empty() {
            return Err((400, "empty question".to_string()));
        }
        let settings = settings_from(&v, &state.opts.settings).map_err(|e| (400, e))?;
        let session = state.checkout(&id)?;
        Ok((id, query, settings, session))
    })();
    let (id, query, settings, mut session) = match parsed {
        Ok(x) => x,
        Err((c, m)) => {
            let _ = req.respond(error(c, &m));
            return;
        }
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let st = Arc::clone(state);
    std::thread::spawn(move || {
        let line = |v: Value| {
            let mut b = serde_json::to_vec(&v).unwrap_or_default();
            b.push(b'\n');
            b
        };
        let result = {
            let m = st.model.lock().unwrap_or_else(|e| e.into_inner());
            m.ask(&mut session, &query, &settings, |piece| {
                let _ = tx.send(line(json!({ "delta": piece })));
            })
        };
        let history: Vec<Turn> = session.history.clone();
        st.checkin(&id, session);
        let _ = tx.send(line(match result {
            Ok(r) => json!({"done": true, "response": r, "history": history}),
            Err(e) => json!({"done": true, "error": format!("{e:#}")}),
        }));
    });
    let reader = ChannelReader {
        rx,
        buf: Vec::new(),
        pos: 0,
    };
    let resp = Response::new(
        StatusCode(200),
        vec![
            header("Content-Type", "application/x-ndjson; charset=utf-8"),
            header("Cache-Control", "no-cache"),
        ],
        reader,
        None,
        None,
    );
    if let Err(e) = req.respond(resp) {
        crate::errln!("web: streaming an answer: {e}");
    }
}

/// Serve until the process is stopped. `ready` gets the bound address once listening.
pub fn serve(
    chat: ChatModel,
    opts: WebOptions,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let server = Server::http((opts.host.as_str(), opts.port))
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", opts.host, opts.port))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server has no IP address")?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
        ^ std::process::id() as i64;
    let state = Arc::new(State {
        model: Mutex::new(chat),
        sessions: Mutex::new((HashMap::new(), 0)),
        ids: Mutex::new(crate::data::rng::PyRandom::new(seed)),
        opts,
    });
    let server = Arc::new(server);
    ready(addr);
    let workers: Vec<_> = (0..state.opts.threads.max(1))
        .map(|_| {
            let server = Arc::clone(&server);
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                while let Ok(req) = server.recv() {
                    handle(&state, req);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}
