//! The HTTP surface: web client, health, signaling socket, admin API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Query, Request, State, WebSocketUpgrade};
use axum::middleware::{self, Next};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetcall_sfu::audio::PolicyChange;
use fleetcall_signaling::controller::{CallSnapshot, DeviceSnapshot};
use fleetcall_signaling::ids::{CallId, DeviceId};
use fleetcall_signaling::pki::DeviceTokens;
use fleetcall_signaling::service::ControlPlane;
use fleetcall_signaling::ws::{self, WsContext};
use fleetcall_signaling::ws_device;
use serde_json::{json, Value};

/// Shared by every request handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub ws: WsContext,
    pub control: ControlPlane,
    pub device_tokens: DeviceTokens,
    /// Served on `/metrics` here unless a separate metrics address is set.
    pub metrics: Option<crate::metrics::Scrape>,
    /// False before the media plane runs and once shutdown begins.
    pub ready: Arc<AtomicBool>,
    pub admin_token: Arc<str>,
}

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/api/stats", get(stats))
        .route("/api/devices", get(devices))
        .route("/api/calls", get(calls))
        .route("/api/calls/{id}/end", post(end_call))
        .route("/api/policy", get(get_policy).put(put_policy))
        .route("/api/audio", get(audio))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin_token));
    Router::new()
        .route("/", get(|| async { Html(include_str!("../web/index.html")) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], include_str!("../web/app.js")) }))
        .route("/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], include_str!("../web/style.css")) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/ws", get(websocket))
        .route("/ws/device", get(device_websocket))
        .route("/metrics", get(metrics))
        .merge(admin)
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let Some(scrape) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are served on the metrics address\n").into_response();
    };
    serve_metrics(scrape).await
}

/// The text exposition, or 503 while a part of the server does not answer.
pub async fn serve_metrics(scrape: &crate::metrics::Scrape) -> Response {
    match scrape.render().await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn websocket(upgrade: WebSocketUpgrade, ConnectInfo(peer): ConnectInfo<SocketAddr>, State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    ws::upgrade(upgrade, peer, state.ws)
}

#[derive(Debug, serde::Deserialize)]
struct DeviceQuery {
    token: String,
}

/// The device protocol over WebSocket; the token is the identity.
async fn device_websocket(upgrade: WebSocketUpgrade, Query(query): Query<DeviceQuery>, State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let Some(device) = state.device_tokens.verify(&query.token).and_then(|id| DeviceId::new(id).ok()) else {
        return (StatusCode::UNAUTHORIZED, "invalid device token\n").into_response();
    };
    ws_device::upgrade(upgrade, device, state.control)
}

async fn stats(State(state): State<AppState>) -> Response {
    match state.ws.sfu.stats().await {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn get_policy(State(state): State<AppState>) -> Response {
    match state.ws.sfu.policy().await {
        Ok(policy) => Json(policy).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Changes the suppression policy at runtime; calls go on, tracks switch with a fade.
async fn put_policy(State(state): State<AppState>, body: Result<Json<PolicyChange>, JsonRejection>) -> Response {
    let Json(change) = match body {
        Ok(change) => change,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e.body_text() }))).into_response(),
    };
    match state.ws.sfu.set_policy(change).await {
        Ok(policy) => Json(policy).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Audio meters of every processed track.
async fn audio(State(state): State<AppState>) -> Response {
    let meters = state.ws.sfu.audio_meters().await;
    Json(meters.iter().map(|(track, m)| json!({
        "participant": track.publisher.0,
        "mid": track.mid.to_string(),
        "suppression": m.suppression.enabled,
        "input": { "rms_dbfs": m.input.rms_dbfs, "peak_dbfs": m.input.peak_dbfs, "noise_floor_dbfs": m.input.noise_floor_dbfs,
                   "snr_db": m.input.snr_db, "clipping_ratio": m.input.clipping_ratio() },
        "output": { "rms_dbfs": m.output.rms_dbfs, "peak_dbfs": m.output.peak_dbfs, "noise_floor_dbfs": m.output.noise_floor_dbfs,
                    "snr_db": m.output.snr_db, "clipping_ratio": m.output.clipping_ratio() },
        "speech": { "probability": m.speech.probability, "ratio": m.speech.ratio },
        "attenuation_db": m.suppression.attenuation_db,
        "packets": { "received": m.packets.received, "sent": m.packets.sent, "lost": m.packets.lost,
                     "concealed": m.packets.concealed, "fec_recovered": m.packets.fec_recovered, "decode_errors": m.packets.decode_errors },
        "processing_us_per_20ms": m.processing.micros_per_20ms(),
    })).collect::<Vec<_>>()).into_response()
}

async fn devices(State(state): State<AppState>) -> Response {
    match state.control.devices().await {
        Ok(devices) => Json(devices.iter().map(device_json).collect::<Vec<_>>()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn calls(State(state): State<AppState>) -> Response {
    match state.control.calls().await {
        Ok(calls) => Json(calls.iter().map(call_json).collect::<Vec<_>>()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn end_call(Path(id): Path<String>, State(state): State<AppState>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "call ids are numbers" }))).into_response();
    };
    match state.control.end_call(CallId(id)).await {
        Ok(true) => Json(json!({ "call": id, "ended": true })).into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, Json(json!({ "error": "no live call with that id" }))).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Every `/api` route needs `Authorization: Bearer <admin token>`.
async fn require_admin_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if authorized(request.headers(), &state.admin_token) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "admin token required\n").into_response()
    }
}

/// Seconds since `at`, for JSON (an `Instant` has no meaning outside the process).
fn age_secs(at: std::time::Instant) -> f64 {
    at.elapsed().as_secs_f64()
}

fn device_json(d: &DeviceSnapshot) -> Value {
    json!({
        "id": d.id.as_str(),
        "reachability": format!("{:?}", d.reachability).to_lowercase(),
        "last_heartbeat_secs_ago": d.last_heartbeat.map(age_secs),
        "heartbeat_rtt_ms": d.heartbeat_rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
        "call": d.call.map(|c| c.0),
        "call_phase": d.call_phase.map(|p| p.as_str_name()),
        "sessions": d.sessions.iter().map(|s| s.0).collect::<Vec<_>>(),
        "media_sessions": d.participants.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "version": d.version,
        "last_error": d.last_error,
    })
}

fn call_json(c: &CallSnapshot) -> Value {
    json!({
        "id": c.id.0,
        "kind": c.kind.as_str_name(),
        "phase": c.phase.as_str_name(),
        "end_reason": c.end_reason.map(|r| r.as_str_name()),
        "initiator": c.initiator.as_str(),
        "age_secs": age_secs(c.created_at),
        "ended_secs_ago": c.ended_at.map(age_secs),
        "members": c.members.iter().map(|(device, status, media)| json!({
            "device": device.as_str(),
            "status": status.as_str_name(),
            "media_session": media.map(|m| m.to_string()),
        })).collect::<Vec<_>>(),
    })
}

/// Checks `Authorization: Bearer <token>` in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        assert!(authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Bearer secreT".parse().unwrap());
        assert!(!authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Bearer secret2".parse().unwrap());
        assert!(!authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Basic secret".parse().unwrap());
        assert!(!authorized(&headers, "secret"));
    }
}
