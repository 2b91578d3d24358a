//! Anthropic request → the backend's normalised chat, with the checks that name the field.

use serde_json::json;

use super::error::ApiError;
use super::types::{Block, Content, MessagesRequest, Role};
use crate::backend::{Chat, ChatMessage, Constraint, GenerateRequest, Sampling};

/// Parses a request body; the error names the field (`messages[0].content[1].type: …`).
pub fn parse(body: &[u8]) -> Result<MessagesRequest, ApiError> {
    from_json(body)
}

/// Deserialises a request body (a JSON object) into `T`; a wrong field is a 400 that names its
/// path, in plain words.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("request body is empty: expected a JSON object"));
    }
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        // Not an object: say so, rather than serde's view of a struct read from a sequence.
        _ if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
            return Err(ApiError::invalid("request body must be a JSON object"));
        }
        _ => {}
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(format!("request body is not valid JSON: {inner}"));
        }
        let (field, problem) = plain(&inner.to_string());
        let path = match (path.as_str(), field) {
            (".", Some(field)) => field,
            (".", None) => return ApiError::invalid(problem),
            (path, Some(field)) => format!("{path}.{field}"),
            (path, None) => path.to_owned(),
        };
        ApiError::invalid_field(path, problem)
    })?;
    // Bytes after the object (a second object, garbage): the body is not one JSON value.
    de.end()
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// serde's words in ours: what is wrong and what is allowed, without its type names or the
/// line and column. A missing field names the field, which serde puts in the message.
fn plain(serde: &str) -> (Option<String>, String) {
    let msg = match serde.rfind(" at line ") {
        Some(at) if serde[at..].contains(" column ") => &serde[..at],
        _ => serde,
    };
    if let Some(field) = msg.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
        return (Some(field.to_owned()), "field required".to_owned());
    }
    let kind = |expected: &str| -> String {
        match expected {
            "u32" | "u64" | "usize" => "a whole number from 0 to 4294967295".into(),
            "f32" | "f64" => "a number".into(),
            "a sequence" => "a list".into(),
            "a map" => "an object".into(),
            other if other.starts_with("struct ") || other.starts_with("internally tagged enum") => "an object".into(),
            other => other.to_owned(),
        }
    };
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((got, expected)) = msg.strip_prefix(prefix).and_then(|m| m.split_once(", expected ")) {
            let got = got.replace('`', "");
            return (None, format!("must be {}, got {got}", kind(expected)));
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        if let Some((got, allowed)) = rest.split_once("`, expected ") {
            return (None, format!("unknown value `{got}`; expected {allowed}"));
        }
    }
    (None, msg.to_owned())
}

/// Checks values and builds the backend request.
pub fn to_backend(req: &MessagesRequest, vision: bool) -> Result<GenerateRequest, ApiError> {
    super::validate::request(req)?;
    if req.max_tokens == 0 {
        return Err(ApiError::invalid_field("max_tokens", "must be at least 1"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid_field("messages", "at least one message is required"));
    }
    if let Some(t) = req.temperature {
        if !(0.0..=1.0).contains(&t) {
            return Err(ApiError::invalid_field(
                "temperature",
                format!("must be between 0 and 1, got {t}"),
            ));
        }
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid_field(
                "top_p",
                format!("must be greater than 0 and at most 1, got {p}"),
            ));
        }
    }
    let mut system = match &req.system {
        None => String::new(),
        Some(c) => text_of(c, "system", vision)?,
    };
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(req.messages.len() + 1);
    for (i, m) in req.messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        match m.role {
            // A leading system message joins the system prompt; a later one becomes user text,
            // which every chat template accepts (many refuse a system turn mid-conversation).
            Role::System if messages.is_empty() => {
                let text = text_of(&m.content, &at, vision)?;
                if !system.is_empty() && !text.is_empty() {
                    system.push('\n');
                }
                system.push_str(&text);
            }
            Role::System | Role::User => {
                add_user(&mut messages, &m.content, &at, vision)?;
            }
            Role::Assistant => {
                messages.push(assistant(&m.content, &at, vision)?);
            }
        }
    }
    // A final assistant message is a prefill: the reply continues it, as Anthropic's does.
    let continue_final = match messages.last() {
        Some(m) if m.role == "assistant" && m.tool_calls.is_empty() => {
            if m.content != m.content.trim_end() {
                let at = req.messages.len() - 1;
                return Err(ApiError::invalid_field(
                    format!("messages[{at}]"),
                    "the final assistant message (a prefill) cannot end with whitespace",
                ));
            }
            !m.content.is_empty()
        }
        _ => false,
    };
    let choice = tool_choice(req)?;
    let constraint = constraint(req, &choice)?;
    if constraint.is_some() && continue_final {
        return Err(ApiError::invalid_field(
            format!("messages[{}]", req.messages.len() - 1),
            format!(
                "a final assistant message (a prefill) cannot be combined with {}",
                match constraint {
                    Some(Constraint::Tool { .. }) => "a tool_choice that forces a tool call",
                    _ => "output_config.format",
                }
            ),
        ));
    }
    if let Some(instruction) = choice.instruction() {
        if !system.is_empty() {
            system.push_str("\n\n");
        }
        system.push_str(&instruction);
    }
    if !system.is_empty() {
        messages.insert(0, msg("system", system));
    }
    // In name order: a client that lists the same tools in another order gets the same prompt
    // (and the prompt cache's prefix).
    let tools = (!req.tools.is_empty() && choice != ToolChoice::None).then(|| {
        let mut tools: Vec<_> = req.tools.iter().collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools
            .into_iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name,
                    "description": t.description.clone().unwrap_or_default(),
                    "parameters": t.input_schema.clone().unwrap_or_else(|| json!({"type": "object"})),
                }})
            })
            .collect()
    });
    Ok(GenerateRequest {
        model: req.model.clone(),
        chat: Chat {
            messages,
            tools,
            continue_final,
        },
        sampling: Sampling {
            max_tokens: req.max_tokens,
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.filter(|p| *p < 1.0),
            top_k: req.top_k.filter(|k| *k > 0),
        },
        stop_sequences: req.stop_sequences.clone(),
        constraint,
    })
}

/// What constrained decoding must hold the answer to: a forced tool call (`tool_choice` `any`
/// or `tool`), or JSON that validates against `output_config.format.schema`.
fn constraint(req: &MessagesRequest, choice: &ToolChoice) -> Result<Option<Constraint>, ApiError> {
    let format = match (&req.output_config, &req.output_format) {
        (Some(config), _) => config
            .get("format")
            .filter(|f| !f.is_null())
            .map(|f| (f, "output_config.format")),
        (None, Some(format)) => Some((format, "output_format")),
        (None, None) => None,
    };
    let schema = match format {
        None => None,
        Some((format, at)) => {
            let kind = format.get("type").and_then(|t| t.as_str());
            if kind != Some("json_schema") {
                return Err(ApiError::invalid_field(
                    format!("{at}.type"),
                    format!(
                        "expected `json_schema`, got {}",
                        format.get("type").map_or("nothing".to_string(), |t| t.to_string())
                    ),
                ));
            }
            match format.get("schema") {
                Some(schema @ serde_json::Value::Object(_)) => Some(schema.clone()),
                _ => {
                    return Err(ApiError::invalid_field(
                        format!("{at}.schema"),
                        "required, a JSON schema object",
                    ))
                }
            }
        }
    };
    Ok(match (choice, schema) {
        (ToolChoice::Any | ToolChoice::Tool(_), Some(_)) => {
            return Err(ApiError::invalid_field(
                "output_config.format",
                "cannot be combined with a tool_choice that forces a tool call",
            ))
        }
        (ToolChoice::Any, None) => {
            let mut names: Vec<String> = req.tools.iter().map(|t| t.name.clone()).collect();
            names.sort();
            Some(Constraint::Tool { names })
        }
        (ToolChoice::Tool(name), None) => Some(Constraint::Tool {
            names: vec![name.clone()],
        }),
        (_, Some(schema)) => Some(Constraint::JsonSchema {
            schema,
            field: if req.output_config.is_some() {
                "output_config.format.schema"
            } else {
                "output_format.schema"
            },
        }),
        (ToolChoice::Auto, None) => strict_tools(req.tools.iter().filter(|t| t.strict == Some(true)).map(|t| &t.name)),
        (ToolChoice::None, None) => None,
    })
}

/// Under `tool_choice: auto`, the tools marked `strict`, if any.
pub(crate) fn strict_tools<'a>(names: impl Iterator<Item = &'a String>) -> Option<Constraint> {
    let strict: Vec<String> = names.cloned().collect();
    (!strict.is_empty()).then_some(Constraint::StrictTools { strict })
}

/// `tool_choice`: `none` hides the tools from the template; `any` and `tool` are instructions in
/// the system prompt, and constrained decoding holds the answer to them (see [`constraint`]).
#[derive(Debug, PartialEq, Eq)]
enum ToolChoice {
    Auto,
    Any,
    Tool(String),
    None,
}

impl ToolChoice {
    fn instruction(&self) -> Option<String> {
        match self {
            ToolChoice::Any => Some("You must answer by calling one of the provided tools.".into()),
            ToolChoice::Tool(name) => Some(format!("You must answer by calling the tool `{name}`.")),
            ToolChoice::Auto | ToolChoice::None => None,
        }
    }
}

fn tool_choice(req: &MessagesRequest) -> Result<ToolChoice, ApiError> {
    let Some(choice) = &req.tool_choice else {
        return Ok(ToolChoice::Auto);
    };
    let kind = choice.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    let choice = match kind {
        "auto" => ToolChoice::Auto,
        "any" => ToolChoice::Any,
        "none" => ToolChoice::None,
        "tool" => {
            let name = choice.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
                ApiError::invalid_field("tool_choice.name", "required when tool_choice.type is \"tool\"")
            })?;
            if !req.tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid_field(
                    "tool_choice.name",
                    format!("no tool named `{name}` in tools"),
                ));
            }
            ToolChoice::Tool(name.to_owned())
        }
        other => {
            return Err(ApiError::invalid_field(
                "tool_choice.type",
                format!("expected one of `auto`, `any`, `tool`, `none`, got `{other}`"),
            ))
        }
    };
    if matches!(choice, ToolChoice::Any | ToolChoice::Tool(_)) && req.tools.is_empty() {
        return Err(ApiError::invalid_field("tool_choice", "requires tools"));
    }
    Ok(choice)
}

fn msg(role: &'static str, content: String) -> ChatMessage {
    ChatMessage {
        role,
        content,
        tool_calls: Vec::new(),
        tool_call_id: None,
    }
}

/// Appends user content: tool results become `tool` messages, text joins the previous user
/// message when there is one (templates expect turns to alternate).
fn add_user(out: &mut Vec<ChatMessage>, content: &Content, at: &str, vision: bool) -> Result<(), ApiError> {
    let blocks = match content {
        Content::Text(t) => {
            push_user_text(out, without_billing_header(t).into_owned());
            return Ok(());
        }
        Content::Blocks(b) => b,
    };
    let mut text = String::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match b {
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let mut result = match content {
                    None => String::new(),
                    Some(c) => text_of(c, &at, vision)?,
                };
                if *is_error {
                    result = format!("Error: {result}");
                }
                out.push(ChatMessage {
                    role: "tool",
                    content: result,
                    tool_calls: Vec::new(),
                    tool_call_id: Some(tool_use_id.clone()),
                });
            }
            other => append_block_text(&mut text, other, &at, vision)?,
        }
    }
    if !text.is_empty() || blocks.is_empty() {
        push_user_text(out, text);
    }
    Ok(())
}

fn push_user_text(out: &mut Vec<ChatMessage>, text: String) {
    match out.last_mut() {
        Some(last) if last.role == "user" => {
            last.content.push_str("\n\n");
            last.content.push_str(&text);
        }
        _ => out.push(msg("user", text)),
    }
}

fn assistant(content: &Content, at: &str, vision: bool) -> Result<ChatMessage, ApiError> {
    let mut m = msg("assistant", String::new());
    let Content::Blocks(blocks) = content else {
        m.content = text_of(content, at, vision)?;
        return Ok(m);
    };
    for (j, b) in blocks.iter().enumerate() {
        match b {
            Block::ToolUse { id, name, input } => m.tool_calls.push(json!({
                "id": id, "type": "function", "function": {"name": name, "arguments": input},
            })),
            other => append_block_text(&mut m.content, other, &format!("{at}.content[{j}]"), vision)?,
        }
    }
    Ok(m)
}

/// The text of a string or of text blocks.
/// Claude Code puts `x-anthropic-billing-header: cc_version=…; cch=…;` in a system block, with
/// values that change on every request. It is metadata for Anthropic's billing, not an
/// instruction, and if the model saw it, no two prompts would share a prefix: the prompt cache
/// could never hit. Such lines are dropped, wherever they come.
pub const BILLING_HEADER: &str = "x-anthropic-billing-header:";

/// `text` without its billing-header lines (see [`BILLING_HEADER`]).
fn without_billing_header(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(BILLING_HEADER) {
        return text.into();
    }
    let kept: Vec<&str> = text
        .split('\n')
        .filter(|line| !line.trim_start().starts_with(BILLING_HEADER))
        .collect();
    kept.join("\n").into()
}

fn text_of(content: &Content, at: &str, vision: bool) -> Result<String, ApiError> {
    match content {
        Content::Text(t) => Ok(without_billing_header(t).into_owned()),
        Content::Blocks(blocks) => {
            let mut s = String::new();
            for (j, b) in blocks.iter().enumerate() {
                append_block_text(&mut s, b, &format!("{at}.content[{j}]"), vision)?;
            }
            Ok(s)
        }
    }
}

fn append_block_text(out: &mut String, block: &Block, at: &str, vision: bool) -> Result<(), ApiError> {
    let text = match block {
        Block::Text { text } => without_billing_header(text),
        // Earlier reasoning is not shown to the model again, as Anthropic's API does.
        Block::Thinking { .. } | Block::RedactedThinking { .. } => return Ok(()),
        Block::Image { .. } if !vision => {
            return Err(ApiError::invalid_field(
                at,
                "this model does not accept images (the loaded model has no vision support)",
            ))
        }
        Block::Image { .. } | Block::Document { .. } => {
            return Err(ApiError::invalid_field(
                at,
                format!("{} blocks are not supported by this server", kind(block)),
            ))
        }
        Block::ToolUse { .. } | Block::ToolResult { .. } => {
            return Err(ApiError::invalid_field(
                at,
                format!("a {} block is not allowed here", kind(block)),
            ))
        }
    };
    if text.is_empty() && text_was_billing_only(block) {
        return Ok(());
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&text);
    Ok(())
}

/// A block that held nothing but the billing header leaves no trace (not even a blank line).
fn text_was_billing_only(block: &Block) -> bool {
    matches!(block, Block::Text { text } if text.contains(BILLING_HEADER))
}

fn kind(b: &Block) -> &'static str {
    match b {
        Block::Text { .. } => "text",
        Block::Image { .. } => "image",
        Block::Document { .. } => "document",
        Block::ToolUse { .. } => "tool_use",
        Block::ToolResult { .. } => "tool_result",
        Block::Thinking { .. } => "thinking",
        Block::RedactedThinking { .. } => "redacted_thinking",
    }
}

#[cfg(test)]
mod tests;

/// Property tests (fuzzing) over parsing and translation: whatever the bytes, the answer is a
/// request or a 400 that says something, never a panic. `PROPTEST_CASES=100000` runs it longer.
#[cfg(test)]
mod fuzz;
