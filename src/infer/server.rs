//! The HTTP server of `xrayglm serve` and `xrayglm web`: the OpenAI-compatible API
//! ([`super::openai`]), the web page with its own endpoints ([`super::web`]) and the operations
//! endpoints `/health`, `/ready`, `/metrics` ([`super::ops`]) on one port, all answered by one
//! [`Engine`] (continuous batching).
//!
//! HTTP is hyper on tokio, routed by axum: connections are tasks, not threads, so slow clients
//! hold no thread; the headers of each request and its body must arrive within `body_timeout_s`
//! (else the connection is closed / 408), and at most `max_connections` are open (more are
//! answered 503 at once). On SIGTERM or Ctrl-C the server stops accepting, the engine refuses
//! new requests (503) and lets the replies in flight finish for `shutdown_grace_s` (then they end
//! with an error), open connections are closed once answered, and the process exits 0.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;

use super::engine::Engine;

pub use super::http::ServerOptions;
use super::http::State;

fn router(state: Arc<State>) -> Router {
    super::web::routes()
        .merge(super::openai::routes())
        .merge(super::ops::routes())
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
