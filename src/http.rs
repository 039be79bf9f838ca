//! The HTTP surface: `/` (a status page for people), `/healthz` (the scheduler loop is alive),
//! `/readyz` (store and database reachable, as checked in the background every
//! [`READINESS_INTERVAL`]), `/status` (JSON), `/metrics` (Prometheus text). Nothing here ever shows a secret:
//! errors shown are the store's and database's messages, scrubbed of the database URL.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use crate::metrics::Exposition;
use crate::sink::Database;
use crate::source::Source;
use crate::status::Status;

/// How long a readiness check waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the readiness checks run (one LIST and one query each time), however many probes
/// come: `/readyz` answers from the latest result.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(5);

/// The latest readiness checks, run in the background ([`Readiness::run`]).
#[derive(Default)]
pub struct Readiness {
    latest: std::sync::Mutex<Option<Checked>>,
}

#[derive(Clone)]
struct Checked {
    store: Result<(), String>,
    database: Result<(), String>,
    at: chrono::DateTime<chrono::Utc>,
}

impl Readiness {
    /// Checks the store and the database every [`READINESS_INTERVAL`] until `stop`.
    pub async fn run(&self, source: &Source, db: &Database, stop: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(READINESS_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let (store, database) = tokio::join!(
                tokio::time::timeout(PROBE_TIMEOUT, source.check()),
                tokio::time::timeout(PROBE_TIMEOUT, db.ping()),
            );
            let checked = Checked {
                store: match store {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                },
                database: match database {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                },
                at: chrono::Utc::now(),
            };
            *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(checked);
        }
    }

    fn latest(&self) -> Option<Checked> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone)]
pub struct AppState {
    pub status: Arc<Status>,
    pub readiness: Arc<Readiness>,
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
    let secrets: Vec<&str> = state.secrets.iter().map(String::as_str).collect();
    let describe = |r: &Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": crate::redact::scrub(e, &secrets)}),
    };
    let freshness = state.status.snapshot().freshness;
    let fresh_enough = !(state.fail_readiness_when_degraded && freshness == crate::status::Freshness::Degraded);
    let (ready, checks) = match state.readiness.latest() {
        Some(c) => (
            c.store.is_ok() && c.database.is_ok() && fresh_enough,
            json!({"store": describe(&c.store), "database": describe(&c.database), "checked_at": c.at}),
        ),
        None => (false, json!({"pending": "the first checks have not finished yet"})),
    };
    let body = json!({"ready": ready, "freshness": freshness, "checks": checks});
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

/// Prometheus text 0.0.4, or OpenMetrics when the scraper's `Accept` asks for it.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Exposition::from_accept(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.status.prometheus(format),
    )
        .into_response()
}
