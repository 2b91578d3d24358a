//! The MLX backend: mlx-lm through PyO3, on one dedicated thread.
//!
//! The thread owns the embedded interpreter's `pensieve_bridge.engine.Engine`. Requests reach it
//! over a bounded queue; events go back over a bounded tokio channel per generation. Every
//! generation is wrapped in a [`GenerationGuard`] whose `Drop` closes the Python generator,
//! drops it and clears the MLX cache, so the cache is emptied on success, on a Python
//! exception, when the client goes away, on an Emergency abort and when a panic unwinds.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyIterator;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{
    Backend, BackendError, BackendStatus, Chat, Event, GenerateRequest, Generation, StopMatcher, StopReason, TokenCount,
};
use crate::config::BackendConfig;
use crate::layers::admission::refusal;
use crate::memory::{BackendMemory, SnapshotHandle, Thresholds, Tier};

/// Events buffered per generation before the backend waits for the client.
const EVENT_BUFFER: usize = 64;
/// How long the backend waits for a client that does not read before it gives up.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The MLX backend. See the [module docs](self).
pub struct MlxBackend {
    jobs: SyncSender<Work>,
    shared: Arc<Shared>,
    model: String,
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

/// Admission settings the backend re-checks when a queued request is about to start.
#[derive(Clone, Debug)]
pub struct Recheck {
    /// The published memory snapshot.
    pub snapshot: SnapshotHandle,
    /// The thresholds, for the refusal message.
    pub thresholds: Thresholds,
    /// `retry-after` of refusals.
    pub retry_after_secs: u32,
}

impl Recheck {
    /// From the `[memory]` section and the published snapshot.
    pub fn new(memory: &crate::config::MemoryConfig, snapshot: SnapshotHandle) -> Self {
        Self {
            snapshot,
            thresholds: Thresholds::from_config(memory),
            retry_after_secs: memory.retry_after_secs,
        }
    }
}

impl MlxBackend {
    /// Starts the backend thread and loads the model; returns when the model is loaded, or
    /// with a message that says which model failed, why, and what to do.
    pub fn start(config: &BackendConfig, recheck: Recheck) -> Result<MlxBackend, String> {
        let venv = resolve_venv(&config.python)?;
        // Waiting for a slow client uses the server's timer, from the backend thread.
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "MlxBackend::start must be called from within a tokio runtime".to_owned())?;
        let (jobs, queue) = sync_channel::<Work>(config.max_queue.max(1));
        let shared = Arc::new(Shared::default());
        let (ready_tx, ready_rx) = sync_channel::<Result<(), String>>(1);
        let model = config.model.clone();
        std::thread::Builder::new()
            .name("pensieve-mlx".into())
            .spawn({
                let shared = shared.clone();
                let model = model.clone();
                move || {
                    let engine = match Python::attach(|py| load_engine(py, &venv, &model, &shared)) {
                        Ok(engine) => engine,
                        Err(message) => {
                            let _ = ready_tx.send(Err(message));
                            return;
                        }
                    };
                    shared.ready.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(()));
                    let run = catch_unwind(AssertUnwindSafe(|| worker(engine, queue, &shared, &recheck, &runtime)));
                    // Whatever ended the loop, say so: requests then get 503, not a silent queue.
                    shared.ready.store(false, Ordering::SeqCst);
                    if run.is_err() {
                        tracing::error!("the backend thread panicked; the model is no longer served");
                    }
                }
            })
            .map_err(|e| format!("could not start the backend thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(MlxBackend { jobs, shared, model }),
            Ok(Err(message)) => Err(message),
            Err(_) => Err(format!("the backend thread died while loading model `{model}`")),
        }
    }

    /// What the memory sampler reads of the backend.
    pub fn memory_reporter(&self) -> Arc<dyn BackendMemory> {
        self.shared.clone()
    }

    fn enqueue(&self, work: Work) -> Result<(), BackendError> {
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
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

fn load_engine(py: Python<'_>, venv: &Path, model: &str, shared: &Shared) -> Result<Py<PyAny>, String> {
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
    let setup = || -> PyResult<Py<PyAny>> {
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
        Ok(engine.unbind())
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

fn worker(engine: Py<PyAny>, queue: Receiver<Work>, shared: &Shared, recheck: &Recheck, rt: &Handle) {
    for work in queue {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        let job = match work {
            Work::Generate(job) => job,
            Work::Count { chat, reply, span } => {
                let _enter = span.enter();
                if !reply.is_closed() {
                    let _ = reply.send(count(&engine, &chat));
                }
                continue;
            }
        };
        let _enter = job.span.enter();
        if job.events.is_closed() {
            tracing::debug!("client left while queued");
            continue;
        }
        // Memory may have fallen while the request waited.
        if let Some(err) = refusal(&recheck.snapshot.load(), &recheck.thresholds, recheck.retry_after_secs) {
            let _ = job.events.try_send(Event::Failed(BackendError::Refused {
                message: err.message,
                retry_after_secs: recheck.retry_after_secs,
            }));
            continue;
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(|| run(&engine, &job, shared, recheck, rt)));
        // The guard inside `run` has cleared the cache by now: the client hears of the end only
        // once the backend is idle again.
        shared.active.fetch_sub(1, Ordering::SeqCst);
        let last = outcome.unwrap_or_else(|_| {
            tracing::error!("generation panicked; the cache was cleared by its guard");
            Some(Event::Failed(BackendError::Generation(
                "internal error in the backend".into(),
            )))
        });
        if let Some(event) = last {
            send_blocking(rt, &job.events, event);
        }
    }
}

/// Closes the Python generator and clears the MLX cache when dropped, however the generation
/// ended (see the module docs).
struct GenerationGuard<'a> {
    generator: Option<Py<PyAny>>,
    engine: &'a Py<PyAny>,
    shared: &'a Shared,
}

impl Drop for GenerationGuard<'_> {
    fn drop(&mut self) {
        Python::attach(|py| {
            if let Some(generator) = self.generator.take() {
                if let Err(e) = generator.call_method0(py, "close") {
                    tracing::warn!(error = %e, "closing the generator raised");
                }
                // Its frame and locals are freed here, before the cache is cleared.
                drop(generator);
            }
            let engine = self.engine.bind(py);
            let left = |method: &str| engine.call_method0(method).and_then(|b| b.extract::<u64>());
            match left("clear_cache") {
                Ok(0) => {}
                // Something outlived reference counting (a cycle): collect it, then clear again.
                Ok(bytes) => {
                    tracing::debug!(bytes, "cache not empty after clearing; running the cycle collector");
                    if let Err(e) = left("collect_and_clear") {
                        tracing::error!(error = %e, "clearing the MLX cache failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "clearing the MLX cache failed"),
            }
            refresh_memory(engine, self.shared);
        });
    }
}

/// Sends an event while holding the GIL; waits for a slow client with the GIL released.
fn send(py: Python<'_>, rt: &Handle, events: &mpsc::Sender<Event>, event: Event) -> bool {
    match events.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(event)) => py.detach(|| send_blocking(rt, events, event)),
    }
}

/// Sends an event, waiting up to [`CLIENT_WRITE_TIMEOUT`] for room; `false` when the client is
/// gone or does not read.
fn send_blocking(rt: &Handle, events: &mpsc::Sender<Event>, event: Event) -> bool {
    // The timer must be made inside `block_on`, where the runtime's context is entered.
    match rt.block_on(async { tokio::time::timeout(CLIENT_WRITE_TIMEOUT, events.send(event)).await }) {
        Ok(Ok(())) => true,
        Ok(Err(_closed)) => false,
        Err(_elapsed) => {
            tracing::warn!("client stopped reading; generation abandoned");
            false
        }
    }
}

/// Runs one generation, streaming its pieces; returns the final event (`Done` or `Failed`),
/// which the caller sends after the guard has cleared the cache, or `None` when the client left.
fn run(engine: &Py<PyAny>, job: &Job, shared: &Shared, recheck: &Recheck, rt: &Handle) -> Option<Event> {
    Python::attach(|py| {
        let mut guard = GenerationGuard {
            generator: None,
            engine,
            shared,
        };
        let engine = engine.bind(py);
        let events = &job.events;
        let request = &job.request;
        let chat = serde_json::to_string(&request.chat).expect("chat serialises");
        let params = serde_json::to_string(&request.sampling).expect("sampling serialises");
        let (input_tokens, generator) = match engine
            .call_method1("prepare", (chat, params))
            .and_then(|t| t.extract::<(u32, Bound<'_, PyAny>)>())
        {
            Ok(v) => v,
            Err(e) => {
                let msg = format!(
                    "the model's chat template cannot render this conversation: {}",
                    python_error(py, &e)
                );
                return Some(Event::Failed(BackendError::InvalidRequest(msg)));
            }
        };
        guard.generator = Some(generator.clone().unbind());
        let context = shared.context_length.load(Ordering::Relaxed);
        if context > 0 && input_tokens > context {
            let msg = format!("prompt is too long: {input_tokens} tokens > {context} maximum");
            return Some(Event::Failed(BackendError::InvalidRequest(msg)));
        }
        if !send(py, rt, events, Event::Started { input_tokens }) {
            return client_gone(0);
        }
        let mut iter = match PyIterator::from_object(&generator) {
            Ok(it) => it,
            Err(e) => return Some(Event::Failed(BackendError::Generation(python_error(py, &e)))),
        };
        let mut stops = StopMatcher::new(&request.stop_sequences);
        let mut output_tokens = 0u32;
        loop {
            if events.is_closed() {
                return client_gone(output_tokens);
            }
            let snapshot = recheck.snapshot.load();
            if snapshot.tier == Tier::Emergency {
                let message = format!(
                    "generation aborted: memory tier Emergency ({:.2} GB available)",
                    snapshot.available_gb()
                );
                tracing::warn!(output_tokens, "{message}");
                let retry_after_secs = recheck.retry_after_secs;
                return Some(Event::Failed(BackendError::Refused {
                    message,
                    retry_after_secs,
                }));
            }
            let item = match iter.next() {
                None => {
                    let text = stops.finish();
                    if !text.is_empty() && !send(py, rt, events, Event::Text(text)) {
                        return client_gone(output_tokens);
                    }
                    return Some(Event::Done {
                        reason: StopReason::EndTurn,
                        stop_sequence: None,
                        output_tokens,
                    });
                }
                Some(Err(e)) => {
                    let msg = python_error(py, &e);
                    tracing::error!(error = %msg, output_tokens, "generation raised");
                    return Some(Event::Failed(BackendError::Generation(msg)));
                }
                Some(Ok(item)) => item,
            };
            let (pieces, finish): (Vec<(String, String)>, Option<String>) = match item.extract() {
                Ok(v) => v,
                Err(e) => return Some(Event::Failed(BackendError::Generation(e.to_string()))),
            };
            output_tokens += 1;
            for (kind, payload) in pieces {
                let event = match kind.as_str() {
                    "text" => {
                        let matched = stops.push(&payload);
                        if !matched.text.is_empty() && !send(py, rt, events, Event::Text(matched.text)) {
                            return client_gone(output_tokens);
                        }
                        if let Some(stop) = matched.stop {
                            let reason = StopReason::StopSequence;
                            return Some(Event::Done {
                                reason,
                                stop_sequence: Some(stop),
                                output_tokens,
                            });
                        }
                        continue;
                    }
                    "thinking" => Event::Thinking(payload),
                    "tool" => tool_use(&payload),
                    other => {
                        tracing::warn!(kind = other, "unknown piece from the bridge");
                        continue;
                    }
                };
                if !send(py, rt, events, event) {
                    return client_gone(output_tokens);
                }
            }
            if let Some(finish) = finish {
                let rest = stops.finish();
                if !rest.is_empty() && !send(py, rt, events, Event::Text(rest)) {
                    return client_gone(output_tokens);
                }
                let reason = match finish.as_str() {
                    "length" => StopReason::MaxTokens,
                    "tool_use" => StopReason::ToolUse,
                    _ => StopReason::EndTurn,
                };
                return Some(Event::Done {
                    reason,
                    stop_sequence: None,
                    output_tokens,
                });
            }
        }
    })
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

fn client_gone(output_tokens: u32) -> Option<Event> {
    tracing::info!(output_tokens, "client went away; generation stopped");
    None
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
