//! The MLX backend: mlx-lm through PyO3, on one dedicated thread, for one model or several.
//!
//! - [`MlxBackend`] (here): the [`Backend`] the API calls. It names the model of a request
//!   ([`Registry`]); requests reach the thread over a bounded queue whose count it keeps (429
//!   past `backend.max_queue`), and events come back over a bounded tokio channel per
//!   generation.
//! - `worker::pool`: the loop on the thread: loads models on demand, unloads them by idle time
//!   and memory, and gives each loaded model's batch a step in turn.
//! - `python`: the embedded interpreter's bridge, `PyBatcher`; the only module that touches pyo3.
//! - `protocol`: the [`Batcher`](protocol::Batcher) trait between the loop and Python, and the
//!   typed codes Python answers with.
//! - `worker`: one model's batch on the loop: continuous batching, one GIL crossing per step for the
//!   whole batch, cache clearing, cancellation, all inside a panic boundary.
//! - `outbox`: per-client buffering, so that a slow reader never stalls the batch.

pub mod loading;
mod outbox;
pub mod prefill;
mod protocol;
mod python;
mod worker;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{
    estimate, Backend, BackendError, BackendStatus, BridgeError, Chat, GenerateRequest, Generation, ModelStatus,
    PromptCacheDisk, Registry, TokenCount,
};
use crate::config::{Config, ModelSpec};
use crate::memory::{BackendMemory, Gate};
use protocol::Memory;
use python::{LoadSettings, PyLoader};
use worker::pool::{LoadRules, Loader, Pool};
use worker::{Job, Work};

/// Events buffered per generation before the backend holds them in the client's outbox.
const EVENT_BUFFER: usize = 64;

/// The MLX backend. See the [module docs](self).
pub struct MlxBackend {
    jobs: SyncSender<Work>,
    global: Arc<Global>,
    slots: Arc<Vec<Slot>>,
    registry: Registry,
    max_queue: usize,
    /// Closed when the backend thread has ended (a Mutex only to make the backend `Sync`).
    ended: Mutex<Receiver<()>>,
}

/// How long dropping the backend waits for its thread to stop (one decoding step, normally).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Dropping the backend (the server is shutting down) stops the thread: running generations
/// fail, the MLX cache is cleared, and the drop returns once the thread has ended, so that the
/// process never exits while MLX is still computing on another thread.
impl Drop for MlxBackend {
    fn drop(&mut self) {
        self.global.stopping.store(true, Ordering::SeqCst);
        // Closes the queue, which wakes an idle loop.
        drop(std::mem::replace(&mut self.jobs, sync_channel(1).0));
        let ended = self.ended.get_mut().unwrap_or_else(|e| e.into_inner());
        if !matches!(ended.recv_timeout(STOP_WAIT), Err(RecvTimeoutError::Disconnected)) {
            tracing::warn!("the backend thread did not stop in time");
        }
    }
}

impl std::fmt::Debug for MlxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlxBackend")
            .field("models", &self.registry.names())
            .finish_non_exhaustive()
    }
}

/// What the backend thread publishes for the whole process (MLX's counters are global).
#[derive(Default)]
pub(crate) struct Global {
    /// The thread runs and takes work.
    alive: AtomicBool,
    /// Set when the backend is dropped: the loop fails what runs and ends.
    stopping: AtomicBool,
    /// Requests taken but not started, every model's.
    queued: AtomicUsize,
    active_bytes: AtomicU64,
    cache_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    /// `backend.mlx_memory_limit_mb` in bytes (0: from the thresholds only).
    mlx_limit_configured: AtomicU64,
    /// The memory limit MLX has now.
    mlx_limit: AtomicU64,
}

impl BackendMemory for Global {
    fn backend_memory(&self) -> Option<(u64, u64)> {
        self.alive.load(Ordering::Relaxed).then(|| {
            (
                self.active_bytes.load(Ordering::Relaxed),
                self.cache_bytes.load(Ordering::Relaxed),
            )
        })
    }
}

pub(crate) const STATE_UNLOADED: u8 = 0;
pub(crate) const STATE_LOADING: u8 = 1;
pub(crate) const STATE_LOADED: u8 = 2;

/// One configured model: what it is, and what the thread publishes of it.
pub(crate) struct Slot {
    spec: ModelSpec,
    /// From its files' headers (read once, at start), when it has local files.
    estimate: Option<estimate::Estimate>,
    shared: Shared,
}

impl Slot {
    /// The one fit rule, at start-up and on demand alike: loaded with `available` memory, the
    /// model (weights, and the KV cache of `max_concurrent` sequences of `kv_context_tokens`)
    /// must leave more than `warning`. A model without local files to estimate from fits.
    fn fits(&self, kv_context_tokens: u64, available: u64, warning: u64) -> Result<(), estimate::NoFit> {
        let Some(estimate) = &self.estimate else {
            return Ok(());
        };
        estimate::check_fits(
            &self.spec.name,
            estimate,
            self.spec.max_concurrent as u64,
            kv_context_tokens,
            available,
            warning,
        )
    }

    /// At start-up, for a model to preload: says what it will take, and refuses it when it
    /// does not fit, unless `force` (`--force`, `backend.force_load`).
    fn check_at_start(&self, kv_context_tokens: u64, force: bool, gate: &Gate) -> Result<(), estimate::NoFit> {
        let Some(estimate) = &self.estimate else {
            return Ok(());
        };
        let snapshot = gate.snapshot().load();
        let spec = &self.spec;
        tracing::info!(
            weights_gb = estimate.weight_bytes as f64 / crate::memory::GIB,
            model = %spec.name,
            with_kv_gb = estimate.total(spec.max_concurrent as u64, kv_context_tokens) as f64 / crate::memory::GIB,
            available_gb = snapshot.available_gb(),
            "model size estimated from its headers"
        );
        match self.fits(kv_context_tokens, snapshot.available_bytes, gate.thresholds().warning) {
            Err(e) if force => {
                tracing::warn!("{e} — loading anyway: backend.force_load is set");
                Ok(())
            }
            other => other,
        }
    }
}

/// Why the backend could not start; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No Python environment with mlx and mlx-lm.
    #[error(transparent)]
    NoPython(#[from] crate::config::paths::NoPython),
    /// The bridge could not start in that environment.
    #[error("could not start the Python bridge: {0}")]
    Bridge(BridgeError),
    /// A model's files cannot be read.
    #[error("model `{model}`: {source}")]
    Estimate {
        /// Which model.
        model: String,
        /// Why.
        #[source]
        source: estimate::EstimateError,
    },
    /// A model to preload would take memory to the warning threshold (`--force` loads it).
    #[error(transparent)]
    DoesNotFit(#[from] estimate::NoFit),
    /// A model to preload failed to load.
    #[error(transparent)]
    Load(BackendError),
    /// The backend thread could not start, or died while loading.
    #[error("the backend thread could not run: {0}")]
    Thread(String),
}

/// What the thread publishes of one model and the API reads.
pub(crate) struct Shared {
    global: Arc<Global>,
    state: AtomicU8,
    active: AtomicU32,
    context_length: AtomicU32,
    kv_bytes_per_token: AtomicU64,
    /// A [`crate::backend::ToolFormat`], by code.
    tool_format: AtomicU8,
    /// The most bytes one token stands for (0: unknown).
    max_token_bytes: AtomicU32,
    max_concurrent: AtomicU32,
    prompt_cache_bytes: AtomicU64,
    prompt_cache_entries: AtomicU64,
    /// Its disk tier, as last read (kept across unloads: the tier outlives the model's load).
    disk: Mutex<Option<PromptCacheDisk>>,
    /// MLX bytes its load took.
    bytes: AtomicU64,
    last_used: Mutex<Option<Instant>>,
    generations: AtomicU64,
    loads: AtomicU64,
    unloads_idle: AtomicU64,
    unloads_memory: AtomicU64,
    load_errors: AtomicU64,
    load_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Tokens generated on it, counted at every step (the dashboard's live tokens/s).
    output_tokens: AtomicU64,
    /// Its long prompts being read now.
    prefills: Mutex<Vec<prefill::PrefillProgress>>,
    /// Speculative decoding's counters, every load's.
    speculation: Mutex<crate::backend::Speculation>,
}

impl Shared {
    fn new(global: Arc<Global>, max_concurrent: usize) -> Shared {
        Shared {
            global,
            state: AtomicU8::new(STATE_UNLOADED),
            active: AtomicU32::new(0),
            context_length: AtomicU32::new(0),
            kv_bytes_per_token: AtomicU64::new(0),
            tool_format: AtomicU8::new(0),
            max_token_bytes: AtomicU32::new(0),
            max_concurrent: AtomicU32::new(max_concurrent as u32),
            prompt_cache_bytes: AtomicU64::new(0),
            prompt_cache_entries: AtomicU64::new(0),
            disk: Mutex::new(None),
            bytes: AtomicU64::new(0),
            last_used: Mutex::new(None),
            generations: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            unloads_idle: AtomicU64::new(0),
            unloads_memory: AtomicU64::new(0),
            load_errors: AtomicU64::new(0),
            load_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            output_tokens: AtomicU64::new(0),
            prefills: Mutex::new(Vec::new()),
            speculation: Mutex::new(Default::default()),
        }
    }

    fn store_memory(&self, m: &Memory) {
        self.global.active_bytes.store(m.active, Ordering::Relaxed);
        self.global.cache_bytes.store(m.cache, Ordering::Relaxed);
        self.global.peak_bytes.store(m.peak, Ordering::Relaxed);
        self.prompt_cache_bytes.store(m.prompt_cache_bytes, Ordering::Relaxed);
        self.prompt_cache_entries
            .store(m.prompt_cache_entries, Ordering::Relaxed);
    }

    fn store_disk(&self, disk: Option<PromptCacheDisk>) {
        *self.disk.lock().unwrap_or_else(|e| e.into_inner()) = disk;
    }

    fn disk(&self) -> Option<PromptCacheDisk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bytes its disk tier has yet to write.
    fn disk_pending(&self) -> u64 {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.as_ref().map_or(0, |d| d.pending_bytes)
    }

    /// A request for it came in now.
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn last_used(&self) -> Option<Instant> {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle_for(&self) -> Option<Duration> {
        self.last_used().map(|t| t.elapsed())
    }
}

impl MlxBackend {
    /// Starts the backend thread and loads the models marked to preload (the one model of
    /// `backend.model`); returns when they are loaded, or with a message that says which model
    /// failed, why, and what to do. A queued request is admitted again by `gate` when it is
    /// about to start.
    pub fn start(config: &Config, gate: Gate) -> Result<MlxBackend, StartError> {
        let python = crate::config::paths::find_python(&config.backend.python)?;
        tracing::info!(dir = %python.dir.display(), from = python.from, "python environment");
        if python.is_running_interpreter() && !config.backend.python.as_os_str().is_empty() {
            tracing::warn!(
                python = %config.backend.python.display(),
                "backend.python is ignored: pensieve runs inside the Python it was installed into"
            );
        }
        // A quarter of what is available now: float32 weights are faster on a CPU, but not at
        // the price of the memory pensieve exists to guard.
        let available = gate.snapshot().load().available_bytes;
        let b = &config.backend;
        let settings = LoadSettings {
            blas: b.blas.clone(),
            cpu_float32_budget: if b.cpu_float32 { available / 4 } else { 0 },
            max_decode_stall_ms: b.max_decode_stall_ms,
            prompt_lookup_tokens: b.prompt_lookup_tokens,
        };
        Self::spawn(config, gate, move || {
            PyLoader::new(&python, settings).map_err(StartError::Bridge)
        })
    }

    /// Starts the thread with the loader `init` makes there (Python objects live on it).
    fn spawn<L, F>(config: &Config, gate: Gate, init: F) -> Result<MlxBackend, StartError>
    where
        L: Loader + Send,
        L::Batcher: Send,
        F: FnOnce() -> Result<L, StartError> + Send + 'static,
    {
        let b = &config.backend;
        let specs = config.model_specs();
        let registry = Registry::new(&specs, &config.default_model(), config.server.fallback);
        let (jobs, queue) = sync_channel::<Work>(b.max_queue.max(1));
        let global = Arc::new(Global::default());
        global
            .mlx_limit_configured
            .store(b.mlx_memory_limit_mb.saturating_mul(1 << 20), Ordering::Relaxed);
        let mut slots = Vec::new();
        for spec in specs {
            let estimate_of = |path: &str| match estimate::model_path(path) {
                Some(path) => estimate::estimate(&path).map_err(|source| StartError::Estimate {
                    model: spec.name.clone(),
                    source,
                }),
                None => Ok(None),
            };
            let mut estimate = estimate_of(&spec.path)?;
            if estimate.is_none() {
                tracing::info!(model = %spec.name, "no local files to estimate the model's size from before loading");
            }
            // A draft model is loaded with the model, and keeps a KV cache beside its own.
            if let (Some(e), Some((_, path))) = (estimate.as_mut(), &spec.draft) {
                if let Some(d) = estimate_of(path)? {
                    e.weight_bytes = e.weight_bytes.saturating_add(d.weight_bytes);
                    e.kv_bytes_per_token = e.kv_bytes_per_token.saturating_add(d.kv_bytes_per_token);
                }
            }
            let shared = Shared::new(global.clone(), spec.max_concurrent);
            let slot = Slot { spec, estimate, shared };
            if slot.spec.preload {
                // Before a byte of it is read.
                slot.check_at_start(b.kv_context_tokens, b.force_load, &gate)?;
            }
            slots.push(slot);
        }
        let slots = Arc::new(slots);
        let rules = LoadRules {
            kv_context_tokens: b.kv_context_tokens,
            force: b.force_load,
            default: registry.default_index(),
            sample_interval: Duration::from_millis(config.memory.sample_interval_ms),
        };
        let (ready_tx, ready_rx) = sync_channel::<Result<(), StartError>>(1);
        let (ended_tx, ended) = sync_channel::<()>(0);
        std::thread::Builder::new()
            .name("pensieve-mlx".into())
            .spawn({
                let slots = slots.clone();
                let global = global.clone();
                move || {
                    // Dropped when this thread ends, however it ends: the backend's drop waits on it.
                    let _ended = ended_tx;
                    let loader = match catch_unwind(AssertUnwindSafe(init)) {
                        Ok(Ok(loader)) => loader,
                        Ok(Err(e)) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                        Err(_) => return,
                    };
                    let mut pool = Pool::new(loader, &slots, &global, &gate, rules);
                    L::on_thread(|| {
                        match catch_unwind(AssertUnwindSafe(|| pool.preload())) {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                let _ = ready_tx.send(Err(StartError::Load(e)));
                                return;
                            }
                            Err(_) => return,
                        }
                        global.alive.store(true, Ordering::SeqCst);
                        let _ = ready_tx.send(Ok(()));
                        let run = catch_unwind(AssertUnwindSafe(|| pool.run(queue)));
                        // Whatever ended the loop, say so: requests then get 503, not a silent queue.
                        global.alive.store(false, Ordering::SeqCst);
                        if run.is_err() {
                            tracing::error!("the backend thread panicked; no model is served any more");
                        }
                    })
                }
            })
            .map_err(|e| StartError::Thread(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(MlxBackend {
                jobs,
                global,
                slots,
                registry,
                max_queue: b.max_queue.max(1),
                ended: Mutex::new(ended),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StartError::Thread("it died while loading the models".to_owned())),
        }
    }

    /// What the memory sampler reads of the backend.
    pub fn memory_reporter(&self) -> Arc<dyn BackendMemory> {
        self.global.clone()
    }

    fn enqueue(&self, work: Work) -> Result<(), BackendError> {
        // The bound is this count, not the channel: the backend thread takes work off the
        // channel at once (so that token counts are answered while the batch is full) and keeps
        // generations waiting for a slot, still counted here, until they start.
        let queued = self.global.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.global.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::QueueFull { queued });
        }
        self.jobs.try_send(work).map_err(|e| {
            let queued = self.global.queued.fetch_sub(1, Ordering::SeqCst) - 1;
            match e {
                TrySendError::Full(_) => BackendError::QueueFull { queued },
                TrySendError::Disconnected(_) => BackendError::Stopped,
            }
        })
    }

    /// The index of a model named by [`Backend::resolve`] (or by any name it answers to).
    fn index(&self, model: &str) -> Result<usize, BackendError> {
        if !self.global.alive.load(Ordering::Relaxed) {
            return Err(BackendError::NotReady);
        }
        self.registry.resolve(model)
    }

    fn model_status(&self, slot: &Slot, i: usize) -> ModelStatus {
        let s = &slot.shared;
        let state = s.state.load(Ordering::Relaxed);
        ModelStatus {
            name: slot.spec.name.clone(),
            path: slot.spec.path.clone(),
            aliases: slot.spec.aliases.clone(),
            state: match state {
                STATE_LOADED => "loaded",
                STATE_LOADING => "loading",
                _ => "unloaded",
            },
            loaded: state == STATE_LOADED,
            default: i == self.registry.default_index(),
            bytes: s.bytes.load(Ordering::Relaxed),
            estimated_bytes: slot
                .estimate
                .as_ref()
                .map(|e| e.total(slot.spec.max_concurrent as u64, 0))
                .unwrap_or(0),
            context_length: s.context_length.load(Ordering::Relaxed),
            tool_format: crate::backend::ToolFormat::from_code(s.tool_format.load(Ordering::Relaxed)),
            active_generations: s.active.load(Ordering::Relaxed),
            idle_secs: s.idle_for().map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
            keep_alive_secs: slot.spec.keep_alive_secs,
            generations: s.generations.load(Ordering::Relaxed),
            loads: s.loads.load(Ordering::Relaxed),
            unloads_idle: s.unloads_idle.load(Ordering::Relaxed),
            unloads_memory: s.unloads_memory.load(Ordering::Relaxed),
            load_errors: s.load_errors.load(Ordering::Relaxed),
            load_seconds: s.load_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            prompt_cache_disk: s.disk(),
            last_error: s.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            load_progress: (state == STATE_LOADING).then(|| loading::of(&slot.spec.name)).flatten(),
            output_tokens: s.output_tokens.load(Ordering::Relaxed),
            prefill_progress: s.prefills.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            speculation: *s.speculation.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Backend for MlxBackend {
    fn generate(&self, request: GenerateRequest) -> Result<Generation, BackendError> {
        let model = self.index(&request.model)?;
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        self.enqueue(Work::Generate(Job {
            model,
            request,
            events,
            span: Span::current(),
        }))?;
        Ok(Generation::new(rx))
    }

    fn count_tokens(&self, model: &str, chat: Chat) -> Result<TokenCount, BackendError> {
        let model = self.index(model)?;
        let (reply, rx) = oneshot::channel();
        self.enqueue(Work::Count(worker::Count {
            model,
            chat,
            reply,
            span: Span::current(),
        }))?;
        Ok(rx)
    }

    fn resolve(&self, name: &str) -> Result<String, BackendError> {
        let i = self.registry.resolve(name)?;
        Ok(self.registry.names()[i].clone())
    }

    fn context_length(&self, model: &str) -> u32 {
        match self.registry.resolve(model) {
            Ok(i) => self.slots[i].shared.context_length.load(Ordering::Relaxed),
            Err(_) => 0,
        }
    }

    fn max_token_bytes(&self, model: &str) -> u32 {
        match self.registry.resolve(model) {
            Ok(i) => self.slots[i].shared.max_token_bytes.load(Ordering::Relaxed),
            Err(_) => 0,
        }
    }

    fn is_loaded(&self, model: &str) -> bool {
        self.registry
            .resolve(model)
            .is_ok_and(|i| self.slots[i].shared.state.load(Ordering::Relaxed) == STATE_LOADED)
    }

    fn active_generations(&self) -> u32 {
        self.slots.iter().map(|s| s.shared.active.load(Ordering::Relaxed)).sum()
    }

    fn status(&self) -> BackendStatus {
        let g = &self.global;
        let models: Vec<ModelStatus> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| self.model_status(slot, i))
            .collect();
        let default = &self.slots[self.registry.default_index()].shared;
        BackendStatus {
            model: self.registry.names()[self.registry.default_index()].clone(),
            ready: g.alive.load(Ordering::Relaxed),
            active_generations: models.iter().map(|m| m.active_generations).sum(),
            queued: g.queued.load(Ordering::Relaxed) as u32,
            active_bytes: g.active_bytes.load(Ordering::Relaxed),
            cache_bytes: g.cache_bytes.load(Ordering::Relaxed),
            peak_bytes: g.peak_bytes.load(Ordering::Relaxed),
            prompt_cache_bytes: self
                .slots
                .iter()
                .map(|s| s.shared.prompt_cache_bytes.load(Ordering::Relaxed))
                .sum(),
            prompt_cache_entries: self
                .slots
                .iter()
                .map(|s| s.shared.prompt_cache_entries.load(Ordering::Relaxed))
                .sum(),
            prompt_cache_disk: PromptCacheDisk::total(models.iter().filter_map(|m| m.prompt_cache_disk.as_ref())),
            kv_bytes_per_token: default.kv_bytes_per_token.load(Ordering::Relaxed),
            mlx_memory_limit_bytes: g.mlx_limit.load(Ordering::Relaxed),
            models,
        }
    }
}
