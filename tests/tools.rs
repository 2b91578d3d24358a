//! Tools and structured outputs on a real model, as client libraries use them: SmolLM2-135M-
//! Instruct from its GGUF file, whose chat template cannot show tools (the generic tool format),
//! on the Messages, Chat Completions and Responses APIs.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);
/// The name SmolLM2 is served under: its file's stem.
const NAME: &str = "SmolLM2-135M-Instruct.Q4_1";

fn server() -> Server {
    assert!(Path::new(GGUF).exists(), "{GGUF} is missing: run `make smollm2`");
    Server::start_with(&[("PENSIEVE_BACKEND__MODEL", GGUF)])
}

async fn post(s: &Server, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(s.url(path))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn ok(s: &Server, path: &str, body: &Value) -> Value {
    let res = post(s, path, body).await;
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn streamed(s: &Server, path: &str, body: &Value) -> Vec<Sse> {
    let mut body = body.clone();
    body["stream"] = true.into();
    let res = post(s, path, &body).await;
    assert_eq!(res.status(), 200);
    parse_sse(&res.text().await.unwrap())
}

/// A weather tool whose schema is open (no `additionalProperties`), as LangChain's `@tool`
/// and most hand-written tools are.
fn open_weather() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
}

const PARIS: &str = "What is the weather in Paris?";

/// The same forced call on each API: `(path, body)`.
fn forced_calls(max_tokens: u32) -> Vec<(&'static str, Value)> {
    let user = json!([{"role": "user", "content": PARIS}]);
    vec![
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": max_tokens, "temperature": 0, "tool_choice": {"type": "any"},
                "tools": [{"name": "get_weather", "input_schema": open_weather()}], "messages": user}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": max_tokens, "temperature": 0, "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": open_weather()}}],
                "messages": user}),
        ),
        (
            "/v1/responses",
            json!({"model": "m", "max_output_tokens": max_tokens, "temperature": 0, "tool_choice": "required",
                "tools": [{"type": "function", "name": "get_weather", "parameters": open_weather()}], "input": PARIS}),
        ),
    ]
}

/// The call of a (non-streamed) answer on `path`: its name, input, and the answer's stop reason
/// as that API says it.
fn call_of(path: &str, answer: &Value) -> (String, Value, String) {
    match path {
        "/v1/messages" => {
            let blocks = answer["content"].as_array().unwrap();
            assert!(
                blocks.iter().all(|b| b["type"] == "tool_use"),
                "no text beside the call: {answer}"
            );
            let call = &blocks[0];
            let id = call["id"].as_str().unwrap();
            assert!(id.starts_with("toolu_"), "{id}");
            let reason = answer["stop_reason"].as_str().unwrap().to_owned();
            (call["name"].as_str().unwrap().into(), call["input"].clone(), reason)
        }
        "/v1/chat/completions" => {
            let choice = &answer["choices"][0];
            assert_eq!(choice["message"]["content"], Value::Null, "{answer}");
            let call = &choice["message"]["tool_calls"][0];
            let id = call["id"].as_str().unwrap();
            assert!(id.starts_with("call_"), "OpenAI's id shape: {id}");
            let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            let reason = choice["finish_reason"].as_str().unwrap().to_owned();
            (call["function"]["name"].as_str().unwrap().into(), args, reason)
        }
        _ => {
            let output = answer["output"].as_array().unwrap();
            assert_eq!(output.len(), 1, "the call alone, no empty message: {answer}");
            let call = &output[0];
            assert_eq!(call["type"], "function_call");
            assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
            let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
            let reason = answer["status"].as_str().unwrap().to_owned();
            (call["name"].as_str().unwrap().into(), args, reason)
        }
    }
}

#[tokio::test]
async fn a_forced_call_on_an_open_schema_is_a_call_with_valid_input_on_every_api_even_cut_short() {
    let s = server();
    for (path, body) in forced_calls(64) {
        let answer = ok(&s, path, &body).await;
        let (name, input, reason) = call_of(path, &answer);
        assert_eq!(name, "get_weather", "{path}: {answer}");
        let keys: Vec<&String> = input.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["city"], "{path}: the listed key only, once: {answer}");
        assert!(input["city"].as_str().unwrap().contains("Paris"), "{path}: {answer}");
        assert!(
            ["tool_use", "tool_calls", "completed"].contains(&reason.as_str()),
            "{path}: {answer}"
        );
    }
    // Cut by max_tokens inside the arguments: still a call (its input what was written,
    // completed), with the stop reason that says it was cut.
    for (path, body) in forced_calls(14) {
        let answer = ok(&s, path, &body).await;
        let (name, input, reason) = call_of(path, &answer);
        assert_eq!(name, "get_weather", "{path}: {answer}");
        assert!(input.is_object(), "{path}: {answer}");
        assert!(
            ["max_tokens", "length", "incomplete"].contains(&reason.as_str()),
            "{path}: {answer}"
        );
    }
}

#[tokio::test]
async fn forced_calls_stream_their_arguments_in_fragments_on_every_api() {
    let s = server();
    for (path, body) in forced_calls(64) {
        let events = streamed(&s, path, &body).await;
        let (fragments, whole): (Vec<String>, Value) = match path {
            "/v1/messages" => {
                let starts: Vec<&Sse> = events.iter().filter(|e| e.event == "content_block_start").collect();
                assert_eq!(starts.len(), 1, "one block, the call: {events:?}");
                assert_eq!(starts[0].data["content_block"]["type"], "tool_use");
                let fragments = events
                    .iter()
                    .filter(|e| e.data["delta"]["type"] == "input_json_delta")
                    .map(|e| e.data["delta"]["partial_json"].as_str().unwrap().to_owned())
                    .collect();
                let stop = events.iter().find(|e| e.event == "message_delta").unwrap();
                assert_eq!(stop.data["delta"]["stop_reason"], "tool_use");
                (fragments, Value::Null)
            }
            "/v1/chat/completions" => {
                let deltas: Vec<&Value> = events.iter().map(|e| &e.data["choices"][0]["delta"]).collect();
                assert!(
                    deltas.iter().all(|d| d.get("content").is_none_or(Value::is_null)),
                    "no content part before or beside a call: {deltas:?}"
                );
                let calls: Vec<&Value> = deltas
                    .iter()
                    .filter_map(|d| d.get("tool_calls"))
                    .map(|c| &c[0])
                    .collect();
                assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
                assert_eq!(calls[0]["function"]["name"], "get_weather");
                let fragments = calls
                    .iter()
                    .filter_map(|c| c["function"]["arguments"].as_str())
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect();
                (fragments, Value::Null)
            }
            _ => {
                let added: Vec<&Sse> = events
                    .iter()
                    .filter(|e| e.event == "response.output_item.added")
                    .collect();
                assert_eq!(added.len(), 1, "the call alone, no empty message: {events:?}");
                assert_eq!(added[0].data["item"]["type"], "function_call");
                let fragments = events
                    .iter()
                    .filter(|e| e.event == "response.function_call_arguments.delta")
                    .map(|e| e.data["delta"].as_str().unwrap().to_owned())
                    .collect();
                let done = events.iter().find(|e| e.event == "response.completed").unwrap();
                (fragments, done.data["response"]["output"][0]["arguments"].clone())
            }
        };
        assert!(
            fragments.len() >= 3,
            "{path}: arguments in {} fragment(s): {fragments:?}",
            fragments.len()
        );
        let joined: Value = serde_json::from_str(&fragments.concat()).unwrap();
        assert!(joined["city"].as_str().unwrap().contains("Paris"), "{path}: {joined}");
        if let Some(whole) = whole.as_str() {
            assert_eq!(serde_json::from_str::<Value>(whole).unwrap(), joined);
        }
    }
}

#[tokio::test]
async fn schemas_keep_their_property_order_on_every_api() {
    let s = server();
    let schema = json!({"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 60},
        "answer": {"type": "string", "maxLength": 20}}, "required": ["reasoning", "answer"], "additionalProperties": false});
    let question = json!([{"role": "user", "content": "Is 17 prime? Think first."}]);
    let asks = [
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 80, "temperature": 0, "messages": question,
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": true, "schema": schema}}}),
        ),
        (
            "/v1/messages",
            json!({"model": "m", "max_tokens": 80, "temperature": 0, "messages": question,
                "output_config": {"format": {"type": "json_schema", "schema": schema}}}),
        ),
        (
            "/v1/responses",
            json!({"model": "m", "max_output_tokens": 80, "temperature": 0, "input": "Is 17 prime? Think first.",
                "text": {"format": {"type": "json_schema", "name": "r", "strict": true, "schema": schema}}}),
        ),
    ];
    for (path, body) in asks {
        let answer = ok(&s, path, &body).await;
        let text = match path {
            "/v1/chat/completions" => answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned(),
            "/v1/messages" => answer["content"][0]["text"].as_str().unwrap().to_owned(),
            _ => answer["output"][0]["content"][0]["text"].as_str().unwrap().to_owned(),
        };
        let (reasoning, answer_at) = (text.find("\"reasoning\""), text.find("\"answer\""));
        assert!(
            reasoning.unwrap() < answer_at.unwrap(),
            "{path}: reasoning comes first: {text}"
        );
    }
    // A forced call's arguments too.
    let ordered = json!({"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "city": {"type": "string", "maxLength": 12}},
        "required": ["zone", "city"]});
    let body = json!({"model": "m", "max_tokens": 40, "temperature": 0, "tool_choice": {"type": "tool", "name": "clock"},
        "tools": [{"name": "clock", "input_schema": ordered}], "messages": [{"role": "user", "content": "Time in Paris?"}]});
    let answer = ok(&s, "/v1/messages", &body).await;
    let keys: Vec<&String> = answer["content"][0]["input"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["zone", "city"], "{answer}");
}

#[tokio::test]
async fn a_model_without_a_tool_template_sees_tools_and_calls_them_under_auto() {
    let s = server();
    // Served under its file's stem, its tool format said.
    let models = reqwest::get(s.url("/v1/models"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], NAME, "{models}");
    assert_eq!(models["data"][0]["tool_format"], "generic", "{models}");
    assert!(s.log().contains("tools in the generic format"), "{}", s.log());

    let tools = json!([{"name": "get_weather", "description": "Get the current weather in a city",
        "input_schema": open_weather()}]);
    let ask = |temperature: f64| {
        json!({"model": NAME, "max_tokens": 48, "temperature": temperature, "tools": tools,
            "messages": [{"role": "user", "content": PARIS}]})
    };
    // The tools reach the prompt.
    let count = |body: Value| {
        let s = &s;
        async move {
            ok(s, "/v1/messages/count_tokens", &body).await["input_tokens"]
                .as_u64()
                .unwrap()
        }
    };
    let with = count(ask(0.0)).await;
    let mut without = ask(0.0);
    without.as_object_mut().unwrap().remove("tools");
    assert!(with > count(without).await + 40, "the tools are in the prompt");

    // Under auto, at 0.7: a call at least once in five tries; every answer a call or text,
    // never the format's JSON.
    let mut calls = 0;
    for _ in 0..5 {
        let answer = ok(&s, "/v1/messages", &ask(0.7)).await;
        assert_eq!(answer["model"], NAME);
        for block in answer["content"].as_array().unwrap() {
            match block["type"].as_str().unwrap() {
                "tool_use" => {
                    calls += 1;
                    assert_eq!(block["name"], "get_weather");
                    assert_eq!(answer["stop_reason"], "tool_use", "{answer}");
                }
                "text" => {
                    let text = block["text"].as_str().unwrap();
                    assert!(
                        !text.contains("\"response\"") && !text.contains("\"tool_call\""),
                        "{answer}"
                    );
                }
                other => panic!("{other}: {answer}"),
            }
        }
    }
    assert!(calls >= 1, "no call in five tries");

    // A whole round trip: the call and its result go back, written as the model wrote them (its
    // call is read from the prompt cache), and the model answers (a call or text, held to the
    // format).
    let mut forced = ask(0.0);
    forced["tool_choice"] = json!({"type": "any"});
    let first = ok(&s, "/v1/messages", &forced).await;
    let call = first["content"][0].clone();
    assert_eq!(call["type"], "tool_use", "{first}");
    let body = json!({"model": NAME, "max_tokens": 40, "temperature": 0, "tools": tools, "messages": [
        {"role": "user", "content": PARIS},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "18 C and sunny"}]}]});
    let answer = ok(&s, "/v1/messages", &body).await;
    assert!(!answer["content"].as_array().unwrap().is_empty(), "{answer}");
    let prompt =
        first["usage"]["input_tokens"].as_u64().unwrap() + first["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(
        answer["usage"]["cache_read_input_tokens"].as_u64().unwrap() > prompt,
        "the call is read back from the prompt cache: {} then {}",
        first["usage"],
        answer["usage"]
    );
}

#[tokio::test]
async fn responses_echo_the_request_and_documented_openai_fields_are_accepted() {
    let s = server();
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": open_weather()}]);
    let body = json!({"model": "m", "input": "Is the sky blue?", "instructions": "Answer in JSON.",
        "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 30, "tools": tools, "tool_choice": "none",
        "text": {"format": {"type": "json_schema", "name": "verdict", "strict": true, "schema": schema}},
        "stream_options": {"include_obfuscation": false}, "max_tool_calls": 2, "parallel_tool_calls": false});
    let check = |r: &Value| {
        assert_eq!(r["text"]["format"]["type"], "json_schema", "{r}");
        assert_eq!(r["text"]["format"]["name"], "verdict");
        assert_eq!(r["tools"], tools);
        assert_eq!(r["tool_choice"], "none");
        assert_eq!(r["temperature"], 0.5);
        assert_eq!(r["top_p"].as_f64().unwrap(), 0.9f32 as f64);
        assert_eq!(r["max_output_tokens"], 30);
        assert_eq!(r["instructions"], "Answer in JSON.");
        assert_eq!(r["parallel_tool_calls"], false);
        assert_eq!(r["max_tool_calls"], 2);
    };
    let answer = ok(&s, "/v1/responses", &body).await;
    check(&answer);
    let events = streamed(&s, "/v1/responses", &body).await;
    check(&events[0].data["response"]);
    let done = events
        .iter()
        .find(|e| e.event == "response.completed" || e.event == "response.incomplete");
    check(&done.unwrap().data["response"]);
    // Defaults, as OpenAI's.
    let plain = ok(
        &s,
        "/v1/responses",
        &json!({"model": "m", "input": "Hi", "max_output_tokens": 4}),
    )
    .await;
    assert_eq!(plain["text"]["format"]["type"], "text");
    assert_eq!(
        (plain["tools"].clone(), plain["tool_choice"].clone()),
        (json!([]), json!("auto"))
    );
    assert_eq!(
        (plain["temperature"].clone(), plain["top_p"].clone()),
        (json!(1.0), json!(1.0))
    );

    // Chat Completions' documented fields; a truly unknown field is still a 400 naming it.
    let chat = json!({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}],
        "prompt_cache_key": "session-1", "safety_identifier": "user-1", "verbosity": "low"});
    ok(&s, "/v1/chat/completions", &chat).await;
    let mut bogus = chat.clone();
    bogus["bogus"] = true.into();
    let res = post(&s, "/v1/chat/completions", &bogus).await;
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["param"], "bogus");

    // A streamed Chat answer opens with its role alone: no empty content part.
    let events = streamed(&s, "/v1/chat/completions", &chat).await;
    assert_eq!(
        events[0].data["choices"][0]["delta"],
        json!({"role": "assistant"}),
        "{events:?}"
    );
}
