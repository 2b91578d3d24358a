//! Pause tenants by header. Settings: `{"header": "x-tenant", "paused": ["acme"],
//! "retry_after_secs": 60}`. A request whose header names a paused tenant gets 429.

wit_bindgen::generate!({ path: "../../wit", world: "admission-policy" });

use pensieve::policy::types::Rejection;
use std::sync::Mutex;

struct Settings {
    header: String,
    paused: Vec<String>,
    retry_after: u32,
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

struct TenantGate;

impl Guest for TenantGate {
    fn configure(settings: String) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(&settings).map_err(|e| format!("settings are not JSON: {e}"))?;
        let header = v.get("header").and_then(|h| h.as_str()).unwrap_or("x-tenant").to_ascii_lowercase();
        let paused = match v.get("paused") {
            None => Vec::new(),
            Some(p) => p
                .as_array()
                .ok_or("paused must be a list of tenant names")?
                .iter()
                .map(|t| t.as_str().map(str::to_owned).ok_or("paused must hold strings"))
                .collect::<Result<_, _>>()?,
        };
        let retry_after = v.get("retry_after_secs").and_then(|r| r.as_u64()).unwrap_or(60) as u32;
        *SETTINGS.lock().unwrap() = Some(Settings { header, paused, retry_after });
        Ok(())
    }

    fn classify(_mem: Memory) -> Option<Tier> {
        None
    }

    fn decide(req: Request, _mem: Memory) -> Verdict {
        let guard = SETTINGS.lock().unwrap();
        let Some(s) = guard.as_ref() else { return Verdict::Admit };
        let tenant = req.headers.iter().find(|(k, _)| *k == s.header).map(|(_, v)| v.as_str());
        match tenant {
            Some(t) if s.paused.iter().any(|p| p == t) => Verdict::Reject(Rejection {
                status: 429,
                error_type: "rate_limit_error".into(),
                message: format!("tenant `{t}` is paused on this server"),
                retry_after_secs: Some(s.retry_after),
            }),
            _ => Verdict::Admit,
        }
    }
}

export!(TenantGate);
