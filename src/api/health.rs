//! `/health`, `/health/ready`, `/health/live`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::json;

use super::AppState;
use crate::memory::Tier;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `GET /health`: always 200; the body says how things are.
pub async fn health(State(app): State<AppState>) -> Response {
    Json(health_json(&app)).into_response()
}

/// The body of `GET /health` (also in the dashboard's snapshot).
pub fn health_json(app: &AppState) -> serde_json::Value {
    let snap = app.gate.snapshot().load();
    let backend = app.backend.status();
    let thresholds = app.gate.thresholds();
    let status = if !backend.ready || !snap.tier.admits() {
        "unhealthy"
    } else if snap.tier == Tier::Warning {
        "degraded"
    } else {
        "healthy"
    };
    json!({
        "status": status,
        "service": "pensieve",
        "version": env!("CARGO_PKG_VERSION"),
        "memory": {
            "status": snap.tier.as_str(),
            "available_gb": round2(snap.available_gb()),
            "total_gb": round2(snap.total_gb()),
            "available_bytes": snap.available_bytes,
            "total_bytes": snap.total_bytes,
            "accepting_requests": snap.tier.admits(),
            "source": snap.source.as_str(),
            "pressure_some_avg10": snap.pressure_some_avg10,
            "kernel_pressure": snap.kernel_pressure.map(|k| k.as_str()),
            "thresholds_gb": {
                "warning": round2(thresholds.warning as f64 / crate::memory::GIB),
                "critical": round2(thresholds.critical as f64 / crate::memory::GIB),
                "emergency": round2(thresholds.emergency as f64 / crate::memory::GIB),
            },
        },
        "backend": backend,
        "policies": app.policies.as_ref().map(|p| p.status()).unwrap_or_default(),
    })
}

/// `GET /health/ready`: 503 while requests would be refused.
pub async fn ready(State(app): State<AppState>) -> Response {
    let snap = app.gate.snapshot().load();
    let backend_ready = app.backend.status().ready;
    if backend_ready && snap.tier.admits() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        let reason = if !backend_ready {
            "the model is not loaded".to_owned()
        } else {
            format!("memory tier {}: {:.2} GB available", snap.tier, snap.available_gb())
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response()
    }
}

/// `GET /health/live`: 200 while the process serves HTTP.
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "alive"}))
}
