//! The layers' metrics, in Prometheus (OpenMetrics) text, with the `prometheus-client` crate:
//! requests by route and status, refusals by tier and by policy, policy errors, memory.
//!
//! Counters are recorded where things happen (the [`MetricsLayer`](crate::layers::MetricsLayer));
//! gauges that mirror state held elsewhere (memory, policy errors) are set from that state when
//! scraped, so that nothing on the request path keeps them up to date. An application adds its
//! own metrics to the same registry with [`Metrics::register`] (the server adds its backend's).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::memory::MemorySnapshot;

/// `route` and `status` of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// One of the server's routes, or `other`.
    pub route: &'static str,
    /// HTTP status.
    pub status: u16,
}

/// One label: a tier, a policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    /// The value.
    pub name: String,
}

/// The layers' metrics, and the registry they are in (prefix `pensieve`).
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    memory_refusals: Family<NameLabel, Counter>,
    policy_refusals: Family<NameLabel, Counter>,
    policy_errors: Family<NameLabel, Gauge>,
    memory_available: Gauge<f64, AtomicU64>,
    memory_tier: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("pensieve")),
            requests: Family::default(),
            memory_refusals: Family::default(),
            policy_refusals: Family::default(),
            policy_errors: Family::default(),
            memory_available: Gauge::default(),
            memory_tier: Gauge::default(),
        };
        m.register(|r| {
            r.register("requests", "HTTP requests by route and status", m.requests.clone());
            r.register(
                "memory_refusals",
                "Requests refused for memory, by tier",
                m.memory_refusals.clone(),
            );
            r.register(
                "policy_refusals",
                "Requests refused by an admission policy",
                m.policy_refusals.clone(),
            );
            r.register(
                "policy_errors",
                "Failed policy calls and loads since the policy was loaded",
                m.policy_errors.clone(),
            );
            r.register(
                "memory_available_bytes",
                "Memory new work can still use",
                m.memory_available.clone(),
            );
            r.register(
                "memory_tier",
                "0 Safe, 1 Warning, 2 Critical, 3 Emergency",
                m.memory_tier.clone(),
            );
        });
        m
    }
}

impl Metrics {
    /// Adds metrics of the application's own to the registry.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Counts a finished request.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
    }

    /// Counts a memory refusal.
    pub fn memory_refusal(&self, tier: &str) {
        self.memory_refusals
            .get_or_create(&NameLabel { name: tier.to_owned() })
            .inc();
    }

    /// Counts a policy refusal.
    pub fn policy_refusal(&self, policy: &str) {
        self.policy_refusals
            .get_or_create(&NameLabel {
                name: policy.to_owned(),
            })
            .inc();
    }

    /// Sets a policy's error count (mirrored from the policy engine at each scrape).
    pub fn policy_errors(&self, policy: &str, errors: u64) {
        self.policy_errors
            .get_or_create(&NameLabel {
                name: policy.to_owned(),
            })
            .set(errors as i64);
    }

    /// The text for a scrape, after setting the memory gauges from `snapshot`.
    pub fn render(&self, snapshot: &MemorySnapshot) -> String {
        self.memory_available.set(snapshot.available_bytes as f64);
        self.memory_tier.set(snapshot.tier as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap_or_else(|e| e.into_inner()))
            .expect("writing to a String");
        out
    }
}

/// The route label of a path: one of the server's routes, so that label values stay few.
pub fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/messages" => "/v1/messages",
        "/v1/messages/count_tokens" => "/v1/messages/count_tokens",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/responses" => "/v1/responses",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        "/health" => "/health",
        "/health/ready" => "/health/ready",
        "/health/live" => "/health/live",
        "/metrics" => "/metrics",
        _ => "other",
    }
}
