//! Forced tools and structured outputs through the real server, on the demo model: its weights
//! are random, so whatever it would say, the constraint alone must make each answer valid.

mod common;

use common::*;
use serde_json::{json, Value};

fn weather_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Weather for a city",
         "input_schema": {"type": "object", "additionalProperties": false,
            "required": ["city", "days", "unit"],
            "properties": {"city": {"type": "string", "maxLength": 16},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7},
                           "unit": {"enum": ["C", "F"]}}}},
        {"name": "get_time", "description": "The time in a zone",
         "input_schema": {"type": "object", "additionalProperties": false, "required": ["zone"],
            "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}}}
    ])
}

/// Checks a `tool_use` input against the two schemas above (by hand: no schema crate here).
fn check_call(name: &str, input: &Value) {
    let o = input
        .as_object()
        .unwrap_or_else(|| panic!("input not an object: {input}"));
    match name {
        "get_weather" => {
            assert_eq!(o.len(), 3, "{input}");
            assert!(o["city"].as_str().is_some_and(|c| c.chars().count() <= 16), "{input}");
            assert!(o["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)), "{input}");
            assert!(matches!(o["unit"].as_str(), Some("C" | "F")), "{input}");
        }
        "get_time" => {
            assert_eq!(o.len(), 1, "{input}");
            assert!(matches!(o["zone"].as_str(), Some("UTC" | "CET" | "JST")), "{input}");
        }
        other => panic!("a call to a tool that was not allowed: {other}"),
    }
}

#[tokio::test]
async fn forced_tool_and_any_always_give_a_valid_call() {
    let s = Server::start();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..12 {
        let choice = if i % 2 == 0 {
            json!({"type": "tool", "name": "get_time"})
        } else {
            json!({"type": "any"})
        };
        let body = json!({"model": "demo", "max_tokens": 120, "tools": weather_tools(), "tool_choice": choice,
            "messages": [{"role": "user", "content": format!("Question number {i}?")}]});
        let res = s.post(&body).await;
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
        let content = v["content"].as_array().unwrap();
        assert_eq!(content.len(), 1, "{v}");
        let call = &content[0];
        assert_eq!(call["type"], "tool_use");
        let name = call["name"].as_str().unwrap();
        if i % 2 == 0 {
            assert_eq!(name, "get_time");
        }
        check_call(name, &call["input"]);
        seen.insert(name.to_owned());
    }
    assert!(seen.contains("get_time"));
    // Streamed: the same, as a tool_use block with its input as JSON deltas.
    let body = json!({"model": "demo", "max_tokens": 120, "tools": weather_tools(),
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "Weather?"}]});
    let events = parse_sse(&s.post_stream(&body).await.text().await.unwrap());
    let start = events.iter().find(|e| e.event == "content_block_start").unwrap();
    assert_eq!(start.data["content_block"]["name"], "get_weather");
    let input: String = events
        .iter()
        .filter(|e| e.data["delta"]["type"] == "input_json_delta")
        .map(|e| e.data["delta"]["partial_json"].as_str().unwrap().to_owned())
        .collect();
    check_call("get_weather", &serde_json::from_str(&input).unwrap());
    let delta = events.iter().find(|e| e.event == "message_delta").unwrap();
    assert_eq!(delta.data["delta"]["stop_reason"], "tool_use");
    assert_eq!(s.idle_backend().await["cache_bytes"], 0);
}

#[tokio::test]
async fn output_config_format_always_gives_json_that_validates() {
    let s = Server::start();
    let schema = json!({"type": "object", "additionalProperties": false, "required": ["verdict", "score"],
        "properties": {"verdict": {"enum": ["yes", "no"]},
                       "score": {"type": "integer", "minimum": 0, "maximum": 10}}});
    for i in 0..8 {
        let body = json!({"model": "demo", "max_tokens": 60, "stream": i % 2 == 1,
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
            "messages": [{"role": "user", "content": format!("Is {i} even?")}]});
        let res = s.post(&body).await;
        assert_eq!(res.status(), 200);
        let text = if i % 2 == 1 {
            text_of_stream(&parse_sse(&res.text().await.unwrap()))
        } else {
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["stop_reason"], "end_turn", "{v}");
            v["content"][0]["text"].as_str().unwrap().to_owned()
        };
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(matches!(answer["verdict"].as_str(), Some("yes" | "no")), "{answer}");
        assert!(
            answer["score"].as_i64().is_some_and(|n| (0..=10).contains(&n)),
            "{answer}"
        );
        assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
    }
}

#[tokio::test]
async fn constraints_that_cannot_hold_are_400s_naming_the_field() {
    let s = Server::start();
    let post = |body: Value| {
        let s = &s;
        async move {
            let res = s.post(&body).await;
            let status = res.status().as_u16();
            let v: Value = res.json().await.unwrap();
            (status, v["error"]["message"].as_str().unwrap_or_default().to_owned())
        }
    };
    let hi = json!([{"role": "user", "content": "hi"}]);
    // A schema the grammar engine cannot use: refused before any token, streamed or not.
    let bad = json!({"type": "json_schema", "schema": {"type": "object",
        "properties": {"a": {"$ref": "#/definitions/missing"}}}});
    for stream in [false, true] {
        let (status, msg) = post(json!({"model": "demo", "max_tokens": 9, "stream": stream,
            "output_config": {"format": bad}, "messages": hi}))
        .await;
        assert_eq!(status, 400);
        assert!(
            msg.starts_with("output_config.format.schema: the schema cannot be used") && msg.contains("missing"),
            "{msg}"
        );
    }
    let (status, msg) = post(json!({"model": "demo", "max_tokens": 9,
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}]}))
    .await;
    assert_eq!(status, 400);
    assert!(msg.contains("prefill") && msg.contains("output_config.format"), "{msg}");
    let (status, msg) = post(json!({"model": "demo", "max_tokens": 2000, "tools": weather_tools(),
        "tool_choice": {"type": "any"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": hi}))
    .await;
    assert_eq!(status, 400);
    assert!(msg.contains("thinking may not be enabled"), "{msg}");
    // Nothing was left running, and the server serves.
    assert_eq!(s.idle_backend().await["active_generations"], 0);
    assert_eq!(s.post(&hello(4)).await.status(), 200);
}

#[tokio::test]
async fn strict_tools_under_auto_let_the_model_answer_freely() {
    // The grammar itself is tested in the bridge (test_constrain.py), with scripted logits: the
    // random demo model almost never opens a call. Here: the request goes through, streamed and
    // not, and the answer is whatever the model says, text included.
    let s = Server::start();
    let mut tools = weather_tools();
    tools[0]["strict"] = json!(true);
    for stream in [false, true] {
        let body = json!({"model": "demo", "max_tokens": 16, "stream": stream, "tools": tools,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}]});
        let res = s.post(&body).await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(!text.contains("\"error\""), "{text}");
    }
    assert_eq!(s.idle_backend().await["cache_bytes"], 0);
}
