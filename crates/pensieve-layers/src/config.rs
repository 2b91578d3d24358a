//! The configuration of the layers: `[memory]`, `[layers]`, `[policies]`, and the keys of
//! `[server]` the stack uses (`api_keys`, `max_body_mb`, `headers`). Plain `Clone + Debug`
//! structs with serde defaults, loaded by [figment].
//!
//! The server reads these sections as part of its own configuration (the same TOML file and
//! `PENSIEVE_` variables); an app that embeds the layers loads just them with
//! [`GuardConfig::load`], and keys of the server's other sections are ignored.
//!
//! ```no_run
//! let config = pensieve_layers::config::GuardConfig::load(None)?;
//! assert!(config.memory.warning_gb > config.memory.critical_gb);
//! # Ok::<(), pensieve_layers::config::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "PENSIEVE_";

/// When the memory headers are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMode {
    /// On every response.
    Always,
    /// Only on memory refusals (which set their own).
    OnReject,
}

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

impl MemoryConfig {
    /// The first value that makes no sense: its dotted key and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (key, v) in [
            ("memory.warning_gb", self.warning_gb),
            ("memory.critical_gb", self.critical_gb),
            ("memory.emergency_gb", self.emergency_gb),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err((key, format!("must be a number of GB ≥ 0, got {v}")));
            }
        }
        if self.warning_gb <= self.critical_gb {
            return Err((
                "memory.warning_gb",
                format!(
                    "({}) must be greater than memory.critical_gb ({})",
                    self.warning_gb, self.critical_gb
                ),
            ));
        }
        if self.critical_gb <= self.emergency_gb {
            return Err((
                "memory.critical_gb",
                format!(
                    "({}) must be greater than memory.emergency_gb ({})",
                    self.critical_gb, self.emergency_gb
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.hysteresis) {
            return Err((
                "memory.hysteresis",
                format!("must be in [0, 1), got {}", self.hysteresis),
            ));
        }
        if self.sample_interval_ms == 0 || self.sample_interval_ms > 60_000 {
            return Err((
                "memory.sample_interval_ms",
                format!("must be between 1 and 60000, got {}", self.sample_interval_ms),
            ));
        }
        Ok(())
    }
}

/// `[layers]`: which layers of the `/v1` stack run (all by default). Request ids, the body
/// limit, error rendering and metrics always run.
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

impl PoliciesConfig {
    /// The first value that makes no sense: its dotted key and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.timeout_ms == 0 || self.timeout_ms > 10_000 {
            return Err((
                "policies.timeout_ms",
                format!("must be between 1 and 10000, got {}", self.timeout_ms),
            ));
        }
        if self.memory_limit_mb == 0 || self.memory_limit_mb > 4096 {
            return Err((
                "policies.memory_limit_mb",
                format!("must be between 1 and 4096, got {}", self.memory_limit_mb),
            ));
        }
        Ok(())
    }
}

/// The keys of `[server]` the stack uses (the server's other keys are its own).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    /// Accepted API keys (`x-api-key` or `Authorization: Bearer`); empty: no authentication.
    pub api_keys: Vec<String>,
    /// Largest request body accepted, in MiB (413 above it).
    pub max_body_mb: u64,
    /// Static headers added to every `/v1/` response.
    pub headers: BTreeMap<String, String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_body_mb: 32,
            headers: BTreeMap::new(),
        }
    }
}

impl HttpConfig {
    /// The first value that makes no sense: its dotted key and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_body_mb == 0 {
            return Err(("server.max_body_mb", "must be at least 1".into()));
        }
        // An empty key would let in a request with an empty `x-api-key`.
        if let Some(i) = self.api_keys.iter().position(|k| k.trim().is_empty()) {
            return Err((
                "server.api_keys",
                format!("key {i} is empty or blank: every key must have characters"),
            ));
        }
        for (name, value) in &self.headers {
            if http::HeaderName::try_from(name.as_str()).is_err()
                || http::HeaderValue::try_from(value.as_str()).is_err()
            {
                return Err(("server.headers", format!("`{name}: {value}` is not a valid header")));
            }
        }
        Ok(())
    }
}

/// What the layers and their set-up ([`Guard`](crate::guard::Guard)) read: a subset of the
/// server's configuration file, under the same keys.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GuardConfig {
    /// `[server]`: keys, body limit, static headers.
    pub server: HttpConfig,
    /// `[memory]`: sampling, tiers and their headers.
    pub memory: MemoryConfig,
    /// `[layers]`: which layers run.
    pub layers: LayersConfig,
    /// `[policies]`: WebAssembly admission policies.
    pub policies: PoliciesConfig,
}

impl GuardConfig {
    /// Defaults, then `file` (when given), then `PENSIEVE_` variables of these sections.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut fig = Figment::from(Serialized::defaults(GuardConfig::default()));
        if let Some(file) = file {
            fig = fig.merge(Toml::file(file));
        }
        fig.merge(env(&["server", "memory", "layers", "policies"]))
    }

    /// Loads and checks the configuration; the error names the key and where it was set.
    pub fn load(file: Option<&Path>) -> Result<GuardConfig, ConfigError> {
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::MissingFile(f.to_owned()));
            }
        }
        let fig = Self::figment(file);
        let config: GuardConfig = fig.extract().map_err(Box::new)?;
        config
            .check()
            .map_err(|(key, problem)| ConfigError::invalid(&fig, key, problem))?;
        Ok(config)
    }

    /// The first value that makes no sense: its dotted key and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        self.memory.check()?;
        self.policies.check()?;
        self.server.check()
    }
}

/// `PENSIEVE_` variables of `sections` only, with `__` between levels, so that unrelated
/// `PENSIEVE_*` variables do not stop start-up.
pub fn env(sections: &'static [&'static str]) -> Env {
    Env::prefixed(ENV_PREFIX).split("__").filter(move |key| {
        let key = key.as_str().to_ascii_lowercase();
        sections.iter().any(|s| key.starts_with(&format!("{s}.")))
    })
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
    /// `--config` (or `PENSIEVE_CONFIG`) names a file that does not exist.
    #[error("invalid configuration: the file {0} (named by --config or PENSIEVE_CONFIG) does not exist")]
    MissingFile(PathBuf),
}

impl ConfigError {
    /// `key` is wrong for `problem`; where it was set is read from `fig`.
    pub fn invalid(fig: &Figment, key: &str, problem: String) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            problem,
            source_name: describe_source(fig, key),
        }
    }
}

/// Where the value of `key` came from: a default, a file, an environment variable or a flag.
pub fn describe_source(fig: &Figment, key: &str) -> String {
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn guard_config_reads_its_sections_of_the_servers_file_and_ignores_the_rest() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "p.toml",
                "[server]\nport = 9\napi_keys = [\"k\"]\n[backend]\nmodel = \"x\"\n[memory]\ncritical_gb = 1.5\n",
            )?;
            jail.set_env("PENSIEVE_MEMORY__WARNING_GB", "3");
            let c = GuardConfig::load(Some(Path::new("p.toml"))).unwrap();
            assert_eq!(c.server.api_keys, ["k"]);
            assert_eq!(c.memory.critical_gb, 1.5);
            assert_eq!(c.memory.warning_gb, 3.0);
            Ok(())
        });
    }

    #[test]
    fn an_empty_api_key_is_refused() {
        let mut c = GuardConfig::default();
        c.server.api_keys = vec!["sk-1".into(), " ".into()];
        let (key, problem) = c.check().unwrap_err();
        assert_eq!(
            (key, problem.as_str()),
            (
                "server.api_keys",
                "key 1 is empty or blank: every key must have characters"
            )
        );
        c.server.api_keys = vec!["sk-1".into()];
        assert!(c.check().is_ok());
    }

    #[test]
    fn a_bad_value_names_key_and_source() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("p.toml", "[memory]\nwarning_gb = 0.5\n")?;
            let e = GuardConfig::load(Some(Path::new("p.toml"))).unwrap_err().to_string();
            assert!(e.contains("memory.warning_gb") && e.contains("p.toml"), "{e}");
            Ok(())
        });
    }
}
