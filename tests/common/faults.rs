//! Fault injection between the loader and its dependencies: a TCP proxy in front of
//! PostgreSQL that can refuse or cut connections, and an HTTP proxy in front of the S3 server
//! that answers with errors, resets, delays or throttles, per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy; new connections can be refused and open ones cut, at will.
pub struct TcpProxy {
    pub port: u16,
    refusing: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    pub connections: Arc<AtomicU64>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let refusing = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let (r, c) = (refusing.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                c.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    cut_rx.borrow_and_update();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {} // dropping both ends closes them
                    }
                });
            }
        });
        TcpProxy {
            port,
            refusing,
            cut,
            connections,
        }
    }

    /// While true, new connections are closed as soon as they are accepted.
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// What the S3 proxy does to a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answer with this status and an S3 error body, without asking the server.
    Status(u16),
    /// Forward, then cut the response body after some bytes (a reset mid-download).
    Reset,
    /// Wait this long, then forward.
    Delay(Duration),
    /// Forward, streaming the response body at this many bytes per second.
    Throttle(u64),
}

/// A rule: requests matching `method` (if set) and whose path contains `path_contains` get
/// `fault` with probability `rate`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: Option<&'static str>,
    pub path_contains: String,
    pub fault: Fault,
    pub rate: f64,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    rules: Arc<Mutex<Vec<Rule>>>,
    faults: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    throttled_answers: Arc<AtomicU64>,
    throttled_bytes: Arc<AtomicU64>,
}

/// An HTTP proxy in front of an S3-protocol server.
pub struct S3Proxy {
    pub endpoint: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    pub faults: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    /// Throttled requests the upstream has answered (their bodies may still be streaming):
    /// from then on, the upstream's answer (a version, a precondition) is fixed.
    pub throttled_answers: Arc<AtomicU64>,
    /// Bytes of throttled bodies sent so far: how far a slow read has come.
    pub throttled_bytes: Arc<AtomicU64>,
}

impl S3Proxy {
    pub async fn start(upstream: &str) -> S3Proxy {
        let rules = Arc::new(Mutex::new(Vec::new()));
        let state = ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder().build().unwrap(),
            rules: rules.clone(),
            faults: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
            throttled_answers: Arc::new(AtomicU64::new(0)),
            throttled_bytes: Arc::new(AtomicU64::new(0)),
        };
        let (faults, requests) = (state.faults.clone(), state.requests.clone());
        let throttled_answers = state.throttled_answers.clone();
        let throttled_bytes = state.throttled_bytes.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let app = axum::Router::new().fallback(forward).with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await });
        S3Proxy {
            endpoint,
            rules,
            faults,
            requests,
            throttled_answers,
            throttled_bytes,
        }
    }

    pub fn set_rules(&self, rules: Vec<Rule>) {
        *self.rules.lock().unwrap() = rules;
    }

    /// Every request, any path: `fault` with probability `rate`.
    pub fn everything(fault: Fault, rate: f64) -> Rule {
        Rule {
            method: None,
            path_contains: String::new(),
            fault,
            rate,
        }
    }
}

fn s3_error(status: u16) -> Response {
    let code = match status {
        503 => "SlowDown",
        500 => "InternalError",
        _ => "ServiceUnavailable",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected fault</Message><RequestId>fault</RequestId></Error>"
    );
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/xml")
        .body(Body::from(body))
        .unwrap()
}

async fn forward(State(state): State<ProxyState>, request: Request) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let method = request.method().as_str().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let fault = {
        let rules = state.rules.lock().unwrap();
        let mut rng = rand::rng();
        rules
            .iter()
            .filter(|r| r.method.is_none_or(|m| m == method) && path.contains(&r.path_contains))
            .find(|r| rng.random_bool(r.rate.clamp(0.0, 1.0)))
            .map(|r| r.fault)
    };
    if fault.is_some() {
        state.faults.fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Some(Fault::Status(code)) => return s3_error(code),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        _ => {}
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut upstream = state
        .client
        .request(parts.method.clone(), format!("{}{path}", state.upstream))
        .body(body);
    for (name, value) in parts.headers.iter() {
        if name != "host" && name != "content-length" {
            upstream = upstream.header(name, value);
        }
    }
    let response = match upstream.send().await {
        Ok(r) => r,
        Err(_) => return s3_error(502),
    };
    let status = response.status();
    let mut headers = HeaderMap::new();
    for (name, value) in response.headers() {
        if name != "transfer-encoding" && name != "connection" {
            headers.insert(name.clone(), value.clone());
        }
    }
    let stream = response.bytes_stream();
    let body = match fault {
        Some(Fault::Reset) => {
            headers.remove("content-length");
            let mut sent = 0usize;
            Body::from_stream(stream.map(move |chunk| {
                let chunk = chunk.map_err(std::io::Error::other)?;
                sent += chunk.len();
                if sent > 64 {
                    return Err(std::io::Error::other("injected reset"));
                }
                Ok(chunk)
            }))
        }
        Some(Fault::Throttle(bytes_per_second)) => {
            state.throttled_answers.fetch_add(1, Ordering::Relaxed);
            let throttled = stream.flat_map(move |chunk| {
                let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = match chunk {
                    Ok(c) => c
                        .chunks(16 * 1024)
                        .map(|p| Ok(bytes::Bytes::copy_from_slice(p)))
                        .collect(),
                    Err(e) => vec![Err(std::io::Error::other(e))],
                };
                futures_util::stream::iter(pieces)
            });
            let delay = Duration::from_secs_f64(16.0 * 1024.0 / bytes_per_second as f64);
            let counted = state.throttled_bytes.clone();
            Body::from_stream(throttled.then(move |piece| {
                let counted = counted.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(p) = &piece {
                        counted.fetch_add(p.len() as u64, Ordering::Relaxed);
                    }
                    piece
                }
            }))
        }
        _ => Body::from_stream(stream),
    };
    let mut out = Response::new(body);
    *out.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap();
    *out.headers_mut() = headers;
    out.headers_mut().insert("x-fault-proxy", HeaderValue::from_static("1"));
    out
}
