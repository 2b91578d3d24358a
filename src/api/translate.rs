//! Anthropic request → the backend's normalised chat, with the checks that name the field.

use serde_json::json;

use super::error::ApiError;
use super::types::{Block, Content, MessagesRequest, Role};
use crate::backend::{Chat, ChatMessage, GenerateRequest, Sampling};

/// Parses a request body; the error names the field (`messages[0].content[1].type: …`).
pub fn parse(body: &[u8]) -> Result<MessagesRequest, ApiError> {
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
    serde_path_to_error::deserialize(de).map_err(|e| {
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
        ApiError::invalid(format!("{path}: {problem}"))
    })
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
        return Err(ApiError::invalid("max_tokens: must be at least 1"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages: at least one message is required"));
    }
    if let Some(t) = req.temperature {
        if !(0.0..=1.0).contains(&t) {
            return Err(ApiError::invalid(format!(
                "temperature: must be between 0 and 1, got {t}"
            )));
        }
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(format!(
                "top_p: must be greater than 0 and at most 1, got {p}"
            )));
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
                return Err(ApiError::invalid(format!(
                    "messages[{at}]: the final assistant message (a prefill) cannot end with whitespace"
                )));
            }
            !m.content.is_empty()
        }
        _ => false,
    };
    let choice = tool_choice(req)?;
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
    })
}

/// `tool_choice`, as far as a local model can be held to it: `none` hides the tools from the
/// template; `any` and `tool` are instructions in the system prompt (a model may still ignore
/// them: nothing constrains its sampling).
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
            let name = choice
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| ApiError::invalid("tool_choice.name: required when tool_choice.type is \"tool\""))?;
            if !req.tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(format!(
                    "tool_choice.name: no tool named `{name}` in tools"
                )));
            }
            ToolChoice::Tool(name.to_owned())
        }
        other => {
            return Err(ApiError::invalid(format!(
                "tool_choice.type: expected one of `auto`, `any`, `tool`, `none`, got `{other}`"
            )))
        }
    };
    if matches!(choice, ToolChoice::Any | ToolChoice::Tool(_)) && req.tools.is_empty() {
        return Err(ApiError::invalid("tool_choice: requires tools"));
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
            return Err(ApiError::invalid(format!(
                "{at}: this model does not accept images (the loaded model has no vision support)"
            )))
        }
        Block::Image { .. } | Block::Document { .. } => {
            return Err(ApiError::invalid(format!(
                "{at}: {} blocks are not supported by this server",
                kind(block)
            )))
        }
        Block::ToolUse { .. } | Block::ToolResult { .. } => {
            return Err(ApiError::invalid(format!(
                "{at}: a {} block is not allowed here",
                kind(block)
            )))
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
mod tests {
    use super::*;

    fn chat(body: serde_json::Value) -> Result<GenerateRequest, ApiError> {
        to_backend(&parse(body.to_string().as_bytes())?, false)
    }

    #[test]
    fn missing_max_tokens_names_the_field() {
        let e = parse(br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert!(e.message.contains("max_tokens"), "{}", e.message);
    }

    #[test]
    fn wrong_type_names_the_path() {
        let e = parse(br#"{"model":"m","max_tokens":"x","messages":[]}"#).unwrap_err();
        assert!(e.message.starts_with("max_tokens:"), "{}", e.message);
        let e = parse(br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"video"}]}]}"#)
            .unwrap_err();
        assert!(
            e.message.contains("messages[0].content[0]") && e.message.contains("video"),
            "{}",
            e.message
        );
    }

    #[test]
    fn serde_errors_are_said_in_plain_words_with_the_field_path() {
        let msg = |body: &str| parse(body.as_bytes()).unwrap_err().message;
        assert_eq!(
            msg(r#"{"model":"m","max_tokens":-1,"messages":[]}"#),
            "max_tokens: must be a whole number from 0 to 4294967295, got integer -1"
        );
        assert_eq!(
            msg(r#"{"model":"m","max_tokens":"ten","messages":[]}"#),
            "max_tokens: must be a whole number from 0 to 4294967295, got string \"ten\""
        );
        assert_eq!(msg(r#"{"model":"m","messages":[]}"#), "max_tokens: field required");
        assert_eq!(
            msg(r#"{"model":"m","max_tokens":1,"messages":[{"content":"x"}]}"#),
            "messages[0].role: field required"
        );
        assert_eq!(
            msg(r#"{"model":"m","max_tokens":1,"temperature":"hot","messages":[]}"#),
            "temperature: must be a number, got string \"hot\""
        );
        let m = msg(r#"{"model":"m","max_tokens":1,"messages":[{"role":"robot","content":"x"}]}"#);
        assert!(
            m.starts_with("messages[0].role: unknown value `robot`; expected"),
            "{m}"
        );
        assert!(!m.contains("line 1"), "{m}");
    }

    #[test]
    fn bad_json_says_so() {
        assert!(parse(b"{not json").unwrap_err().message.contains("not valid JSON"));
        assert!(parse(b"").unwrap_err().message.contains("empty"));
    }

    #[test]
    fn billing_header_values_never_reach_the_prompt() {
        let with = |first: &str, middle: &str, tools: serde_json::Value| {
            chat(json!({
                "model": "m", "max_tokens": 10,
                "system": [
                    {"type": "text", "text": first},
                    {"type": "text", "text": format!("You are a coding agent.\n{middle}\nBe brief."),
                     "cache_control": {"type": "ephemeral"}},
                ],
                "messages": [{"role": "user", "content": "hi"}],
                "tools": tools,
            }))
            .unwrap()
            .chat
        };
        let tool = |name: &str| json!({"name": name, "input_schema": {"type": "object"}});
        let a = with(
            "x-anthropic-billing-header: cc_version=2.1.328.593; cc_entrypoint=sdk-cli; cch=1a2b3;",
            "x-anthropic-billing-header: cch=00001;",
            json!([tool("Read"), tool("Bash")]),
        );
        let b = with(
            "x-anthropic-billing-header: cc_version=2.1.328.9f1; cc_entrypoint=sdk-cli; cch=ffff0;",
            "  x-anthropic-billing-header: cch=99999;",
            json!([tool("Bash"), tool("Read")]),
        );
        assert_eq!(
            a, b,
            "the volatile values and the tool order must not change the prompt"
        );
        assert_eq!(a.messages[0].content, "You are a coding agent.\nBe brief.");
        let names: Vec<_> = a.tools.unwrap().iter().map(|t| t["function"]["name"].clone()).collect();
        assert_eq!(names, [json!("Bash"), json!("Read")]);
    }

    #[test]
    fn claude_code_shapes_are_accepted() {
        let r = chat(json!({
            "model": "claude-opus", "max_tokens": 10, "stream": true,
            "system": [{"type": "text", "text": "billing"}, {"type": "text", "text": "You are", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "reminder"}, {"type": "text", "text": "say hi"}]},
                {"role": "system", "content": [{"type": "text", "text": "env", "cache_control": {"type": "ephemeral"}}], "output_config": {"effort": "medium"}},
            ],
            "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}],
            "metadata": {"user_id": "u"}, "thinking": {"type": "adaptive", "display": "omitted"},
            "context_management": {"edits": []}, "output_config": {"effort": "high"},
        }))
        .unwrap();
        let m = &r.chat.messages;
        assert_eq!(m[0], msg("system", "billing\nYou are".into()));
        assert_eq!(m[1], msg("user", "reminder\nsay hi\n\nenv".into()));
        assert_eq!(m.len(), 2);
        assert_eq!(r.chat.tools.as_ref().unwrap()[0]["function"]["name"], "Bash");
    }

    #[test]
    fn tool_history_becomes_tool_calls_and_tool_messages() {
        let r = chat(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "and now?"}]},
        ]}))
        .unwrap();
        let m = &r.chat.messages;
        assert_eq!(m[1].tool_calls[0]["function"]["arguments"]["city"], "Oslo");
        assert_eq!(
            (m[2].role, m[2].content.as_str(), m[2].tool_call_id.as_deref()),
            ("tool", "rain", Some("tu_1"))
        );
        assert_eq!((m[3].role, m[3].content.as_str()), ("user", "and now?"));
    }

    #[test]
    fn tool_choice_is_honoured_as_far_as_a_local_model_allows() {
        let base = |choice: serde_json::Value| {
            chat(json!({"model": "m", "max_tokens": 5, "tool_choice": choice,
                "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
                "messages": [{"role": "user", "content": "x"}]}))
        };
        let none = base(json!({"type": "none"})).unwrap();
        assert!(none.chat.tools.is_none());
        let tool = base(json!({"type": "tool", "name": "Bash"})).unwrap();
        assert!(tool.chat.messages[0].content.contains("calling the tool `Bash`"));
        assert!(tool.chat.tools.is_some());
        let any = base(json!({"type": "any"})).unwrap();
        assert!(any.chat.messages[0]
            .content
            .contains("calling one of the provided tools"));
        assert_eq!(base(json!({"type": "auto"})).unwrap().chat.messages.len(), 1);
        assert!(base(json!({"type": "tool", "name": "Nope"}))
            .unwrap_err()
            .message
            .contains("Nope"));
        assert!(base(json!({"type": "maybe"}))
            .unwrap_err()
            .message
            .starts_with("tool_choice.type"));
    }

    #[test]
    fn images_are_refused_by_a_model_without_vision() {
        let e = chat(
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}),
        )
        .unwrap_err();
        assert!(
            e.message.contains("images") && e.message.contains("messages[0].content[0]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn values_out_of_range_name_the_field() {
        let base = |k: &str, v: serde_json::Value| {
            let mut b = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
            b[k] = v;
            chat(b).unwrap_err().message
        };
        assert!(base("temperature", json!(3.0)).starts_with("temperature"));
        assert!(base("top_p", json!(0.0)).starts_with("top_p"));
        assert!(base("max_tokens", json!(0)).starts_with("max_tokens"));
        assert!(base("messages", json!([])).starts_with("messages"));
    }
}

/// Property tests (fuzzing) over parsing and translation: whatever the bytes, the answer is a
/// request or a 400 that says something, never a panic. `PROPTEST_CASES=100000` runs it longer.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::api::error::ErrorKind;
    use proptest::prelude::*;
    use serde_json::Value;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
            prop::sample::select(vec![
                "user",
                "assistant",
                "system",
                "text",
                "image",
                "tool_use",
                "tool_result",
                "thinking",
                "auto",
                "tool",
                "none",
                "any"
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "type",
                        "text",
                        "role",
                        "content",
                        "source",
                        "id",
                        "name",
                        "input",
                        "tool_use_id",
                        "is_error",
                        "thinking",
                        "model",
                        "max_tokens",
                        "messages",
                        "system"
                    ]),
                    inner,
                    0..6,
                )
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    fn check(body: &[u8]) {
        match parse(body).and_then(|r| to_backend(&r, false)) {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e}");
                assert!(!e.message.is_empty());
            }
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_a_request_or_a_400(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&bytes);
        }

        #[test]
        fn any_json_is_a_request_or_a_400(v in json_value()) {
            check(v.to_string().as_bytes());
        }

        #[test]
        fn any_field_of_a_valid_request_can_be_anything(
            field in prop::sample::select(vec!["model", "max_tokens", "messages", "system", "stream", "temperature",
                "top_p", "top_k", "stop_sequences", "tools", "tool_choice", "thinking", "metadata"]),
            v in json_value(),
            content in json_value(),
        ) {
            let mut body = serde_json::json!({"model": "m", "max_tokens": 8,
                "messages": [{"role": "user", "content": content}]});
            body[field] = v;
            check(body.to_string().as_bytes());
        }
    }
}
