use super::*;
use crate::api::error::ErrorKind;

fn req(body: Value) -> Result<GenerateRequest, ApiError> {
    to_backend(&parse(body.to_string().as_bytes())?, 8192)
}

fn err(body: Value) -> String {
    req(body).unwrap_err().message
}

fn base() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

#[test]
fn roles_parts_and_history_become_the_normalised_chat() {
    let r = req(
        json!({"model": "m", "max_completion_tokens": 7, "max_tokens": 99, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}),
    )
    .unwrap();
    let m = &r.chat.messages;
    assert_eq!((m[0].role, m[0].content.as_str()), ("system", "Be brief."));
    assert_eq!((m[1].role, m[1].content.as_str()), ("user", "weather in Oslo?"));
    assert_eq!(m[2].tool_calls[0]["function"]["arguments"], json!({"city": "Oslo"}));
    assert_eq!((m[3].role, m[3].tool_call_id.as_deref()), ("tool", Some("call_1")));
    // max_completion_tokens wins over the older max_tokens; without either, the context.
    assert_eq!(r.sampling.max_tokens, 7);
    assert_eq!(req(base()).unwrap().sampling.max_tokens, 8192);
}

#[test]
fn tools_tool_choice_and_response_format_become_constraints() {
    let tools = json!([{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
                       {"type": "function", "function": {"name": "b"}}]);
    let b = with(base(), "tools", tools);
    let names = |r: GenerateRequest| match r.constraint {
        Some(Constraint::Tool { names }) => names,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names(req(with(b.clone(), "tool_choice", json!("required"))).unwrap()),
        ["a", "b"]
    );
    let one = json!({"type": "function", "function": {"name": "b"}});
    assert_eq!(names(req(with(b.clone(), "tool_choice", one)).unwrap()), ["b"]);
    let auto = req(with(b.clone(), "tool_choice", json!("auto"))).unwrap();
    assert!(auto.constraint.is_none() && auto.chat.tools.is_some());
    assert!(req(with(b.clone(), "tool_choice", json!("none")))
        .unwrap()
        .chat
        .tools
        .is_none());
    let nope = json!({"type": "function", "function": {"name": "c"}});
    assert_eq!(
        err(with(b.clone(), "tool_choice", nope)),
        "tool_choice.function.name: no tool named `c` in tools"
    );
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}});
    let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
    assert_eq!(
        req(with(base(), "response_format", format.clone())).unwrap().constraint,
        Some(Constraint::JsonSchema {
            schema,
            field: "response_format.json_schema.schema"
        })
    );
    assert_eq!(
        req(with(base(), "response_format", json!({"type": "json_object"})))
            .unwrap()
            .constraint,
        Some(Constraint::JsonSchema {
            schema: json!({"type": "object"}),
            field: "response_format.json_schema.schema"
        })
    );
    let both = with(with(b, "tool_choice", json!("required")), "response_format", format);
    assert!(err(both).starts_with("response_format: cannot be combined"));
}

#[test]
fn what_is_not_honoured_is_a_400_naming_the_field() {
    assert_eq!(err(with(base(), "n", json!(2))), "n: only 1 choice is generated");
    assert!(req(with(base(), "n", json!(1))).is_ok());
    assert!(err(with(base(), "logprobs", json!(true))).starts_with("logprobs: "));
    assert!(err(with(base(), "seed", json!(7))).starts_with("seed: not supported"));
    assert!(err(with(base(), "presence_penalty", json!(0.5))).starts_with("presence_penalty: "));
    assert!(req(with(base(), "presence_penalty", json!(0.0))).is_ok());
    assert_eq!(err(with(base(), "temprature", json!(0.5))), "temprature: unknown field");
    assert!(req(with(base(), "user", json!("u-1"))).is_ok());
    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    assert!(err(with(base(), "messages", image)).starts_with("messages[0].content[0].type: `image_url`"));
    assert_eq!(
        err(with(base(), "messages", json!([]))),
        "messages: must contain at least one message"
    );
    assert!(err(with(base(), "messages", json!([{"role": "tool", "content": "x"}])))
        .starts_with("messages[0].tool_call_id: required"));
    assert!(err(with(base(), "tools", json!([{"type": "web_search"}]))).starts_with("tools[0].type"));
    assert!(err(json!({"model": "m"})).contains("messages"));
}

#[test]
fn stop_is_a_string_or_up_to_four() {
    assert_eq!(req(with(base(), "stop", json!("END"))).unwrap().stop_sequences, ["END"]);
    assert_eq!(
        req(with(base(), "stop", json!(["a", "b"]))).unwrap().stop_sequences,
        ["a", "b"]
    );
    assert!(err(with(base(), "stop", json!(["a", "b", "c", "d", "e"]))).starts_with("stop: at most 4"));
    assert!(err(with(base(), "stop", json!(3))).starts_with("stop: expected"));
}

#[test]
fn errors_have_openais_shape_with_the_param() {
    let e = ApiError::invalid_field("max_completion_tokens", "must be at least 1");
    let v: Value = serde_json::from_slice(&super::super::error_body(&e, Some("req_1"))).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "max_completion_tokens: must be at least 1", "type": "invalid_request_error",
                         "param": "max_completion_tokens", "code": null, "request_id": "req_1"}})
    );
    let e = ApiError::new(ErrorKind::Overloaded, "memory is critical (0.5 GB available)");
    let v: Value = serde_json::from_slice(&super::super::error_body(&e, None)).unwrap();
    assert_eq!(
        (v["error"]["param"].clone(), v["error"]["code"].clone()),
        (Value::Null, json!("overloaded"))
    );
}

#[test]
fn strict_functions_are_held_to_their_schemas_under_auto() {
    let tools = json!([{"type": "function", "function": {"name": "a", "strict": true, "parameters": {"type": "object"}}},
                       {"type": "function", "function": {"name": "b"}}]);
    assert_eq!(
        req(with(base(), "tools", tools.clone())).unwrap().constraint,
        Some(Constraint::StrictTools {
            strict: vec!["a".into()]
        })
    );
    let none = with(with(base(), "tools", tools), "tool_choice", json!("none"));
    assert_eq!(req(none).unwrap().constraint, None);
}
