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
