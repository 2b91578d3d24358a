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
    // Forced calls are constrained, not only asked for.
    assert_eq!(
        tool.constraint,
        Some(Constraint::Tool {
            names: vec!["Bash".into()]
        })
    );
    assert_eq!(
        any.constraint,
        Some(Constraint::Tool {
            names: vec!["Bash".into()]
        })
    );
    assert_eq!(base(json!({"type": "auto"})).unwrap().constraint, None);
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

#[test]
fn output_config_format_becomes_a_json_schema_constraint_and_conflicts_are_400s() {
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}});
    let base = |extra: serde_json::Value| {
        let mut body = json!({"model": "m", "max_tokens": 5,
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        chat(body)
    };
    let format = json!({"type": "json_schema", "schema": schema});
    let r = base(json!({"output_config": {"format": format}})).unwrap();
    assert_eq!(
        r.constraint,
        Some(Constraint::JsonSchema {
            schema: schema.clone(),
            field: "output_config.format.schema"
        })
    );
    // The structured-outputs beta's spelling.
    let r = base(json!({"output_format": format})).unwrap();
    assert!(matches!(
        r.constraint,
        Some(Constraint::JsonSchema {
            field: "output_format.schema",
            ..
        })
    ));
    // output_config without a format (effort only) constrains nothing.
    assert_eq!(
        base(json!({"output_config": {"effort": "high"}})).unwrap().constraint,
        None
    );
    let err = |extra| base(extra).unwrap_err().message;
    assert_eq!(
        err(json!({"output_config": {"format": {"type": "text"}}})),
        "output_config.format.type: expected `json_schema`, got \"text\""
    );
    assert_eq!(
        err(json!({"output_config": {"format": {"type": "json_schema"}}})),
        "output_config.format.schema: required, a JSON schema object"
    );
    assert!(
        err(json!({"output_config": {"format": format}, "tool_choice": {"type": "any"}}))
            .starts_with("output_config.format: cannot be combined")
    );
    let prefill = json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "{"}]);
    assert_eq!(
        err(json!({"output_config": {"format": format}, "messages": prefill})),
        "messages[1]: a final assistant message (a prefill) cannot be combined with output_config.format"
    );
    assert!(
        err(json!({"tool_choice": {"type": "tool", "name": "Bash"}, "messages": prefill}))
            .ends_with("a tool_choice that forces a tool call")
    );
}

#[test]
fn strict_tools_under_auto_are_held_to_their_schemas() {
    let body = |choice: serde_json::Value| {
        chat(json!({"model": "m", "max_tokens": 5, "tool_choice": choice,
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}, "strict": true},
                      {"name": "Read", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "x"}]}))
        .unwrap()
        .constraint
    };
    assert_eq!(
        body(json!({"type": "auto"})),
        Some(Constraint::StrictTools {
            strict: vec!["Bash".into()]
        })
    );
    // A forced call is held anyway; with the tools hidden there is nothing to hold.
    assert!(matches!(body(json!({"type": "any"})), Some(Constraint::Tool { .. })));
    assert_eq!(body(json!({"type": "none"})), None);
}
