//! The backend thread's loop over several models: one [`Worker`] (batch, queue, outboxes) per
//! loaded model, all driven from this one thread, because one thread drives all of MLX.
//!
//! - **Sharing.** Each round, every model with work gets one decoding step of its whole batch,
//!   in the models' order: fair in steps, not in time (a large model's step takes longer). A
//!   model being loaded holds the thread: the other models' generations pause for the load.
//! - **Loading.** A request for an unloaded model loads it, on this thread, before it queues.
//!   A model whose headers give its size must fit under `memory.warning_gb` (as at start-up,
//!   with its KV cache): idle models are unloaded, least recently used first, until it does; if
//!   it cannot fit with every idle model gone, its requests get a 503 naming it, its size and
//!   what is available. A model with no local files (the demo, a Hugging Face id) loads while
//!   memory admits requests.
//! - **Unloading.** A model idle for `keep_alive_secs` is unloaded. When memory reaches Warning,
//!   every prompt cache goes first (each worker's turn); if memory stays at Warning, idle models
//!   other than the default are unloaded one at a time (those with a `keep_alive_secs` first,
//!   then the least recently used), two memory samples apart. An unloaded model's Python
//!   objects are released, the cycle collector runs and MLX's cache is cleared, so that its
//!   memory is back when the unload is reported.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{Job, Work, Worker, DRAIN_TICK, IDLE_TICK};
use crate::backend::mlx::protocol::{Batcher, Caching};
use crate::backend::mlx::{Global, Slot, STATE_LOADED, STATE_LOADING, STATE_UNLOADED};
use crate::backend::{BackendError, BridgeError, Event};
use crate::config::ModelSpec;
use crate::memory::{Gate, Tier};

/// Loads models on the backend thread.
pub(crate) trait Loader {
    /// The loaded model and its batch.
    type Batcher: Batcher;
    /// Loads `spec`; what Python said when it could not.
    fn load(&mut self, spec: &ModelSpec) -> Result<Self::Batcher, BridgeError>;
    /// After a model's batcher was dropped: frees what it held (the cycle collector, MLX's
    /// cache); MLX's active bytes after, when known.
    fn release(&mut self) -> Option<u64> {
        None
    }
    /// Runs `f`, the backend thread's whole life after the loader is made, with what the
    /// loader keeps for that thread (the Python loader: the thread's Python state, so that
    /// each call into Python takes the GIL and no more).
    fn on_thread<R>(f: impl FnOnce() -> R + Send) -> R
    where
        Self: Sized,
        R: Send,
    {
        f()
    }
}

/// Any closure that makes a batcher is a loader (the tests' fakes).
impl<B: Batcher, F: FnMut(&ModelSpec) -> Result<B, BridgeError>> Loader for F {
    type Batcher = B;
    fn load(&mut self, spec: &ModelSpec) -> Result<B, BridgeError> {
        self(spec)
    }
}

/// What loading needs beyond each model's spec.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoadRules {
    /// `backend.kv_context_tokens`: the KV cache counted per sequence when a model must fit.
    pub kv_context_tokens: u64,
    /// `backend.force_load`: load without the fit check.
    pub force: bool,
    /// The default model's index (never unloaded for Warning).
    pub default: usize,
    /// Memory samples are this far apart.
    pub sample_interval: Duration,
}

/// Why a model was unloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unload {
    Idle,
    Memory,
}

/// The models on this thread. See the [module docs](self).
pub(crate) struct Pool<'a, L: Loader> {
    loader: L,
    slots: &'a [Slot],
    global: &'a Global,
    gate: &'a Gate,
    rules: LoadRules,
    workers: Vec<Option<Worker<'a, L::Batcher>>>,
    /// No unload for memory before this (the memory sample must show the last one first).
    memory_hold: Option<Instant>,
    /// When idle and memory unloads were last looked for (at most every `IDLE_TICK`, off the
    /// per-step path).
    looked: Instant,
}

impl<'a, L: Loader> Pool<'a, L> {
    pub fn new(loader: L, slots: &'a [Slot], global: &'a Global, gate: &'a Gate, rules: LoadRules) -> Self {
        Pool {
            loader,
            slots,
            global,
            gate,
            rules,
            workers: slots.iter().map(|_| None).collect(),
            memory_hold: None,
            looked: Instant::now(),
        }
    }

    /// Loads the models marked `preload`; the first failure, as a start-up error.
    pub fn preload(&mut self) -> Result<(), BackendError> {
        for i in 0..self.slots.len() {
            if self.slots[i].spec.preload {
                // At start-up the server checked the models' sizes already (honouring --force),
                // and loads them whatever the tier, as it always has.
                self.load(i, false)?;
            }
        }
        Ok(())
    }

    /// Runs until the queue closes or the backend stops, then stops every model: what runs
    /// fails, the prompt caches go to their disk tiers, and what Python held is released.
    pub fn run(&mut self, queue: Receiver<Work>) {
        self.serve(queue);
        let loaded: Vec<usize> = (0..self.workers.len()).filter(|&j| self.workers[j].is_some()).collect();
        for j in loaded {
            let mut worker = self.workers[j].take().expect("loaded");
            worker.spill();
            // Dropping it fails what still runs and clears the MLX cache.
        }
        self.loader.release();
    }

    fn serve(&mut self, queue: Receiver<Work>) {
        loop {
            if self.global.stopping.load(Ordering::SeqCst) {
                let generations: usize = self.workers.iter().flatten().map(|w| w.running.len()).sum();
                tracing::info!(generations, "the backend is stopping");
                break;
            }
            if !self.workers.iter().flatten().any(Worker::computing) {
                let work = match self.tick() {
                    Some(tick) => match queue.recv_timeout(tick) {
                        Ok(work) => Some(work),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                    None => match queue.recv() {
                        Ok(work) => Some(work),
                        Err(_) => break,
                    },
                };
                if let Some(work) = work {
                    self.take(work);
                }
            }
            while let Ok(work) = queue.try_recv() {
                self.take(work);
            }
            self.unload_what_must_go();
            for i in 0..self.workers.len() {
                let elsewhere = self.reserved_except(i);
                let Some(w) = self.workers[i].as_mut() else { continue };
                if w.busy() {
                    // Idle time counts from the last generation's end, not its request.
                    w.shared.touch();
                }
                w.elsewhere = elsewhere;
                w.admit();
                if catch_unwind(AssertUnwindSafe(|| w.turn())).is_err() {
                    tracing::error!(model = %self.slots[i].spec.name, "the backend loop panicked; its generations fail and the cache is cleared");
                    w.fail_all(BackendError::Generation(BridgeError::Panicked));
                }
            }
        }
    }

    /// How long an idle loop may sleep: not at all while something needs watching.
    fn tick(&self) -> Option<Duration> {
        let loaded = self
            .workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| (i, w)));
        let mut tick = None;
        for (i, w) in loaded {
            if !w.draining.is_empty() || w.preparing() {
                return Some(DRAIN_TICK);
            }
            let watch_cache = (w.caching == Caching::Memory && w.shared.prompt_cache_bytes.load(Ordering::Relaxed) > 0)
                || w.shared.disk_pending() > 0;
            if watch_cache || self.slots[i].spec.keep_alive_secs > 0 || i != self.rules.default {
                tick = Some(IDLE_TICK);
            }
        }
        tick
    }

    /// Work from the API: to its model's worker, loading the model first when it is not.
    fn take(&mut self, work: Work) {
        let i = match &work {
            Work::Generate(job) => job.model,
            Work::Count(count) => count.model,
        };
        self.slots[i].shared.touch();
        if self.workers[i].is_none() {
            if let Err(e) = self.load(i, true) {
                self.global.queued.fetch_sub(1, Ordering::SeqCst);
                match work {
                    Work::Generate(Job { events, span, .. }) => {
                        let _enter = span.enter();
                        let _ = events.try_send(Event::Failed(e));
                    }
                    Work::Count(count) => {
                        let _ = count.reply.send(Err(e));
                    }
                }
                return;
            }
        }
        self.workers[i].as_mut().expect("loaded").take(work);
    }

    /// Loads model `i`, making room for it first when `check`. See the [module docs](self).
    fn load(&mut self, i: usize, check: bool) -> Result<(), BackendError> {
        let slot = &self.slots[i];
        let spec = &slot.spec;
        if check {
            self.make_room(i)?;
        }
        slot.shared.state.store(STATE_LOADING, Ordering::SeqCst);
        tracing::info!(model = %spec.name, path = %spec.path, "loading the model");
        let started = Instant::now();
        let before = self.global.active_bytes.load(Ordering::Relaxed);
        let loaded = catch_unwind(AssertUnwindSafe(|| self.loader.load(spec))).unwrap_or_else(|_| {
            tracing::error!(model = %spec.name, "loading the model panicked");
            Err(BridgeError::Panicked)
        });
        let shared = &slot.shared;
        let elapsed = started.elapsed();
        shared.load_ms.fetch_add(elapsed.as_millis() as u64, Ordering::Relaxed);
        let batcher = match loaded {
            Ok(batcher) => batcher,
            Err(cause) => {
                let error = BackendError::LoadFailed {
                    model: spec.name.clone(),
                    path: spec.path.clone(),
                    cause,
                };
                shared.state.store(STATE_UNLOADED, Ordering::SeqCst);
                shared.load_errors.fetch_add(1, Ordering::Relaxed);
                *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
                tracing::error!(model = %spec.name, "{error}");
                // What a failed load left behind goes back.
                if let Some(active) = self.loader.release() {
                    self.global.active_bytes.store(active, Ordering::Relaxed);
                }
                return Err(error);
            }
        };
        shared.context_length.store(batcher.context_length(), Ordering::Relaxed);
        shared.tool_format.store(batcher.tool_format() as u8, Ordering::Relaxed);
        shared
            .max_token_bytes
            .store(batcher.max_token_bytes(), Ordering::Relaxed);
        shared
            .kv_bytes_per_token
            .store(batcher.kv_bytes_per_token(), Ordering::Relaxed);
        let mut worker = Worker::new(batcher, shared, self.gate);
        worker.refresh();
        let after = self.global.active_bytes.load(Ordering::Relaxed);
        shared.bytes.store(after.saturating_sub(before), Ordering::Relaxed);
        shared.loads.fetch_add(1, Ordering::Relaxed);
        shared.state.store(STATE_LOADED, Ordering::SeqCst);
        tracing::info!(
            model = %spec.name,
            bytes = after.saturating_sub(before),
            load_ms = elapsed.as_millis() as u64,
            "model loaded"
        );
        self.workers[i] = Some(worker);
        Ok(())
    }

    /// Unloads idle models, least recently used first, until model `i` fits under the warning
    /// threshold; a 503 naming it when it cannot.
    fn make_room(&mut self, i: usize) -> Result<(), BackendError> {
        let slots = self.slots;
        let thresholds = self.gate.thresholds();
        let kv_context_tokens = self.rules.kv_context_tokens;
        if slots[i].estimate.is_none() {
            // Nothing to estimate from: it loads while memory admits requests.
            return self.gate.check().map(drop).map_err(BackendError::Memory);
        }
        if self.rules.force {
            return Ok(());
        }
        let fits = |available: u64| slots[i].fits(kv_context_tokens, available, thresholds.warning);
        let available = self.gate.snapshot().load().available_bytes;
        if available == 0 || fits(available).is_ok() {
            return Ok(());
        }
        // Unloading idle models is worth it only when it is enough: a hopeless load must not
        // cost the others their place.
        let idle: Vec<usize> = self.idle_models(false).into_iter().filter(|&j| j != i).collect();
        let held = |j: usize| slots[j].shared.bytes.load(Ordering::Relaxed);
        let reclaimable: u64 = idle.iter().map(|&j| held(j)).sum();
        if let Err(no_fit) = fits(available + reclaimable) {
            let message = format!(
                "{no_fit}. Unloading the {} idle model(s) would free {:.2} GB, not enough",
                idle.len(),
                reclaimable as f64 / crate::memory::GIB
            );
            return Err(BackendError::LoadRefused {
                message,
                retry_after_secs: self.gate.retry_after_secs(),
            });
        }
        let mut freed = 0;
        for j in idle {
            if fits(available + freed).is_ok() {
                break;
            }
            freed += held(j);
            self.unload(j, Unload::Memory);
        }
        Ok(())
    }

    /// Unloads what has been idle past its `keep_alive_secs`, and one idle model when memory is
    /// at Warning or worse (two samples after the last).
    fn unload_what_must_go(&mut self) {
        if self.looked.elapsed() < IDLE_TICK {
            return;
        }
        self.looked = Instant::now();
        let idle = self.idle_models(true);
        for &j in &idle {
            let keep = self.slots[j].spec.keep_alive_secs;
            if keep > 0 && self.slots[j].shared.idle_for().is_some_and(|d| d.as_secs() >= keep) {
                self.unload(j, Unload::Idle);
            }
        }
        let tier = self.gate.snapshot().load().tier;
        if tier == Tier::Safe {
            self.memory_hold = None;
            return;
        }
        let now = Instant::now();
        let hold = *self
            .memory_hold
            .get_or_insert(now + 2 * self.rules.sample_interval.max(Duration::from_millis(100)));
        if now < hold {
            return;
        }
        let victim = self
            .idle_models(true)
            .into_iter()
            .find(|&j| j != self.rules.default && self.workers[j].is_some());
        if let Some(j) = victim {
            tracing::warn!(model = %self.slots[j].spec.name, ?tier, "memory left Safe: unloading an idle model");
            self.unload(j, Unload::Memory);
            self.memory_hold = Some(now + 2 * self.rules.sample_interval.max(Duration::from_millis(100)));
        }
    }

    /// Loaded models with nothing running, waiting or owed: those with a `keep_alive_secs`
    /// first when `keep_alive_first`, then the least recently used.
    fn idle_models(&self, keep_alive_first: bool) -> Vec<usize> {
        let mut idle: Vec<usize> = (0..self.workers.len())
            .filter(|&j| {
                self.workers[j]
                    .as_ref()
                    .is_some_and(|w| !w.busy() && w.draining.is_empty())
            })
            .collect();
        idle.sort_by_key(|&j| {
            let never = self.slots[j].spec.keep_alive_secs == 0;
            let last = self.slots[j].shared.last_used();
            (keep_alive_first && never, last)
        });
        idle
    }

    /// Unloads model `j`: its worker goes (clearing the cache), then what Python held; it is
    /// reported unloaded once its memory is back.
    fn unload(&mut self, j: usize, why: Unload) {
        let Some(mut worker) = self.workers[j].take() else {
            return;
        };
        worker.spill();
        drop(worker);
        if let Some(active) = self.loader.release() {
            self.global.active_bytes.store(active, Ordering::Relaxed);
            self.global.cache_bytes.store(0, Ordering::Relaxed);
        }
        let shared = &self.slots[j].shared;
        let held = shared.bytes.swap(0, Ordering::Relaxed);
        shared.prompt_cache_bytes.store(0, Ordering::Relaxed);
        shared.prompt_cache_entries.store(0, Ordering::Relaxed);
        match why {
            Unload::Idle => shared.unloads_idle.fetch_add(1, Ordering::Relaxed),
            Unload::Memory => shared.unloads_memory.fetch_add(1, Ordering::Relaxed),
        };
        shared.state.store(STATE_UNLOADED, Ordering::SeqCst);
        tracing::info!(
            model = %self.slots[j].spec.name,
            reason = ?why,
            bytes = held,
            mlx_active_bytes = self.global.active_bytes.load(Ordering::Relaxed),
            "model unloaded"
        );
    }

    /// KV cache bytes the running generations of every model but `i` may still add.
    fn reserved_except(&self, i: usize) -> u64 {
        self.workers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, w)| w.as_ref())
            .map(Worker::reserved_bytes)
            .sum()
    }
}
