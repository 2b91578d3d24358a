//! The boundary with the Python bridge, typed: the [`Batcher`] trait the worker drives, and the
//! small codes Python answers with (`python_bridge/pensieve_bridge/protocol.py` has the same
//! ones; they are part of the protocol schema that `python.rs` compares with the bridge's when
//! it loads it).

use crate::backend::{BridgeError, Chat, GenerateRequest, PromptCacheDisk};
use crate::memory::Tier;

/// What a piece of a step's output is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Answer text.
    Text(String),
    /// Reasoning.
    Thinking(String),
    /// A whole tool call: JSON `{"name": ..., "arguments": {...}}`. It ends the call that
    /// [`Piece::ToolStart`] began, if one is open.
    Tool(String),
    /// This generation failed; why.
    Error(String),
    /// A tool call begins: the tool's name (its arguments stream next).
    ToolStart(String),
    /// The next fragment of the open call's arguments (JSON text).
    ToolArgs(String),
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// The model ended its turn (or mlx-lm caught a stop sequence).
    Stop,
    /// `max_tokens`.
    Length,
    /// A tool call ended the turn.
    ToolUse,
    /// Failed (its `Piece::Error` says why).
    Error,
    /// Stopped because MLX went over its memory limit (its `Piece::Error` says how much).
    Memory,
}

/// What [`Batcher::add`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Added {
    /// In the batch as `uid`.
    Started {
        /// The batcher's id for it.
        uid: u64,
        /// Prompt tokens.
        input_tokens: u32,
        /// Of those, from the prompt cache.
        cached_tokens: u32,
    },
    /// Not started: the prompt is longer than the context.
    TooLong {
        /// Prompt tokens.
        input_tokens: u32,
    },
    /// Not started: its constraint (a schema, a forced tool) cannot be used.
    Refused {
        /// The request field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Not started yet: its prompt's cache is being read from disk, off the loop; add it again.
    Reading,
}

/// One generation's output from one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stepped {
    /// Which generation.
    pub uid: u64,
    /// Its new pieces, in order.
    pub pieces: Vec<Piece>,
    /// Set on its last step.
    pub finish: Option<Finish>,
}

/// MLX's memory counters and the prompt cache's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    pub active: u64,
    pub cache: u64,
    pub peak: u64,
    pub prompt_cache_bytes: u64,
    pub prompt_cache_entries: u64,
}

/// The continuous batch and the model, as the worker drives them. `Err` is what the other side
/// said (a Python exception, with its type); a panic is the worker's to contain.
pub(crate) trait Batcher {
    /// The model's context in tokens (0: unknown).
    fn context_length(&self) -> u32;
    /// KV cache bytes one token of one sequence takes (0: unknown).
    fn kv_bytes_per_token(&self) -> u64;
    /// How the model is shown tools and writes its calls.
    fn tool_format(&self) -> ToolFormat {
        ToolFormat::Native
    }
    /// The most bytes one token stands for (0: unknown).
    fn max_token_bytes(&self) -> u32 {
        0
    }
    /// Renders a request and puts it in the batch (or says it is too long). `Err`: the chat
    /// template refused it.
    fn add(&mut self, request: &GenerateRequest, context_length: u32) -> Result<Added, BridgeError>;
    /// One decoding step of every running generation. `Err`: the model itself failed, and the
    /// whole batch with it.
    fn step(&mut self) -> Result<Vec<Stepped>, BridgeError>;
    /// Removes generations; with `keep`, what they computed goes into the prompt cache.
    fn cancel(&mut self, uids: &[u64], keep: bool) -> Result<(), BridgeError>;
    /// Forgets every generation and starts a new batch (after a failure of the model).
    fn reset(&mut self) -> Result<(), BridgeError>;
    /// Where finished generations go; anything but [`Caching::Memory`] releases the prompt
    /// cache (to the disk tier, when there is one).
    fn set_caching(&mut self, caching: Caching) -> Result<(), BridgeError>;
    /// The prompt cache's disk tier (`None`: none); frees what its finished writes held.
    fn disk_stats(&mut self) -> Result<Option<PromptCacheDisk>, BridgeError> {
        Ok(None)
    }
    /// Speculative decoding's counters since the batcher opened.
    fn speculation(&mut self) -> Result<crate::backend::Speculation, BridgeError> {
        Ok(crate::backend::Speculation::default())
    }
    /// For each of `uids` (generations whose prompt is being read): prompt tokens in its KV
    /// cache so far, cached ones included (`None`: not running).
    fn prefill_progress(&mut self, uids: &[u64]) -> Result<Vec<Option<u32>>, BridgeError> {
        Ok(vec![None; uids.len()])
    }
    /// Prompt tokens of `chat`, with the same template as generation; `None` while a long
    /// prompt is rendered off the batch thread (ask again with the same chat).
    fn count_tokens(&mut self, chat: &Chat) -> Result<Option<u32>, BridgeError>;
    /// Frees MLX's allocator cache (`thorough`: after a cycle collection); the bytes left.
    fn clear_cache(&mut self, thorough: bool) -> Result<u64, BridgeError>;
    /// The memory counters.
    fn memory(&mut self) -> Result<Memory, BridgeError>;
    /// Sets MLX's memory limit, which the batcher watches at every step: a step that goes over
    /// it ends the largest generation with [`Finish::Memory`].
    fn set_memory_limit(&mut self, bytes: u64) -> Result<(), BridgeError>;
}

pub(crate) use crate::backend::ToolFormat;

/// Where finished generations' KV caches go, by memory tier ([`Batcher::set_caching`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caching {
    /// Dropped, and the prompt cache released (Critical, Emergency; an unload, a stop).
    Off = 0,
    /// Into the prompt cache in memory (Safe).
    Memory = 1,
    /// Written to the disk tier, the prompt cache released (Warning): a session's next turn
    /// reads its prefix from disk instead of processing it again.
    Disk = 2,
}

impl Caching {
    /// What memory tier `tier` allows.
    pub fn for_tier(tier: Tier) -> Caching {
        match tier {
            Tier::Safe => Caching::Memory,
            Tier::Warning => Caching::Disk,
            Tier::Critical | Tier::Emergency => Caching::Off,
        }
    }
}

/// Every code, as Python's `protocol.codes()` names them.
pub(crate) const CODES: [(&str, u8); 18] = [
    ("Piece.TEXT", 0),
    ("Piece.THINKING", 1),
    ("Piece.TOOL", 2),
    ("Piece.ERROR", 3),
    ("Piece.TOOL_START", 4),
    ("Piece.TOOL_ARGS", 5),
    ("Finish.STOP", 0),
    ("Finish.LENGTH", 1),
    ("Finish.TOOL_USE", 2),
    ("Finish.ERROR", 3),
    ("Finish.MEMORY", 4),
    ("Added.STARTED", 0),
    ("Added.TOO_LONG", 1),
    ("Added.REFUSED", 2),
    ("Added.READING", 3),
    ("Caching.OFF", 0),
    ("Caching.MEMORY", 1),
    ("Caching.DISK", 2),
];

impl Piece {
    /// From Python's `(code, payload)`.
    pub fn decode(code: u8, payload: String) -> Result<Piece, BridgeError> {
        Ok(match code {
            0 => Piece::Text(payload),
            1 => Piece::Thinking(payload),
            2 => Piece::Tool(payload),
            3 => Piece::Error(payload),
            4 => Piece::ToolStart(payload),
            5 => Piece::ToolArgs(payload),
            other => return Err(BridgeError::Protocol(format!("unknown piece code {other}"))),
        })
    }
}

impl Finish {
    /// From Python's code.
    pub fn decode(code: u8) -> Result<Finish, BridgeError> {
        Ok(match code {
            0 => Finish::Stop,
            1 => Finish::Length,
            2 => Finish::ToolUse,
            3 => Finish::Error,
            4 => Finish::Memory,
            other => return Err(BridgeError::Protocol(format!("unknown finish code {other}"))),
        })
    }
}

impl Added {
    /// From the fields of Python's `AddResult`.
    pub fn decode(
        code: u8,
        uid: u64,
        input_tokens: u32,
        cached_tokens: u32,
        field: String,
        message: String,
    ) -> Result<Added, BridgeError> {
        Ok(match code {
            0 => Added::Started {
                uid,
                input_tokens,
                cached_tokens,
            },
            1 => Added::TooLong { input_tokens },
            2 => Added::Refused { field, message },
            3 => Added::Reading,
            other => return Err(BridgeError::Protocol(format!("unknown add code {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decode_to_their_variants_and_unknown_ones_are_errors() {
        assert_eq!(Piece::decode(2, "{}".into()), Ok(Piece::Tool("{}".into())));
        assert_eq!(Finish::decode(1), Ok(Finish::Length));
        assert_eq!(
            Added::decode(1, 0, 99, 0, String::new(), String::new()),
            Ok(Added::TooLong { input_tokens: 99 })
        );
        assert_eq!(
            Added::decode(2, 0, 9, 0, "tools".into(), "no".into()),
            Ok(Added::Refused {
                field: "tools".into(),
                message: "no".into()
            })
        );
        assert_eq!(
            Piece::decode(9, String::new()),
            Err(BridgeError::Protocol("unknown piece code 9".into()))
        );
        assert!(Finish::decode(7).is_err() && Added::decode(5, 0, 0, 0, String::new(), String::new()).is_err());
    }
}
