//! The requests that finished last, for the dashboard: read off the logging layer's `request`
//! spans (their fields: id, method, path, model, tier, status, tokens, latency) by a tracing
//! layer, [`RecentLayer`], that the command line installs beside the log output. Bounded;
//! nothing of a prompt is kept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The logging layer's span target and name.
const TARGET: &str = "pensieve_layers::layers::logging";
const NAME: &str = "request";

/// One finished `/v1` request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Finished {
    /// When it finished, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The request id.
    pub id: String,
    /// HTTP method and path.
    pub method: String,
    /// The path.
    pub path: String,
    /// The model that answered.
    pub model: Option<String>,
    /// The memory tier it was admitted at.
    pub tier: Option<String>,
    /// The response status.
    pub status: Option<u64>,
    /// Prompt tokens.
    pub input_tokens: Option<u64>,
    /// Generated tokens.
    pub output_tokens: Option<u64>,
    /// From the request to the end of its response body.
    pub latency_ms: Option<f64>,
}

impl Visit for Finished {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "id" => self.id = value.to_owned(),
            "path" => self.path = value.to_owned(),
            "model" => self.model = Some(value.to_owned()),
            "tier" => self.tier = Some(value.to_owned()),
            "method" => self.method = value.to_owned(),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "status" => self.status = Some(value),
            "input_tokens" => self.input_tokens = Some(value),
            "output_tokens" => self.output_tokens = Some(value),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_u64(field, value.max(0) as u64);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "latency_ms" {
            self.latency_ms = Some((value * 10.0).round() / 10.0);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// The last requests, newest last, at most `capacity`.
#[derive(Debug)]
pub struct Recent {
    capacity: AtomicUsize,
    list: Mutex<VecDeque<Finished>>,
}

impl Recent {
    /// Keeps at most `capacity` requests from now on.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        while list.len() > capacity {
            list.pop_front();
        }
    }

    fn push(&self, finished: Finished) {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.push_back(finished);
        while list.len() > capacity {
            list.pop_front();
        }
    }

    /// The requests kept, newest first.
    pub fn newest_first(&self) -> Vec<Finished> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().rev().cloned().collect()
    }
}

/// The process's list (filled by [`RecentLayer`]).
pub fn recent() -> &'static Recent {
    static RECENT: OnceLock<Recent> = OnceLock::new();
    RECENT.get_or_init(|| Recent {
        capacity: AtomicUsize::new(100),
        list: Mutex::new(VecDeque::new()),
    })
}

/// A tracing layer that adds each finished `/v1` request span to [`recent`].
pub struct RecentLayer;

impl RecentLayer {
    /// Whether a span is one the logging layer makes for a request.
    pub fn wants(metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == TARGET && metadata.name() == NAME
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RecentLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !Self::wants(attrs.metadata()) {
            return;
        }
        let mut finished = Finished::default();
        attrs.record(&mut finished);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(finished);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(finished) = span.extensions_mut().get_mut::<Finished>() {
                values.record(finished);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(mut finished) = span.extensions_mut().remove::<Finished>() else {
            return;
        };
        if !finished.path.starts_with("/v1/") {
            return;
        }
        finished.at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        recent().push(finished);
    }
}
