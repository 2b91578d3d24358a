//! Progress of the model loads under way: the bridge reports the bytes of weights read of the
//! total as a load goes (`pensieve_bridge.progress`), through [`Reporter`]; `/health`,
//! `/v1/models` and the dashboard show it while the model's state is `loading`, and a log line
//! says it at most every [`LOG_EVERY`]. An [`Observer`] (the terminal's progress bar) sees every
//! report; while one is set, the log says only where a load starts and ends.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use serde::Serialize;

/// The most often a load's progress is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(2);

/// How far a load has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadProgress {
    /// Bytes of weights read.
    pub done_bytes: u64,
    /// Bytes of weights in all.
    pub total_bytes: u64,
}

struct Loading {
    progress: LoadProgress,
    logged: Option<Instant>,
}

static LOADING: Mutex<BTreeMap<String, Loading>> = Mutex::new(BTreeMap::new());

/// Sees each load's progress as it is reported (`None`: the load is over).
pub type Observer = fn(model: &str, progress: Option<LoadProgress>);

static OBSERVER: Mutex<Option<Observer>> = Mutex::new(None);

/// Sets the one observer of every load's progress.
pub fn observe(observer: Observer) {
    *OBSERVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
}

fn observer() -> Option<Observer> {
    *OBSERVER.lock().unwrap_or_else(|e| e.into_inner())
}

/// The progress of `model`'s load under way, if one is.
pub fn of(model: &str) -> Option<LoadProgress> {
    LOADING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(model)
        .map(|l| l.progress)
}

/// `model`'s load has read `done` bytes of `total`.
pub fn report(model: &str, done: u64, total: u64) {
    let mut loads = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    let entry = loads.entry(model.to_owned()).or_insert(Loading {
        progress: LoadProgress::default(),
        logged: None,
    });
    // Monotonic, whatever the order reports arrive in.
    entry.progress = LoadProgress {
        done_bytes: done.max(entry.progress.done_bytes).min(total.max(done)),
        total_bytes: total,
    };
    let observer = observer();
    if let Some(observer) = observer {
        observer(model, Some(entry.progress));
    }
    // The first report, the last, and (with no observer drawing them) one every LOG_EVERY.
    let due = match entry.logged {
        None => true,
        Some(t) => observer.is_none() && t.elapsed() >= LOG_EVERY,
    };
    if due || done >= total {
        entry.logged = Some(Instant::now());
        let percent = if total > 0 {
            done as f64 * 100.0 / total as f64
        } else {
            100.0
        };
        tracing::info!(
            model,
            done_mb = done >> 20,
            total_mb = total >> 20,
            percent = (percent * 10.0).round() / 10.0,
            "loading the model's weights"
        );
    }
}

/// `model`'s load is over (loaded or failed).
pub fn finish(model: &str) {
    LOADING.lock().unwrap_or_else(|e| e.into_inner()).remove(model);
    if let Some(observer) = observer() {
        observer(model, None);
    }
}

/// What the bridge calls with `(done_bytes, total_bytes)` during a load.
#[pyclass]
pub(crate) struct Reporter {
    pub model: String,
}

#[pymethods]
impl Reporter {
    fn __call__(&self, done: u64, total: u64) {
        report(&self.model, done, total);
    }
}
