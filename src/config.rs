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

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use paths::{config_file, ConfigFile};
const SECTIONS: [&str; 8] = [
    "server",
    "memory",
    "backend",
    "models",
    "layers",
    "policies",
    "log",
    "dashboard",
];

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
    /// The dashboard at `/` and `/dashboard`.
    pub dashboard: DashboardConfig,
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
    /// Open connections at most: at the limit, the oldest connection without a request in
    /// flight is closed for a new one; when every one has a request in flight, new ones wait
    /// in the kernel's backlog.
    pub max_connections: usize,
    /// Seconds for a request's head to arrive, from the connection's opening or its last
    /// answer (an idle keep-alive connection closes then).
    pub header_timeout_secs: u64,
    /// Seconds for a request's body to arrive whole, from its head.
    pub body_timeout_secs: u64,
    /// With `[models]`: the model that `/health` names and that unknown names get.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_model: Option<String>,
    /// What a `model` name no model answers to gets: `"default"` or `"404"`.
    pub fallback: Fallback,
    /// With `api_keys`: `/health` and `/metrics` need a key too (`/health/live` and
    /// `/health/ready` stay open for probes).
    pub protect_health: bool,
    /// Web origins (`https://app.example`) whose pages may call the server, besides pages
    /// served from this machine; `"*"` allows any. Others get a 403.
    pub allowed_origins: Vec<String>,
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
            header_timeout_secs: 10,
            body_timeout_secs: 60,
            default_model: None,
            fallback: Fallback::Default,
            allowed_origins: Vec::new(),
            protect_health: false,
        }
    }
}

pub use models::{model_path, Fallback, ModelConfig, ModelSpec};
use pensieve_layers::config::{describe_source, env};
pub use pensieve_layers::config::{
    ConfigError, GuardConfig, HeaderMode, HttpConfig, LayersConfig, MemoryConfig, OnError, PoliciesConfig, ENV_PREFIX,
};

/// `[backend]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// A Hugging Face id, a local folder, a `.gguf` file (or a folder holding one), or `demo`.
    pub model: String,
    /// The virtual environment holding mlx and mlx-lm (a folder, or an interpreter in it);
    /// empty: `$PENSIEVE_PYTHON`, else `$VIRTUAL_ENV`, else `.venv` here (see [`paths`]).
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
    /// state folder, see [`paths`]), one folder per model.
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
    /// While generations are decoding, each batch step reads about this much prompt (in
    /// milliseconds of prefill, at the measured rate), so that a long prompt arriving does not
    /// stall running streams; 0: full 2,048-token chunks always.
    pub max_decode_stall_ms: u64,
    /// The most tokens a generation drafts from its own prompt and answer in a step, verified
    /// in one forward pass (speculative decoding by prompt lookup); 0: off.
    pub prompt_lookup_tokens: u32,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            model: "demo".into(),
            python: PathBuf::new(),
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
            max_decode_stall_ms: 500,
            prompt_lookup_tokens: 10,
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

/// `[dashboard]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// Serve the dashboard (`/`, `/dashboard`) and its snapshot (`/dashboard/snapshot`).
    pub enabled: bool,
    /// Finished requests the snapshot lists (route, model, status, tokens, latency; never
    /// prompt text).
    pub recent_requests: usize,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            recent_requests: 100,
        }
    }
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

/// Builds the layered figment: defaults, the TOML file, the environment, the flags.
/// `file` is `--config`; without it, [`config_file`] says which file is read.
pub fn figment(file: Option<&Path>, flags: &Flags) -> Figment {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = config_file(file).path {
        fig = fig.merge(Toml::file_exact(path));
    }
    fig.merge(env(&SECTIONS)).merge(Serialized::defaults(flags.clone()))
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Config, ConfigError> {
        let chosen = config_file(file);
        if let Some(f) = chosen.path.as_ref().filter(|f| chosen.required && !f.exists()) {
            return Err(ConfigError::MissingFile(f.to_owned()));
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
        let invalid = |key: &str, problem: String| ConfigError::invalid(fig, key, problem);
        // The layers' own sections, checked by the layers' crate.
        self.guard().check().map_err(|(key, problem)| invalid(key, problem))?;
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1".into()));
        }
        for (key, secs) in [
            ("server.header_timeout_secs", self.server.header_timeout_secs),
            ("server.body_timeout_secs", self.server.body_timeout_secs),
        ] {
            if secs == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if self.backend.max_concurrent == 0 || self.backend.max_concurrent > 256 {
            return Err(invalid(
                "backend.max_concurrent",
                format!("must be between 1 and 256, not {}", self.backend.max_concurrent),
            ));
        }
        if self.dashboard.recent_requests > 10_000 {
            return Err(invalid(
                "dashboard.recent_requests",
                format!("must be at most 10000, not {}", self.dashboard.recent_requests),
            ));
        }
        if self.backend.prompt_lookup_tokens > 64 {
            return Err(invalid(
                "backend.prompt_lookup_tokens",
                format!(
                    "must be at most 64 (0 turns speculation off), not {}",
                    self.backend.prompt_lookup_tokens
                ),
            ));
        }
        if self.backend.max_decode_stall_ms > 60_000 {
            return Err(invalid(
                "backend.max_decode_stall_ms",
                format!(
                    "must be at most 60000 (0 turns the budget off), not {}",
                    self.backend.max_decode_stall_ms
                ),
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
        if self.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a tracing filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// The sections the layers read, for their [`Guard`](pensieve_layers::guard::Guard) and stack.
    pub fn guard(&self) -> GuardConfig {
        GuardConfig {
            server: HttpConfig {
                api_keys: self.server.api_keys.clone(),
                max_body_mb: self.server.max_body_mb,
                headers: self.server.headers.clone(),
            },
            memory: self.memory.clone(),
            layers: self.layers,
            policies: self.policies.clone(),
        }
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
        // What the defaults resolve to on this machine, now.
        let q = |p: &Path| serde_json::Value::from(p.display().to_string());
        let chosen = config_file(file);
        out.push_str(&format!(
            "resolved.config_file = {}  # {}\n",
            match chosen.path.as_deref() {
                Some(p) => q(&std::path::absolute(p).unwrap_or(p.to_owned())),
                None => serde_json::Value::from(""),
            },
            chosen.from
        ));
        let python = match paths::find_python(&config.backend.python) {
            Ok(env) => format!("{}  # from {}", q(&env.dir), env.from),
            Err(e) => format!("\"\"  # not found: {e}"),
        };
        out.push_str(&format!(
            "resolved.state_dir = {}  # PENSIEVE_CACHE_DIR, XDG_CACHE_HOME or ~/.cache\n",
            q(&paths::state_dir())
        ));
        out.push_str(&format!(
            "resolved.models_dir = {}  # the demo model is built here\n",
            q(&paths::models_dir())
        ));
        out.push_str(&format!(
            "resolved.prompt_cache_dir = {}  # backend.prompt_cache_dir, or the state folder's\n",
            q(&paths::prompt_cache_dir(&config.backend.prompt_cache_dir))
        ));
        out.push_str(&format!("resolved.python = {python}\n"));
        out.push_str(&format!(
            "resolved.policies_dir = {}\n",
            q(&std::path::absolute(&config.policies.dir).unwrap_or(config.policies.dir.clone()))
        ));
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

mod models;
pub mod paths;
#[cfg(test)]
mod tests;
