//! The endpoints an operator's tools poll: `GET /health` (liveness: the process answers),
//! `GET /ready` (readiness: a request sent now would be taken — not shutting down, the engine
//! thread alive, room in the queue; else 503 with the reason) and `GET /metrics` (Prometheus
//! text format, [`super::metrics`]). None of them needs the API key: probes and scrapers carry
//! none, and they show counts, not content.

use std::sync::Arc;

use axum::extract::State as Shared;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::http::State;

pub(crate) fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn ready(Shared(st): Shared<Arc<State>>) -> Response {
    match st.engine.ready() {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": why})),
        )
            .into_response(),
    }
}

async fn metrics(Shared(st): Shared<Arc<State>>) -> Response {
    let text = st.engine.stats.metrics.render(st.engine.gauges());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
