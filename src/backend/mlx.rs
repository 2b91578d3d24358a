//! The MLX backend: mlx-lm through PyO3, on one dedicated thread.
//!
//! The thread owns the embedded interpreter's `pensieve_bridge.engine.Engine` and a
//! `pensieve_bridge.batch.Batcher` (mlx-lm's `BatchGenerator` and `LRUPromptCache`). Requests
//! reach it over a bounded queue; up to `backend.max_concurrent` generations are decoded
//! together, one GIL crossing per step for the whole batch, and events go back over a bounded
//! tokio channel per generation. The MLX cache is cleared whenever the batch becomes idle and
//! after every generation that fails or is aborted (a Python exception, a client that went
//! away, an Emergency abort, a panic in the loop).

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{
    Backend, BackendError, BackendStatus, Chat, Event, GenerateRequest, Generation, StopMatcher, StopReason, TokenCount,
};
use crate::config::BackendConfig;
use crate::memory::{BackendMemory, Gate, Tier};

/// Events buffered per generation before the backend waits for the client.
const EVENT_BUFFER: usize = 64;
/// How long the backend waits for a client that does not read before it gives up.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The MLX backend. See the [module docs](self).
pub struct MlxBackend {
    jobs: SyncSender<Work>,
    shared: Arc<Shared>,
    model: String,
    max_queue: usize,
}

impl std::fmt::Debug for MlxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlxBackend")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    ready: AtomicBool,
    active: AtomicU32,
    queued: AtomicUsize,
    active_bytes: AtomicU64,
    cache_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    context_length: AtomicU32,
    max_concurrent: AtomicU32,
    prompt_cache_bytes: AtomicU64,
    prompt_cache_entries: AtomicU64,
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

struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<Event>,
    span: Span,
}

/// What the backend thread is asked to do.
enum Work {
    Generate(Job),
    Count {
        chat: Chat,
        reply: oneshot::Sender<Result<u32, BackendError>>,
        span: Span,
    },
}

impl MlxBackend {
    /// Starts the backend thread and loads the model; returns when the model is loaded, or
    /// with a message that says which model failed, why, and what to do.
    pub fn start(config: &BackendConfig, gate: Gate) -> Result<MlxBackend, String> {
        let venv = resolve_venv(&config.python)?;
        let (jobs, queue) = sync_channel::<Work>(config.max_queue.max(1));
        let shared = Arc::new(Shared::default());
        shared
            .max_concurrent
            .store(config.max_concurrent as u32, Ordering::Relaxed);
        let cache_bytes = config.prompt_cache_mb.saturating_mul(1 << 20);
        let (ready_tx, ready_rx) = sync_channel::<Result<(), String>>(1);
        let model = config.model.clone();
        std::thread::Builder::new()
            .name("pensieve-mlx".into())
            .spawn({
                let shared = shared.clone();
                let model = model.clone();
                move || {
                    let loaded = Python::attach(|py| load_engine(py, &venv, &model, &shared, cache_bytes));
                    let (engine, batcher) = match loaded {
                        Ok(v) => v,
                        Err(message) => {
                            let _ = ready_tx.send(Err(message));
                            return;
                        }
                    };
                    shared.ready.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(()));
                    let run = catch_unwind(AssertUnwindSafe(|| worker(engine, batcher, queue, &shared, &gate)));
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
        }
    }

    fn model(&self) -> &str {
        &self.model
    }
}

/// The virtual environment: as configured (relative to the working directory), else the one
/// beside this crate's sources.
fn resolve_venv(configured: &Path) -> Result<PathBuf, String> {
    let fallback = Path::new(env!("CARGO_MANIFEST_DIR")).join(configured);
    [configured.to_owned(), fallback]
        .into_iter()
        .find(|p| p.join("lib").is_dir())
        .ok_or_else(|| {
            format!(
                "the Python environment `{}` (backend.python) was not found: run `make venv` in the \
                 pensieve checkout, or point backend.python at a venv with mlx and mlx-lm",
                configured.display()
            )
        })
}

fn load_engine(
    py: Python<'_>,
    venv: &Path,
    model: &str,
    shared: &Shared,
    prompt_cache_bytes: u64,
) -> Result<(Py<PyAny>, Py<PyAny>), String> {
    let v = py.version_info();
    let site_packages = venv
        .join("lib")
        .join(format!("python{}.{}", v.major, v.minor))
        .join("site-packages");
    if !site_packages.is_dir() {
        return Err(format!(
            "{} does not exist: the venv was made for another Python than the one pensieve was built \
             against ({}); rebuild with `make build`",
            site_packages.display(),
            pyo3::Python::version_str()
        ));
    }
    let describe = |e: PyErr| python_error(py, &e);
    let setup = || -> PyResult<(Py<PyAny>, Py<PyAny>)> {
        // Signals belong to the server (graceful shutdown), not to Python: without this,
        // Python's handler turns the first SIGINT into a KeyboardInterrupt inside a running
        // generation, and the server never hears of it.
        let signal = py.import("signal")?;
        signal.call_method1("signal", (signal.getattr("SIGINT")?, signal.getattr("SIG_DFL")?))?;
        py.import("site")?
            .call_method1("addsitedir", (site_packages.to_string_lossy().as_ref(),))?;
        let module = py.import("pensieve_bridge.engine")?;
        let engine = module.getattr("Engine")?.call1((model,))?;
        let info: String = engine.call_method0("describe")?.extract()?;
        tracing::info!(%info, "model loaded");
        let ctx: u32 = engine.getattr("context_length")?.extract().unwrap_or(0);
        shared.context_length.store(ctx, Ordering::Relaxed);
        refresh_memory(&engine, shared);
        let max_concurrent = shared.max_concurrent.load(Ordering::Relaxed);
        let batcher = py.import("pensieve_bridge.batch")?.getattr("Batcher")?.call1((
            &engine,
            max_concurrent,
            prompt_cache_bytes,
        ))?;
        Ok((engine.unbind(), batcher.unbind()))
    };
    setup().map_err(|e| {
        format!(
            "could not load model `{model}`: {}\n  backend.model must be `demo`, a local folder with \
             config.json, tokenizer and safetensors weights, or a Hugging Face id that mlx-lm can \
             download (this needs network access). The environment used was {}.",
            describe(e),
            venv.display()
        )
    })
}

fn python_error(py: Python<'_>, e: &PyErr) -> String {
    let tb = e.traceback(py).and_then(|tb| tb.format().ok()).unwrap_or_default();
    if !tb.is_empty() {
        tracing::debug!(traceback = %tb, "python traceback");
    }
    e.to_string()
}

fn refresh_memory(engine: &Bound<'_, PyAny>, shared: &Shared) {
    match engine
        .call_method0("memory")
        .and_then(|m| m.extract::<(u64, u64, u64)>())
    {
        Ok((active, cache, peak)) => {
            shared.active_bytes.store(active, Ordering::Relaxed);
            shared.cache_bytes.store(cache, Ordering::Relaxed);
            shared.peak_bytes.store(peak, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "could not read MLX memory counters"),
    }
}

/// Events a client may fall behind by before its generation is abandoned.
const MAX_HELD: usize = 4096;
/// How often an idle backend looks at memory (to release the prompt cache) and at slow clients.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Memory counters are read again after this many decoding steps.
const MEMORY_EVERY: u32 = 32;

/// Events on their way to one client: sent at once when its channel has room, held (a bounded
/// number, for a bounded time) while it has none, so that one slow reader never stalls the batch.
struct Outbox {
    events: mpsc::Sender<Event>,
    held: VecDeque<Event>,
    stalled_since: Option<Instant>,
}

/// Whether a client can still be written to.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Open,
    /// Gone, or too slow: its generation is abandoned.
    Closed,
}

impl Outbox {
    fn new(events: mpsc::Sender<Event>) -> Self {
        Outbox {
            events,
            held: VecDeque::new(),
            stalled_since: None,
        }
    }

    fn push(&mut self, event: Event) -> Flow {
        self.held.push_back(event);
        if self.held.len() > MAX_HELD {
            tracing::warn!(held = self.held.len(), "client stopped reading; generation abandoned");
            return Flow::Closed;
        }
        self.flush()
    }

    fn flush(&mut self) -> Flow {
        while let Some(event) = self.held.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => self.stalled_since = None,
                Err(mpsc::error::TrySendError::Closed(_)) => return Flow::Closed,
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.held.push_front(event);
                    let since = *self.stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > CLIENT_WRITE_TIMEOUT {
                        tracing::warn!("client stopped reading; generation abandoned");
                        return Flow::Closed;
                    }
                    return Flow::Open;
                }
            }
        }
        Flow::Open
    }

    fn is_closed(&self) -> bool {
        self.events.is_closed()
    }
}

/// One generation in the batch.
struct Running {
    span: Span,
    stops: StopMatcher,
    output_tokens: u32,
    outbox: Outbox,
}

/// How one generation's step went.
enum Step {
    Going,
    /// Ended; this is its last event. `cancel`: the bridge still runs it (a stop sequence).
    Ended {
        last: Event,
        cancel: bool,
    },
    /// The client left.
    Gone,
}

/// The backend thread's state: the running generations and the events still owed to clients.
///
/// The loop takes work while there are free slots, then runs one decoding step of the whole
/// batch. Whenever the batch becomes idle, and after any generation that fails or is aborted,
/// the MLX cache is cleared; a generation's last event is sent only after that, so a client that
/// has seen its answer end on an idle server sees `cache_bytes: 0`.
struct Worker<'a> {
    engine: Py<PyAny>,
    batcher: Py<PyAny>,
    shared: &'a Shared,
    gate: &'a Gate,
    running: HashMap<i64, Running>,
    /// Generations taken off the queue, waiting for a free slot (still counted as queued).
    waiting: VecDeque<Job>,
    /// Finished generations whose last events the client has not taken yet.
    draining: Vec<Outbox>,
    steps: u32,
    /// Whether the prompt cache keeps finished generations (memory is Safe).
    caching: bool,
}

fn worker(engine: Py<PyAny>, batcher: Py<PyAny>, queue: Receiver<Work>, shared: &Shared, gate: &Gate) {
    let max_concurrent = shared.max_concurrent.load(Ordering::Relaxed).max(1) as usize;
    let mut w = Worker {
        engine,
        batcher,
        shared,
        gate,
        running: HashMap::new(),
        waiting: VecDeque::new(),
        draining: Vec::new(),
        steps: 0,
        caching: true,
    };
    loop {
        if w.running.is_empty() && w.waiting.is_empty() {
            // Nothing to decode: wait for work, waking now and then while something needs
            // watching (held events, a prompt cache that memory pressure must release).
            let watch = !w.draining.is_empty() || w.caching && shared.prompt_cache_bytes.load(Ordering::Relaxed) > 0;
            let work = if watch {
                match queue.recv_timeout(IDLE_TICK) {
                    Ok(work) => Some(work),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match queue.recv() {
                    Ok(work) => Some(work),
                    Err(_) => break,
                }
            };
            if let Some(work) = work {
                w.take(work);
            }
        }
        while let Ok(work) = queue.try_recv() {
            w.take(work);
        }
        w.waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
            !gone
        });
        while w.running.len() < max_concurrent {
            let Some(job) = w.waiting.pop_front() else { break };
            w.start(job);
        }
        if catch_unwind(AssertUnwindSafe(|| w.turn())).is_err() {
            tracing::error!("the backend loop panicked; its generations fail and the cache is cleared");
            w.fail_all(BackendError::Generation("internal error in the backend".into()));
        }
    }
}

/// The drop guard of the batch: however the loop ends (the queue closed at shutdown, a panic
/// outside a turn), generations still running fail and the MLX cache is cleared.
impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if self.running.is_empty() {
            self.clear_cache();
        } else {
            self.fail_all(BackendError::Stopped);
        }
    }
}

impl Worker<'_> {
    /// Takes work off the queue: a token count is answered now, a generation waits for a slot.
    fn take(&mut self, work: Work) {
        match work {
            Work::Generate(job) => self.waiting.push_back(job),
            Work::Count { chat, reply, span } => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                let _enter = span.enter();
                if !reply.is_closed() {
                    let _ = reply.send(count(&self.engine, &chat));
                }
            }
        }
    }

    /// Starts a waiting generation: admission again, then into the batch.
    fn start(&mut self, job: Job) {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        let _enter = job.span.enter();
        if job.events.is_closed() {
            tracing::debug!("client left while queued");
            return;
        }
        // Memory may have fallen while the request waited.
        if let Err(refusal) = self.gate.check() {
            let _ = job.events.try_send(Event::Failed(BackendError::Memory(refusal)));
            return;
        }
        let request = &job.request;
        let chat = serde_json::to_string(&request.chat).expect("chat serialises");
        let params = serde_json::to_string(&request.sampling).expect("sampling serialises");
        let context = self.shared.context_length.load(Ordering::Relaxed);
        let added = Python::attach(|py| {
            self.batcher
                .bind(py)
                .call_method1("add", (chat, params, context))
                .and_then(|t| t.extract::<(i64, u32, u32)>())
                .map_err(|e| python_error(py, &e))
        });
        let (uid, input_tokens, cached_tokens) = match added {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("the model's chat template cannot render this conversation: {e}");
                let _ = job.events.try_send(Event::Failed(BackendError::InvalidRequest(msg)));
                return;
            }
        };
        if uid < 0 {
            let msg = format!("prompt is too long: {input_tokens} tokens > {context} maximum");
            let _ = job.events.try_send(Event::Failed(BackendError::InvalidRequest(msg)));
            return;
        }
        tracing::debug!(uid, input_tokens, cached_tokens, "generation started");
        let mut outbox = Outbox::new(job.events);
        let _ = outbox.push(Event::Started {
            input_tokens,
            cached_tokens,
        });
        drop(_enter);
        self.running.insert(
            uid,
            Running {
                span: job.span,
                stops: StopMatcher::new(&request.stop_sequences),
                output_tokens: 0,
                outbox,
            },
        );
        self.shared.active.store(self.running.len() as u32, Ordering::SeqCst);
        self.refresh();
    }

    /// Memory, slow clients, then one decoding step of the batch.
    fn turn(&mut self) {
        let snapshot = self.gate.snapshot().load();
        let safe = snapshot.tier == Tier::Safe;
        if safe != self.caching {
            // Out of Safe, the prompt cache is the first thing given back, and stays empty.
            if safe {
                tracing::info!("memory is Safe again: the prompt cache is back on");
            } else {
                tracing::info!(tier = ?snapshot.tier, "memory left Safe: releasing the prompt cache");
            }
            Python::attach(|py| {
                if let Err(e) = self.batcher.bind(py).call_method1("set_caching", (safe,)) {
                    tracing::error!(error = %python_error(py, &e), "switching the prompt cache failed");
                }
            });
            self.caching = safe;
            self.refresh();
        }
        if snapshot.tier == Tier::Emergency && !self.running.is_empty() {
            let message = format!(
                "generation aborted: memory tier Emergency ({:.2} GB available)",
                snapshot.available_gb()
            );
            tracing::warn!(generations = self.running.len(), "{message}");
            let retry_after_secs = self.gate.retry_after_secs();
            self.fail_all(BackendError::Aborted {
                message,
                retry_after_secs,
            });
            return;
        }
        self.draining
            .retain_mut(|o| o.flush() == Flow::Open && !o.held.is_empty());
        let gone: Vec<i64> = self
            .running
            .iter_mut()
            .filter_map(|(uid, r)| (r.outbox.is_closed() || r.outbox.flush() == Flow::Closed).then_some(*uid))
            .collect();
        if !gone.is_empty() {
            for uid in &gone {
                if let Some(r) = self.running.remove(uid) {
                    r.span.in_scope(|| client_gone(r.output_tokens));
                }
            }
            self.cancel(&gone);
            self.settle(Vec::new(), true);
        }
        if self.running.is_empty() {
            return;
        }
        let stepped = Python::attach(|py| {
            self.batcher
                .bind(py)
                .call_method0("step")
                .and_then(|r| r.extract::<Vec<(i64, Vec<(String, String)>, Option<String>)>>())
                .map_err(|e| python_error(py, &e))
        });
        let events = match stepped {
            Ok(events) => events,
            Err(msg) => {
                tracing::error!(error = %msg, generations = self.running.len(), "generation raised");
                self.fail_all(BackendError::Generation(msg));
                return;
            }
        };
        let before = self.running.len();
        let mut ended = Vec::new();
        let mut cancel = Vec::new();
        let mut failed = false;
        for (uid, pieces, finish) in events {
            let Some(r) = self.running.get_mut(&uid) else { continue };
            let _enter = r.span.clone().entered();
            match dispatch(r, pieces, finish.as_deref()) {
                Step::Going => continue,
                Step::Ended {
                    last,
                    cancel: still_running,
                } => {
                    failed |= matches!(last, Event::Failed(_));
                    if still_running {
                        cancel.push(uid);
                    }
                    let r = self.running.remove(&uid).expect("present");
                    ended.push((r.outbox, last));
                }
                Step::Gone => {
                    client_gone(r.output_tokens);
                    if finish.is_none() {
                        cancel.push(uid);
                    }
                    self.running.remove(&uid);
                }
            }
        }
        if !cancel.is_empty() {
            self.cancel(&cancel);
        }
        self.steps = self.steps.wrapping_add(1);
        // Anything that left the batch (ended, cut by a stop sequence, its client gone on the
        // last token) settles: the count, and the cache when the batch is now idle.
        if self.running.len() != before {
            self.settle(ended, failed || !cancel.is_empty());
        } else if self.steps % MEMORY_EVERY == 0 {
            self.refresh();
        }
    }

    /// After generations left the batch: clears the cache when the batch is idle or one of them
    /// failed or was aborted, then sends their last events.
    fn settle(&mut self, ended: Vec<(Outbox, Event)>, abnormal: bool) {
        self.shared.active.store(self.running.len() as u32, Ordering::SeqCst);
        if self.running.is_empty() || abnormal {
            self.clear_cache();
        }
        for (mut outbox, last) in ended {
            if outbox.push(last) == Flow::Open && !outbox.held.is_empty() {
                self.draining.push(outbox);
            }
        }
    }

    /// Ends every running generation with `error`, resets the batch and clears the cache.
    fn fail_all(&mut self, error: BackendError) {
        let ended: Vec<(Outbox, Event)> = self
            .running
            .drain()
            .map(|(_, r)| (r.outbox, Event::Failed(error.clone())))
            .collect();
        self.call("reset");
        self.settle(ended, true);
    }

    /// Removes generations from the batch, keeping what they computed in the prompt cache
    /// (clients that left, stop sequences).
    fn cancel(&self, uids: &[i64]) {
        Python::attach(|py| {
            if let Err(e) = self.batcher.bind(py).call_method1("cancel", (uids.to_vec(), true)) {
                tracing::error!(error = %python_error(py, &e), "cancelling generations failed; resetting the batch");
                let _ = self.batcher.bind(py).call_method0("reset");
            }
        });
    }

    fn call(&self, method: &'static str) {
        Python::attach(|py| {
            if let Err(e) = self.batcher.bind(py).call_method0(method) {
                tracing::error!(error = %python_error(py, &e), method, "backend call failed");
            }
        });
    }

    /// Clears the MLX cache (with the cycle collector when reference counting left something).
    fn clear_cache(&self) {
        Python::attach(|py| {
            let engine = self.engine.bind(py);
            let left = |method: &str| engine.call_method0(method).and_then(|b| b.extract::<u64>());
            match left("clear_cache") {
                Ok(0) => {}
                Ok(bytes) if self.running.is_empty() => {
                    tracing::debug!(bytes, "cache not empty after clearing; running the cycle collector");
                    if let Err(e) = left("collect_and_clear") {
                        tracing::error!(error = %e, "clearing the MLX cache failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "clearing the MLX cache failed"),
            }
        });
        self.refresh();
    }

    /// Reads MLX's memory counters and the prompt cache's size into the shared status.
    fn refresh(&self) {
        Python::attach(|py| {
            refresh_memory(self.engine.bind(py), self.shared);
            match self
                .batcher
                .bind(py)
                .call_method0("prompt_cache_stats")
                .and_then(|t| t.extract::<(u64, u64)>())
            {
                Ok((bytes, entries)) => {
                    self.shared.prompt_cache_bytes.store(bytes, Ordering::Relaxed);
                    self.shared.prompt_cache_entries.store(entries, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "could not read the prompt cache's size"),
            }
        });
    }
}

/// Turns one generation's pieces of one step into events for its client.
fn dispatch(r: &mut Running, pieces: Vec<(String, String)>, finish: Option<&str>) -> Step {
    r.output_tokens += 1;
    for (kind, payload) in pieces {
        let event = match kind.as_str() {
            "text" => {
                let matched = r.stops.push(&payload);
                if !matched.text.is_empty() && r.outbox.push(Event::Text(matched.text)) == Flow::Closed {
                    return Step::Gone;
                }
                if let Some(stop) = matched.stop {
                    let last = Event::Done {
                        reason: StopReason::StopSequence,
                        stop_sequence: Some(stop),
                        output_tokens: r.output_tokens,
                    };
                    return Step::Ended {
                        last,
                        cancel: finish.is_none(),
                    };
                }
                continue;
            }
            "thinking" => Event::Thinking(payload),
            "tool" => tool_use(&payload),
            "error" => {
                tracing::error!(error = %payload, output_tokens = r.output_tokens, "generation raised");
                return Step::Ended {
                    last: Event::Failed(BackendError::Generation(payload)),
                    cancel: false,
                };
            }
            other => {
                tracing::warn!(kind = other, "unknown piece from the bridge");
                continue;
            }
        };
        if r.outbox.push(event) == Flow::Closed {
            return Step::Gone;
        }
    }
    let Some(finish) = finish else { return Step::Going };
    let rest = r.stops.finish();
    if !rest.is_empty() && r.outbox.push(Event::Text(rest)) == Flow::Closed {
        return Step::Gone;
    }
    let reason = match finish {
        "length" => StopReason::MaxTokens,
        "tool_use" => StopReason::ToolUse,
        _ => StopReason::EndTurn,
    };
    Step::Ended {
        last: Event::Done {
            reason,
            stop_sequence: None,
            output_tokens: r.output_tokens,
        },
        cancel: false,
    }
}

/// A parsed call from the bridge (`{"name": ..., "arguments": {...}}`) as a `ToolUse` event.
fn tool_use(payload: &str) -> Event {
    let call: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    Event::ToolUse {
        id: format!("toolu_{}", uuid::Uuid::new_v4().simple()),
        name: call["name"].as_str().unwrap_or_default().to_owned(),
        input: match call.get("arguments") {
            Some(v @ serde_json::Value::Object(_)) => v.clone(),
            _ => serde_json::json!({}),
        },
    }
}

fn client_gone(output_tokens: u32) {
    tracing::info!(output_tokens, "client went away; generation stopped");
}

fn count(engine: &Py<PyAny>, chat: &Chat) -> Result<u32, BackendError> {
    Python::attach(|py| {
        let chat = serde_json::to_string(chat).expect("chat serialises");
        engine
            .bind(py)
            .call_method1("render", (chat,))
            .and_then(|t| t.len())
            .map(|n| n as u32)
            .map_err(|e| {
                BackendError::InvalidRequest(format!(
                    "the model's chat template cannot render this conversation: {}",
                    python_error(py, &e)
                ))
            })
    })
}
