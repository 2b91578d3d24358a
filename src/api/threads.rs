//! Message threads: the `thread` field of a Messages request (Anthropic's beta
//! `message-threads-2026-08-12`), which the official SDKs' tool runners use.
//!
//! A request with `"thread": {"type": "create"}` is answered as usual, and its whole
//! conversation (its messages and the reply, with its `system` and `tools`) is kept under the
//! reply's message id. A request with `"thread": {"type": "continue", "previous_message_id":
//! "msg_…"}` sends only its new messages, and leaves out `system` and `tools` (the SDKs treat
//! them as fixed at creation): the kept conversation goes in front of the new messages, the kept
//! `system` and `tools` stand in for absent ones, and the result is kept under the new reply's
//! id. Conversations live in memory, bounded by count and size, oldest first out; a
//! `previous_message_id` that is not (or no longer) kept is a 404 whose `error.details.error_code`
//! is `thread_not_found`, on which the SDKs send the whole history again under a new thread.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::error::{ApiError, ErrorKind};
use super::types::{Block, Content, InputMessage, MessagesRequest, OutputBlock, Role, Tool};

/// Conversations kept at most.
const MAX_THREADS: usize = 1024;
/// Bytes of text (roughly) kept at most, over all conversations.
const MAX_BYTES: usize = 64 << 20;

/// What a request asks of threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThreadParam {
    /// Keep this conversation.
    Create,
    /// Continue the conversation kept under this message id, and keep the result.
    Continue(String),
}

/// The `thread` field of `req`, checked.
pub fn param(req: &MessagesRequest) -> Result<Option<ThreadParam>, ApiError> {
    let Some(thread) = req.thread.as_ref().filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    match thread.get("type").and_then(Value::as_str) {
        Some("create") => Ok(Some(ThreadParam::Create)),
        Some("continue") => match thread.get("previous_message_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => Ok(Some(ThreadParam::Continue(id.to_owned()))),
            _ => Err(ApiError::invalid_field(
                "thread.previous_message_id",
                "required (a message id) when thread.type is \"continue\"",
            )),
        },
        _ => Err(ApiError::invalid_field(
            "thread.type",
            format!(
                "expected `create` or `continue`, got {}",
                thread.get("type").map_or("nothing".to_string(), Value::to_string)
            ),
        )),
    }
}

/// The kept conversations.
#[derive(Debug, Default)]
pub struct Threads {
    store: Bounded<Kept>,
}

/// A map of the last entries kept, bounded by count and by (approximate) bytes, oldest first
/// out. One lock, held only to look up or insert. Message threads and the Responses API's
/// `previous_response_id` keep their conversations in one each.
#[derive(Debug)]
pub struct Bounded<T> {
    inner: Mutex<Store<T>>,
}

impl<T> Default for Bounded<T> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Store {
                by_id: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
        }
    }
}

#[derive(Debug)]
struct Store<T> {
    by_id: HashMap<String, (Arc<T>, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl<T> Bounded<T> {
    /// The entry under `id`.
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        let store = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        store.by_id.get(id).map(|(v, _)| v.clone())
    }

    /// Keeps `value` (about `bytes` large) under `id`, evicting the oldest to make room; a
    /// value larger than the whole budget is not kept.
    pub fn insert(&self, id: &str, value: T, bytes: usize) {
        if bytes > MAX_BYTES {
            tracing::warn!(bytes, "a conversation is larger than the store; not kept");
            return;
        }
        let mut store = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while store.order.len() >= MAX_THREADS || store.bytes + bytes > MAX_BYTES {
            let Some(oldest) = store.order.pop_front() else { break };
            if let Some((_, b)) = store.by_id.remove(&oldest) {
                store.bytes -= b;
            }
        }
        store.bytes += bytes;
        store.order.push_back(id.to_owned());
        store.by_id.insert(id.to_owned(), (Arc::new(value), bytes));
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).by_id.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One kept conversation.
#[derive(Debug)]
pub struct Kept {
    /// Every message, the reply last.
    pub messages: Vec<InputMessage>,
    /// The system prompt it was created with.
    pub system: Option<Content>,
    /// The tools it was created with.
    pub tools: Vec<Tool>,
}

impl Kept {
    /// `req` continued: the kept messages in front of its own, and the kept `system` and
    /// `tools` where it has none.
    pub fn continued(&self, req: &MessagesRequest) -> MessagesRequest {
        let mut full = req.clone();
        full.messages = self.messages.iter().cloned().chain(full.messages).collect();
        if full.system.is_none() {
            full.system = self.system.clone();
        }
        if full.tools.is_empty() {
            full.tools = self.tools.clone();
        }
        full
    }
}

impl Threads {
    /// The conversation kept under `previous_message_id`, or the 404 the SDKs recover from.
    pub fn history(&self, previous_message_id: &str) -> Result<Arc<Kept>, ApiError> {
        self.store.get(previous_message_id).ok_or_else(|| {
            ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "thread.previous_message_id: no conversation is kept under `{previous_message_id}` \
                         (unknown, or evicted: pensieve keeps the last {MAX_THREADS} in memory); send the \
                         whole history with thread.type \"create\""
                ),
            )
            .details(serde_json::json!({"error_code": "thread_not_found"}))
        })
    }

    /// Keeps the conversation of `req` (whole, after [`Kept::continued`]) and the reply
    /// `content` under `message_id`.
    pub fn keep(&self, message_id: &str, req: &MessagesRequest, content: &[OutputBlock]) {
        let mut messages = req.messages.clone();
        messages.push(reply(content));
        let bytes = messages.iter().map(approx_bytes).sum::<usize>()
            + req
                .tools
                .iter()
                .map(|t| 64 + t.input_schema.as_ref().map_or(0, |s| s.to_string().len()))
                .sum::<usize>();
        let kept = Kept {
            messages,
            system: req.system.clone(),
            tools: req.tools.clone(),
        };
        self.store.insert(message_id, kept, bytes);
    }

    /// Conversations kept now.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The reply as the assistant message a client would send back.
fn reply(content: &[OutputBlock]) -> InputMessage {
    let blocks = content
        .iter()
        // An empty answer's empty text block would not pass as input.
        .filter(|b| !matches!(b, OutputBlock::Text { text } if text.is_empty()))
        .map(|b| match b {
            OutputBlock::Text { text } => Block::Text { text: text.clone() },
            OutputBlock::Thinking { thinking, signature } => Block::Thinking {
                thinking: thinking.clone(),
                signature: Some(signature.clone()),
            },
            OutputBlock::ToolUse { id, name, input } => Block::ToolUse {
                id: id.clone(),
                name: name.clone(),
                input: input.clone(),
            },
        })
        .collect();
    InputMessage {
        role: Role::Assistant,
        content: Content::Blocks(blocks),
    }
}

/// About how many bytes a message holds (its text and JSON), for the store's bound.
fn approx_bytes(m: &InputMessage) -> usize {
    fn content(c: &Content) -> usize {
        match c {
            Content::Text(t) => t.len(),
            Content::Blocks(blocks) => blocks.iter().map(block).sum(),
        }
    }
    fn block(b: &Block) -> usize {
        64 + match b {
            Block::Text { text } => text.len(),
            Block::Image { source } | Block::Document { source } => source.to_string().len(),
            Block::ToolUse { id, name, input } => id.len() + name.len() + input.to_string().len(),
            Block::ToolResult {
                tool_use_id,
                content: c,
                ..
            } => tool_use_id.len() + c.as_ref().map_or(0, content),
            Block::Thinking { thinking, signature } => thinking.len() + signature.as_ref().map_or(0, String::len),
            Block::RedactedThinking { data } => data.as_ref().map_or(0, String::len),
        }
    }
    64 + content(&m.content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value) -> MessagesRequest {
        serde_json::from_value(body).unwrap()
    }

    fn asking(text: &str) -> MessagesRequest {
        req(serde_json::json!({"model": "m", "max_tokens": 1, "system": "Be brief.",
            "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": text}]}))
    }

    #[test]
    fn a_kept_conversation_comes_back_with_its_reply_and_unknown_ids_are_thread_not_found() {
        let threads = Threads::default();
        let call = OutputBlock::ToolUse {
            id: "toolu_1".into(),
            name: "get_time".into(),
            input: serde_json::json!({"zone": "UTC"}),
        };
        threads.keep("msg_1", &asking("time?"), &[call]);
        let kept = threads.history("msg_1").unwrap();
        // The SDKs continue with only the new messages, and without system and tools.
        let next = req(
            serde_json::json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}]}]}),
        );
        let full = kept.continued(&next);
        assert_eq!(full.messages.len(), 3);
        assert_eq!(full.messages[1].role, Role::Assistant);
        assert!(
            matches!(&full.messages[1].content, Content::Blocks(b) if matches!(&b[0], Block::ToolUse { id, .. } if id == "toolu_1"))
        );
        assert_eq!(full.system, Some(Content::Text("Be brief.".into())));
        assert_eq!(full.tools.len(), 1);
        let e = threads.history("msg_2").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let body: Value = serde_json::from_slice(&e.body(None)).unwrap();
        assert_eq!(body["error"]["details"]["error_code"], "thread_not_found");
    }

    #[test]
    fn the_store_is_bounded_oldest_first() {
        let threads = Threads::default();
        for i in 0..MAX_THREADS + 10 {
            threads.keep(&format!("msg_{i}"), &asking("x"), &[]);
        }
        assert_eq!(threads.len(), MAX_THREADS);
        assert!(threads.history("msg_0").is_err());
        assert!(threads.history(&format!("msg_{}", MAX_THREADS + 9)).is_ok());
        // One conversation over the whole budget is not kept at all.
        threads.keep("big", &asking(&"x".repeat(MAX_BYTES)), &[]);
        assert!(threads.history("big").is_err());
    }

    #[test]
    fn the_thread_field_is_checked() {
        let req = |thread: Value| {
            let body = serde_json::json!({"model": "m", "max_tokens": 1, "messages": [], "thread": thread});
            param(&serde_json::from_value(body).unwrap())
        };
        assert_eq!(
            req(serde_json::json!({"type": "create"})).unwrap(),
            Some(ThreadParam::Create)
        );
        assert_eq!(
            req(serde_json::json!({"type": "continue", "previous_message_id": "msg_9"})).unwrap(),
            Some(ThreadParam::Continue("msg_9".into()))
        );
        assert!(req(serde_json::json!({"type": "continue"}))
            .unwrap_err()
            .message
            .starts_with("thread.previous_message_id: required"));
        assert!(req(serde_json::json!({"type": "fork"}))
            .unwrap_err()
            .message
            .starts_with("thread.type: expected"));
        assert_eq!(req(Value::Null).unwrap(), None);
    }
}
