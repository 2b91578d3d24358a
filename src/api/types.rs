//! The Anthropic Messages API on the wire: what clients send and what we answer.
//!
//! Parsing is tolerant where clients differ (a string or blocks for `system` and `content`,
//! `role: "system"` inside `messages`, `cache_control`, `metadata`, `thinking`, unknown fields)
//! and strict where a mistake would be silent (unknown block types, wrong types).

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/messages`
#[derive(Clone, Debug, Deserialize)]
pub struct MessagesRequest {
    /// Any name: the loaded model serves it.
    pub model: String,
    /// Required, at least 1.
    pub max_tokens: u32,
    /// The conversation.
    pub messages: Vec<InputMessage>,
    /// A string or text blocks.
    #[serde(default)]
    pub system: Option<Content>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// 0 to 1; default 1.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Custom stop sequences.
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    /// Tool definitions.
    #[serde(default)]
    pub tools: Vec<Tool>,
    /// `auto`, `any`, `tool`, `none` (accepted; see the README for what is enforced).
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Accepted and ignored.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Accepted (`enabled` with `budget_tokens`, or `disabled`).
    #[serde(default)]
    pub thinking: Option<Value>,
    /// Structured outputs: `{"format": {"type": "json_schema", "schema": {...}}}`, enforced by
    /// constrained decoding.
    #[serde(default)]
    pub output_config: Option<Value>,
    /// The structured-outputs beta's name for `output_config.format`.
    #[serde(default)]
    pub output_format: Option<Value>,
    /// Message threads: `{"type": "create"}` or `{"type": "continue", "previous_message_id":
    /// …}` (see `api::threads`).
    #[serde(default)]
    pub thread: Option<Value>,
}

/// One tool definition. Server tools (with a `type` and no schema) parse too.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Tool {
    /// The tool's name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of its input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Set for Anthropic's server tools.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Its inputs always valid against its schema (constrained decoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A message's author.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person.
    User,
    /// The model.
    Assistant,
    /// Instructions, as Claude Code sends them inside `messages`.
    System,
}

/// One message.
#[derive(Clone, Debug, Deserialize)]
pub struct InputMessage {
    /// Who wrote it.
    pub role: Role,
    /// A string or blocks.
    pub content: Content,
}

/// A string, or a list of blocks.
#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Blocks.
    Blocks(Vec<Block>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of content blocks")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Content, E> {
                Ok(Content::Text(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Content, E> {
                Ok(Content::Text(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(b) = seq.next_element()? {
                    blocks.push(b);
                }
                Ok(Content::Blocks(blocks))
            }
        }
        d.deserialize_any(V)
    }
}

/// A content block. Unknown types are an error that names them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image (refused by models without vision).
    Image {
        /// `{"type": "base64", ...}` or `{"type": "url", ...}`.
        source: Value,
    },
    /// A document (refused: no document support).
    Document {
        /// The document's source.
        source: Value,
    },
    /// A tool call the assistant made.
    ToolUse {
        /// Its id.
        id: String,
        /// The tool.
        name: String,
        /// Its input.
        #[serde(default)]
        input: Value,
    },
    /// The answer to a tool call.
    ToolResult {
        /// The call answered.
        tool_use_id: String,
        /// A string or blocks.
        #[serde(default)]
        content: Option<Content>,
        /// Whether the tool failed.
        #[serde(default)]
        is_error: bool,
    },
    /// Earlier reasoning.
    Thinking {
        /// The reasoning.
        thinking: String,
        /// Opaque.
        #[serde(default)]
        signature: Option<String>,
    },
    /// Earlier reasoning, encrypted by Anthropic: nothing a local model can read.
    RedactedThinking {
        /// Opaque.
        #[serde(default)]
        data: Option<String>,
    },
}

/// Token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Prompt tokens written to the prompt cache (0 until there is one).
    pub cache_creation_input_tokens: u32,
    /// Prompt tokens read from the prompt cache (0 until there is one).
    pub cache_read_input_tokens: u32,
}

/// An output block.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputBlock {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// The model's reasoning.
    Thinking {
        /// The reasoning.
        thinking: String,
        /// Opaque to clients; ours says the block came from a local model.
        signature: String,
    },
    /// A tool call.
    ToolUse {
        /// `toolu_…`
        id: String,
        /// The tool.
        name: String,
        /// Its arguments.
        input: Value,
    },
}

/// The `signature` of thinking blocks: Anthropic's are encrypted; a local model has nothing to
/// hide, and clients only need a non-empty string to send back.
pub const THINKING_SIGNATURE: &str = "pensieve-local-thinking";

/// The answer to a non-streamed request, and the `message` of `message_start`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    /// `msg_…`
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `assistant`.
    pub role: &'static str,
    /// The model that answered.
    pub model: String,
    /// The blocks.
    pub content: Vec<OutputBlock>,
    /// Why it ended (`null` in `message_start`).
    pub stop_reason: Option<crate::backend::StopReason>,
    /// The stop sequence that ended it.
    pub stop_sequence: Option<String>,
    /// Token counts.
    pub usage: Usage,
}

impl Message {
    /// An empty message from `model`.
    pub fn new(model: &str) -> Self {
        Self {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            kind: "message",
            role: "assistant",
            model: model.to_owned(),
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: Usage::default(),
        }
    }
}
