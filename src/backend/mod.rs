//! The backend boundary: a normalised chat goes in, a stream of [`Event`]s comes out.
//!
//! [`Backend`] is what the API calls; [`MlxBackend`] is the implementation that runs mlx-lm
//! through PyO3 on a dedicated thread. No Python object escapes [`mlx`].

pub mod estimate;
mod mlx;
pub mod models;
mod stop;

use serde::Serialize;
use tokio::sync::mpsc;

pub use mlx::loading::{observe as observe_loads, LoadProgress};
pub use mlx::prefill::PrefillProgress;
pub use mlx::{MlxBackend, StartError};
pub use models::{ModelStatus, Registry, Speculation};
pub use stop::StopMatcher;

/// One message of the normalised chat, as the chat template takes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: &'static str,
    /// The text.
    pub content: String,
    /// Tool calls of an assistant turn (OpenAI-style, as chat templates expect).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// For `tool` messages: the call answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// The conversation and tools, ready for the chat template.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Chat {
    /// Messages, system first when there is one.
    pub messages: Vec<ChatMessage>,
    /// Tool definitions (`{"type": "function", "function": {...}}`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    /// The last message is the assistant's, and the reply continues it (a prefill) instead of
    /// starting a new turn.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub continue_final: bool,
}

impl Chat {
    /// The bytes of text the template is given: message contents, calls and tool definitions.
    pub fn text_bytes(&self) -> usize {
        let calls = |m: &ChatMessage| m.tool_calls.iter().map(|c| c.to_string().len()).sum::<usize>();
        let messages: usize = self.messages.iter().map(|m| m.content.len() + calls(m)).sum();
        let tools: usize = self.tools.iter().flatten().map(|t| t.to_string().len()).sum();
        messages + tools
    }

    /// Why this chat cannot fit a context of `context` tokens, known without tokenising it
    /// ([`too_long`] of its [`text_bytes`](Chat::text_bytes)). `None` when it may fit, or when
    /// either is unknown (0).
    pub fn cannot_fit(&self, context: u32, max_token_bytes: u32) -> Option<String> {
        if context == 0 || max_token_bytes == 0 {
            return None;
        }
        too_long(self.text_bytes(), context, max_token_bytes)
    }
}

/// Why `bytes` of prompt text cannot fit a context of `context` tokens: they are at least
/// `bytes / max_token_bytes` tokens (the most bytes one token stands for). `None` when they
/// may fit, or when either is unknown (0).
pub fn too_long(bytes: usize, context: u32, max_token_bytes: u32) -> Option<String> {
    if context == 0 || max_token_bytes == 0 {
        return None;
    }
    let at_least = bytes / max_token_bytes as usize;
    (at_least > context as usize).then(|| {
        format!(
            "prompt is too long: at least {at_least} tokens ({bytes} bytes, at most {max_token_bytes} bytes a token for this model) > {context} maximum"
        )
    })
}

impl GenerateRequest {
    /// One user message for `model`, greedy, no stop sequence, no constraint (for tests).
    #[cfg(test)]
    pub(crate) fn user(model: &str, content: &str, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            model: model.into(),
            chat: Chat {
                messages: vec![ChatMessage {
                    role: "user",
                    content: content.into(),
                    tool_calls: vec![],
                    tool_call_id: None,
                }],
                tools: None,
                continue_final: false,
            },
            sampling: Sampling {
                max_tokens,
                temperature: 0.0,
                top_p: None,
                top_k: None,
            },
            stop_sequences: vec![],
            constraint: None,
        }
    }
}

/// Sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sampling {
    /// At most this many tokens are generated.
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling; `None` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Top-k sampling; `None` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
}

/// One generation to run.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The model that runs it, as [`Backend::resolve`] named it.
    pub model: String,
    /// What the model sees.
    pub chat: Chat,
    /// How it samples.
    pub sampling: Sampling,
    /// Generation ends when one of these appears; it is not part of the text.
    pub stop_sequences: Vec<String>,
    /// What the output must be, enforced token by token (constrained decoding).
    pub constraint: Option<Constraint>,
}

/// A constraint on a generation's output, enforced at every token by the backend's grammar
/// engine: what the model cannot get wrong.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// The answer is JSON that validates against `schema` (`output_config.format`).
    JsonSchema {
        /// A JSON schema.
        schema: serde_json::Value,
        /// Where the client put it (`output_config.format.schema`, `response_format.json_schema
        /// .schema`, `text.format.schema`): the field an error names.
        field: &'static str,
    },
    /// The answer is one call to one of these tools, its input valid against the tool's
    /// `input_schema` (`tool_choice` `any` or `tool`).
    Tool {
        /// The tools it may call.
        names: Vec<String>,
    },
    /// The model may answer freely, but a call it makes to one of these tools (`strict: true`)
    /// has input valid against the tool's schema (`tool_choice` `auto`).
    StrictTools {
        /// The strict tools.
        strict: Vec<String>,
    },
}

/// How a model is shown tools and writes its calls (`python_bridge/pensieve_bridge/tool_format.py`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    /// Not known yet (never loaded).
    #[default]
    Unknown = 0,
    /// Its chat template's own format, parsed by mlx-lm's parser for it.
    Native = 1,
    /// Its template cannot show tools: they are described in the system prompt, and the answer
    /// is held to a JSON call or reply.
    Generic = 2,
}

impl ToolFormat {
    /// From its code in [`ToolFormat`]'s order.
    pub fn from_code(code: u8) -> ToolFormat {
        match code {
            1 => ToolFormat::Native,
            2 => ToolFormat::Generic,
            _ => ToolFormat::Unknown,
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model ended its turn.
    EndTurn,
    /// `max_tokens` was reached.
    MaxTokens,
    /// A stop sequence appeared.
    StopSequence,
    /// The model called a tool and ended its turn.
    ToolUse,
}

/// What a generation reports, in order: `Started`, any number of `Text`, then `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt is tokenised and about to be processed.
    Started {
        /// Prompt tokens.
        input_tokens: u32,
        /// Of those, how many come from the prompt cache (not processed again).
        cached_tokens: u32,
    },
    /// Generated text (never part of a stop sequence).
    Text(String),
    /// Reasoning the model did before answering (`<think>…</think>` or its family's markers).
    Thinking(String),
    /// A tool call begins (streamed): its arguments follow as [`Event::ToolInput`], and
    /// [`Event::ToolUse`] with the same id ends it.
    ToolStart {
        /// `toolu_…`
        id: String,
        /// The tool called.
        name: String,
    },
    /// The next fragment of the arguments of the call [`Event::ToolStart`] began: JSON text;
    /// the fragments joined are its arguments as the model wrote them (cut short with the
    /// generation, if it was).
    ToolInput(String),
    /// A whole tool call, parsed by the model family's tool parser; when a [`Event::ToolStart`]
    /// with this id came before, it ends that call.
    ToolUse {
        /// `toolu_…`
        id: String,
        /// The tool called.
        name: String,
        /// Its arguments.
        input: serde_json::Value,
    },
    /// The generation ended normally.
    Done {
        /// Why.
        reason: StopReason,
        /// The stop sequence that ended it.
        stop_sequence: Option<String>,
        /// Tokens generated.
        output_tokens: u32,
    },
    /// The generation failed; nothing follows.
    Failed(BackendError),
}

/// A failure on the Python side of the bridge, as Python named it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// Python raised: the exception's type (`ValueError`, `TemplateError`, `MemoryError`, …)
    /// and its message.
    #[error("{kind}: {message}")]
    Raised {
        /// The exception's type name.
        kind: String,
        /// Its message.
        message: String,
    },
    /// One generation failed inside the bridge, which caught it and reported it as the
    /// generation's error piece (its text names the exception).
    #[error("{0}")]
    Reported(String),
    /// The bridge answered with something this binary does not understand (an unknown code).
    #[error("the Python bridge broke the protocol: {0}")]
    Protocol(String),
    /// The Python environment cannot run the bridge (no site-packages for this Python, another
    /// protocol): what is wrong and what to do.
    #[error("{0}")]
    Environment(String),
    /// The model's draft model (`[models.<name>] draft`) cannot draft for it: why.
    #[error("{0}")]
    Draft(String),
    /// The backend panicked while calling the bridge (the panic is in the log).
    #[error("internal error in the backend")]
    Panicked,
}

impl BridgeError {
    /// Whether Python said the request itself is wrong (the chat template refused it, a bad
    /// value), rather than the backend failing.
    pub fn is_request_error(&self) -> bool {
        matches!(self, BridgeError::Raised { kind, .. } if matches!(kind.as_str(),
            "TemplateError" | "TemplateSyntaxError" | "UndefinedError" | "ValueError" | "TypeError"
                | "KeyError" | "IndexError" | "JSONDecodeError" | "UnicodeDecodeError" | "UnicodeEncodeError"))
    }
}

/// What a model to load must be, after a load that failed.
const LOADABLE: &str =
    "\n  backend.model (or a [models.<name>] path) must be `demo`, a local folder with config.json, \
     tokenizer and safetensors weights, a .gguf file (llama, SmolLM, Mistral, Qwen2, Qwen3 with a byte-level BPE \
     vocabulary), or a Hugging Face id that mlx-lm can download (this needs network access)";

/// Why the backend cannot serve a request.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// Too many requests are waiting.
    #[error("queue full ({queued} waiting)")]
    QueueFull {
        /// How many are waiting.
        queued: usize,
    },
    /// The model is not loaded.
    #[error("backend not ready")]
    NotReady,
    /// No model answers to this name (`server.fallback = "404"`).
    #[error("model `{name}` is not served here; the models served are {served:?} (GET /v1/models lists them)")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The names served.
        served: Vec<String>,
    },
    /// A model could not be loaded now: it would not fit, even with every idle model unloaded.
    #[error("{message}")]
    LoadRefused {
        /// Names the model, its estimated size and what is available.
        message: String,
        /// For `retry-after`.
        retry_after_secs: u32,
    },
    /// Loading a model failed (its files, its format).
    #[error(
        "could not load model `{model}`{}: {cause}{}",
        if path == model { String::new() } else { format!(" from `{path}`") },
        if matches!(cause, BridgeError::Draft(_)) { "" } else { LOADABLE }
    )]
    LoadFailed {
        /// The model's name.
        model: String,
        /// What it was loaded from.
        path: String,
        /// What Python said.
        cause: BridgeError,
    },
    /// Refused when it was about to start: memory fell while it waited.
    #[error("{0}")]
    Memory(crate::memory::Refusal),
    /// Refused before its prompt was processed: its KV cache would take memory to the critical
    /// threshold (`fits_later`: it would fit once memory is free; otherwise never here).
    #[error("{message}")]
    TooLarge {
        /// Says how much it needs, what is available and what to change.
        message: String,
        /// Whether retrying later can help.
        fits_later: bool,
        /// For `retry-after`.
        retry_after_secs: u32,
    },
    /// Aborted while running: memory reached Emergency.
    #[error("{message}")]
    Aborted {
        /// Says why, with the numbers.
        message: String,
        /// For `retry-after`.
        retry_after_secs: u32,
    },
    /// The request cannot run on this model (for example, the template refused it).
    #[error("{0}")]
    InvalidRequest(String),
    /// A field of the request cannot be used on this model (a schema the grammar engine cannot
    /// compile, a forced tool that does not exist).
    #[error("{field}: {problem}")]
    Refused {
        /// The request field at fault (OpenAI's `param`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The generation failed in the backend (Python raised, or the bridge failed).
    #[error("{0}")]
    Generation(BridgeError),
    /// The backend thread is gone.
    #[error("backend stopped")]
    Stopped,
    /// The server is stopping and its grace is over: the answer is cut.
    #[error("the server is shutting down (its grace, server.shutdown_grace_secs, is over); the answer was cut: retry")]
    ShuttingDown,
}

/// What `/health` shows of the backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BackendStatus {
    /// The default model.
    pub model: String,
    /// Serving: the backend thread runs (models load on demand).
    pub ready: bool,
    /// Generations running now.
    pub active_generations: u32,
    /// Requests waiting to start.
    pub queued: u32,
    /// Bytes in live MLX arrays.
    pub active_bytes: u64,
    /// Bytes in MLX's allocator cache; 0 whenever nothing runs.
    pub cache_bytes: u64,
    /// Peak MLX bytes since start.
    pub peak_bytes: u64,
    /// Bytes of KV cache kept for reuse by later prompts (part of `active_bytes`).
    pub prompt_cache_bytes: u64,
    /// Prompts in the prompt cache.
    pub prompt_cache_entries: u64,
    /// The prompt cache's disk tier, every model's together.
    pub prompt_cache_disk: PromptCacheDisk,
    /// KV cache bytes one token of one sequence takes: what admission multiplies a request's
    /// prompt and `max_tokens` by.
    pub kv_bytes_per_token: u64,
    /// The memory limit MLX has now (0: not set yet): `backend.mlx_memory_limit_mb`, or what
    /// MLX holds plus what memory has above `memory.emergency_gb`, whichever is less.
    pub mlx_memory_limit_bytes: u64,
    /// Every configured model, loaded or not.
    pub models: Vec<ModelStatus>,
}

/// The prompt cache's disk tier: one model's, or every model's summed (`/health`, `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PromptCacheDisk {
    /// Whether it takes and gives entries.
    pub enabled: bool,
    /// Its folder (a model's), or the folder holding the models' folders.
    pub dir: String,
    /// Why it is off, when it was turned off (a folder that cannot be written, a full disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_reason: Option<String>,
    /// Entries on disk.
    pub entries: u64,
    /// Bytes of the files on disk.
    pub bytes: u64,
    /// The cap (`backend.prompt_cache_disk_mb`).
    pub max_bytes: u64,
    /// Bytes queued for writing, still in memory.
    pub pending_bytes: u64,
    /// Prompts that started from an entry read from disk.
    pub hits: u64,
    /// Prompt tokens read from disk.
    pub hit_tokens: u64,
    /// Entries moved from memory to disk instead of dropped (memory left Safe, the memory
    /// cap, an unload, a stop).
    pub spills: u64,
    /// Bytes of those entries.
    pub spilled_bytes: u64,
    /// Files written.
    pub writes: u64,
    /// Files found corrupted, truncated or foreign, and removed.
    pub removed: u64,
    /// Seconds spent reading entries back.
    pub read_seconds: f64,
    /// Seconds the writer spent writing (off the batch loop).
    pub write_seconds: f64,
}

impl PromptCacheDisk {
    /// Every model's tier summed; the folder is the one holding theirs.
    pub fn total<'a>(tiers: impl IntoIterator<Item = &'a PromptCacheDisk>) -> PromptCacheDisk {
        let mut sum = PromptCacheDisk::default();
        let mut reasons = Vec::new();
        for t in tiers {
            sum.enabled |= t.enabled;
            if sum.dir.is_empty() {
                sum.dir = std::path::Path::new(&t.dir)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
            }
            reasons.extend(t.off_reason.clone());
            sum.entries += t.entries;
            sum.bytes += t.bytes;
            sum.max_bytes += t.max_bytes;
            sum.pending_bytes += t.pending_bytes;
            sum.hits += t.hits;
            sum.hit_tokens += t.hit_tokens;
            sum.spills += t.spills;
            sum.spilled_bytes += t.spilled_bytes;
            sum.writes += t.writes;
            sum.removed += t.removed;
            sum.read_seconds += t.read_seconds;
            sum.write_seconds += t.write_seconds;
        }
        if !sum.enabled {
            sum.off_reason = reasons.into_iter().next();
        }
        sum
    }
}

/// A running generation: its events, in order. Dropping it cancels the generation.
#[derive(Debug)]
pub struct Generation {
    /// Events from the backend thread.
    pub events: mpsc::Receiver<Event>,
    /// Whether the server's shutdown grace is over ([`abort_generations`]).
    abort: tokio::sync::watch::Receiver<bool>,
}

/// Set when the server's shutdown grace is over: running answers end with an error.
static ABORT: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(false).0);

/// Ends every answer still running: each generation's next event is
/// [`BackendError::ShuttingDown`] (a stream's `error` event, or a 503), instead of a cut.
pub fn abort_generations() {
    ABORT.send_replace(true);
}

impl Generation {
    /// A generation whose events come from `events`.
    pub fn new(events: mpsc::Receiver<Event>) -> Generation {
        Generation {
            events,
            abort: ABORT.subscribe(),
        }
    }

    /// The next event; a [`BackendError::ShuttingDown`] failure once [`abort_generations`] was
    /// called.
    pub async fn next(&mut self) -> Option<Event> {
        tokio::select! {
            biased;
            _ = self.abort.wait_for(|a| *a) => {
                tracing::warn!("answer cut: the server's shutdown grace is over");
                Some(Event::Failed(BackendError::ShuttingDown))
            }
            event = self.events.recv() => event,
        }
    }
}

/// The answer to a token count, when the backend thread gets to it.
pub type TokenCount = tokio::sync::oneshot::Receiver<Result<u32, BackendError>>;

/// An inference backend.
pub trait Backend: Send + Sync + 'static {
    /// Queues a generation; fails at once when it cannot be queued.
    fn generate(&self, request: GenerateRequest) -> Result<Generation, BackendError>;
    /// Counts the prompt tokens of `chat` with `model`'s template and tokenizer, as generation.
    fn count_tokens(&self, model: &str, chat: Chat) -> Result<TokenCount, BackendError>;
    /// The model that answers to `name` (a model's name, an alias, a glob, or the fallback).
    fn resolve(&self, name: &str) -> Result<String, BackendError>;
    /// `model`'s context in tokens (0 when unknown: never loaded yet).
    fn context_length(&self, model: &str) -> u32;
    /// The most bytes one of `model`'s tokens stands for (0 when unknown: never loaded yet).
    fn max_token_bytes(&self, _model: &str) -> u32 {
        0
    }
    /// Counters for `/health`.
    fn status(&self) -> BackendStatus;
    /// Whether `model` is loaded now (a request for it starts without a load).
    fn is_loaded(&self, _model: &str) -> bool {
        true
    }
    /// Generations running now, every model's (cheaper than [`Backend::status`]).
    fn active_generations(&self) -> u32 {
        self.status().active_generations
    }
}
