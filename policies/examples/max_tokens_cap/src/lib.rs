//! Under memory pressure, refuse requests that ask for too many tokens. Settings:
//! `{"max_tokens": 1024, "from_tier": "warning"}`: at that tier or worse, a request with a
//! larger `max_tokens` gets 400 naming the cap (the client can retry with a smaller one).

wit_bindgen::generate!({ path: "../../wit", world: "admission-policy" });

use pensieve::policy::types::Rejection;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

static CAP: AtomicU32 = AtomicU32::new(1024);
static FROM: AtomicU8 = AtomicU8::new(1);

fn rank(t: Tier) -> u8 {
    match t {
        Tier::Safe => 0,
        Tier::Warning => 1,
        Tier::Critical => 2,
        Tier::Emergency => 3,
    }
}

struct MaxTokensCap;

impl Guest for MaxTokensCap {
    fn configure(settings: String) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(&settings).map_err(|e| format!("settings are not JSON: {e}"))?;
        if let Some(m) = v.get("max_tokens") {
            let m = m.as_u64().filter(|m| *m >= 1 && *m <= u32::MAX as u64).ok_or("max_tokens must be a positive integer")?;
            CAP.store(m as u32, Ordering::Relaxed);
        }
        if let Some(t) = v.get("from_tier") {
            let r = match t.as_str() {
                Some("safe") => 0,
                Some("warning") => 1,
                Some("critical") => 2,
                Some("emergency") => 3,
                _ => return Err("from_tier must be safe, warning, critical or emergency".into()),
            };
            FROM.store(r, Ordering::Relaxed);
        }
        Ok(())
    }

    fn classify(_mem: Memory) -> Option<Tier> {
        None
    }

    fn decide(req: Request, mem: Memory) -> Verdict {
        let cap = CAP.load(Ordering::Relaxed);
        match req.max_tokens {
            Some(m) if rank(mem.tier) >= FROM.load(Ordering::Relaxed) && m > cap => Verdict::Reject(Rejection {
                status: 400,
                error_type: "invalid_request_error".into(),
                message: format!("max_tokens: at most {cap} while memory is short (asked for {m})"),
                retry_after_secs: None,
            }),
            _ => Verdict::Admit,
        }
    }
}

export!(MaxTokensCap);
