//! `[models.<name>]` and the two `[server]` keys that route to them: several models, each
//! loaded on demand and unloaded by idle time or memory (see [`crate::backend`]).
//!
//! Without a `[models]` table, `backend.model` (or `--model`) is the one model, preloaded and
//! answering every name: [`Config::model_specs`] turns both forms into the same list.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Config;

/// `[models.<name>]`: one model the server may load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A local folder, a `.gguf` file, a Hugging Face id, or `demo`.
    pub path: String,
    /// Other names it answers to: exact names, or `*` globs (`claude-haiku-*`).
    pub aliases: Vec<String>,
    /// Loaded at start-up (otherwise on its first request).
    pub preload: bool,
    /// Unloaded after this long without a request; 0: never.
    pub keep_alive_secs: u64,
    /// Generations decoded together (default `backend.max_concurrent`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// Its prompt cache in MiB (default `backend.prompt_cache_mb`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_cache_mb: Option<u64>,
    /// Its prompt cache's disk tier in MiB (default `backend.prompt_cache_disk_mb`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_cache_disk_mb: Option<u64>,
    /// Another model of `[models]`, with the same tokenizer, that drafts tokens for this one
    /// to verify (speculative decoding); loaded with it, checked at load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<String>,
}

/// What a request for a name no model answers to gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Fallback {
    /// The default model answers it.
    #[default]
    #[serde(rename = "default")]
    Default,
    /// 404 `not_found_error`, listing the names served.
    #[serde(rename = "404")]
    NotFound,
}

/// `"default"` or `"404"` (also the number 404, as an environment variable gives it).
impl<'de> Deserialize<'de> for Fallback {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) if t == "default" => Ok(Fallback::Default),
            Raw::Text(t) if t == "404" => Ok(Fallback::NotFound),
            Raw::Number(404) => Ok(Fallback::NotFound),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "expected \"default\" or \"404\", not `{t}`"
            ))),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "expected \"default\" or \"404\", not {n}"
            ))),
        }
    }
}

/// One model as the backend runs it: the table's entry with every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Its name (the table key, or `backend.model` in the one-model form).
    pub name: String,
    /// What to load.
    pub path: String,
    /// Other names it answers to.
    pub aliases: Vec<String>,
    /// Loaded at start-up.
    pub preload: bool,
    /// Unloaded after this long idle; 0: never.
    pub keep_alive_secs: u64,
    /// Generations decoded together.
    pub max_concurrent: usize,
    /// Its prompt cache in bytes.
    pub prompt_cache_bytes: u64,
    /// `backend.prompt_cache_dir`.
    pub prompt_cache_dir: String,
    /// Its prompt cache's disk tier in bytes (0: none).
    pub prompt_cache_disk_bytes: u64,
    /// The model that drafts for it: `(name, path)`.
    pub draft: Option<(String, String)>,
}

impl Config {
    /// The models served: the `[models]` table, or `backend.model` alone.
    pub fn model_specs(&self) -> Vec<ModelSpec> {
        let b = &self.backend;
        if self.models.is_empty() {
            let name = short_name(&b.model);
            return vec![ModelSpec {
                // A local file or folder answers to its short name, and to its path as given.
                aliases: if name == b.model {
                    Vec::new()
                } else {
                    vec![b.model.clone()]
                },
                name,
                path: b.model.clone(),
                preload: true,
                keep_alive_secs: 0,
                max_concurrent: b.max_concurrent,
                prompt_cache_bytes: b.prompt_cache_mb.saturating_mul(1 << 20),
                prompt_cache_dir: super::paths::prompt_cache_dir(&b.prompt_cache_dir)
                    .display()
                    .to_string(),
                prompt_cache_disk_bytes: b.prompt_cache_disk_mb.saturating_mul(1 << 20),
                draft: None,
            }];
        }
        self.models
            .iter()
            .map(|(name, m)| ModelSpec {
                name: name.clone(),
                path: m.path.clone(),
                aliases: m.aliases.clone(),
                preload: m.preload || *name == self.default_model(),
                keep_alive_secs: m.keep_alive_secs,
                max_concurrent: m.max_concurrent.unwrap_or(b.max_concurrent),
                prompt_cache_bytes: m.prompt_cache_mb.unwrap_or(b.prompt_cache_mb).saturating_mul(1 << 20),
                prompt_cache_dir: super::paths::prompt_cache_dir(&b.prompt_cache_dir)
                    .display()
                    .to_string(),
                prompt_cache_disk_bytes: m
                    .prompt_cache_disk_mb
                    .unwrap_or(b.prompt_cache_disk_mb)
                    .saturating_mul(1 << 20),
                draft: m
                    .draft
                    .as_ref()
                    .and_then(|d| Some((d.clone(), self.models.get(d)?.path.clone()))),
            })
            .collect()
    }

    /// The model that answers names no model claims (with `fallback = "default"`), and the one
    /// `/health` names: `server.default_model`, the only model, or `backend.model`.
    pub fn default_model(&self) -> String {
        if self.models.is_empty() {
            return short_name(&self.backend.model);
        }
        match &self.server.default_model {
            Some(name) => name.clone(),
            None => self.models.keys().next().cloned().unwrap_or_default(),
        }
    }

    /// Checks the `[models]` table: `(key, problem)` for the first thing wrong.
    pub(super) fn check_models(&self) -> Result<(), (String, String)> {
        if self.models.is_empty() {
            if let Some(name) = &self.server.default_model {
                if *name != self.backend.model {
                    return Err((
                        "server.default_model".into(),
                        format!("names `{name}`, but there is no [models] table (backend.model is the one model)"),
                    ));
                }
            }
            return Ok(());
        }
        let names: Vec<&String> = self.models.keys().collect();
        match &self.server.default_model {
            Some(name) if !self.models.contains_key(name) => {
                return Err((
                    "server.default_model".into(),
                    format!("names `{name}`, which is not a model in [models] (those are {names:?})"),
                ))
            }
            None if self.models.len() > 1 => {
                return Err((
                    "server.default_model".into(),
                    format!("must name one of the models {names:?} when there are several"),
                ))
            }
            _ => {}
        }
        let mut claimed: Vec<(&str, &str)> = Vec::new();
        for (name, m) in &self.models {
            let key = |field: &str| format!("models.{name}.{field}");
            if name.is_empty() || name.contains('*') {
                return Err((
                    format!("models.{name}"),
                    "a model's name must be non-empty, without `*`".into(),
                ));
            }
            if m.path.trim().is_empty() {
                return Err((
                    key("path"),
                    "must be set: a folder, a .gguf file, a Hugging Face id or `demo`".into(),
                ));
            }
            if looks_local(&m.path) && model_path(&m.path).is_none() {
                return Err((key("path"), format!("`{}` does not exist", m.path)));
            }
            if m.max_concurrent.is_some_and(|n| n == 0 || n > 256) {
                return Err((key("max_concurrent"), "must be between 1 and 256".into()));
            }
            for alias in &m.aliases {
                if alias.is_empty() {
                    return Err((key("aliases"), "an alias must not be empty".into()));
                }
                if let Some(other) = self.models.keys().find(|other| *other == alias && *other != name) {
                    return Err((key("aliases"), format!("`{alias}` is the name of model `{other}`")));
                }
                if let Some((_, owner)) = claimed.iter().find(|(a, _)| *a == alias) {
                    return Err((key("aliases"), format!("`{alias}` is claimed by model `{owner}` too")));
                }
                claimed.push((alias, name));
            }
            if let Some(draft) = &m.draft {
                if draft == name {
                    return Err((key("draft"), "a model cannot draft for itself".into()));
                }
                if !self.models.contains_key(draft) {
                    return Err((
                        key("draft"),
                        format!("names `{draft}`, which is not a model in [models] (those are {names:?})"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The name a model given as `backend.model` (`--model`) is served under: a GGUF file's stem
/// (`SmolLM2-135M-Instruct.Q4_1`), a local folder's name, else the value itself (`demo`, a
/// Hugging Face id).
pub fn short_name(model: &str) -> String {
    if !looks_local(model) {
        return model.to_owned();
    }
    let path = Path::new(model.strip_prefix("scripted:").unwrap_or(model));
    let short = if path.extension().is_some_and(|e| e == "gguf") {
        path.file_stem()
    } else {
        path.file_name()
    };
    match short.and_then(|s| s.to_str()) {
        Some(s) if !s.is_empty() && s != "." && s != ".." => s.to_owned(),
        _ => model.to_owned(),
    }
}

/// Whether `path` names local files (rather than a Hugging Face id or `demo`).
fn looks_local(path: &str) -> bool {
    let path = path.strip_prefix("scripted:").unwrap_or(path);
    path.starts_with('/')
        || path.starts_with("./")
        || path.starts_with("../")
        || path.starts_with("~/")
        || Path::new(path).extension().is_some_and(|e| e == "gguf")
}

/// The local files of `backend.model`, if it names any (`demo` and Hugging Face ids do not).
pub fn model_path(model: &str) -> Option<PathBuf> {
    let model = model.strip_prefix("scripted:").unwrap_or(model);
    if model == "demo" {
        return None;
    }
    let path = match model.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var_os("HOME")?).join(rest),
        None => PathBuf::from(model),
    };
    path.exists().then_some(path)
}
