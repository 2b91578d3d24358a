//! The seed's memory thresholds, written as a policy: proof that tiering itself can be
//! loaded as WebAssembly. Settings (all optional, GB of available memory):
//! `{"warning_gb": 2.0, "critical_gb": 1.0, "emergency_gb": 0.5}`.

wit_bindgen::generate!({ path: "../../wit", world: "admission-policy" });


use std::sync::Mutex;

static LIMITS: Mutex<[f64; 3]> = Mutex::new([2.0, 1.0, 0.5]);

struct Thresholds;

impl Guest for Thresholds {
    fn configure(settings: String) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(&settings).map_err(|e| format!("settings are not JSON: {e}"))?;
        let mut limits = LIMITS.lock().unwrap();
        for (i, key) in ["warning_gb", "critical_gb", "emergency_gb"].iter().enumerate() {
            if let Some(x) = v.get(*key) {
                limits[i] = x.as_f64().ok_or(format!("{key} must be a number"))?;
            }
        }
        if !(limits[0] > limits[1] && limits[1] > limits[2] && limits[2] >= 0.0) {
            return Err("thresholds must satisfy warning_gb > critical_gb > emergency_gb >= 0".into());
        }
        Ok(())
    }

    fn classify(mem: Memory) -> Option<Tier> {
        let gb = mem.available_bytes as f64 / (1u64 << 30) as f64;
        let [w, c, e] = *LIMITS.lock().unwrap();
        Some(if gb <= e {
            Tier::Emergency
        } else if gb <= c {
            Tier::Critical
        } else if gb <= w {
            Tier::Warning
        } else {
            Tier::Safe
        })
    }

    fn decide(_req: Request, _mem: Memory) -> Verdict {
        Verdict::Admit
    }
}

export!(Thresholds);
