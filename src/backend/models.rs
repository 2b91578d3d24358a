//! Which model answers a `model` name: [`Registry`], built from the configured models; and
//! what `/health` shows of each ([`ModelStatus`]).
//!
//! A name is matched, in order, against the models' names, their exact aliases, then their
//! glob aliases (`claude-haiku-*`; the longest pattern wins when several match, so
//! `claude-3-5-haiku-*` beats `claude-*`), then the fallback: the default model, or none.

use serde::Serialize;
use wildmatch::WildMatch;

use super::BackendError;
use crate::config::{Fallback, ModelSpec};

/// Names to models. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Registry {
    names: Vec<String>,
    exact: Vec<(String, usize)>,
    globs: Vec<(String, WildMatch, usize)>,
    default: usize,
    fallback: Fallback,
}

impl Registry {
    /// From the models (in the backend's order), the default model's name and the fallback.
    pub fn new(specs: &[ModelSpec], default: &str, fallback: Fallback) -> Registry {
        let mut exact = Vec::new();
        let mut globs = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            for alias in &spec.aliases {
                if alias.contains(['*', '?']) {
                    globs.push((alias.clone(), WildMatch::new(alias), i));
                } else {
                    exact.push((alias.clone(), i));
                }
            }
        }
        globs.sort_by_key(|(pattern, _, _)| std::cmp::Reverse(pattern.len()));
        Registry {
            names: specs.iter().map(|s| s.name.clone()).collect(),
            exact,
            globs,
            default: specs.iter().position(|s| s.name == default).unwrap_or(0),
            fallback,
        }
    }

    /// The index of the model that answers to `name`.
    pub fn resolve(&self, name: &str) -> Result<usize, BackendError> {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return Ok(i);
        }
        if let Some((_, i)) = self.exact.iter().find(|(alias, _)| alias == name) {
            return Ok(*i);
        }
        if let Some((_, _, i)) = self.globs.iter().find(|(_, glob, _)| glob.matches(name)) {
            return Ok(*i);
        }
        match self.fallback {
            Fallback::Default => Ok(self.default),
            Fallback::NotFound => Err(BackendError::UnknownModel {
                name: name.to_owned(),
                served: self.served(),
            }),
        }
    }

    /// Every name a request may use: the models' names and their aliases.
    pub fn served(&self) -> Vec<String> {
        let mut served = self.names.clone();
        served.extend(self.exact.iter().map(|(a, _)| a.clone()));
        served.extend(self.globs.iter().map(|(a, _, _)| a.clone()));
        served
    }

    /// The model names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The default model's index.
    pub fn default_index(&self) -> usize {
        self.default
    }
}

/// One configured model, as `/health` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelStatus {
    /// Its name.
    pub name: String,
    /// What it loads from.
    pub path: String,
    /// Other names it answers to.
    pub aliases: Vec<String>,
    /// `unloaded`, `loading` or `loaded`.
    pub state: &'static str,
    /// Whether it is loaded now.
    pub loaded: bool,
    /// Whether it answers names no model claims.
    pub default: bool,
    /// MLX bytes it took when it loaded (weights and what loading left), 0 while unloaded.
    pub bytes: u64,
    /// Its size estimated from its files' headers, before loading (0: nothing to read).
    pub estimated_bytes: u64,
    /// Its context in tokens (0: never loaded).
    pub context_length: u32,
    /// How it is shown tools (`unknown` until it has loaded once).
    pub tool_format: crate::backend::ToolFormat,
    /// Generations running on it now.
    pub active_generations: u32,
    /// Seconds since its last request (`None`: none yet).
    pub idle_secs: Option<f64>,
    /// Unloaded after this long idle (0: never).
    pub keep_alive_secs: u64,
    /// Generations started on it.
    pub generations: u64,
    /// Times it was loaded.
    pub loads: u64,
    /// Times it was unloaded after `keep_alive_secs` idle.
    pub unloads_idle: u64,
    /// Times it was unloaded for memory (the tier reached Warning, or another model's load).
    pub unloads_memory: u64,
    /// Times its load failed.
    pub load_errors: u64,
    /// Seconds spent loading it, in all.
    pub load_seconds: f64,
    /// Its prompt cache's disk tier (`None`: none, or the model was never loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_cache_disk: Option<super::PromptCacheDisk>,
    /// Why its last load failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// While it loads: the bytes of weights read so far of the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_progress: Option<crate::backend::LoadProgress>,
    /// Tokens generated on it, counted as they are generated.
    pub output_tokens: u64,
    /// Its prompts of over 2,048 tokens to read, while they are read.
    pub prefill_progress: Vec<crate::backend::PrefillProgress>,
    /// What speculative decoding from the prompt did on it (every load of it).
    pub speculation: Speculation,
}

/// Speculative decoding's counters (`pensieve_bridge.speculate`): acceptance is
/// `accepted_tokens / drafted_tokens`, tokens per step `tokens / sequence_steps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Speculation {
    /// Steps that verified drafts.
    pub steps: u64,
    /// Draft tokens proposed.
    pub drafted_tokens: u64,
    /// Draft tokens the model kept.
    pub accepted_tokens: u64,
    /// Decoding steps, one per generation in the batch.
    pub sequence_steps: u64,
    /// Tokens those steps gave.
    pub tokens: u64,
}

impl Speculation {
    /// What `self` counted since `before` (a batcher's counters start again at each load).
    pub fn since(&self, before: &Speculation) -> Speculation {
        Speculation {
            steps: self.steps.saturating_sub(before.steps),
            drafted_tokens: self.drafted_tokens.saturating_sub(before.drafted_tokens),
            accepted_tokens: self.accepted_tokens.saturating_sub(before.accepted_tokens),
            sequence_steps: self.sequence_steps.saturating_sub(before.sequence_steps),
            tokens: self.tokens.saturating_sub(before.tokens),
        }
    }

    /// Adds `more` to `self`.
    pub fn add(&mut self, more: &Speculation) {
        self.steps += more.steps;
        self.drafted_tokens += more.drafted_tokens;
        self.accepted_tokens += more.accepted_tokens;
        self.sequence_steps += more.sequence_steps;
        self.tokens += more.tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, aliases: &[&str]) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            path: "demo".into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            preload: false,
            keep_alive_secs: 0,
            max_concurrent: 1,
            prompt_cache_bytes: 0,
            prompt_cache_dir: String::new(),
            prompt_cache_disk_bytes: 0,
            draft: None,
        }
    }

    #[test]
    fn names_then_exact_aliases_then_the_longest_glob_then_the_fallback() {
        let specs = [
            spec("big", &["claude-*", "sonnet"]),
            spec("small", &["claude-haiku-*", "claude-3-5-haiku-latest"]),
        ];
        let r = Registry::new(&specs, "big", Fallback::Default);
        assert_eq!(r.resolve("small").unwrap(), 1);
        assert_eq!(r.resolve("sonnet").unwrap(), 0);
        assert_eq!(r.resolve("claude-3-5-haiku-latest").unwrap(), 1);
        assert_eq!(r.resolve("claude-haiku-4-5-20251001").unwrap(), 1);
        assert_eq!(r.resolve("claude-sonnet-4-5").unwrap(), 0);
        assert_eq!(r.resolve("gpt-4o").unwrap(), 0, "the default model");
        let r = Registry::new(&specs, "big", Fallback::NotFound);
        match r.resolve("gpt-4o") {
            Err(BackendError::UnknownModel { name, served }) => {
                assert_eq!(name, "gpt-4o");
                assert!(served.contains(&"claude-haiku-*".to_string()) && served.contains(&"big".to_string()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.resolve("claude-opus-4").unwrap(), 0);
    }
}
