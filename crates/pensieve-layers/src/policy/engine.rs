//! Compiling, configuring and calling policies, with their bounds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{AdmissionPolicy, AdmissionPolicyPre, Memory, Request, Tier, Verdict};
use crate::config::{OnError, PoliciesConfig};

/// Milliseconds per epoch tick: the granularity of `policies.timeout_ms`.
const TICK: Duration = Duration::from_millis(1);
/// How long the ticker sleeps while no policy is loaded or loading: no 1 ms wake-ups on a
/// server without policies (they cost about 1% of a core, taken from generation).
const IDLE_TICK: Duration = Duration::from_millis(50);
/// Bytes a policy may print per instance before its output is cut.
const OUTPUT_CAP: usize = 64 * 1024;

/// A store's data: a WASI context that grants nothing, and the limits.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    logged: (usize, usize),
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct Slot {
    store: Store<HostState>,
    policy: AdmissionPolicy,
}

/// One policy file, loaded or not.
pub(crate) struct Policy {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) stamp: Option<(std::time::SystemTime, u64)>,
    pre: Option<AdmissionPolicyPre<HostState>>,
    settings: String,
    pool: Mutex<Vec<Slot>>,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What a policy did wrong (it would not load, refused its settings, trapped, ran out of time
/// or memory), in the words `/health` and `pensieve policy check` show: it names the policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyFailure(pub String);

/// Why the engine itself could not start (no policy is involved).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime could not be set up (or WASI linked).
    #[error("cannot start wasmtime: {0:#}")]
    Wasmtime(wasmtime::Error),
    /// The epoch thread that bounds calls could not start.
    #[error("cannot start the epoch thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl Policy {
    pub(crate) fn loaded(&self) -> bool {
        self.pre.is_some()
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }

    pub(crate) fn fail(&self, failure: PolicyFailure) -> PolicyFailure {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(policy = %self.name, error = %failure, "policy error");
        *self.last_error.lock().unwrap() = Some(failure.0.clone());
        failure
    }
}

/// What `/health` shows of a policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyStatus {
    /// The file's stem.
    pub name: String,
    /// Compiled and configured.
    pub loaded: bool,
    /// Failures since load (traps, timeouts, memory, refused configuration).
    pub errors: u64,
    /// The last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The outcome of the policies' `decide`.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Every policy admitted (or failed with `on_error = "admit"`).
    Admit,
    /// A policy refused; these make the response.
    Reject {
        /// The policy that refused.
        policy: String,
        /// HTTP status, 400 to 599.
        status: u16,
        /// Anthropic error type.
        error_type: String,
        /// For the client.
        message: String,
        /// `retry-after`.
        retry_after_secs: Option<u32>,
    },
}

/// The policy engine: a wasmtime engine, a linker with WASI, and the loaded policies.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<HostState>,
    config: PoliciesConfig,
    policies: ArcSwap<Vec<Arc<Policy>>>,
    stop: Arc<AtomicBool>,
    /// Loaded policies, and loads under way: while both are 0 the ticker runs at
    /// [`IDLE_TICK`], otherwise at [`TICK`].
    loaded: Arc<AtomicUsize>,
    loading: Arc<AtomicUsize>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("policies", &self.status())
            .finish()
    }
}

/// Counts a load under way until dropped.
struct Loading<'a>(&'a AtomicUsize);

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PolicyEngine {
    /// An engine with no policies loaded yet; starts the epoch ticker that bounds calls.
    pub fn new(config: &PoliciesConfig) -> Result<PolicyEngine, EngineError> {
        let mut c = Config::new();
        c.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&c).map_err(EngineError::Wasmtime)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(EngineError::Wasmtime)?;
        let stop = Arc::new(AtomicBool::new(false));
        let loaded = Arc::new(AtomicUsize::new(0));
        let loading = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("pensieve-epoch".into())
            .spawn({
                let engine = engine.weak();
                let stop = stop.clone();
                let (loaded, loading) = (loaded.clone(), loading.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        let idle = loaded.load(Ordering::Relaxed) == 0 && loading.load(Ordering::Relaxed) == 0;
                        std::thread::sleep(if idle { IDLE_TICK } else { TICK });
                        match engine.upgrade() {
                            Some(e) => e.increment_epoch(),
                            None => return,
                        }
                    }
                }
            })
            .map_err(EngineError::Thread)?;
        Ok(PolicyEngine {
            engine,
            linker,
            config: config.clone(),
            policies: ArcSwap::from_pointee(Vec::new()),
            stop,
            loaded,
            loading,
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &PoliciesConfig {
        &self.config
    }

    /// Loads every `*.wasm` and `*.wat` in `policies.dir`, replacing what was loaded.
    pub fn load_dir(&self) -> Vec<PolicyStatus> {
        let loaded: Vec<Arc<Policy>> = policy_files(&self.config.dir)
            .into_iter()
            .map(|p| Arc::new(self.load(&p)))
            .collect();
        self.replace(loaded);
        self.status()
    }

    pub(crate) fn current(&self) -> Arc<Vec<Arc<Policy>>> {
        self.policies.load_full()
    }

    pub(crate) fn replace(&self, policies: Vec<Arc<Policy>>) {
        self.loaded.store(policies.len(), Ordering::Relaxed);
        self.policies.store(Arc::new(policies));
    }

    /// Compiles, links and configures one file. A failure is kept as a policy that is not
    /// loaded, with its error, so that it shows in `/health`.
    pub(crate) fn load(&self, path: &Path) -> Policy {
        // `configure` runs during the load: the ticker must bound it too.
        self.loading.fetch_add(1, Ordering::Relaxed);
        let _loaded = Loading(&self.loading);
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let settings = self
            .config
            .settings
            .get(&name)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "{}".into());
        let stamp = std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        let mut policy = Policy {
            name,
            path: path.to_owned(),
            stamp,
            pre: None,
            settings,
            pool: Mutex::new(Vec::new()),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        };
        match self.compile(path) {
            Ok(pre) => {
                policy.pre = Some(pre);
                // Configure one instance now: a policy that refuses its settings (or hangs) is not loaded.
                match self.instantiate(&policy) {
                    Ok(slot) => {
                        policy.pool.lock().unwrap().push(slot);
                        tracing::info!(policy = %policy.name, "policy loaded");
                    }
                    Err(e) => {
                        policy.pre = None;
                        policy.fail(e);
                    }
                }
            }
            Err(e) => {
                policy.fail(e);
            }
        }
        policy
    }

    fn compile(&self, path: &Path) -> Result<AdmissionPolicyPre<HostState>, PolicyFailure> {
        self.compile_inner(path).map_err(PolicyFailure)
    }

    fn compile_inner(&self, path: &Path) -> Result<AdmissionPolicyPre<HostState>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let is_text = path.extension().is_some_and(|e| e == "wat");
        if !is_text && !bytes.starts_with(b"\0asm") {
            return Err(format!(
                "{}: not a WebAssembly binary (no \\0asm header)",
                path.display()
            ));
        }
        let bytes = if is_core_module(&bytes) {
            // A core module made by wit-bindgen for wasm32-unknown-unknown: wrap it.
            wit_component::ComponentEncoder::default()
                .module(&bytes)
                .and_then(|e| e.validate(true).encode())
                .map_err(|e| {
                    format!(
                        "{}: a core module that cannot be made a component: {e:#}",
                        path.display()
                    )
                })?
        } else {
            bytes
        };
        let component = Component::new(&self.engine, &bytes)
            .map_err(|e| format!("{}: not a valid component: {e:#}", path.display()))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("{}: imports what pensieve does not grant: {e:#}", path.display()))?;
        AdmissionPolicyPre::new(pre).map_err(|e| {
            format!(
                "{}: does not implement the admission-policy world: {e:#}",
                path.display()
            )
        })
    }

    fn instantiate(&self, policy: &Policy) -> Result<Slot, PolicyFailure> {
        let pre = policy
            .pre
            .as_ref()
            .ok_or_else(|| PolicyFailure(format!("{}: not loaded", policy.name)))?;
        let stdout = MemoryOutputPipe::new(OUTPUT_CAP);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAP);
        // Nothing is granted: no preopened directories, no environment, no arguments, no network.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.config.memory_limit_mb as usize * 1024 * 1024)
            .trap_on_grow_failure(true)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits,
            stdout,
            stderr,
            logged: (0, 0),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let policy_inst = pre
            .instantiate(&mut store)
            .map_err(|e| describe(&policy.name, "instantiate", e))?;
        store.set_epoch_deadline(self.deadline_ticks());
        let configured = policy_inst.call_configure(&mut store, &policy.settings);
        forward_output(&policy.name, &mut store);
        match configured {
            Ok(Ok(())) => Ok(Slot {
                store,
                policy: policy_inst,
            }),
            Ok(Err(refusal)) => Err(PolicyFailure(format!(
                "{}: configure refused its settings: {refusal}",
                policy.name
            ))),
            Err(e) => Err(describe(&policy.name, "configure", e)),
        }
    }

    fn deadline_ticks(&self) -> u64 {
        (self.config.timeout_ms / TICK.as_millis() as u64).max(1) + 1
    }

    /// Runs `f` on a configured instance of `policy`; a failed call's instance is dropped.
    fn call<R>(
        &self,
        policy: &Policy,
        what: &str,
        f: impl FnOnce(&mut Store<HostState>, &AdmissionPolicy) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyFailure> {
        let slot = policy.pool.lock().unwrap().pop();
        let mut slot = match slot {
            Some(s) => s,
            None => self.instantiate(policy).map_err(|e| policy.fail(e))?,
        };
        slot.store.set_epoch_deadline(self.deadline_ticks());
        let result = f(&mut slot.store, &slot.policy);
        forward_output(&policy.name, &mut slot.store);
        match result {
            Ok(r) => {
                policy.pool.lock().unwrap().push(slot);
                Ok(r)
            }
            // A trap, a timeout or an exhausted limit poisons the instance: it is dropped here.
            Err(e) => Err(policy.fail(describe(&policy.name, what, e))),
        }
    }

    /// The most severe tier proposed by any policy for this sample (`None`: no proposal).
    pub fn classify(&self, mem: &Memory) -> Option<Tier> {
        let policies = self.policies.load();
        let mut worst: Option<Tier> = None;
        for p in policies.iter().filter(|p| p.loaded()) {
            if let Ok(Some(t)) = self.call(p, "classify", |store, inst| inst.call_classify(store, *mem)) {
                if worst.is_none_or(|w| rank(t) > rank(w)) {
                    worst = Some(t);
                }
            }
        }
        worst
    }

    /// Runs `decide` on every policy in order; the first rejection wins. Failures follow
    /// `policies.on_error`, and with `reject` a policy that is not loaded refuses too.
    pub fn decide(&self, req: &Request, mem: &Memory) -> Decision {
        let policies = self.policies.load();
        for p in policies.iter() {
            let reject_on_error = self.config.on_error == OnError::Reject;
            if !p.loaded() {
                if reject_on_error {
                    return failed_closed(&p.name, "is not loaded");
                }
                continue;
            }
            match self.call(p, "decide", |store, inst| inst.call_decide(store, req, *mem)) {
                Ok(Verdict::Admit) => {}
                Ok(Verdict::Reject(r)) => {
                    let status = if (400..=599).contains(&r.status) { r.status } else { 503 };
                    return Decision::Reject {
                        policy: p.name.clone(),
                        status,
                        error_type: r.error_type,
                        message: r.message,
                        retry_after_secs: r.retry_after_secs,
                    };
                }
                Err(_) if reject_on_error => return failed_closed(&p.name, "failed"),
                Err(_) => {}
            }
        }
        Decision::Admit
    }

    /// Loads `path` as `serve` would, runs `classify` and `decide` on sample inputs, and says
    /// what happened; `Err` on any problem (`pensieve policy check`).
    pub fn check(&self, path: &Path, mem: &Memory) -> Result<String, PolicyFailure> {
        self.loading.fetch_add(1, Ordering::Relaxed);
        let _checking = Loading(&self.loading);
        let policy = self.load(path);
        let name = policy.name.clone();
        if !policy.loaded() {
            return Err(PolicyFailure(
                policy
                    .last_error
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| format!("{name}: not loaded")),
            ));
        }
        let mut out = format!("{name}: loaded and configured with {}\n", policy.settings);
        let classified = self.call(&policy, "classify", |store, inst| inst.call_classify(store, *mem))?;
        out.push_str(&format!(
            "  classify(available {} bytes, host tier {:?}) -> {:?}\n",
            mem.available_bytes, mem.tier, classified
        ));
        let sample = Request {
            method: "POST".into(),
            path: "/v1/messages".into(),
            model: Some("demo".into()),
            max_tokens: Some(1024),
            input_tokens: Some(100),
            streaming: true,
            in_flight: 0,
            headers: vec![("content-type".into(), "application/json".into())],
        };
        let verdict = self.call(&policy, "decide", |store, inst| inst.call_decide(store, &sample, *mem))?;
        out.push_str(&format!(
            "  decide(POST /v1/messages, max_tokens 1024, streaming) -> {verdict:?}\n"
        ));
        Ok(out)
    }

    /// One line per policy, for `/health`.
    pub fn status(&self) -> Vec<PolicyStatus> {
        self.policies
            .load()
            .iter()
            .map(|p| PolicyStatus {
                name: p.name.clone(),
                loaded: p.loaded(),
                errors: p.errors.load(Ordering::Relaxed),
                last_error: p.last_error.lock().unwrap().clone(),
            })
            .collect()
    }

    /// Whether any policy is configured (loaded or not).
    pub fn is_empty(&self) -> bool {
        self.policies.load().is_empty()
    }
}

fn failed_closed(name: &str, what: &str) -> Decision {
    Decision::Reject {
        policy: name.to_owned(),
        status: 503,
        error_type: "overloaded_error".into(),
        message: format!("admission policy `{name}` {what}, and policies.on_error is \"reject\""),
        retry_after_secs: Some(5),
    }
}

fn rank(t: Tier) -> u8 {
    match t {
        Tier::Safe => 0,
        Tier::Warning => 1,
        Tier::Critical => 2,
        Tier::Emergency => 3,
    }
}

fn describe(name: &str, what: &str, e: wasmtime::Error) -> PolicyFailure {
    let reason = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "ran past policies.timeout_ms".to_owned(),
        Some(wasmtime::Trap::OutOfFuel) => "ran out of fuel".to_owned(),
        Some(t) => format!("trapped: {t}"),
        // The root cause only: the wasm backtrace belongs in a debugger, not in /health.
        None => format!("failed: {}", e.root_cause()),
    };
    PolicyFailure(format!("{name}: {what} {reason}"))
}

fn forward_output(name: &str, store: &mut Store<HostState>) {
    let s = store.data_mut();
    for (pipe, logged, stream) in [
        (&s.stdout, &mut s.logged.0, "stdout"),
        (&s.stderr, &mut s.logged.1, "stderr"),
    ] {
        let all = pipe.contents();
        if all.len() > *logged {
            let text = String::from_utf8_lossy(&all[*logged..]);
            for line in text.lines().filter(|l| !l.is_empty()) {
                tracing::info!(policy = %name, stream, "{line}");
            }
            *logged = all.len();
        }
    }
}

fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..4] == b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// The policy files of a folder, sorted by name (their order is the order of `decide`).
pub(crate) fn policy_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("wasm" | "wat")))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The memory record handed to policies, from a snapshot.
pub fn memory_record(s: &crate::memory::MemorySnapshot) -> Memory {
    Memory {
        available_bytes: s.available_bytes,
        total_bytes: s.total_bytes,
        tier: wit_tier(s.tier),
        pressure_some_avg10: s.pressure_some_avg10,
        backend_active_bytes: s.backend_active_bytes,
        backend_cache_bytes: s.backend_cache_bytes,
    }
}

/// The WIT tier of a host tier, and back.
pub fn wit_tier(t: crate::memory::Tier) -> Tier {
    match t {
        crate::memory::Tier::Safe => Tier::Safe,
        crate::memory::Tier::Warning => Tier::Warning,
        crate::memory::Tier::Critical => Tier::Critical,
        crate::memory::Tier::Emergency => Tier::Emergency,
    }
}

/// The host tier of a WIT tier.
pub fn host_tier(t: Tier) -> crate::memory::Tier {
    match t {
        Tier::Safe => crate::memory::Tier::Safe,
        Tier::Warning => crate::memory::Tier::Warning,
        Tier::Critical => crate::memory::Tier::Critical,
        Tier::Emergency => crate::memory::Tier::Emergency,
    }
}

impl crate::memory::TierProposer for PolicyEngine {
    fn propose(&self, snapshot: &crate::memory::MemorySnapshot) -> Option<crate::memory::Tier> {
        if self.is_empty() {
            return None;
        }
        self.classify(&memory_record(snapshot)).map(host_tier)
    }
}

#[cfg(test)]
pub(crate) mod tests;
