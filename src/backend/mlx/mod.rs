//! The MLX backend: mlx-lm through PyO3, on one dedicated thread.
//!
//! - [`MlxBackend`] (here): the [`Backend`] the API calls. Requests reach the thread over a
//!   bounded queue whose count it keeps (429 past `backend.max_queue`), and events come back
//!   over a bounded tokio channel per generation.
//! - `python`: the embedded interpreter's bridge, `PyBatcher`; the only module that touches pyo3.
//! - `protocol`: the [`Batcher`](protocol::Batcher) trait between the loop and Python, and the
//!   typed codes Python answers with.
//! - `worker`: the loop on the thread: continuous batching, one GIL crossing per step for the
//!   whole batch, cache clearing, cancellation, all inside a panic boundary.
//! - `outbox`: per-client buffering, so that a slow reader never stalls the batch.

mod outbox;
mod protocol;
mod python;
mod worker;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{Backend, BackendError, BackendStatus, Chat, GenerateRequest, Generation, TokenCount};
use crate::config::BackendConfig;
use crate::memory::{BackendMemory, Gate};
use protocol::{Batcher, Memory};
use python::{LoadSettings, PyBatcher};
use worker::{Job, Work};

/// Events buffered per generation before the backend holds them in the client's outbox.
const EVENT_BUFFER: usize = 64;

/// The MLX backend. See the [module docs](self).
pub struct MlxBackend {
    jobs: SyncSender<Work>,
    shared: Arc<Shared>,
    model: String,
    max_queue: usize,
    /// Closed when the backend thread has ended (a Mutex only to make the backend `Sync`).
    ended: std::sync::Mutex<Receiver<()>>,
}

/// How long dropping the backend waits for its thread to stop (one decoding step, normally).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Dropping the backend (the server is shutting down) stops the thread: running generations
/// fail, the MLX cache is cleared, and the drop returns once the thread has ended, so that the
/// process never exits while MLX is still computing on another thread.
impl Drop for MlxBackend {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
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
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// What the backend thread publishes and the API reads.
#[derive(Default)]
pub(crate) struct Shared {
    ready: AtomicBool,
    /// Set when the backend is dropped: the loop fails what runs and ends.
    stopping: AtomicBool,
    active: AtomicU32,
    queued: AtomicUsize,
    active_bytes: AtomicU64,
    cache_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    context_length: AtomicU32,
    kv_bytes_per_token: AtomicU64,
    /// `backend.mlx_memory_limit_mb` in bytes (0: from the thresholds only).
    mlx_limit_configured: AtomicU64,
    /// The memory limit MLX has now.
    mlx_limit: AtomicU64,
    max_concurrent: AtomicU32,
    prompt_cache_bytes: AtomicU64,
    prompt_cache_entries: AtomicU64,
}

impl Shared {
    fn store_memory(&self, m: &Memory) {
        self.active_bytes.store(m.active, Ordering::Relaxed);
        self.cache_bytes.store(m.cache, Ordering::Relaxed);
        self.peak_bytes.store(m.peak, Ordering::Relaxed);
        self.prompt_cache_bytes.store(m.prompt_cache_bytes, Ordering::Relaxed);
        self.prompt_cache_entries
            .store(m.prompt_cache_entries, Ordering::Relaxed);
    }
}

impl BackendMemory for Shared {
    fn backend_memory(&self) -> Option<(u64, u64)> {
        self.ready.load(Ordering::Relaxed).then(|| {
            (
                self.active_bytes.load(Ordering::Relaxed),
                self.cache_bytes.load(Ordering::Relaxed),
            )
        })
    }
}

impl MlxBackend {
    /// Starts the backend thread and loads the model; returns when the model is loaded, or
    /// with a message that says which model failed, why, and what to do. A queued request is
    /// admitted again by `gate` when it is about to start.
    pub fn start(config: &BackendConfig, gate: Gate) -> Result<MlxBackend, String> {
        let venv = python::resolve_venv(&config.python)?;
        let model = config.model.clone();
        // A quarter of what is available now: float32 weights are faster on a CPU, but not at
        // the price of the memory pensieve exists to guard.
        let available = gate.snapshot().load().available_bytes;
        let settings = LoadSettings {
            max_concurrent: config.max_concurrent as u32,
            prompt_cache_bytes: config.prompt_cache_mb.saturating_mul(1 << 20),
            blas: config.blas.clone(),
            cpu_float32_budget: if config.cpu_float32 { available / 4 } else { 0 },
        };
        Self::spawn(config, gate, move || PyBatcher::load(&venv, &model, &settings))
    }

    /// Starts the thread with the batcher `load` makes there (Python objects live on it).
    fn spawn<B, F>(config: &BackendConfig, gate: Gate, load: F) -> Result<MlxBackend, String>
    where
        B: Batcher,
        F: FnOnce() -> Result<B, String> + Send + 'static,
    {
        let (jobs, queue) = sync_channel::<Work>(config.max_queue.max(1));
        let shared = Arc::new(Shared::default());
        shared
            .max_concurrent
            .store(config.max_concurrent as u32, Ordering::Relaxed);
        shared
            .mlx_limit_configured
            .store(config.mlx_memory_limit_mb.saturating_mul(1 << 20), Ordering::Relaxed);
        let (ready_tx, ready_rx) = sync_channel::<Result<(), String>>(1);
        let (ended_tx, ended) = sync_channel::<()>(0);
        let model = config.model.clone();
        std::thread::Builder::new()
            .name("pensieve-mlx".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    // Dropped when this thread ends, however it ends: the backend's drop waits on it.
                    let _ended = ended_tx;
                    let batcher = match catch_unwind(AssertUnwindSafe(load)) {
                        Ok(Ok(batcher)) => batcher,
                        Ok(Err(message)) => {
                            let _ = ready_tx.send(Err(message));
                            return;
                        }
                        Err(_) => return,
                    };
                    shared.context_length.store(batcher.context_length(), Ordering::Relaxed);
                    shared
                        .kv_bytes_per_token
                        .store(batcher.kv_bytes_per_token(), Ordering::Relaxed);
                    shared.ready.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(()));
                    let run = catch_unwind(AssertUnwindSafe(|| worker::run(batcher, queue, &shared, &gate)));
                    // Whatever ended the loop, say so: requests then get 503, not a silent queue.
                    shared.ready.store(false, Ordering::SeqCst);
                    if run.is_err() {
                        tracing::error!("the backend thread panicked; the model is no longer served");
                    }
                }
            })
            .map_err(|e| format!("could not start the backend thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(MlxBackend {
                jobs,
                shared,
                model,
                max_queue: config.max_queue.max(1),
                ended: std::sync::Mutex::new(ended),
            }),
            Ok(Err(message)) => Err(message),
            Err(_) => Err(format!("the backend thread died while loading model `{model}`")),
        }
    }

    /// What the memory sampler reads of the backend.
    pub fn memory_reporter(&self) -> Arc<dyn BackendMemory> {
        self.shared.clone()
    }

    fn enqueue(&self, work: Work) -> Result<(), BackendError> {
        // The bound is this count, not the channel: the backend thread takes work off the
        // channel at once (so that token counts are answered while the batch is full) and keeps
        // generations waiting for a slot, still counted here, until they start.
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::QueueFull { queued });
        }
        self.jobs.try_send(work).map_err(|e| {
            let queued = self.shared.queued.fetch_sub(1, Ordering::SeqCst) - 1;
            match e {
                TrySendError::Full(_) => BackendError::QueueFull { queued },
                TrySendError::Disconnected(_) => BackendError::Stopped,
            }
        })
    }
}

impl Backend for MlxBackend {
    fn generate(&self, request: GenerateRequest) -> Result<Generation, BackendError> {
        if !self.shared.ready.load(Ordering::Relaxed) {
            return Err(BackendError::NotReady);
        }
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        self.enqueue(Work::Generate(Job {
            request,
            events,
            span: Span::current(),
        }))?;
        Ok(Generation { events: rx })
    }

    fn count_tokens(&self, chat: Chat) -> Result<TokenCount, BackendError> {
        if !self.shared.ready.load(Ordering::Relaxed) {
            return Err(BackendError::NotReady);
        }
        let (reply, rx) = oneshot::channel();
        self.enqueue(Work::Count {
            chat,
            reply,
            span: Span::current(),
        })?;
        Ok(rx)
    }

    fn context_length(&self) -> u32 {
        self.shared.context_length.load(Ordering::Relaxed)
    }

    fn status(&self) -> BackendStatus {
        let s = &self.shared;
        BackendStatus {
            model: self.model.clone(),
            ready: s.ready.load(Ordering::Relaxed),
            active_generations: s.active.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed) as u32,
            active_bytes: s.active_bytes.load(Ordering::Relaxed),
            cache_bytes: s.cache_bytes.load(Ordering::Relaxed),
            peak_bytes: s.peak_bytes.load(Ordering::Relaxed),
            prompt_cache_bytes: s.prompt_cache_bytes.load(Ordering::Relaxed),
            prompt_cache_entries: s.prompt_cache_entries.load(Ordering::Relaxed),
            kv_bytes_per_token: s.kv_bytes_per_token.load(Ordering::Relaxed),
            mlx_memory_limit_bytes: s.mlx_limit.load(Ordering::Relaxed),
        }
    }

    fn model(&self) -> &str {
        &self.model
    }
}
