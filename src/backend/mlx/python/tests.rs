//! The bridge for real: the protocol against its golden file, and the embedded interpreter
//! driving the scripted batcher.

use super::*;
use crate::config::Config;

const GOLDEN: &str = include_str!("../../../../python_bridge/pensieve_bridge/protocol.json");

fn golden() -> serde_json::Value {
    serde_json::from_str(GOLDEN).unwrap()
}

fn request(content: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        stop_sequences: vec!["\n\nUser:".into()],
        ..GenerateRequest::user("scripted:demo", content, max_tokens)
    }
}

#[test]
fn the_binary_speaks_the_golden_protocol() {
    let mut g = golden();
    let examples = g.as_object_mut().unwrap().remove("examples").unwrap();
    assert_eq!(schema(), g, "a record, a field or a code differs from protocol.json");
    // What Rust sends is the golden example the Python tests build their requests from.
    let sent = serde_json::to_value(AddParams::of(&request("hi", 24))).unwrap();
    assert_eq!(sent, examples["AddParams"]);
    let mut other = schema();
    other["records"]["Out"] = serde_json::json!(["kind", "text"]);
    assert!(check_schema(&other)
        .unwrap_err()
        .to_string()
        .contains("another protocol"));
}

/// The bridge, for real: the embedded interpreter with the environment's packages, the
/// scripted test batcher on the demo model (`pensieve_bridge.testing`).
fn batcher() -> PyBatcher {
    let venv = crate::config::paths::find_python(std::path::Path::new("")).expect("run from the checkout, with .venv");
    let mut loader = PyLoader::new(
        &venv,
        LoadSettings {
            blas: "auto".into(),
            cpu_float32_budget: 0,
            max_decode_stall_ms: 0,
            prompt_lookup_tokens: 10,
        },
    )
    .unwrap();
    let mut config = Config::default();
    config.backend.model = "scripted:demo".into();
    config.backend.prompt_cache_disk_mb = 0;
    let spec = config.model_specs().remove(0);
    loader.load(&spec).unwrap()
}

fn run(b: &mut PyBatcher, uid: u64) -> (String, Finish) {
    let mut text = String::new();
    for _ in 0..200 {
        for s in b.step().unwrap() {
            assert_eq!(s.uid, uid);
            for p in s.pieces {
                match p {
                    Piece::Text(t) => text.push_str(&t),
                    other => panic!("unexpected piece {other:?}"),
                }
            }
            if let Some(f) = s.finish {
                return (text, f);
            }
        }
    }
    panic!("no finish after 200 steps");
}

#[test]
fn pybatcher_drives_the_real_bridge_through_every_record() {
    let mut b = batcher();
    assert!(b.context_length() >= 131072 && b.kv_bytes_per_token() > 0);
    let chat = request("hello", 8).chat;
    let n = b
        .count_tokens(&chat)
        .unwrap()
        .expect("a short prompt is counted at once");
    assert!(n > 0);
    // A scripted answer comes back as text pieces, then its finish.
    let r = request("[[script]]Paris is the capital.[[/script]]", 64);
    let Added::Started {
        uid,
        input_tokens,
        cached_tokens,
    } = b.add(&r, 0).unwrap()
    else {
        panic!("not started")
    };
    assert!(input_tokens > n && cached_tokens == 0);
    assert_eq!(run(&mut b, uid), ("Paris is the capital.".to_owned(), Finish::Stop));
    // Too long for the context given: nothing starts.
    assert_eq!(
        b.add(&request("hello", 8), 2).unwrap(),
        Added::TooLong { input_tokens: n }
    );
    // A constraint the bridge cannot use: refused, with why.
    let mut bad = request("hello", 8);
    bad.constraint = Some(Constraint::Tool {
        names: vec!["nope".into()],
    });
    assert!(matches!(b.add(&bad, 0).unwrap(),
        Added::Refused { field, message } if field == "tool_choice" && message.contains("nope")));
    // A generation that fails in Python: an error piece and an error finish, the batch goes on.
    let Added::Started { uid, .. } = b.add(&request("PLEASE-FAIL now", 16), 0).unwrap() else {
        panic!("not started")
    };
    let mut failed = None;
    for _ in 0..50 {
        for s in b.step().unwrap() {
            if s.finish.is_some() {
                failed = Some((s.uid, s.pieces, s.finish));
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let (u, pieces, finish) = failed.expect("the fault never came");
    assert_eq!((u, finish), (uid, Some(Finish::Error)));
    assert!(matches!(pieces.last(), Some(Piece::Error(m)) if m.contains("injected fault")));
    // Counters by name; an idle batcher's cache clears to nothing.
    let m = b.memory().unwrap();
    assert!(m.active > 0 && m.peak >= m.active);
    assert_eq!(b.clear_cache(false).unwrap(), 0);
    b.set_caching(Caching::Off).unwrap();
    assert_eq!(b.memory().unwrap().prompt_cache_entries, 0);
    assert_eq!(b.disk_stats().unwrap(), None);
    b.cancel(&[], false).unwrap();
    b.reset().unwrap();
}
