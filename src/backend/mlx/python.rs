//! The Python side: starting the embedded interpreter's bridge, and [`PyBatcher`], the
//! [`Batcher`] that calls `pensieve_bridge`. The only module that touches pyo3; no Python
//! object leaves it.
//!
//! Everything that crosses is a record with named fields (below, and `NamedTuple`s in
//! `pensieve_bridge/protocol.py`), read by name, under one protocol version. When it loads the
//! bridge, the binary compares its [`schema`] with the bridge's: a bridge and a binary that
//! disagree stop start-up with a message. `pensieve_bridge/protocol.json` is the golden copy
//! both test suites read.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use serde::Serialize;

use super::protocol::{Added, Batcher, Caching, Finish, Memory, Piece, Stepped, ToolFormat, CODES};
use super::worker::pool::Loader;
use crate::backend::{BridgeError, Chat, Constraint, GenerateRequest, PromptCacheDisk};
use crate::config::paths::PythonEnv;
use crate::config::ModelSpec;

/// The protocol's version: bumped with `VERSION` in `protocol.py` whenever a code or a record
/// changes.
pub(crate) const PROTOCOL_VERSION: u32 = 3;

/// A record of the protocol: its name in `protocol.py`, and its fields in order.
trait Record {
    const NAME: &'static str;
    const FIELDS: &'static [&'static str];
}

/// Declares a record: the struct, read from Python by field name (`from python`) or written to
/// it as JSON (`to python`), and its [`Record`] names, from the same tokens.
macro_rules! record {
    ($(#[$m:meta])* from python struct $($rest:tt)*) => {
        record!(@emit FromPyObject; $(#[$m])* struct $($rest)*);
    };
    ($(#[$m:meta])* to python struct $($rest:tt)*) => {
        record!(@emit Serialize; $(#[$m])* struct $($rest)*);
    };
    (@emit $derive:ident; $(#[$m:meta])* struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, $derive)]
        struct $name {
            $($field: $ty,)*
        }
        impl Record for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

record! {
    /// How a request samples, as `Batcher.add` takes it (JSON).
    to python struct AddParams {
        max_tokens: u32,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<u32>,
        stop: Vec<String>,
        constraint: Option<Constraint>,
    }
}

record! {
    /// What `Batcher.add` did.
    from python struct AddResult {
        code: u8,
        uid: u64,
        input_tokens: u32,
        cached_tokens: u32,
        message: String,
        field: String,
    }
}

record! {
    /// One piece of a generation's output.
    from python struct Out {
        kind: u8,
        payload: String,
    }
}

record! {
    /// One generation's output from one step.
    from python struct PyStepped {
        uid: u64,
        pieces: Vec<Out>,
        finish: Option<u8>,
    }
}

record! {
    /// MLX's memory.
    from python struct MemoryCounters {
        active: u64,
        cache: u64,
        peak: u64,
    }
}

record! {
    /// The prompt cache in memory.
    from python struct CacheStats {
        bytes: u64,
        entries: u64,
    }
}

record! {
    /// The prompt cache's disk tier.
    from python struct DiskStats {
        folder: String,
        off_reason: String,
        entries: u64,
        bytes: u64,
        max_bytes: u64,
        pending_bytes: u64,
        hits: u64,
        hit_tokens: u64,
        spills: u64,
        spilled_bytes: u64,
        writes: u64,
        removed: u64,
        read_seconds: f64,
        write_seconds: f64,
    }
}

/// The protocol this binary speaks: version, codes, records (`Stepped` is `PyStepped` here).
pub(crate) fn schema() -> serde_json::Value {
    fn entry<R: Record>(records: &mut BTreeMap<&'static str, &'static [&'static str]>) {
        records.insert(R::NAME.strip_prefix("Py").unwrap_or(R::NAME), R::FIELDS);
    }
    let mut records = BTreeMap::new();
    entry::<AddParams>(&mut records);
    entry::<AddResult>(&mut records);
    entry::<Out>(&mut records);
    entry::<PyStepped>(&mut records);
    entry::<MemoryCounters>(&mut records);
    entry::<CacheStats>(&mut records);
    entry::<DiskStats>(&mut records);
    let codes: BTreeMap<&str, u8> = CODES.iter().copied().collect();
    serde_json::json!({"version": PROTOCOL_VERSION, "codes": codes, "records": records})
}

/// The bridge's `protocol.schema()` against [`schema`].
fn check_schema(python: &serde_json::Value) -> Result<(), BridgeError> {
    let ours = schema();
    if &ours == python {
        return Ok(());
    }
    Err(BridgeError::Environment(format!(
        "the Python bridge speaks another protocol than this binary (bridge: {python}; binary: {ours}): \
         install the bridge and the binary from the same pensieve"
    )))
}

impl AddParams {
    fn of(request: &GenerateRequest) -> AddParams {
        let s = &request.sampling;
        AddParams {
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            stop: request.stop_sequences.clone(),
            constraint: request.constraint.clone(),
        }
    }
}

/// Memory of prompt lookup's n-gram index per token of a generation: two dict entries keyed by
/// packed ints, 176 bytes measured with tracemalloc over 32,768 distinct tokens (the worst
/// case), counted with the KV cache so that admission sees it.
const LOOKUP_BYTES_PER_TOKEN: u64 = 192;

/// How models are loaded.
pub(crate) struct LoadSettings {
    /// `backend.blas`.
    pub blas: String,
    /// On a CPU, weights become float32 when they then take at most this (0: never).
    pub cpu_float32_budget: u64,
    /// `backend.max_decode_stall_ms`: each step's prefill while streams decode.
    pub max_decode_stall_ms: u64,
    /// `backend.prompt_lookup_tokens`: the most draft tokens a generation gets in a step.
    pub prompt_lookup_tokens: u32,
}

/// Loads models in the embedded interpreter, once it is set up with the venv's packages.
pub(crate) struct PyLoader {
    settings: LoadSettings,
}

/// The bridge's engine (model, tokenizer, template, memory) and batcher.
pub(crate) struct PyBatcher {
    engine: Py<PyAny>,
    batcher: Py<PyAny>,
    context_length: u32,
    kv_bytes_per_token: u64,
    max_token_bytes: u32,
    tool_format: ToolFormat,
}

impl PyLoader {
    /// Sets up the interpreter: the environment's packages, signals, BLAS, and a bridge that
    /// speaks this server's protocol. Inside the interpreter that runs pensieve (the wheel) the
    /// packages are importable already and signals are the console script's to set.
    pub fn new(python: &PythonEnv, settings: LoadSettings) -> Result<PyLoader, BridgeError> {
        let inside = python.is_running_interpreter();
        Python::attach(|py| {
            let v = py.version_info();
            let site_packages = python
                .dir
                .join("lib")
                .join(format!("python{}.{}", v.major, v.minor))
                .join("site-packages");
            if !inside && !site_packages.is_dir() {
                return Err(BridgeError::Environment(format!(
                    "{} does not exist: the venv was made for another Python than the one pensieve was \
                     built against ({}); rebuild with `make build`",
                    site_packages.display(),
                    pyo3::Python::version_str()
                )));
            }
            let setup = || -> PyResult<Result<(), BridgeError>> {
                // Signals belong to the server (graceful shutdown), not to Python: without this,
                // Python's handler turns the first SIGINT into a KeyboardInterrupt inside a
                // running generation, and the server never hears of it.
                if !inside {
                    let signal = py.import("signal")?;
                    signal.call_method1("signal", (signal.getattr("SIGINT")?, signal.getattr("SIG_DFL")?))?;
                    py.import("site")?
                        .call_method1("addsitedir", (site_packages.to_string_lossy().as_ref(),))?;
                }
                // One state folder, resolved here, so that server and bridge agree on it.
                let state = crate::config::paths::state_dir();
                py.import("pensieve_bridge.paths")?
                    .call_method1("configure", (state.to_string_lossy().as_ref(),))?;
                // Before anything imports MLX: an optimised BLAS must be in place first.
                let blas: String = py
                    .import("pensieve_bridge.blas")?
                    .call_method1("preload", (settings.blas.as_str(),))?
                    .extract()?;
                tracing::info!("{blas}");
                tracing::info!(allocator = crate::alloc::allocator_name(), "memory allocator");
                let schema: String = py
                    .import("json")?
                    .call_method1(
                        "dumps",
                        (py.import("pensieve_bridge.protocol")?.call_method0("schema")?,),
                    )?
                    .extract()?;
                Ok(serde_json::from_str(&schema)
                    .map_err(|e| BridgeError::Protocol(format!("the bridge's protocol schema is not JSON: {e}")))
                    .and_then(|schema| check_schema(&schema)))
            };
            setup().map_err(|e| python_error(py, &e)).and_then(|r| r)?;
            Ok(PyLoader { settings })
        })
    }
}

impl Loader for PyLoader {
    type Batcher = PyBatcher;

    fn load(&mut self, spec: &ModelSpec) -> Result<PyBatcher, BridgeError> {
        let model = spec.path.as_str();
        let mut refused_draft = None;
        let loaded = Python::attach(|py| {
            let mut setup = || -> PyResult<PyBatcher> {
                let reporter = super::loading::Reporter {
                    model: spec.name.clone(),
                };
                py.import("pensieve_bridge.progress")?
                    .call_method1("set_reporter", (Py::new(py, reporter)?,))?;
                let load_engine = |path: &str| {
                    py.import("pensieve_bridge.engine")?
                        .getattr("Engine")?
                        .call1((path, self.settings.cpu_float32_budget))
                };
                let engine = load_engine(model)?;
                let info: String = engine.call_method0("describe")?.extract()?;
                tracing::info!(model = %spec.name, %info, "model ready");
                let context_length: u32 = engine.getattr("context_length")?.extract().unwrap_or(0);
                let kv_bytes_per_token: u64 = engine.getattr("kv_bytes_per_token")?.extract().unwrap_or(0);
                let max_token_bytes: u32 = engine.getattr("max_token_bytes")?.extract().unwrap_or(0);
                let tool_format = match engine.getattr("tool_format")?.extract::<String>()?.as_str() {
                    "native" => ToolFormat::Native,
                    "generic" => ToolFormat::Generic,
                    other => {
                        return Err(pyo3::exceptions::PyValueError::new_err(format!(
                            "unknown tool format {other:?}"
                        )))
                    }
                };
                // What a generation holds per token besides the model's KV cache: prompt
                // lookup's n-gram index, and the draft model's KV cache.
                let mut kv_bytes_per_token = kv_bytes_per_token;
                if self.settings.prompt_lookup_tokens > 0 {
                    kv_bytes_per_token += LOOKUP_BYTES_PER_TOKEN;
                }
                let draft = match &spec.draft {
                    Some((name, path)) => {
                        let engine_of_draft = load_engine(path)?;
                        let draft = py
                            .import("pensieve_bridge.draft")?
                            .getattr("DraftModel")?
                            .call1((&engine_of_draft, &engine))
                            .inspect_err(|e| {
                                refused_draft = Some(format!(
                                    "models.{}.draft: `{name}` cannot draft for it: {}",
                                    spec.name,
                                    e.value(py)
                                ))
                            })?;
                        kv_bytes_per_token += draft.getattr("kv_bytes_per_token")?.extract::<u64>().unwrap_or(0);
                        tracing::info!(model = %spec.name, draft = %name, "draft model ready");
                        Some(draft)
                    }
                    None => None,
                };
                let batcher = py.import("pensieve_bridge.batch")?.getattr("open_batcher")?.call1((
                    &engine,
                    spec.max_concurrent as u32,
                    spec.prompt_cache_bytes,
                    spec.prompt_cache_dir.as_str(),
                    spec.prompt_cache_disk_bytes,
                    self.settings.max_decode_stall_ms,
                    self.settings.prompt_lookup_tokens,
                    draft,
                ))?;
                Ok(PyBatcher {
                    engine: engine.unbind(),
                    batcher: batcher.unbind(),
                    context_length,
                    kv_bytes_per_token,
                    max_token_bytes,
                    tool_format,
                })
            };
            let loaded = setup();
            loaded.map_err(|e| match refused_draft.take() {
                Some(why) => BridgeError::Draft(why),
                None => python_error(py, &e),
            })
        });
        super::loading::finish(&spec.name);
        loaded
    }

    fn on_thread<R>(f: impl FnOnce() -> R + Send) -> R
    where
        R: Send,
    {
        // Attached once for the thread's life, then detached: its Python state stays, and every
        // `Python::attach` after only takes the GIL (without this, each one made the thread's
        // state and deleted it again, at every step).
        Python::attach(|py| py.detach(f))
    }

    fn release(&mut self) -> Option<u64> {
        // Attaching runs the decrefs of the dropped batcher; `release` does the rest.
        let active = Python::attach(|py| -> PyResult<u64> {
            py.import("pensieve_bridge.engine")?.call_method0("release")?.extract()
        })
        .map_err(|e| tracing::warn!(error = %e, "releasing an unloaded model's memory failed"))
        .ok();
        // What Python and MLX freed goes back to the system now, not after jemalloc's decay.
        crate::alloc::release_freed();
        active
    }
}

impl PyBatcher {
    fn call<T>(
        &self,
        f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>, &Bound<'_, PyAny>) -> PyResult<T>,
    ) -> Result<T, BridgeError> {
        Python::attach(|py| f(py, self.engine.bind(py), self.batcher.bind(py)).map_err(|e| python_error(py, &e)))
    }
}

impl Batcher for PyBatcher {
    fn context_length(&self) -> u32 {
        self.context_length
    }

    fn kv_bytes_per_token(&self) -> u64 {
        self.kv_bytes_per_token
    }

    fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    fn max_token_bytes(&self) -> u32 {
        self.max_token_bytes
    }

    fn add(&mut self, request: &GenerateRequest, context_length: u32) -> Result<Added, BridgeError> {
        let chat = serde_json::to_string(&request.chat).expect("chat serialises");
        let params = serde_json::to_string(&AddParams::of(request)).expect("params serialise");
        let r = self.call(|_, _, b| {
            b.call_method1("add", (chat, params, context_length))?
                .extract::<AddResult>()
        })?;
        Added::decode(r.code, r.uid, r.input_tokens, r.cached_tokens, r.field, r.message)
    }

    fn step(&mut self) -> Result<Vec<Stepped>, BridgeError> {
        let raw = self.call(|_, _, b| b.call_method0("step")?.extract::<Vec<PyStepped>>())?;
        raw.into_iter()
            .map(|s| {
                Ok(Stepped {
                    uid: s.uid,
                    pieces: s
                        .pieces
                        .into_iter()
                        .map(|o| Piece::decode(o.kind, o.payload))
                        .collect::<Result<_, _>>()?,
                    finish: s.finish.map(Finish::decode).transpose()?,
                })
            })
            .collect()
    }

    fn cancel(&mut self, uids: &[u64], keep: bool) -> Result<(), BridgeError> {
        self.call(|_, _, b| b.call_method1("cancel", (uids.to_vec(), keep)).map(drop))
    }

    fn reset(&mut self) -> Result<(), BridgeError> {
        self.call(|_, _, b| b.call_method0("reset").map(drop))
    }

    fn set_caching(&mut self, caching: Caching) -> Result<(), BridgeError> {
        self.call(|_, _, b| b.call_method1("set_caching", (caching as u8,)).map(drop))
    }

    fn disk_stats(&mut self) -> Result<Option<PromptCacheDisk>, BridgeError> {
        let raw = self.call(|_, _, b| b.call_method0("disk_stats")?.extract::<Option<DiskStats>>())?;
        Ok(raw.map(|d| PromptCacheDisk {
            enabled: d.off_reason.is_empty(),
            dir: d.folder,
            off_reason: (!d.off_reason.is_empty()).then_some(d.off_reason),
            entries: d.entries,
            bytes: d.bytes,
            max_bytes: d.max_bytes,
            pending_bytes: d.pending_bytes,
            hits: d.hits,
            hit_tokens: d.hit_tokens,
            spills: d.spills,
            spilled_bytes: d.spilled_bytes,
            writes: d.writes,
            removed: d.removed,
            read_seconds: d.read_seconds,
            write_seconds: d.write_seconds,
        }))
    }

    fn speculation(&mut self) -> Result<crate::backend::Speculation, BridgeError> {
        self.call(|_, _, b| {
            let (steps, drafted_tokens, accepted_tokens, sequence_steps, tokens) =
                b.call_method0("speculation_stats")?.extract()?;
            Ok(crate::backend::Speculation {
                steps,
                drafted_tokens,
                accepted_tokens,
                sequence_steps,
                tokens,
            })
        })
    }

    fn prefill_progress(&mut self, uids: &[u64]) -> Result<Vec<Option<u32>>, BridgeError> {
        self.call(|_, _, b| {
            let done: Vec<i64> = b.call_method1("prefill_progress", (uids.to_vec(),))?.extract()?;
            Ok(done.into_iter().map(|d| u32::try_from(d).ok()).collect())
        })
    }

    fn count_tokens(&mut self, chat: &Chat) -> Result<Option<u32>, BridgeError> {
        let chat = serde_json::to_string(chat).expect("chat serialises");
        self.call(|_, _, b| {
            let n: i64 = b.call_method1("count_tokens", (chat,))?.extract()?;
            Ok(u32::try_from(n).ok())
        })
    }

    fn clear_cache(&mut self, thorough: bool) -> Result<u64, BridgeError> {
        let method = if thorough { "collect_and_clear" } else { "clear_cache" };
        self.call(|_, e, _| e.call_method0(method)?.extract())
    }

    fn memory(&mut self) -> Result<Memory, BridgeError> {
        self.call(|_, e, b| {
            let m = e.call_method0("memory")?.extract::<MemoryCounters>()?;
            let c = b.call_method0("prompt_cache_stats")?.extract::<CacheStats>()?;
            Ok(Memory {
                active: m.active,
                cache: m.cache,
                peak: m.peak,
                prompt_cache_bytes: c.bytes,
                prompt_cache_entries: c.entries,
            })
        })
    }

    fn set_memory_limit(&mut self, bytes: u64) -> Result<(), BridgeError> {
        self.call(|_, _, b| b.call_method1("set_memory_limit", (bytes,)).map(drop))
    }
}

/// A Python exception as a [`BridgeError`]: its type's name and its message (the traceback
/// goes to the log).
fn python_error(py: Python<'_>, e: &PyErr) -> BridgeError {
    let tb = e.traceback(py).and_then(|tb| tb.format().ok()).unwrap_or_default();
    if !tb.is_empty() {
        tracing::debug!(traceback = %tb, "python traceback");
    }
    let kind = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    BridgeError::Raised {
        kind,
        message: e.value(py).to_string(),
    }
}

#[cfg(test)]
mod tests;
