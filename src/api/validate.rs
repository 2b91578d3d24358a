//! The checks Anthropic's API makes that parsing alone does not, each a 400
//! `invalid_request_error` naming the field: code tested against pensieve must not fail against
//! the real API.

use super::error::ApiError;
use super::types::{Block, Content, MessagesRequest, Role};

/// Every check, in the order a reader meets the fields.
pub fn request(req: &MessagesRequest) -> Result<(), ApiError> {
    for (i, m) in req.messages.iter().enumerate() {
        non_empty(m.role, &m.content, i)?;
    }
    tool_results_answer_calls(req)?;
    for (i, stop) in req.stop_sequences.iter().enumerate() {
        if stop.trim().is_empty() {
            return Err(ApiError::invalid_field(
                format!("stop_sequences[{i}]"),
                "each stop sequence must contain non-whitespace characters",
            ));
        }
    }
    thinking(req)?;
    tools(req)
}

/// Text blocks must hold text, and a user turn must say something.
fn non_empty(role: Role, content: &Content, i: usize) -> Result<(), ApiError> {
    match content {
        Content::Text(t) if t.is_empty() && role != Role::Assistant => Err(ApiError::invalid_field(
            format!("messages[{i}].content"),
            format!("a {} message must have non-empty content", role_name(role)),
        )),
        Content::Blocks(blocks) if blocks.is_empty() && role != Role::Assistant => Err(ApiError::invalid_field(
            format!("messages[{i}].content"),
            format!("a {} message must have at least one content block", role_name(role)),
        )),
        Content::Blocks(blocks) => {
            for (j, b) in blocks.iter().enumerate() {
                if matches!(b, Block::Text { text } if text.is_empty()) {
                    return Err(ApiError::invalid_field(
                        format!("messages[{i}].content[{j}].text"),
                        "text content blocks must be non-empty",
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::System => "system",
    }
}

/// Calls and results pair up, as Anthropic checks them: every `tool_use` id is unique in the
/// conversation, a `tool_result` answers a `tool_use` of the assistant message just before it,
/// at most once, and every `tool_use` is answered in the next message (when there is one).
fn tool_results_answer_calls(req: &MessagesRequest) -> Result<(), ApiError> {
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    // The calls of the assistant message just before, and where that message is.
    let mut calls: Vec<&str> = Vec::new();
    let mut asked_at = 0;
    for (i, m) in req.messages.iter().enumerate() {
        let blocks: &[Block] = match &m.content {
            Content::Blocks(b) => b,
            Content::Text(_) => &[],
        };
        if m.role == Role::Assistant {
            unanswered(&calls, asked_at)?;
            calls.clear();
            asked_at = i;
            for (j, b) in blocks.iter().enumerate() {
                if let Block::ToolUse { id, .. } = b {
                    if !seen.insert(id.as_str()) {
                        return Err(ApiError::invalid_field(
                            format!("messages[{i}].content[{j}].id"),
                            format!("`{id}` is the id of an earlier tool_use block: ids must be unique"),
                        ));
                    }
                    calls.push(id.as_str());
                }
            }
            continue;
        }
        for (j, b) in blocks.iter().enumerate() {
            if let Block::ToolResult { tool_use_id, .. } = b {
                let at = format!("messages[{i}].content[{j}].tool_use_id");
                match calls.iter().position(|c| *c == tool_use_id.as_str()) {
                    Some(k) => {
                        calls.swap_remove(k);
                    }
                    None if seen.contains(tool_use_id.as_str()) && asked_at + 1 == i => {
                        return Err(ApiError::invalid_field(
                            at,
                            format!("`{tool_use_id}` is answered twice: one tool_result per tool_use"),
                        ))
                    }
                    None => {
                        return Err(ApiError::invalid_field(
                            at,
                            format!(
                                "`{tool_use_id}` answers no tool_use block in \
                             the assistant message before it"
                            ),
                        ))
                    }
                }
            }
        }
        unanswered(&calls, asked_at)?;
        calls.clear();
    }
    Ok(())
}

/// Calls of the assistant message at `at` that the next message did not answer.
fn unanswered(calls: &[&str], at: usize) -> Result<(), ApiError> {
    match calls.first() {
        None => Ok(()),
        Some(id) => Err(ApiError::invalid_field(
            format!("messages[{}]", at + 1),
            format!(
                "the tool_use `{id}` of messages[{at}] has no tool_result here: each tool_use is answered by a \
                 tool_result in the next message"
            ),
        )),
    }
}

/// `thinking: {"type": "enabled", "budget_tokens": N}`: 1024 ≤ N < `max_tokens`, and no
/// temperature but 1.
fn thinking(req: &MessagesRequest) -> Result<(), ApiError> {
    let Some(t) = &req.thinking else { return Ok(()) };
    if t.get("type").and_then(|v| v.as_str()) != Some("enabled") {
        return Ok(());
    }
    let Some(budget) = t.get("budget_tokens").and_then(|b| b.as_u64()) else {
        return Err(ApiError::invalid_field(
            "thinking.budget_tokens",
            "required (a whole number) when thinking is enabled",
        ));
    };
    if budget < 1024 {
        return Err(ApiError::invalid_field(
            "thinking.budget_tokens",
            format!("must be at least 1024, got {budget}"),
        ));
    }
    if budget >= req.max_tokens as u64 {
        return Err(ApiError::invalid_field(
            "thinking.budget_tokens",
            format!("must be less than max_tokens ({}), got {budget}", req.max_tokens),
        ));
    }
    if let Some(temp) = req.temperature.filter(|t| *t != 1.0) {
        return Err(ApiError::invalid_field(
            "temperature",
            format!("may only be 1 when thinking is enabled, got {temp}"),
        ));
    }
    let forced = req
        .tool_choice
        .as_ref()
        .and_then(|c| c.get("type"))
        .and_then(|t| t.as_str())
        .is_some_and(|t| t == "any" || t == "tool");
    if forced {
        return Err(ApiError::invalid_field(
            "tool_choice",
            "thinking may not be enabled when tool_choice forces tool use",
        ));
    }
    Ok(())
}

/// Tool names: unique, and `^[a-zA-Z0-9_-]{1,128}$`.
fn tools(req: &MessagesRequest) -> Result<(), ApiError> {
    for (i, t) in req.tools.iter().enumerate() {
        let ok = (1..=128).contains(&t.name.len())
            && t.name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        if !ok {
            return Err(ApiError::invalid_field(
                format!("tools[{i}].name"),
                format!("must be 1 to 128 letters, digits, `_` or `-`, got `{}`", t.name),
            ));
        }
        // A client tool needs its schema (Anthropic's server tools have a `type` and none).
        let custom = t.kind.as_deref().is_none_or(|k| k == "custom");
        if custom && !t.input_schema.as_ref().is_some_and(|s| s.is_object()) {
            return Err(ApiError::invalid_field(
                format!("tools[{i}].input_schema"),
                format!("required, a JSON schema object (tool `{}`)", t.name),
            ));
        }
        if let Some(j) = req.tools[..i].iter().position(|u| u.name == t.name) {
            return Err(ApiError::invalid_field(
                format!("tools[{i}].name"),
                format!("`{}` is also the name of tools[{j}]; tool names must be unique", t.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::translate::parse;
    use serde_json::json;

    fn check(body: serde_json::Value) -> Result<(), String> {
        request(&parse(&serde_json::to_vec(&body).unwrap()).unwrap()).map_err(|e| e.message)
    }

    fn base() -> serde_json::Value {
        json!({"model": "m", "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn a_plain_request_passes() {
        assert_eq!(check(base()), Ok(()));
    }

    #[test]
    fn empty_text_and_empty_user_turns_are_refused() {
        let mut b = base();
        b["messages"][0]["content"] = json!([{"type": "text", "text": ""}]);
        assert_eq!(
            check(b.clone()).unwrap_err(),
            "messages[0].content[0].text: text content blocks must be non-empty"
        );
        b["messages"][0]["content"] = json!("");
        assert!(check(b.clone())
            .unwrap_err()
            .starts_with("messages[0].content: a user message"));
        b["messages"][0]["content"] = json!([]);
        assert!(check(b).unwrap_err().contains("at least one content block"));
    }

    #[test]
    fn whitespace_stop_sequences_are_refused() {
        for stop in ["", "  \n"] {
            let mut b = base();
            b["stop_sequences"] = json!(["ok", stop]);
            assert!(check(b).unwrap_err().starts_with("stop_sequences[1]:"));
        }
    }

    #[test]
    fn a_thinking_budget_is_bounded_and_forbids_other_temperatures() {
        let mut b = base();
        b["thinking"] = json!({"type": "enabled", "budget_tokens": 512});
        assert!(check(b.clone()).unwrap_err().contains("at least 1024, got 512"));
        b["thinking"]["budget_tokens"] = json!(4000);
        assert!(check(b.clone()).unwrap_err().contains("less than max_tokens (2000)"));
        b["thinking"]["budget_tokens"] = json!(1024);
        b["temperature"] = json!(0.5);
        assert!(check(b.clone()).unwrap_err().starts_with("temperature: may only be 1"));
        b["temperature"] = json!(1.0);
        assert_eq!(check(b.clone()), Ok(()));
        b["tools"] = json!([{"name": "read_file", "input_schema": {"type": "object"}}]);
        b["tool_choice"] = json!({"type": "any"});
        assert_eq!(
            check(b.clone()).unwrap_err(),
            "tool_choice: thinking may not be enabled when tool_choice forces tool use"
        );
        b["tool_choice"] = json!({"type": "auto"});
        assert_eq!(check(b.clone()), Ok(()));
        // Claude Code's adaptive thinking is not budgeted.
        b["thinking"] = json!({"type": "adaptive", "display": "omitted"});
        b["temperature"] = json!(0.2);
        assert_eq!(check(b), Ok(()));
    }

    #[test]
    fn tool_names_are_unique_and_well_formed_and_client_tools_have_a_schema() {
        let tool = |name: &str| json!({"name": name, "input_schema": {"type": "object"}});
        let mut b = base();
        b["tools"] = json!([tool("read_file"), tool("bad name")]);
        assert!(check(b.clone())
            .unwrap_err()
            .starts_with("tools[1].name: must be 1 to 128"));
        b["tools"] = json!([tool("read_file"), tool("x"), tool("read_file")]);
        assert!(check(b.clone())
            .unwrap_err()
            .contains("tools[2].name: `read_file` is also the name of tools[0]"));
        b["tools"] = json!([tool("read_file"), {"name": "x"}]);
        assert_eq!(
            check(b.clone()).unwrap_err(),
            "tools[1].input_schema: required, a JSON schema object (tool `x`)"
        );
        // A server tool has a type and no schema.
        b["tools"] = json!([tool("read_file"), {"type": "web_search_20250305", "name": "web_search"}]);
        assert_eq!(check(b), Ok(()));
    }

    #[test]
    fn a_tool_result_must_answer_a_call_just_before_it() {
        let call =
            json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}]});
        let answer = |id: &str| json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "ok"}]});
        let mut b = base();
        b["messages"] = json!([{"role": "user", "content": "go"}, call, answer("toolu_1")]);
        assert_eq!(check(b.clone()), Ok(()));
        b["messages"] = json!([{"role": "user", "content": "go"}, call, answer("toolu_2")]);
        assert!(check(b.clone())
            .unwrap_err()
            .starts_with("messages[2].content[0].tool_use_id: `toolu_2` answers no"));
        // Not an earlier turn's call either.
        b["messages"] = json!([{"role": "user", "content": "go"}, call, answer("toolu_1"),
            {"role": "assistant", "content": "done"}, answer("toolu_1")]);
        assert!(check(b.clone())
            .unwrap_err()
            .starts_with("messages[4].content[0].tool_use_id"));
        // A call unanswered in the next message.
        b["messages"] = json!([{"role": "user", "content": "go"}, call, {"role": "user", "content": "and?"}]);
        assert!(check(b.clone())
            .unwrap_err()
            .starts_with("messages[2]: the tool_use `toolu_1` of messages[1] has no tool_result"));
        // A call that ends the conversation waits for its result: fine.
        b["messages"] = json!([{"role": "user", "content": "go"}, call]);
        assert_eq!(check(b.clone()), Ok(()));
        // Two results for one call.
        let twice = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "again"}]});
        b["messages"] = json!([{"role": "user", "content": "go"}, call, twice]);
        assert!(check(b.clone())
            .unwrap_err()
            .starts_with("messages[2].content[1].tool_use_id: `toolu_1` is answered twice"));
        // The same id for two calls.
        b["messages"] = json!([{"role": "user", "content": "go"}, call, answer("toolu_1"), call, answer("toolu_1")]);
        assert!(check(b)
            .unwrap_err()
            .starts_with("messages[3].content[0].id: `toolu_1` is the id of an earlier"));
    }
}
