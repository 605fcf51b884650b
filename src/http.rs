//! The HTTP surface: web client, health, the device protocol over
//! WebSocket, admin API (devices, calls, tokens, revocation, policy).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State, WebSocketUpgrade};
use axum::middleware::{self, Next};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetcall_media::admin::{PolicyChangeJson, PolicyJson, StatsJson};
use fleetcall_media::SfuHandle;
use fleetcall_signaling::controller::{CallSnapshot, DeviceSnapshot};
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::revocations::Revocations;
use fleetcall_signaling::service::{unix_now, ControlPlane};
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use fleetcall_signaling::ws_device::{self, TokenCheck};
use serde_json::{json, Value};

use crate::server::Running;

mod limits;

pub use limits::{HttpLimits, LimitAcceptor};

/// Shared by every request handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub sfu: SfuHandle,
    pub control: ControlPlane,
    /// Mints tokens (admin API).
    pub tokens: AccessTokens,
    /// Checks the tokens of WebSocket clients.
    pub token_check: TokenCheck,
    /// The revocation list on disk; the controller enforces it.
    pub revocations: Arc<Mutex<Revocations>>,
    /// Origins besides the server's own that may open the device socket.
    pub allowed_origins: Arc<[String]>,
    /// `https` or `http`: the server's own origin is `<scheme>://<Host>`.
    pub scheme: &'static str,
    /// Served on `/metrics` here unless a separate metrics address is set.
    pub metrics: Option<crate::metrics::Scrape>,
    /// False before the media plane runs and once shutdown begins.
    pub ready: Arc<AtomicBool>,
    pub admin_token: Arc<str>,
    /// Held by each device socket's task while it runs: shutdown waits for
    /// the sockets to write their last frames.
    pub running: Running,
}

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/api/stats", get(stats))
        .route("/api/devices", get(devices))
        .route("/api/calls", get(calls))
        .route("/api/calls/{id}/end", post(end_call))
        .route("/api/tokens", post(create_token))
        .route("/api/devices/{id}/revoke", post(revoke))
        .route("/api/revocations", get(revocations))
        .route("/api/policy", get(get_policy).put(put_policy))
        .route("/api/audio", get(audio))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin_token));
    Router::new()
        .route("/", get(|| async { Html(include_str!("../web/index.html")) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], include_str!("../web/app.js")) }))
        .route("/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], include_str!("../web/style.css")) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
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

#[derive(Debug, serde::Deserialize)]
struct DeviceQuery {
    token: Option<String>,
    /// A guest link's tab, so a reconnecting tab keeps its guest number.
    tab: Option<String>,
}

/// The device protocol over WebSocket; the token is the identity. A page
/// from another origin is refused before the upgrade (a browser sends the
/// user's network position along, never a token it was not given).
async fn device_websocket(
    upgrade: WebSocketUpgrade,
    Query(query): Query<DeviceQuery>,
    headers: HeaderMap,
    State(state): State<AppState>,
) -> Response {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if !origin_allowed(&headers, state.scheme, &state.allowed_origins) {
        return (StatusCode::FORBIDDEN, Json(json!({ "error": "origin_not_allowed", "message": "this page's origin may not open the device socket" }))).into_response();
    }
    let credential = state.token_check.check(query.token.as_deref(), query.tab.as_deref());
    ws_device::upgrade(upgrade, credential, state.control, state.running)
}

/// No `Origin` (a device, not a browser), the server's own origin, or one
/// on the allow list.
fn origin_allowed(headers: &HeaderMap, scheme: &str, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    let own = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|host| format!("{scheme}://{host}"));
    own.is_some_and(|own| own.eq_ignore_ascii_case(origin)) || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

/// `POST /api/tokens`: an access token for a browser or another WebSocket
/// client.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// Shown to the others.
    identity: String,
    /// Room names or `prefix*`.
    #[serde(default)]
    rooms: Vec<String>,
    /// Lifetime, e.g. `8h` (default) or `30m`.
    ttl: Option<String>,
    #[serde(default)]
    subscribe_only: bool,
}

async fn create_token(State(state): State<AppState>, body: Result<Json<TokenBody>, JsonRejection>) -> Response {
    let bad = |message: String| (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response();
    let body = match body {
        Ok(Json(body)) => body,
        Err(e) => return bad(e.body_text()),
    };
    let ttl = match body.ttl.as_deref().map(humantime::parse_duration).transpose() {
        Ok(ttl) => ttl.unwrap_or(Duration::from_secs(8 * 3600)),
        Err(e) => return bad(format!("ttl: {e}")),
    };
    let rooms = match body.rooms.iter().map(|r| RoomPattern::parse(r)).collect::<Result<Vec<_>, _>>() {
        Ok(rooms) => rooms,
        Err(e) => return bad(e.to_string()),
    };
    let grant = Grant { rooms, publish: !body.subscribe_only, subscribe: true };
    let request = TokenRequest { identity: body.identity, ttl, grant, guest: false };
    // Never in the second of the identity's latest revocation, which would
    // revoke it.
    let revoked_at = state.revocations.lock().expect("revocation list lock").revoked_at(&request.identity);
    let now = revoked_at.map_or(unix_now(), |at| unix_now().max(at + 1));
    match state.tokens.mint(&request, now) {
        Ok(token) => Json(json!({
            "token": token,
            "identity": request.identity,
            "rooms": body.rooms,
            "publish": request.grant.publish,
            "expires_at": now + ttl.as_secs(),
        }))
        .into_response(),
        Err(e) => bad(e.to_string()),
    }
}

/// `POST /api/devices/{id}/revoke`: every credential of `id` issued until
/// now is refused from now on, and its live connections close.
async fn revoke(Path(id): Path<String>, State(state): State<AppState>) -> Response {
    if id.is_empty() || id.len() > fleetcall_signaling::ids::MAX_DEVICE_ID {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "not an identity" }))).into_response();
    }
    // Persisted before it is enforced, so a crash never forgets a revocation.
    let list = state.revocations.clone();
    let subject = id.clone();
    let saved = tokio::task::spawn_blocking(move || list.lock().expect("revocation list lock").revoke(&subject, unix_now())).await;
    let at = match saved {
        Ok(Ok(at)) => at,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e.to_string() }))).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e.to_string() }))).into_response(),
    };
    match state.control.revoke(id.clone(), at).await {
        Ok(sessions) => Json(json!({ "subject": id, "revoked_at": at, "sessions_ended": sessions })).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn revocations(State(state): State<AppState>) -> Response {
    let entries = state.revocations.lock().expect("revocation list lock").entries().clone();
    Json(entries).into_response()
}

async fn stats(State(state): State<AppState>) -> Response {
    match state.sfu.stats().await {
        Ok(stats) => Json(StatsJson(&stats)).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn get_policy(State(state): State<AppState>) -> Response {
    match state.sfu.policy().await {
        Ok(policy) => Json(PolicyJson(&policy)).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Changes the suppression policy at runtime; calls go on, tracks switch with a fade.
async fn put_policy(State(state): State<AppState>, body: Result<Json<PolicyChangeJson>, JsonRejection>) -> Response {
    let Json(PolicyChangeJson(change)) = match body {
        Ok(change) => change,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e.body_text() }))).into_response(),
    };
    match state.sfu.set_policy(change).await {
        Ok(policy) => Json(PolicyJson(&policy)).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// Audio meters of every processed track.
async fn audio(State(state): State<AppState>) -> Response {
    let meters = state.sfu.audio_meters().await;
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
        "name": c.name,
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
    fn only_the_own_origin_and_the_allow_list_open_the_socket() {
        let allowed = vec!["https://portal.example".to_owned()];
        let mut headers = HeaderMap::new();
        assert!(origin_allowed(&headers, "http", &allowed), "no Origin: not a browser");
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(origin_allowed(&headers, "http", &allowed));
        assert!(!origin_allowed(&headers, "https", &allowed), "the scheme is part of the origin");
        headers.insert(header::ORIGIN, "https://portal.example".parse().unwrap());
        assert!(origin_allowed(&headers, "http", &allowed));
        for evil in ["http://evil.example", "null", "http://127.0.0.1:8080.evil.example"] {
            headers.insert(header::ORIGIN, evil.parse().unwrap());
            assert!(!origin_allowed(&headers, "http", &allowed), "{evil}");
        }
    }

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
