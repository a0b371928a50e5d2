//! What the HTTP endpoints share: the server's settings, its state (the engine, the web page's
//! conversations, the client for remote images) and the helpers every handler uses (ids, bodies
//! read within limits, image preprocessing off the async threads, refusals). The routes are in
//! [`super::web`] and [`super::openai`]; [`super::server`] binds and runs them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::header;
use http_body_util::BodyExt;

use super::chat::{ChatSettings, Turn};
use super::engine::{Engine, Refused};

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
/// `(status, message)`: 413 over the limit, 408 too slow, 400 broken. An over-limit body is still
/// read (and dropped) up to [`drain_cap`] before the 413 goes out, so that a client that is still
/// sending reads the answer instead of a reset connection.
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
    let over = |n: Option<u64>| {
        let size = n.map(|n| format!(" of {n} bytes")).unwrap_or_default();
        (
            413,
            format!("the request body{size} is over the limit of {limit} bytes"),
        )
    };
    let timeout = Duration::from_secs_f64(st.opts.body_timeout_s);
    let late = || {
        (
            408,
            format!(
                "the request body did not arrive within {} s",
                st.opts.body_timeout_s
            ),
        )
    };
    let mut body = req.into_body();
    let cap = drain_cap(limit);
    if declared.is_some_and(|n| n > cap as u64) {
        // Too big to read through: answer at once (the client may see the connection close).
        return Err(over(declared));
    }
    let read = async {
        let mut out = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| (400, format!("reading the request: {e}")))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen <= limit {
                out.extend_from_slice(data);
            } else if seen > cap {
                break;
            }
        }
        if seen > limit {
            return Err(over(declared));
        }
        Ok(Bytes::from(out))
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) if declared.is_some_and(|n| n > limit as u64) => Err(over(declared)),
        Err(_) => Err(late()),
        Ok(r) => r,
    }
}

/// How much of an over-limit body is read and dropped before the 413 (beyond it the answer goes
/// out at once and the connection closes): four times the limit, at least 64 MiB.
fn drain_cap(limit: usize) -> usize {
    limit.saturating_mul(4).max(64 << 20)
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

/// What a refused request is told.
pub(crate) fn refused_text(r: Refused) -> &'static str {
    match r {
        Refused::QueueFull => "the server is busy (its queue is full): try again shortly",
        Refused::Stopping => "the server is shutting down",
    }
}
