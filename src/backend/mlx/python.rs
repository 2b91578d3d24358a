//! The Python side: finding the venv, starting the embedded interpreter's bridge, and
//! [`PyBatcher`], the [`Batcher`] that calls `pensieve_bridge`. The only module that touches
//! pyo3; no Python object leaves it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;

use super::protocol::{check_codes, Added, Batcher, Caching, Finish, Memory, Piece, Stepped};
use super::worker::pool::Loader;
use crate::backend::{Chat, GenerateRequest, PromptCacheDisk};
use crate::config::ModelSpec;

/// How models are loaded.
pub(crate) struct LoadSettings {
    /// `backend.blas`.
    pub blas: String,
    /// On a CPU, weights become float32 when they then take at most this (0: never).
    pub cpu_float32_budget: u64,
}

/// Loads models in the embedded interpreter, once it is set up with the venv's packages.
pub(crate) struct PyLoader {
    venv: PathBuf,
    settings: LoadSettings,
}

/// The bridge's engine (model, tokenizer, template, memory) and batcher.
pub(crate) struct PyBatcher {
    engine: Py<PyAny>,
    batcher: Py<PyAny>,
    context_length: u32,
    kv_bytes_per_token: u64,
}

impl PyLoader {
    /// Sets up the embedded interpreter: the venv's packages, signals, BLAS, and a bridge that
    /// speaks this binary's protocol.
    pub fn new(venv: &Path, settings: LoadSettings) -> Result<PyLoader, String> {
        Python::attach(|py| {
            let v = py.version_info();
            let site_packages = venv
                .join("lib")
                .join(format!("python{}.{}", v.major, v.minor))
                .join("site-packages");
            if !site_packages.is_dir() {
                return Err(format!(
                    "{} does not exist: the venv was made for another Python than the one pensieve was \
                     built against ({}); rebuild with `make build`",
                    site_packages.display(),
                    pyo3::Python::version_str()
                ));
            }
            let setup = || -> PyResult<Result<(), String>> {
                // Signals belong to the server (graceful shutdown), not to Python: without this,
                // Python's handler turns the first SIGINT into a KeyboardInterrupt inside a
                // running generation, and the server never hears of it.
                let signal = py.import("signal")?;
                signal.call_method1("signal", (signal.getattr("SIGINT")?, signal.getattr("SIG_DFL")?))?;
                py.import("site")?
                    .call_method1("addsitedir", (site_packages.to_string_lossy().as_ref(),))?;
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
                let codes: HashMap<String, u8> = py
                    .import("pensieve_bridge.protocol")?
                    .call_method0("codes")?
                    .extract()?;
                Ok(check_codes(&codes))
            };
            setup()
                .map_err(|e| python_error(py, &e))
                .and_then(|r| r)
                .map_err(|e| format!("could not start the Python bridge from {}: {e}", venv.display()))?;
            Ok(PyLoader {
                venv: venv.to_owned(),
                settings,
            })
        })
    }
}

impl Loader for PyLoader {
    type Batcher = PyBatcher;

    fn load(&mut self, spec: &ModelSpec) -> Result<PyBatcher, String> {
        let model = spec.path.as_str();
        Python::attach(|py| {
            let setup = || -> PyResult<PyBatcher> {
                let engine = py
                    .import("pensieve_bridge.engine")?
                    .getattr("Engine")?
                    .call1((model, self.settings.cpu_float32_budget))?;
                let info: String = engine.call_method0("describe")?.extract()?;
                tracing::info!(model = %spec.name, %info, "model ready");
                let context_length: u32 = engine.getattr("context_length")?.extract().unwrap_or(0);
                let kv_bytes_per_token: u64 = engine.getattr("kv_bytes_per_token")?.extract().unwrap_or(0);
                let batcher = py.import("pensieve_bridge.batch")?.getattr("open_batcher")?.call1((
                    &engine,
                    spec.max_concurrent as u32,
                    spec.prompt_cache_bytes,
                    spec.prompt_cache_dir.as_str(),
                    spec.prompt_cache_disk_bytes,
                ))?;
                Ok(PyBatcher {
                    engine: engine.unbind(),
                    batcher: batcher.unbind(),
                    context_length,
                    kv_bytes_per_token,
                })
            };
            setup().map_err(|e| {
                let from = if spec.name == model {
                    String::new()
                } else {
                    format!(" from `{model}`")
                };
                format!(
                    "could not load model `{}`{from}: {}\n  backend.model (or a [models.<name>] path) must be `demo`, \
                     a local folder with config.json, tokenizer and safetensors weights, a .gguf file (llama, SmolLM, \
                     Mistral, Qwen2, Qwen3 with a byte-level BPE vocabulary), or a Hugging Face id that mlx-lm can \
                     download (this needs network access). The environment used was {}.",
                    spec.name,
                    python_error(py, &e),
                    self.venv.display()
                )
            })
        })
    }

    fn release(&mut self) -> Option<u64> {
        // Attaching runs the decrefs of the dropped batcher; `release` does the rest.
        Python::attach(|py| -> PyResult<u64> {
            py.import("pensieve_bridge.engine")?.call_method0("release")?.extract()
        })
        .map_err(|e| tracing::warn!(error = %e, "releasing an unloaded model's memory failed"))
        .ok()
    }
}

impl PyBatcher {
    fn call<T>(
        &self,
        f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>, &Bound<'_, PyAny>) -> PyResult<T>,
    ) -> Result<T, String> {
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

    fn add(&mut self, request: &GenerateRequest, context_length: u32) -> Result<Added, String> {
        let chat = serde_json::to_string(&request.chat).expect("chat serialises");
        let mut params = serde_json::to_value(&request.sampling).expect("sampling serialises");
        params["stop"] = serde_json::json!(request.stop_sequences);
        params["constraint"] = serde_json::json!(request.constraint);
        let added = self.call(|_, _, b| {
            b.call_method1("add", (chat, params.to_string(), context_length))?
                .extract::<(u8, u64, u32, u32, String)>()
        })?;
        Added::decode(added)
    }

    fn step(&mut self) -> Result<Vec<Stepped>, String> {
        type Raw = Vec<(u64, Vec<(u8, String)>, Option<u8>)>;
        let raw = self.call(|_, _, b| b.call_method0("step")?.extract::<Raw>())?;
        raw.into_iter()
            .map(|(uid, pieces, finish)| {
                Ok(Stepped {
                    uid,
                    pieces: pieces
                        .into_iter()
                        .map(|(code, payload)| Piece::decode(code, payload))
                        .collect::<Result<_, _>>()?,
                    finish: finish.map(Finish::decode).transpose()?,
                })
            })
            .collect()
    }

    fn cancel(&mut self, uids: &[u64], keep: bool) -> Result<(), String> {
        self.call(|_, _, b| b.call_method1("cancel", (uids.to_vec(), keep)).map(drop))
    }

    fn reset(&mut self) -> Result<(), String> {
        self.call(|_, _, b| b.call_method0("reset").map(drop))
    }

    fn set_caching(&mut self, caching: Caching) -> Result<(), String> {
        self.call(|_, _, b| b.call_method1("set_caching", (caching as u8,)).map(drop))
    }

    fn disk_stats(&mut self) -> Result<Option<PromptCacheDisk>, String> {
        type Counts = (u64, u64, u64, u64, u64, u64, u64, u64, u64, u64);
        type Raw = (String, String, Counts, (f64, f64));
        let raw = self.call(|_, _, b| b.call_method0("disk_stats")?.extract::<Option<Raw>>())?;
        Ok(raw.map(|(dir, off, counts, (read_seconds, write_seconds))| {
            let (entries, bytes, max_bytes, pending_bytes, hits, hit_tokens, spills, spilled_bytes, writes, removed) =
                counts;
            PromptCacheDisk {
                enabled: off.is_empty(),
                dir,
                off_reason: (!off.is_empty()).then_some(off),
                entries,
                bytes,
                max_bytes,
                pending_bytes,
                hits,
                hit_tokens,
                spills,
                spilled_bytes,
                writes,
                removed,
                read_seconds,
                write_seconds,
            }
        }))
    }

    fn count_tokens(&mut self, chat: &Chat) -> Result<u32, String> {
        let chat = serde_json::to_string(chat).expect("chat serialises");
        self.call(|_, e, _| e.call_method1("render", (chat,))?.len().map(|n| n as u32))
    }

    fn clear_cache(&mut self, thorough: bool) -> Result<u64, String> {
        let method = if thorough { "collect_and_clear" } else { "clear_cache" };
        self.call(|_, e, _| e.call_method0(method)?.extract())
    }

    fn memory(&mut self) -> Result<Memory, String> {
        self.call(|_, e, b| {
            let (active, cache, peak) = e.call_method0("memory")?.extract::<(u64, u64, u64)>()?;
            let (prompt_cache_bytes, prompt_cache_entries) =
                b.call_method0("prompt_cache_stats")?.extract::<(u64, u64)>()?;
            Ok(Memory {
                active,
                cache,
                peak,
                prompt_cache_bytes,
                prompt_cache_entries,
            })
        })
    }

    fn set_memory_limit(&mut self, bytes: u64) -> Result<(), String> {
        self.call(|_, _, b| b.call_method1("set_memory_limit", (bytes,)).map(drop))
    }
}

fn python_error(py: Python<'_>, e: &PyErr) -> String {
    let tb = e.traceback(py).and_then(|tb| tb.format().ok()).unwrap_or_default();
    if !tb.is_empty() {
        tracing::debug!(traceback = %tb, "python traceback");
    }
    e.to_string()
}
