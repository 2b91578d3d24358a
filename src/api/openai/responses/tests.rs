use super::*;
use crate::backend::Constraint;

fn req(body: Value) -> Result<(GenerateRequest, Vec<ChatMessage>), ApiError> {
    let r: ResponsesRequest = serde_json::from_value(body).unwrap();
    to_backend(&r, 8192, &Kept::default())
}

#[test]
fn codex_shaped_input_becomes_the_normalised_chat() {
    let (r, history) = req(json!({"model": "local", "instructions": "Be a coding agent.", "stream": true,
        "store": false, "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "k", "parallel_tool_calls": true, "tool_choice": "auto",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]},
            {"type": "reasoning", "summary": [], "encrypted_content": "xyz"},
            {"type": "function_call", "call_id": "call_1", "name": "exec_command", "arguments": "{\"cmd\": \"ls\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"}],
        "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
                  {"type": "namespace", "name": "agents", "tools": [{"type": "function", "name": "close_agent"}]},
                  {"type": "web_search", "external_web_access": false}]}))
    .unwrap();
    let m = &r.chat.messages;
    assert_eq!(
        (m[0].role, m[0].content.as_str()),
        ("system", "Be a coding agent.\n\nSandbox: read-only.")
    );
    assert_eq!((m[1].role, m[1].content.as_str()), ("user", "list files"));
    assert_eq!(m[2].role, "assistant");
    assert_eq!(m[2].tool_calls[0]["function"]["arguments"], json!({"cmd": "ls"}));
    assert_eq!((m[3].role, m[3].tool_call_id.as_deref()), ("tool", Some("call_1")));
    // Function tools, a namespace's too; hosted tools are left out.
    let tools = r.chat.tools.unwrap();
    let names: Vec<_> = tools.iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["exec_command", "close_agent"]);
    // What is kept for previous_response_id has no system prompt.
    assert_eq!(history.len(), 3);
    assert_eq!(r.sampling.max_tokens, 8192);
}

#[test]
fn continuations_formats_and_refusals() {
    let kept = Kept::default();
    kept.insert("resp_1", vec![message("user", "hi".into(), Vec::new(), None)], 10);
    let r: ResponsesRequest =
        serde_json::from_value(json!({"input": "again", "previous_response_id": "resp_1"})).unwrap();
    let (r, _) = to_backend(&r, 0, &kept).unwrap();
    assert_eq!(r.chat.messages.len(), 2);
    assert_eq!(
        r.sampling.max_tokens,
        u32::MAX,
        "to the context, which the backend knows"
    );
    let r: ResponsesRequest = serde_json::from_value(json!({"input": "x", "previous_response_id": "resp_2"})).unwrap();
    let e = to_backend(&r, 0, &kept).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let schema = json!({"type": "object"});
    let (r, _) =
        req(json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "o", "schema": schema}}})).unwrap();
    assert_eq!(
        r.constraint,
        Some(Constraint::JsonSchema {
            schema,
            field: "text.format.schema"
        })
    );
    let e = |body| req(body).unwrap_err().message;
    assert_eq!(e(json!({"input": "x", "temprature": 1})), "temprature: unknown field");
    assert!(e(json!({"input": [{"type": "computer_call"}]})).starts_with("input[0].type: `computer_call`"));
    assert!(e(json!({"input": 3})).starts_with("input: expected"));
    assert!(
        e(json!({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}))
            .starts_with("input[0].call_id: required")
    );
}
