//! `GET /metrics`: Prometheus (OpenMetrics) text, with the `prometheus-client` crate.
//!
//! The layers' metrics (requests, refusals, policy errors, memory) are the layers' crate's
//! ([`pensieve_layers::metrics`]); the backend's (models, generations, prompt cache, disk
//! tier) are added to the same registry here. Counters and histograms are recorded where
//! things happen; gauges that mirror state held elsewhere (memory, the backend's queue, policy
//! errors) are set from that state when scraped, so that nothing on the request path keeps them
//! up to date.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::PromptCacheDisk;
pub use pensieve_layers::metrics::Metrics as HttpMetrics;

/// A model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// The model's name.
    pub model: String,
}

/// A model, and why it was unloaded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnloadLabels {
    /// The model's name.
    pub model: String,
    /// `idle`, `memory`, or `error` (a load that failed).
    pub reason: &'static str,
}

/// The prompt cache's disk tier, every model's summed, mirrored from the backend at each scrape.
#[derive(Default)]
struct DiskMetrics {
    entries: Gauge,
    bytes: Gauge,
    hits: Counter,
    hit_tokens: Counter,
    spills: Counter,
    spilled_bytes: Counter,
    writes: Counter,
    removed: Counter,
    read_seconds: Counter<f64, AtomicU64>,
}

impl DiskMetrics {
    fn register(&self, r: &mut Registry) {
        let name = |n: &str| format!("prompt_cache_disk_{n}");
        r.register(
            name("entries"),
            "Entries in the prompt cache's disk tier",
            self.entries.clone(),
        );
        r.register(
            name("bytes"),
            "Bytes of the prompt cache's files on disk",
            self.bytes.clone(),
        );
        r.register(
            name("hits"),
            "Prompts that started from an entry read from disk",
            self.hits.clone(),
        );
        r.register(
            name("hit_tokens"),
            "Prompt tokens read from disk",
            self.hit_tokens.clone(),
        );
        r.register(
            name("spills"),
            "Prompt cache entries moved from memory to disk instead of dropped",
            self.spills.clone(),
        );
        r.register(
            name("spilled_bytes"),
            "Bytes of the entries spilled to disk",
            self.spilled_bytes.clone(),
        );
        r.register(name("writes"), "Prompt cache files written", self.writes.clone());
        r.register(
            name("removed"),
            "Prompt cache files found corrupted, truncated or foreign, and removed",
            self.removed.clone(),
        );
        r.register(
            name("read_seconds"),
            "Time spent reading entries from disk",
            self.read_seconds.clone(),
        );
    }

    fn mirror(&self, d: &PromptCacheDisk) {
        self.entries.set(d.entries as i64);
        self.bytes.set(d.bytes as i64);
        // The backend's counters only grow: each counter catches up with its own.
        for (c, to) in [
            (&self.hits, d.hits),
            (&self.hit_tokens, d.hit_tokens),
            (&self.spills, d.spills),
            (&self.spilled_bytes, d.spilled_bytes),
            (&self.writes, d.writes),
            (&self.removed, d.removed),
        ] {
            c.inc_by(to.saturating_sub(c.get()));
        }
        if d.read_seconds > self.read_seconds.get() {
            self.read_seconds.inc_by(d.read_seconds - self.read_seconds.get());
        }
    }
}

/// Per-model metrics, mirrored from the backend's counters at each scrape.
#[derive(Default)]
struct ModelMetrics {
    loaded: Family<ModelLabel, Gauge>,
    bytes: Family<ModelLabel, Gauge>,
    loads: Family<ModelLabel, Counter>,
    unloads: Family<UnloadLabels, Counter>,
    load_seconds: Family<ModelLabel, Counter<f64, AtomicU64>>,
    generations: Family<ModelLabel, Counter>,
    drafted: Family<ModelLabel, Counter>,
    accepted: Family<ModelLabel, Counter>,
    sequence_steps: Family<ModelLabel, Counter>,
    decoded: Family<ModelLabel, Counter>,
}

/// The server's metrics: the layers' and the backend's, in one registry.
pub struct Metrics {
    http: Arc<HttpMetrics>,
    models: ModelMetrics,
    disk: DiskMetrics,
    generations_running: Gauge,
    generations_queued: Gauge,
    cache_bytes: Gauge,
    time_to_first_token: Histogram,
    tokens_per_second: Histogram,
    output_tokens: Counter,
    prompt_tokens: Counter,
    prompt_cache_hits: Counter,
    prompt_cache_hit_tokens: Counter,
    prompt_cache_bytes: Gauge,
    prompt_cache_entries: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The backend's metrics, added to the registry of the layers' `http` metrics.
    pub fn new(http: Arc<HttpMetrics>) -> Self {
        let m = Metrics {
            http,
            models: ModelMetrics::default(),
            disk: DiskMetrics::default(),
            generations_running: Gauge::default(),
            generations_queued: Gauge::default(),
            cache_bytes: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            tokens_per_second: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            output_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            prompt_cache_hits: Counter::default(),
            prompt_cache_hit_tokens: Counter::default(),
            prompt_cache_bytes: Gauge::default(),
            prompt_cache_entries: Gauge::default(),
        };
        m.http.register(|r| {
            let mm = &m.models;
            r.register("model_loaded", "1 while the model is loaded", mm.loaded.clone());
            r.register(
                "model_bytes",
                "MLX bytes the model took when it loaded",
                mm.bytes.clone(),
            );
            r.register("model_loads", "Times the model was loaded", mm.loads.clone());
            r.register(
                "model_unloads",
                "Times the model was unloaded (idle, memory) or failed to load (error)",
                mm.unloads.clone(),
            );
            r.register(
                "model_load_seconds",
                "Time spent loading the model",
                mm.load_seconds.clone(),
            );
            r.register(
                "model_generations",
                "Generations started on the model",
                mm.generations.clone(),
            );
            r.register(
                "speculative_drafted_tokens",
                "Tokens drafted from the prompt (speculative decoding); accepted / drafted is the acceptance rate",
                mm.drafted.clone(),
            );
            r.register(
                "speculative_accepted_tokens",
                "Drafted tokens the model kept",
                mm.accepted.clone(),
            );
            r.register(
                "decode_sequence_steps",
                "Decoding steps, one per generation in the batch; decode_tokens / decode_sequence_steps is tokens per step",
                mm.sequence_steps.clone(),
            );
            r.register(
                "decode_tokens",
                "Tokens the decoding steps gave",
                mm.decoded.clone(),
            );
            m.disk.register(r);
            r.register(
                "generations_running",
                "Generations running",
                m.generations_running.clone(),
            );
            r.register(
                "generations_queued",
                "Requests waiting for the model",
                m.generations_queued.clone(),
            );
            r.register(
                "backend_cache_bytes",
                "Bytes in MLX's allocator cache",
                m.cache_bytes.clone(),
            );
            r.register(
                "time_to_first_token_seconds",
                "From request to first generated piece",
                m.time_to_first_token.clone(),
            );
            r.register(
                "generation_tokens_per_second",
                "Output tokens per second of each generation",
                m.tokens_per_second.clone(),
            );
            r.register("output_tokens", "Tokens generated", m.output_tokens.clone());
            r.register(
                "prompt_tokens",
                "Prompt tokens of started generations",
                m.prompt_tokens.clone(),
            );
            r.register(
                "prompt_cache_hits",
                "Generations that started from a cached prefix",
                m.prompt_cache_hits.clone(),
            );
            r.register(
                "prompt_cache_hit_tokens",
                "Prompt tokens read from the prompt cache",
                m.prompt_cache_hit_tokens.clone(),
            );
            r.register(
                "prompt_cache_bytes",
                "Bytes of KV cache kept for later prompts",
                m.prompt_cache_bytes.clone(),
            );
            r.register(
                "prompt_cache_entries",
                "Prompts in the prompt cache",
                m.prompt_cache_entries.clone(),
            );
        });
        m
    }

    /// Counts a started generation's prompt and what of it came from the prompt cache.
    pub fn prompt(&self, input_tokens: u32, cached_tokens: u32) {
        self.prompt_tokens.inc_by(input_tokens as u64);
        if cached_tokens > 0 {
            self.prompt_cache_hits.inc();
            self.prompt_cache_hit_tokens.inc_by(cached_tokens as u64);
        }
    }

    /// Records a generation's timing: started at `start`, first piece at `first`, done now.
    pub fn generation(&self, start: Instant, first: Option<Instant>, output_tokens: u32) {
        self.output_tokens.inc_by(output_tokens as u64);
        if let Some(first) = first {
            self.time_to_first_token.observe((first - start).as_secs_f64());
            let decoding = first.elapsed().as_secs_f64();
            if output_tokens > 1 && decoding > 0.0 {
                self.tokens_per_second.observe((output_tokens - 1) as f64 / decoding);
            }
        }
    }

    /// The text for a scrape, after setting the state gauges.
    pub fn render(
        &self,
        snapshot: &crate::memory::MemorySnapshot,
        backend: &crate::backend::BackendStatus,
        policies: &[crate::policy::PolicyStatus],
    ) -> String {
        self.generations_running.set(backend.active_generations as i64);
        self.generations_queued.set(backend.queued as i64);
        self.cache_bytes.set(backend.cache_bytes as i64);
        self.prompt_cache_bytes.set(backend.prompt_cache_bytes as i64);
        self.prompt_cache_entries.set(backend.prompt_cache_entries as i64);
        self.disk.mirror(&backend.prompt_cache_disk);
        for m in &backend.models {
            let model = ModelLabel { model: m.name.clone() };
            let unload = |reason| UnloadLabels {
                model: m.name.clone(),
                reason,
            };
            let mm = &self.models;
            mm.loaded.get_or_create(&model).set(m.loaded as i64);
            mm.bytes.get_or_create(&model).set(m.bytes as i64);
            // The backend's counters only grow: each family counter catches up with its own.
            let catch_up = |c: &Counter, to: u64| {
                c.inc_by(to.saturating_sub(c.get()));
            };
            catch_up(&mm.loads.get_or_create(&model), m.loads);
            catch_up(&mm.generations.get_or_create(&model), m.generations);
            catch_up(&mm.drafted.get_or_create(&model), m.speculation.drafted_tokens);
            catch_up(&mm.accepted.get_or_create(&model), m.speculation.accepted_tokens);
            catch_up(&mm.sequence_steps.get_or_create(&model), m.speculation.sequence_steps);
            catch_up(&mm.decoded.get_or_create(&model), m.speculation.tokens);
            catch_up(&mm.unloads.get_or_create(&unload("idle")), m.unloads_idle);
            catch_up(&mm.unloads.get_or_create(&unload("memory")), m.unloads_memory);
            catch_up(&mm.unloads.get_or_create(&unload("error")), m.load_errors);
            let seconds = mm.load_seconds.get_or_create(&model);
            if m.load_seconds > seconds.get() {
                seconds.inc_by(m.load_seconds - seconds.get());
            }
        }
        for p in policies {
            self.http.policy_errors(&p.name, p.errors);
        }
        self.http.render(snapshot)
    }
}
