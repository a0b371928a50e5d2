//! The OpenAI-compatible API of `xrayglm serve`: `GET /v1/models` and `POST /v1/chat/completions`
//! in OpenAI's request, response, streaming (server-sent events) and error shapes, so the
//! official clients, notebooks and evaluation harnesses talk to XrayGLM as to any chat model.
//!
//! * `messages`: `system`, `user` and `assistant` turns; user content a string or parts (`text`,
//!   `image_url` with a `data:image/…;base64,` URL — or a local path inside
//!   `--allowed_local_media_path`, or an `http(s)://` URL with `--allow_remote_images`; both are
//!   refused otherwise). Several images (up to 8: the views of one study) each get their own
//!   `<img>` block in order, in front of the first question as VisualGLM places its one image.
//!   Earlier user/assistant pairs become the `问：…\n答：…\n` history exactly as `chat` builds
//!   it; system text goes before the first question.
//! * `model`: the base model's name or an adapter's (`--lora NAME=DIR`); unknown → 404.
//! * `temperature` (0 = greedy), `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop`
//!   (string or list), `stream` (+ `stream_options.include_usage`); extensions `top_k` and
//!   `repetition_penalty` (XrayGLM's defaults: 100 and 1.2). Without a `seed` each request draws
//!   one from the OS.
//! * Extension `findings: true`: the reply's CheXpert observations as the findings labeler reads
//!   them (the rules of the reply's language; `xrayglm findings`' line without its id: `labels`,
//!   `sides`, `mentions` with the matched text) in a top-level `findings` field of the completion,
//!   or of the stream's chunk that carries the finish reason. Off by default.
//! * `response_format`: `text`, `json_object`, or `json_schema` (its `schema`): the reply is held to
//!   it by constrained decoding ([`super::structured`]); a schema that does not compile is a 400.
//! * Fields that would change the reply and are not implemented (`tools`, `logprobs`,
//!   `logit_bias`, penalties, audio, `n` > 1, …) are refused with a 400 naming them
//!   ([`unsupported`]), never silently ignored.
//! * Errors: `{"error": {"message", "type", "param", "code"}}` with 400 (bad request, unsupported
//!   part or field, a message without content, undecodable image), 401 (missing or wrong bearer
//!   key with `--api_key`), 404 (unknown model), 413 (body over `--max_body_mib`), 503 (queue
//!   full, shutting down), 500 (model failure). Every answer's status is counted for `/metrics`
//!   ([`super::metrics`]).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State as Shared};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::{ChatSettings, Turn};
use super::engine::{Event, Finished, Job, Refused};
use super::http::{new_id, preprocess, read_body, refused_text, State};
use super::structured::ResponseFormat;

/// An OpenAI error object with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: u16,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            404 => "not_found_error",
            429 | 503 => "server_overloaded",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }});
        (status, axum::Json(body)).into_response()
    }
}

type ApiResult = std::result::Result<Response, ApiError>;

/// `/v1/models` and `/v1/chat/completions`.
pub(crate) fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions))
}

/// With `--api_key`, the request must carry `Authorization: Bearer KEY` (compared in constant
/// time).
fn authorize(st: &State, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(key) = &st.opts.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            if given.is_empty() {
                "no API key: send Authorization: Bearer KEY"
            } else {
                "incorrect API key"
            },
        )
        .code("invalid_api_key"))
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(Shared(st): Shared<Arc<State>>, headers: HeaderMap) -> ApiResult {
    authorize(&st, &headers)?;
    let created = now_s();
    let data: Vec<Value> = st
        .engine
        .info
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            json!({"id": m, "object": "model", "created": created, "owned_by": "xrayglm",
                   "parent": if i == 0 { Value::Null } else { json!(st.engine.info.models[0]) }})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// The format `response_format` asks for: `None` for free text (`text`, or no field).
fn response_format(r: &ChatRequest) -> std::result::Result<Option<ResponseFormat>, ApiError> {
    let bad = |why: String| {
        ApiError::new(400, format!("`response_format`: {why}")).param("response_format")
    };
    let Some(f) = r.response_format.as_ref().filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let schema = f
                .pointer("/json_schema/schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| bad("`json_schema.schema` (an object) is required".into()))?;
            Ok(Some(ResponseFormat::JsonSchema(schema.clone())))
        }
        Some(t) => Err(bad(format!(
            "type {t:?} is not one of \"text\", \"json_object\", \"json_schema\""
        ))
        .code("unsupported_parameter")),
        None => Err(bad("an object with a `type` is expected".into())),
    }
}

/// The request fields xrayglm reads. Fields that would change the answer and are not implemented
/// are read only to refuse them ([`unsupported`]); the rest (`user`, `metadata`, `store`, …) do not
/// change a reply and are accepted and ignored.
#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    repetition_penalty: Option<f64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    logit_bias: Option<Value>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    modalities: Option<Value>,
    audio: Option<Value>,
    prediction: Option<Value>,
    /// Extension: the reply's findings ([`findings`]).
    #[serde(default)]
    findings: bool,
}

/// The first field of `r` that asks for something this server does not do, as a 400 naming it:
/// a client must not get a 200 whose reply silently lacks what it asked for.
fn unsupported(r: &ChatRequest) -> std::result::Result<(), ApiError> {
    let refuse = |field: &'static str, why: &str| {
        Err(ApiError::new(400, format!("`{field}`: {why}"))
            .param(field)
            .code("unsupported_parameter"))
    };
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let empty = |v: &Value| v.as_array().is_some_and(|a| a.is_empty());
    if r.tools.as_ref().is_some_and(|t| !t.is_null() && !empty(t)) {
        return refuse("tools", "tool calling is not supported");
    }
    if r.tool_choice
        .as_ref()
        .is_some_and(|c| !c.is_null() && c.as_str() != Some("none"))
    {
        return refuse("tool_choice", "tool calling is not supported");
    }
    if r.functions
        .as_ref()
        .is_some_and(|t| !t.is_null() && !empty(t))
    {
        return refuse("functions", "function calling is not supported");
    }
    if set(&r.function_call) && r.function_call.as_ref().and_then(Value::as_str) != Some("none") {
        return refuse("function_call", "function calling is not supported");
    }
    if r.logprobs == Some(true) {
        return refuse("logprobs", "log-probabilities are not returned");
    }
    if r.top_logprobs.is_some_and(|n| n > 0) {
        return refuse("top_logprobs", "log-probabilities are not returned");
    }
    if r.logit_bias
        .as_ref()
        .is_some_and(|b| b.as_object().is_some_and(|o| !o.is_empty()))
    {
        return refuse("logit_bias", "not supported");
    }
    if r.frequency_penalty.is_some_and(|x| x != 0.0) {
        return refuse(
            "frequency_penalty",
            "not supported (use the `repetition_penalty` extension)",
        );
    }
    if r.presence_penalty.is_some_and(|x| x != 0.0) {
        return refuse(
            "presence_penalty",
            "not supported (use the `repetition_penalty` extension)",
        );
    }
    if let Some(m) = r.modalities.as_ref().and_then(Value::as_array) {
        if m.iter().any(|x| x.as_str() != Some("text")) {
            return refuse("modalities", "replies are text only");
        }
    }
    if set(&r.audio) {
        return refuse("audio", "replies are text only");
    }
    if set(&r.prediction) {
        return refuse("prediction", "predicted outputs are not supported");
    }
    Ok(())
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

/// A conversation read from `messages`.
struct Conversation {
    system: String,
    history: Vec<Turn>,
    query: String,
    /// The image URLs of every user message, in order.
    images: Vec<String>,
}

/// `messages` → system text, history pairs, the last question and the image URLs.
fn conversation(messages: &[Message]) -> std::result::Result<Conversation, ApiError> {
    let bad = |m: String| ApiError::new(400, m).param("messages");
    let mut system = Vec::new();
    let mut turns: Vec<(String, String)> = Vec::new();
    let mut pending: Option<String> = None;
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let mut text = Vec::new();
        match &m.content {
            None => {
                return Err(bad(format!(
                    "messages[{i}]: no content (a string or a list of parts is expected)"
                )))
            }
            Some(Content::Text(t)) => text.push(t.clone()),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => text.push(
                            p.get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    bad(format!("messages[{i}]: a text part without text"))
                                })?
                                .to_string(),
                        ),
                        Some("image_url") if m.role == "user" => {
                            let url = p
                                .pointer("/image_url/url")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    bad(format!(
                                        "messages[{i}]: an image_url part without image_url.url"
                                    ))
                                })?;
                            if images.len() == MAX_FILMS {
                                return Err(bad(format!(
                                    "more than {MAX_FILMS} images in one conversation"
                                )));
                            }
                            images.push(url.to_string());
                        }
                        other => {
                            return Err(bad(format!(
                                "messages[{i}]: unsupported content part {:?} for role {:?} (text, \
                                 and image_url in user messages)",
                                other.unwrap_or("(no type)"),
                                m.role
                            )))
                        }
                    }
                }
            }
        }
        let text = text.join("\n");
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" => {
                pending = Some(match pending.take() {
                    Some(p) => format!("{p}\n{text}"),
                    None => text,
                })
            }
            "assistant" => match pending.take() {
                Some(q) => turns.push((q, text)),
                None => {
                    return Err(bad(format!(
                        "messages[{i}]: an assistant turn must follow a user turn"
                    )))
                }
            },
            r => {
                return Err(bad(format!(
                    "messages[{i}]: unsupported role {r:?} (system, user, assistant)"
                )))
            }
        }
    }
    let query = pending.ok_or_else(|| bad("the last message must be the user's".into()))?;
    Ok(Conversation {
        system: system.join("\n"),
        history: turns
            .into_iter()
            .map(|(query, response)| Turn { query, response })
            .collect(),
        query,
        images,
    })
}

/// Films one conversation may carry (each adds an image block of ~35 prompt tokens).
const MAX_FILMS: usize = 8;

const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (for `data:` URLs: the benchmark's and the tests' clients).
pub fn base64_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = c.iter().fold(0u32, |a, &x| (a << 8) | x as u32) << (8 * (3 - c.len()));
        for i in 0..4 {
            s.push(if i <= c.len() {
                BASE64[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    s
}

/// Standard base64 (padding optional; white space skipped).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    let body = s.trim_end_matches('=');
    for c in body.bytes().filter(|c| !c.is_ascii_whitespace()) {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The bytes of an image URL: a `data:` URL, a local file inside `--allowed_local_media_path`, or
/// with `--allow_remote_images` an `http(s)://` URL.
async fn image_bytes(st: &State, url: &str) -> std::result::Result<Vec<u8>, ApiError> {
    let bad = |m: String| ApiError::new(400, m).param("messages");
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("a data: URL without a comma".into()))?;
        if !meta.ends_with(";base64") {
            return Err(bad(
                "data: URLs must be base64 (data:image/png;base64,…)".into()
            ));
        }
        return base64_decode(data).ok_or_else(|| bad("the data: URL is not valid base64".into()));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let Some(client) = &st.http else {
            return Err(bad(
                "remote image URLs are not fetched (no server-side requests unless the server \
                 runs with --allow_remote_images): send the image as a data:image/…;base64 URL"
                    .into(),
            ));
        };
        return fetch(client, url, st.opts.max_upload)
            .await
            .map_err(|e| bad(format!("fetching {url}: {e}")));
    }
    let path = std::path::PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    let Some(root) = &st.opts.local_media else {
        return Err(bad(
            "local image paths are refused: send a data: URL, or start the server with \
             --allowed_local_media_path DIR"
                .into(),
        ));
    };
    let inside = std::fs::canonicalize(&path)
        .ok()
        .zip(std::fs::canonicalize(root).ok())
        .filter(|(p, r)| p.starts_with(r));
    match inside {
        Some((p, _)) => crate::io::read_bytes_capped(&p, crate::io::MAX_IMAGE_BYTES)
            .map_err(|e| bad(format!("{}: {e:#}", path.display()))),
        None => Err(bad(format!(
            "{}: not a file inside the allowed media folder",
            path.display()
        ))),
    }
}

/// GET `url`: a 2xx answer of at most `limit` bytes.
async fn fetch(client: &reqwest::Client, url: &str, limit: usize) -> Result<Vec<u8>, String> {
    let mut r = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("the server answered {}", r.status()));
    }
    if r.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("over the limit of {limit} bytes"));
    }
    let mut out = Vec::new();
    while let Some(c) = r.chunk().await.map_err(|e| e.to_string())? {
        out.extend_from_slice(&c);
        if out.len() > limit {
            return Err(format!("over the limit of {limit} bytes"));
        }
    }
    Ok(out)
}

/// Decoding settings of a request, over the server's defaults.
fn settings(
    st: &State,
    r: &ChatRequest,
) -> std::result::Result<(ChatSettings, Option<usize>), ApiError> {
    let mut s = st.opts.settings.clone();
    let p = &mut s.sampling;
    if let Some(t) = r.temperature {
        if t == 0.0 {
            p.greedy = true;
        } else {
            p.temperature = t;
        }
    }
    if let Some(x) = r.top_p {
        p.top_p = x;
    }
    if let Some(k) = r.top_k {
        p.top_k = k;
    }
    if let Some(x) = r.repetition_penalty {
        p.repetition_penalty = x;
    }
    p.seed = match r.seed {
        Some(x) => x as u64,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| ApiError::new(500, e.to_string()))?;
            u64::from_le_bytes(b) >> 1
        }
    };
    p.validate()
        .map_err(|e| ApiError::new(400, e.to_string()))?;
    let max_new = match r.max_completion_tokens.or(r.max_tokens) {
        None => None,
        Some(n) if n >= 1 => Some(n as usize),
        Some(n) => {
            return Err(
                ApiError::new(400, format!("max_tokens must be ≥ 1 (got {n})")).param("max_tokens"),
            )
        }
    };
    if let Some(n) = r.n.filter(|&n| n != 1) {
        return Err(ApiError::new(400, format!("n = {n}: one choice per request")).param("n"));
    }
    Ok((s, max_new))
}

/// `POST /v1/chat/completions`; every answer's status is counted for `/metrics`.
async fn completions(Shared(st): Shared<Arc<State>>, req: Request) -> Response {
    let mut model = None;
    let answer = complete(&st, req, &mut model)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    st.engine
        .stats
        .metrics
        .request(model, answer.status().as_u16());
    answer
}

/// A chat completion; `model` is set once the request names a served model.
async fn complete(st: &Arc<State>, req: Request, model: &mut Option<usize>) -> ApiResult {
    let arrived = std::time::Instant::now();
    authorize(st, req.headers())?;
    let body = read_body(st, req, st.opts.max_body)
        .await
        .map_err(|(c, m)| ApiError::new(c, m))?;
    let r: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(400, format!("bad request body: {e}")))?;
    *model = st.engine.info.models.iter().position(|m| *m == r.model);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = job_for(st, &r, *model, tx, arrived).await?;
    st.engine.submit(job).map_err(|e| {
        ApiError::new(503, refused_text(e)).code(match e {
            Refused::QueueFull => "queue_full",
            Refused::Stopping => "shutting_down",
        })
    })?;
    // The prompt is checked in the engine: wait until it is read before answering 200.
    match rx.recv().await {
        Some(Event::Started { .. }) => {}
        Some(Event::Failed { status, message }) => return Err(ApiError::new(status, message)),
        _ => return Err(ApiError::new(500, "the engine stopped")),
    }
    let head = Head {
        id: format!("chatcmpl-{}", new_id()),
        model: r.model,
        created: now_s(),
        findings: r.findings,
    };
    if r.stream {
        let include_usage = r.stream_options.is_some_and(|o| o.include_usage);
        Ok(streamed(rx, head, include_usage))
    } else {
        whole(rx, head).await
    }
}

/// A chat request as the engine's job: the served model it names (`model`: its index, `None`
/// when it names none), its sampling settings, the conversation, its images fetched and
/// preprocessed, its stop strings.
async fn job_for(
    st: &Arc<State>,
    r: &ChatRequest,
    model: Option<usize>,
    events: EventSender,
    arrived: std::time::Instant,
) -> Result<Job, ApiError> {
    let Some(model) = model else {
        return Err(ApiError::new(
            404,
            format!(
                "the model `{}` does not exist: this server has {:?}",
                r.model, st.engine.info.models
            ),
        )
        .param("model")
        .code("model_not_found"));
    };
    unsupported(r)?;
    let constraint = match response_format(r)? {
        None => None,
        Some(format) => {
            // Compiling a schema (and, the first time, the grammar engine) takes a moment.
            let grammars = Arc::clone(&st.engine.info.grammars);
            let built = tokio::task::spawn_blocking(move || {
                grammars.get().and_then(|g| g.constraint(&format))
            })
            .await
            .map_err(|e| ApiError::new(500, format!("compiling the response format: {e}")))?;
            Some(built.map_err(|e| {
                ApiError::new(400, format!("`response_format`: {e:#}")).param("response_format")
            })?)
        }
    };
    let (settings, max_new_tokens) = settings(st, r)?;
    let conv = conversation(&r.messages)?;
    let mut images = Vec::with_capacity(conv.images.len());
    for (k, url) in conv.images.iter().enumerate() {
        let bytes = image_bytes(st, url).await?;
        images.push(preprocess(st, Bytes::from(bytes)).await.map_err(|e| {
            ApiError::new(400, format!("image {k} cannot be read: {e}")).param("messages")
        })?);
    }
    let stop = match &r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    Ok(Job {
        model,
        images,
        system: conv.system,
        history: conv.history,
        query: conv.query,
        settings,
        max_new_tokens,
        stop,
        events,
        arrived,
        constraint,
    })
}

type EventSender = tokio::sync::mpsc::UnboundedSender<Event>;
type EventReceiver = tokio::sync::mpsc::UnboundedReceiver<Event>;

/// What every object of one completion repeats, and whether its end carries the findings.
struct Head {
    id: String,
    model: String,
    created: u64,
    findings: bool,
}

/// The findings of a reply as `xrayglm findings` writes a report's line (without its id), read
/// with the embedded rules of its language (Chinese when it has a CJK character).
fn findings(text: &str) -> Value {
    use crate::eval::findings::{files::label_line, Labeler};
    use crate::eval::metrics::Lang;
    static LABELERS: std::sync::OnceLock<[Labeler; 2]> = std::sync::OnceLock::new();
    let [zh, en] =
        LABELERS.get_or_init(|| [Labeler::builtin(Lang::Zh), Labeler::builtin(Lang::En)]);
    let cjk = text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
    let mut v = label_line("", &(if cjk { zh } else { en }).label(text), true);
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
    }
    v
}

/// The whole reply as one `chat.completion` object.
async fn whole(mut rx: EventReceiver, h: Head) -> ApiResult {
    loop {
        match rx.recv().await {
            Some(Event::Done(f)) => {
                let mut v = json!({
                    "id": h.id, "object": "chat.completion", "created": h.created, "model": h.model,
                    "choices": [{"index": 0, "finish_reason": f.finish.as_str(), "logprobs": null,
                                 "message": {"role": "assistant", "content": f.text}}],
                    "usage": usage(&f),
                });
                if h.findings {
                    v["findings"] = findings(&f.text);
                }
                return Ok(axum::Json(v).into_response());
            }
            Some(Event::Failed { status, message }) => return Err(ApiError::new(status, message)),
            Some(Event::Started { .. } | Event::Delta(_)) => {}
            None => return Err(ApiError::new(500, "the engine stopped")),
        }
    }
}

/// The reply as server-sent `chat.completion.chunk` events: the role, each piece of text, the
/// finish reason (with the findings when asked for; and, asked for, the usage), then `[DONE]`; a
/// failure mid-stream is an error event.
fn streamed(rx: EventReceiver, h: Head, include_usage: bool) -> axum::response::Response {
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": h.id, "object": "chat.completion.chunk", "created": h.created, "model": h.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let with_findings = h.findings;
    let first = sse(&chunk(json!({"role": "assistant", "content": ""}), None));
    let body = futures_util::stream::unfold(
        (Some(rx), Some(first), chunk),
        move |(rx, pending, chunk)| async move {
            if let Some(b) = pending {
                return Some((Ok::<Bytes, std::convert::Infallible>(b), (rx, None, chunk)));
            }
            let mut rx = rx?;
            loop {
                let out = match rx.recv().await {
                    Some(Event::Delta(d)) => sse(&chunk(json!({"content": d}), None)),
                    Some(Event::Done(f)) => {
                        let mut last = chunk(json!({}), Some(f.finish.as_str()));
                        // The usage chunk: the last one's head, no choices.
                        let usage_chunk = include_usage.then(|| {
                            let mut u = last.clone();
                            u["choices"] = json!([]);
                            u["usage"] = usage(&f);
                            u
                        });
                        if with_findings {
                            last["findings"] = findings(&f.text);
                        }
                        let mut b = sse(&last).to_vec();
                        if let Some(u) = usage_chunk {
                            b.extend_from_slice(&sse(&u));
                        }
                        b.extend_from_slice(b"data: [DONE]\n\n");
                        return Some((Ok(Bytes::from(b)), (None, None, chunk)));
                    }
                    Some(Event::Failed { status, message }) => {
                        let e = ApiError::new(status, message);
                        let v = json!({"error": {"message": e.message, "type": e.kind(), "code": null, "param": null}});
                        return Some((Ok(sse(&v)), (None, None, chunk)));
                    }
                    Some(Event::Started { .. }) => continue,
                    None => return None,
                };
                return Some((Ok(out), (Some(rx), None, chunk)));
            }
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn usage(f: &Finished) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
           "total_tokens": f.prompt_tokens + f.completion_tokens})
}

/// One server-sent event: `data: {json}` and a blank line.
fn sse(v: &Value) -> Bytes {
    let mut b = b"data: ".to_vec();
    b.extend(serde_json::to_vec(v).unwrap_or_default());
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_the_standard_alphabet_with_and_without_padding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(base64_decode("a*b").is_none());
        for n in 0..8 {
            let b: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(97)).collect();
            assert_eq!(base64_decode(&base64_encode(&b)).unwrap(), b);
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
    }

    fn msgs(v: Value) -> Vec<Message> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn messages_map_to_the_chat_history() {
        let c = conversation(&msgs(json!([
            {"role": "system", "content": "你是放射科医生。"},
            {"role": "user", "content": [{"type": "text", "text": "描述"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
            {"role": "assistant", "content": "心脏正常。"},
            {"role": "user", "content": "有积液吗？"}
        ])))
        .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(c.system, "你是放射科医生。");
        assert_eq!(
            c.history,
            vec![Turn {
                query: "描述".into(),
                response: "心脏正常。".into()
            }]
        );
        assert_eq!(c.query, "有积液吗？");
        assert_eq!(c.images, vec!["data:image/png;base64,AA==".to_string()]);
        for bad in [
            json!([{"role": "assistant", "content": "x"}]),
            json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
            json!([{"role": "user", "content": [{"type": "input_audio"}]}]),
            json!([{"role": "tool", "content": "x"}]),
            json!([{"role": "user", "content": null}]),
            json!([{"role": "user"}]),
            json!([{"role": "system", "content": null}, {"role": "user", "content": "x"}]),
        ] {
            assert!(conversation(&msgs(bad)).is_err());
        }
    }

    fn request(extra: Value) -> ChatRequest {
        let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn unimplemented_fields_are_refused_by_name_and_neutral_values_pass() {
        for (extra, field) in [
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                "tools",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (json!({"logit_bias": {"5": 10}}), "logit_bias"),
            (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
            (json!({"presence_penalty": -0.5}), "presence_penalty"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (
                json!({"audio": {"voice": "alloy", "format": "wav"}}),
                "audio",
            ),
            (
                json!({"prediction": {"type": "content", "content": "x"}}),
                "prediction",
            ),
        ] {
            let e = unsupported(&request(extra.clone())).expect_err(&extra.to_string());
            assert_eq!(e.status, 400, "{extra}");
            assert_eq!(e.param, Some(field), "{extra}");
            assert!(e.message.contains(field), "{}", e.message);
        }
        for extra in [
            json!({}),
            json!({"response_format": {"type": "text"}}),
            json!({"response_format": null, "tools": null, "tool_choice": null}),
            json!({"tools": [], "tool_choice": "none", "logprobs": false, "top_logprobs": 0}),
            json!({"logit_bias": {}, "frequency_penalty": 0.0, "presence_penalty": 0}),
            json!({"modalities": ["text"], "user": "u", "metadata": {"a": "b"}, "store": false}),
        ] {
            assert!(unsupported(&request(extra.clone())).is_ok(), "{extra}");
        }
    }

    #[test]
    fn response_formats_are_read_or_refused_by_name() {
        let format = |v: Value| response_format(&request(json!({ "response_format": v })));
        assert_eq!(format(json!({"type": "text"})).unwrap(), None);
        assert_eq!(format(Value::Null).unwrap(), None);
        assert_eq!(
            format(json!({"type": "json_object"})).unwrap(),
            Some(ResponseFormat::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            format(json!({"type": "json_schema", "json_schema": {"name": "f", "schema": schema, "strict": true}}))
                .unwrap(),
            Some(ResponseFormat::JsonSchema(schema))
        );
        for bad in [
            json!({"type": "json_schema", "json_schema": {"name": "f"}}),
            json!({"type": "grammar"}),
            json!({"json_schema": {}}),
        ] {
            let e = format(bad.clone()).expect_err(&bad.to_string());
            assert_eq!((e.status, e.param), (400, Some("response_format")), "{bad}");
        }
    }
}
