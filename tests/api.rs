//! Anthropic API fidelity against the real server: tool calls, thinking, count_tokens, models,
//! context overflow, images. The demo model's own text is random, so tool calls and thinking
//! come from scripted replies (the test-only model id `scripted:demo`): model-shaped text replayed token by
//! token through the real tokenizer, detokenizer, mlx-lm's state machine and tool parser.

mod common;

use common::*;
use serde_json::{json, Value};

const REPLY: &str = "<think>\nThe user wants the weather.\n</think>\n\nLet me look.<tool_call>\n\
    {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 2}}\n</tool_call>";

fn scripted(reply: &str) -> Value {
    json!({
        "model": "claude-sonnet-4-5", "max_tokens": 300,
        "tools": [{"name": "get_weather", "description": "Weather by city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}],
        "messages": [{"role": "user", "content": format!("[[script]]{reply}[[/script]]")}]
    })
}

fn scripts_server() -> Server {
    // The test-only model id: the demo model behind the bridge's scripted test batcher.
    Server::start_with(&[("PENSIEVE_BACKEND__MODEL", SCRIPTED)])
}

#[tokio::test]
async fn a_tool_call_is_a_tool_use_block_with_stop_reason_tool_use() {
    let s = scripts_server();
    let m: Value = s.post(&scripted(REPLY)).await.json().await.unwrap();
    assert_eq!(m["stop_reason"], "tool_use", "{m}");
    let c = m["content"].as_array().unwrap();
    assert_eq!(
        c[0],
        json!({"type": "thinking", "thinking": "The user wants the weather.\n", "signature": "pensieve-local-thinking"})
    );
    assert_eq!(c[1], json!({"type": "text", "text": "Let me look."}));
    assert_eq!(c[2]["type"], "tool_use");
    assert!(c[2]["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(c[2]["name"], "get_weather");
    assert_eq!(c[2]["input"], json!({"city": "Oslo", "days": 2}));
    assert_eq!(m["model"], SCRIPTED);
}

#[tokio::test]
async fn a_streamed_tool_call_uses_blocks_and_input_json_delta() {
    let s = scripts_server();
    let events = parse_sse(&s.post_stream(&scripted(REPLY)).await.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names[0], "message_start");
    assert!(names.contains(&"ping"));
    // Blocks in order, indexes counting up, each opened and closed once.
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "content_block_start")
        .map(|e| &e.data)
        .collect();
    let kinds: Vec<&str> = starts
        .iter()
        .map(|d| d["content_block"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["thinking", "text", "tool_use"]);
    for (i, d) in starts.iter().enumerate() {
        assert_eq!(d["index"], i);
    }
    assert_eq!(events.iter().filter(|e| e.event == "content_block_stop").count(), 3);
    let deltas = |ty: &str| -> String {
        events
            .iter()
            .filter(|e| e.event == "content_block_delta" && e.data["delta"]["type"] == ty)
            .map(|e| {
                let d = &e.data["delta"];
                d["text"]
                    .as_str()
                    .or(d["thinking"].as_str())
                    .or(d["partial_json"].as_str())
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(deltas("thinking_delta"), "The user wants the weather.\n");
    assert_eq!(deltas("text_delta"), "Let me look.");
    let input: Value = serde_json::from_str(&deltas("input_json_delta")).unwrap();
    assert_eq!(input, json!({"city": "Oslo", "days": 2}));
    assert!(events.iter().any(|e| e.data["delta"]["type"] == "signature_delta"));
    let tool_start = &starts[2]["content_block"];
    assert_eq!(
        (tool_start["name"].clone(), tool_start["input"].clone()),
        (json!("get_weather"), json!({}))
    );
    let md = events.iter().find(|e| e.event == "message_delta").unwrap();
    assert_eq!(md.data["delta"]["stop_reason"], "tool_use");
    assert_eq!(names.last().unwrap(), &"message_stop");
}

#[tokio::test]
async fn a_broken_tool_call_is_returned_as_text_not_lost() {
    let s = scripts_server();
    let m: Value = s
        .post(&scripted("Trying.<tool_call>{oops</tool_call>"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(m["stop_reason"], "end_turn");
    let text = m["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("Trying.") && text.contains("{oops"), "{m}");
}

#[tokio::test]
async fn count_tokens_is_exact_and_counts_system_and_tools() {
    let s = Server::start();
    let client = reqwest::Client::new();
    let mut body = hello(5);
    body["system"] = json!([{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]);
    let count = |b: Value| {
        let client = client.clone();
        let url = s.url("/v1/messages/count_tokens");
        async move {
            let res = client.post(url).json(&b).send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()["input_tokens"].as_u64().unwrap()
        }
    };
    let counted = count(body.clone()).await;
    let m: Value = s.post(&body).await.json().await.unwrap();
    assert_eq!(counted, m["usage"]["input_tokens"].as_u64().unwrap());
    // No max_tokens needed; tools count.
    let mut with_tools = body.clone();
    with_tools.as_object_mut().unwrap().remove("max_tokens");
    let without = count(with_tools.clone()).await;
    assert_eq!(without, counted);
    with_tools["tools"] = json!([{"name": "Bash", "description": "Run a command", "input_schema": {"type": "object"}}]);
    assert!(count(with_tools).await > counted + 10);
    let res = client
        .post(s.url("/v1/messages/count_tokens"))
        .header("content-type", "application/json")
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn models_are_listed_in_anthropics_shape() {
    let s = Server::start();
    let list: Value = reqwest::get(s.url("/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0]["id"], "demo");
    assert_eq!(list["data"][0]["type"], "model");
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], "demo");
    let one: Value = reqwest::get(s.url("/v1/models/claude-opus-4-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "demo");
    assert!(one["created_at"].is_string());
}

#[tokio::test]
async fn a_prompt_over_the_context_is_a_400_before_generation() {
    let s = Server::start();
    let mut body = hello(5);
    // Four tokens a repetition: 180,000 tokens, well over 131,072.
    body["messages"][0]["content"] = json!("memory server token ".repeat(45_000));
    body["stream"] = json!(true);
    let res = s.post(&body).await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("prompt is too long: ") && msg.ends_with(" > 131072 maximum"),
        "{msg}"
    );
    assert_eq!(s.health().await["backend"]["cache_bytes"], 0);
}

#[tokio::test]
async fn an_image_gets_a_400_that_says_the_model_has_no_vision() {
    let s = Server::start();
    let mut body = hello(5);
    body["messages"][0]["content"] = json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                                            {"type": "text", "text": "what is this?"}]);
    let res = s.post(&body).await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not accept images"));
}

#[tokio::test]
async fn tool_history_and_thinking_blocks_are_accepted_as_input() {
    let s = Server::start();
    let body = json!({"model": "demo", "max_tokens": 4, "temperature": 0,
    "thinking": {"type": "adaptive"},
    "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"},
    "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use the tool", "signature": "abc"},
            {"type": "redacted_thinking", "data": "xyz"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Bergen"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain", "is_error": false},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "boom"}], "is_error": true}]}
    ]});
    let res = s.post(&body).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

#[tokio::test]
async fn a_message_thread_keeps_the_conversation_its_system_and_its_tools() {
    let s = scripts_server();
    // Created with a scripted tool call, streamed (the reply is kept from the stream).
    let mut first = scripted(REPLY);
    first["system"] = json!("Answer with tools.");
    first["thread"] = json!({"type": "create"});
    let events = parse_sse(&s.post_stream(&first).await.text().await.unwrap());
    let start = &events[0].data["message"];
    let id = start["id"].as_str().unwrap().to_owned();
    let call = events
        .iter()
        .find(|e| e.data["content_block"]["type"] == "tool_use")
        .unwrap();
    let call_id = call.data["content_block"]["id"].as_str().unwrap().to_owned();
    // Continued as the SDKs do: only the tool result, no system and no tools.
    let next = json!({"model": "m", "max_tokens": 4, "thread": {"type": "continue", "previous_message_id": id},
        "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "sunny"}]}]});
    let res = s.post(&next).await;
    assert_eq!(res.status(), 200);
    let second: Value = res.json().await.unwrap();
    // The same conversation in full, sent without a thread, has the same prompt.
    let mut whole = first.clone();
    whole.as_object_mut().unwrap().remove("thread");
    let assistant = json!({"role": "assistant", "content": [
        {"type": "thinking", "thinking": "The user wants the weather.\n", "signature": "pensieve-local-thinking"},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": "Oslo", "days": 2}}]});
    whole["messages"] = json!([first["messages"][0], assistant, next["messages"][0]]);
    let counted = reqwest::Client::new()
        .post(s.url("/v1/messages/count_tokens"))
        .json(&whole)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let prompt = |m: &Value| {
        m["usage"]["input_tokens"].as_u64().unwrap() + m["usage"]["cache_read_input_tokens"].as_u64().unwrap()
    };
    assert_eq!(prompt(&second), counted["input_tokens"].as_u64().unwrap(), "{second}");
    // The continuation is kept too: a third turn continues from the second reply.
    let third = json!({"model": "m", "max_tokens": 2, "thread": {"type": "continue", "previous_message_id": second["id"]},
        "messages": [{"role": "user", "content": "thanks"}]});
    let res = s.post(&third).await;
    assert_eq!(res.status(), 200);
    let third: Value = res.json().await.unwrap();
    assert!(prompt(&third) > prompt(&second));
    // An id that is not kept: 404 with the error code the SDKs recover from.
    let lost = json!({"model": "m", "max_tokens": 2, "thread": {"type": "continue", "previous_message_id": "msg_gone"},
        "messages": [{"role": "user", "content": "hi"}]});
    let res = s.post(&lost).await;
    assert_eq!(res.status(), 404);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    assert_eq!(v["error"]["details"]["error_code"], "thread_not_found", "{v}");
}
