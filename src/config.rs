//! Configuration: defaults, then a TOML file, then `PENSIEVE_` environment variables, then
//! command-line flags, merged by [figment].
//!
//! ```no_run
//! let config = pensieve::config::Config::load(None, &pensieve::config::Flags::default())?;
//! assert!(config.memory.warning_gb > config.memory.critical_gb);
//! # Ok::<(), pensieve::config::ConfigError>(())
//! ```
//!
//! Environment variables use `__` between levels: `PENSIEVE_MEMORY__CRITICAL_GB=3`. Only the
//! sections below are read from the environment, so that unrelated `PENSIEVE_*` variables do
//! not stop start-up. Unknown keys in the file are errors: a typo must not be silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The file read when `--config` is not given (when it exists).
pub const DEFAULT_FILE: &str = "config/pensieve.toml";
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "PENSIEVE_";
const SECTIONS: [&str; 7] = ["server", "memory", "backend", "models", "layers", "policies", "log"];

/// The whole configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listening address, authentication, limits.
    pub server: ServerConfig,
    /// Memory sampling, tiers and their headers.
    pub memory: MemoryConfig,
    /// The model and the Python environment that runs it.
    pub backend: BackendConfig,
    /// `[models.<name>]`: several models, loaded on demand (empty: `backend.model` alone).
    pub models: BTreeMap<String, ModelConfig>,
    /// Which layers run on `/v1`.
    pub layers: LayersConfig,
    /// WebAssembly admission policies.
    pub policies: PoliciesConfig,
    /// Log format and level.
    pub log: LogConfig,
}

/// `[server]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind; loopback unless the operator says otherwise.
    pub host: String,
    /// Port to bind.
    pub port: u16,
    /// Accepted API keys (`x-api-key` or `Authorization: Bearer`); empty: no authentication.
    pub api_keys: Vec<String>,
    /// Largest request body accepted, in MiB (413 above it).
    pub max_body_mb: u64,
    /// Static headers added to every `/v1/` response.
    pub headers: BTreeMap<String, String>,
    /// How long running generations may finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// Open connections at most; more wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// With `[models]`: the model that `/health` names and that unknown names get.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_model: Option<String>,
    /// What a `model` name no model answers to gets: `"default"` or `"404"`.
    pub fallback: Fallback,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7777,
            api_keys: Vec::new(),
            max_body_mb: 32,
            headers: BTreeMap::new(),
            shutdown_grace_secs: 30,
            max_connections: 1024,
            default_model: None,
            fallback: Fallback::Default,
        }
    }
}

pub use crate::layers::HeaderMode;
pub use models::{Fallback, ModelConfig, ModelSpec};

/// `[memory]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// How often the background sampler reads memory.
    pub sample_interval_ms: u64,
    /// Below this many GB available: Warning.
    pub warning_gb: f64,
    /// Below this: Critical (new generations refused).
    pub critical_gb: f64,
    /// Below this: Emergency (running generations aborted too).
    pub emergency_gb: f64,
    /// A tier is left only when memory is this fraction above the threshold that raised it.
    pub hysteresis: f64,
    /// `retry-after` on memory refusals.
    pub retry_after_secs: u32,
    /// When the memory headers are sent.
    pub headers: HeaderMode,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            sample_interval_ms: 250,
            warning_gb: 2.0,
            critical_gb: 1.0,
            emergency_gb: 0.5,
            hysteresis: 0.1,
            retry_after_secs: 5,
            headers: HeaderMode::Always,
        }
    }
}

/// `[backend]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// A Hugging Face id, a local folder, a `.gguf` file (or a folder holding one), or `demo`.
    pub model: String,
    /// The virtual environment holding mlx and mlx-lm.
    pub python: PathBuf,
    /// Generations decoded together (continuous batching).
    pub max_concurrent: usize,
    /// Requests that may wait for a free slot; more get 429.
    pub max_queue: usize,
    /// How long a request may wait for its generation to start before it gets 429.
    pub queue_timeout_ms: u64,
    /// Bytes of KV cache kept for reuse across requests (prompt cache) and held by running
    /// generations, in MiB; 0 turns the prompt cache off.
    pub prompt_cache_mb: u64,
    /// The prompt cache's disk tier: where its files go (empty: `prompt-cache` in pensieve's
    /// cache folder, `$PENSIEVE_CACHE_DIR` or `~/.cache/pensieve`), one folder per model.
    pub prompt_cache_dir: String,
    /// The most each model's disk tier holds, in MiB; 0 turns the disk tier off.
    pub prompt_cache_disk_mb: u64,
    /// The BLAS MLX uses on a CPU: `auto` (OpenBLAS where installed), `off`, or a library path.
    pub blas: String,
    /// On a CPU, run quantised and half-precision weights as float32 (faster through BLAS)
    /// when that takes at most a quarter of the memory available at load.
    pub cpu_float32: bool,
    /// Tokens per sequence of KV cache counted, for every one of `max_concurrent` sequences,
    /// when checking that the model fits before it loads.
    pub kv_context_tokens: u64,
    /// Load even when the estimate says the model would take memory to `memory.warning_gb`.
    pub force_load: bool,
    /// MLX's memory limit in MiB (0: what MLX holds plus what memory has above
    /// `memory.emergency_gb`, updated as memory changes). A step that goes over it stops the
    /// largest running generation (503), and a request whose KV cache would not fit under it
    /// is refused before its prompt is processed.
    pub mlx_memory_limit_mb: u64,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            model: "demo".into(),
            python: PathBuf::from(".venv"),
            max_concurrent: 8,
            max_queue: 16,
            queue_timeout_ms: 120_000,
            prompt_cache_mb: 2048,
            prompt_cache_dir: String::new(),
            prompt_cache_disk_mb: 8192,
            blas: "auto".into(),
            cpu_float32: true,
            kv_context_tokens: 4096,
            force_load: false,
            mlx_memory_limit_mb: 0,
        }
    }
}

/// `[layers]`: which layers of the `/v1` stack run (all by default). Request ids, the body
/// limit and metrics always run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayersConfig {
    /// One tracing span and one log line per request.
    pub logging: bool,
    /// `x-memory-status`, `x-available-memory-gb` and `server.headers` on every response.
    pub memory_headers: bool,
    /// `server.api_keys` (does nothing while the list is empty).
    pub auth: bool,
    /// Memory admission: 503 while the tier is Critical or Emergency.
    pub admission: bool,
    /// The WASM policies in `policies.dir`.
    pub policies: bool,
}

impl Default for LayersConfig {
    fn default() -> Self {
        Self {
            logging: true,
            memory_headers: true,
            auth: true,
            admission: true,
            policies: true,
        }
    }
}

/// What a policy failure does to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Admit: the host's own tiers still protect the machine.
    Admit,
    /// Refuse with 503 (fail closed), also while a configured policy is not loaded.
    Reject,
}

/// `[policies]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoliciesConfig {
    /// Every `*.wasm` and `*.wat` here is loaded, and reloaded on change.
    pub dir: PathBuf,
    /// Longest a policy call may run.
    pub timeout_ms: u64,
    /// Largest linear memory a policy may have.
    pub memory_limit_mb: u64,
    /// What a failing policy does.
    pub on_error: OnError,
    /// `[policies.settings.<name>]`: JSON handed to that policy's `configure`.
    pub settings: BTreeMap<String, serde_json::Value>,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("policies"),
            timeout_ms: 10,
            memory_limit_mb: 16,
            on_error: OnError::Admit,
            settings: BTreeMap::new(),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A tracing filter: `info`, `pensieve=debug`, …
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// Values given on the command line; they override everything else.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flags {
    /// `--host`, `--port`
    #[serde(skip_serializing_if = "FlagServer::is_empty")]
    pub server: FlagServer,
    /// `--model`
    #[serde(skip_serializing_if = "FlagBackend::is_empty")]
    pub backend: FlagBackend,
}

/// `[server]` keys settable by flags.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlagServer {
    /// `--host`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `--port`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl FlagServer {
    fn is_empty(&self) -> bool {
        self.host.is_none() && self.port.is_none()
    }
}

/// `[backend]` keys settable by flags.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlagBackend {
    /// `--model`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `--force`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_load: Option<bool>,
}

impl FlagBackend {
    fn is_empty(&self) -> bool {
        self.model.is_none() && self.force_load.is_none()
    }
}

/// Why the configuration cannot be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Figment's own error: it names the key, the expected value and the source.
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    /// A value that parses but makes no sense.
    #[error("invalid configuration: `{key}` {problem} (set in {source_name})")]
    Invalid {
        /// Dotted key, e.g. `memory.critical_gb`.
        key: String,
        /// What is wrong with it.
        problem: String,
        /// Where the value came from.
        source_name: String,
    },
    /// `--config` names a file that does not exist.
    #[error("invalid configuration: the file {0} given with --config does not exist")]
    MissingFile(PathBuf),
}

/// Builds the layered figment: defaults, the TOML file, the environment, the flags.
pub fn figment(file: Option<&Path>, flags: &Flags) -> Figment {
    let file = file.unwrap_or(Path::new(DEFAULT_FILE));
    Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::file(file))
        .merge(Env::prefixed(ENV_PREFIX).split("__").filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            SECTIONS.iter().any(|s| key.starts_with(&format!("{s}.")))
        }))
        .merge(Serialized::defaults(flags.clone()))
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Config, ConfigError> {
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::MissingFile(f.to_owned()));
            }
        }
        let fig = figment(file, flags);
        let mut config: Config = fig.extract().map_err(Box::new)?;
        if flags.backend.model.is_some() {
            // `--model` is the one-model shortcut: it replaces the [models] table.
            config.models.clear();
            config.server.default_model = None;
        }
        config.validate(&fig)?;
        Ok(config)
    }

    fn validate(&self, fig: &Figment) -> Result<(), ConfigError> {
        let m = &self.memory;
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            key: key.to_owned(),
            problem,
            source_name: describe_source(fig, key),
        };
        for (key, v) in [
            ("memory.warning_gb", m.warning_gb),
            ("memory.critical_gb", m.critical_gb),
            ("memory.emergency_gb", m.emergency_gb),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(key, format!("must be a number of GB ≥ 0, got {v}")));
            }
        }
        if m.warning_gb <= m.critical_gb {
            return Err(invalid(
                "memory.warning_gb",
                format!(
                    "({}) must be greater than memory.critical_gb ({})",
                    m.warning_gb, m.critical_gb
                ),
            ));
        }
        if m.critical_gb <= m.emergency_gb {
            return Err(invalid(
                "memory.critical_gb",
                format!(
                    "({}) must be greater than memory.emergency_gb ({})",
                    m.critical_gb, m.emergency_gb
                ),
            ));
        }
        if !(0.0..1.0).contains(&m.hysteresis) {
            return Err(invalid(
                "memory.hysteresis",
                format!("must be in [0, 1), got {}", m.hysteresis),
            ));
        }
        if m.sample_interval_ms == 0 || m.sample_interval_ms > 60_000 {
            return Err(invalid(
                "memory.sample_interval_ms",
                format!("must be between 1 and 60000, got {}", m.sample_interval_ms),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1".into()));
        }
        if self.server.max_body_mb == 0 {
            return Err(invalid("server.max_body_mb", "must be at least 1".into()));
        }
        if self.policies.timeout_ms == 0 || self.policies.timeout_ms > 10_000 {
            return Err(invalid(
                "policies.timeout_ms",
                format!("must be between 1 and 10000, got {}", self.policies.timeout_ms),
            ));
        }
        if self.policies.memory_limit_mb == 0 || self.policies.memory_limit_mb > 4096 {
            return Err(invalid(
                "policies.memory_limit_mb",
                format!("must be between 1 and 4096, got {}", self.policies.memory_limit_mb),
            ));
        }
        if self.backend.max_concurrent == 0 || self.backend.max_concurrent > 256 {
            return Err(invalid(
                "backend.max_concurrent",
                format!("must be between 1 and 256, not {}", self.backend.max_concurrent),
            ));
        }
        if self.backend.queue_timeout_ms == 0 {
            return Err(invalid("backend.queue_timeout_ms", "must be at least 1".into()));
        }
        let blas = &self.backend.blas;
        if blas != "auto" && blas != "off" && !Path::new(blas).exists() {
            return Err(invalid(
                "backend.blas",
                format!("must be \"auto\", \"off\" or the path of a BLAS library, not `{blas}` (no such file)"),
            ));
        }
        if self.backend.model.trim().is_empty() {
            return Err(invalid("backend.model", "must not be empty".into()));
        }
        self.check_models().map_err(|(key, problem)| invalid(&key, problem))?;
        for (name, value) in &self.server.headers {
            if http::HeaderName::try_from(name.as_str()).is_err()
                || http::HeaderValue::try_from(value.as_str()).is_err()
            {
                return Err(invalid(
                    "server.headers",
                    format!("`{name}: {value}` is not a valid header"),
                ));
            }
        }
        if self.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a tracing filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// Every effective value with where it came from, one `key = value  # source` per line.
    pub fn explain(file: Option<&Path>, flags: &Flags) -> Result<String, ConfigError> {
        let config = Config::load(file, flags)?;
        let fig = figment(file, flags);
        let value = serde_json::to_value(&config).expect("config serialises");
        let mut out = String::new();
        let mut leaves = Vec::new();
        flatten("", &value, &mut leaves);
        for (key, v) in leaves {
            out.push_str(&format!("{key} = {v}  # {}\n", describe_source(&fig, &key)));
        }
        Ok(out)
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) if !map.is_empty() || prefix.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// Where the value of `key` came from: a default, a file, an environment variable or a flag.
fn describe_source(fig: &Figment, key: &str) -> String {
    let Some(meta) = fig.find_metadata(key) else {
        return "default".into();
    };
    if let Some(figment::Source::File(path)) = &meta.source {
        return format!("file {}", path.display());
    }
    let name = meta.name.as_ref();
    if name.contains("nvironment") {
        return format!("environment {ENV_PREFIX}{}", key.replace('.', "__").to_uppercase());
    }
    if name.ends_with("Flags") {
        return "command-line flag".into();
    }
    "default".into()
}

mod models;
#[cfg(test)]
mod tests;
