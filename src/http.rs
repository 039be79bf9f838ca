//! The HTTP surface: `/` (a status page for people), `/healthz` (the scheduler loop is alive),
//! `/readyz` (store and database reachable), `/status` (JSON), `/metrics` (Prometheus text). Nothing here ever shows a secret:
//! errors shown are the store's and database's messages, scrubbed of the database URL.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use crate::sink::Database;
use crate::source::Source;
use crate::status::Status;

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct AppState {
    pub status: Arc<Status>,
    pub source: Arc<Source>,
    pub db: Arc<Database>,
    /// `/healthz` fails when the scheduler loop has shown no sign of life for this long.
    pub liveness_window: Duration,
    /// Strings that must never appear in a response (the database URL).
    pub secrets: Arc<Vec<String>>,
    /// `/readyz` fails while data freshness is degraded.
    pub fail_readiness_when_degraded: bool,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Response {
    let quiet = state.status.since_heartbeat();
    if quiet <= state.liveness_window {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stalled", "seconds_since_scheduler_heartbeat": quiet.as_secs()})),
        )
            .into_response()
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let (store, db) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, state.source.check()),
        tokio::time::timeout(PROBE_TIMEOUT, state.db.ping()),
    );
    let store = match store {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    let db = match db {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    let secrets: Vec<&str> = state.secrets.iter().map(String::as_str).collect();
    let describe = |r: &Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": crate::redact::scrub(e, &secrets)}),
    };
    let freshness = state.status.snapshot().freshness;
    let fresh_enough = !(state.fail_readiness_when_degraded && freshness == crate::status::Freshness::Degraded);
    let ready = store.is_ok() && db.is_ok() && fresh_enough;
    let body = json!({
        "ready": ready,
        "freshness": freshness,
        "checks": {"store": describe(&store), "database": describe(&db)},
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn page(State(state): State<AppState>) -> Response {
    let html = crate::page::render(&state.status.snapshot(), &state.status.samples(), chrono::Utc::now());
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    Json(state.status.snapshot()).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.status.prometheus(),
    )
        .into_response()
}
