//! Host tests with inline WIT and text-format modules, in wasmtime's style: no guest toolchain.
//! Each policy is a core module written in WAT against the canonical ABI, given the WIT's
//! component-type section, and so componentised on load exactly like a wit-bindgen module built
//! for wasm32-unknown-unknown.

use super::*;

use crate::policy::testing::{core_policy, ADMIT, NONE, OK, REJECT};

const LOOP: &str = "(loop $l (br $l)) (i32.const 0)";
const TRAP: &str = "unreachable";
const BOMB: &str = "(loop $l (drop (memory.grow (i32.const 16))) (br $l)) (i32.const 0)";
/// some(critical)
const CRITICAL: &str =
    "(i32.store8 (i32.const 16) (i32.const 1)) (i32.store8 (i32.const 17) (i32.const 2)) (i32.const 16)";

fn engine_with(files: &[(&str, Vec<u8>)], on_error: OnError) -> (PolicyEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let config = PoliciesConfig {
        dir: dir.path().to_owned(),
        on_error,
        ..PoliciesConfig::default()
    };
    let engine = PolicyEngine::new(&config).unwrap();
    engine.load_dir();
    (engine, dir)
}

fn request() -> Request {
    Request {
        method: "POST".into(),
        path: "/v1/messages".into(),
        model: None,
        max_tokens: Some(10),
        input_tokens: None,
        streaming: false,
        in_flight: 0,
        headers: vec![],
    }
}

fn mem() -> Memory {
    memory_record(&crate::memory::MemorySnapshot::unknown())
}

fn status(engine: &PolicyEngine, name: &str) -> PolicyStatus {
    engine.status().into_iter().find(|p| p.name == name).unwrap()
}

#[test]
fn a_core_module_is_componentised_and_its_rejection_makes_the_answer() {
    let (engine, _d) = engine_with(&[("gate.wasm", core_policy(OK, NONE, REJECT))], OnError::Admit);
    assert!(status(&engine, "gate").loaded, "{:?}", engine.status());
    match engine.decide(&request(), &mem()) {
        Decision::Reject {
            policy,
            status,
            error_type,
            message,
            retry_after_secs,
        } => {
            assert_eq!(
                (policy.as_str(), status, error_type.as_str()),
                ("gate", 429, "rate_limit_error")
            );
            assert_eq!((message.as_str(), retry_after_secs), ("not today", Some(7)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_most_severe_classification_wins() {
    let (engine, _d) = engine_with(
        &[
            ("a.wasm", core_policy(OK, NONE, ADMIT)),
            ("b.wasm", core_policy(OK, CRITICAL, ADMIT)),
        ],
        OnError::Admit,
    );
    assert_eq!(engine.classify(&mem()), Some(Tier::Critical));
    assert_eq!(engine.decide(&request(), &mem()), Decision::Admit);
}

#[test]
fn hostile_policies_are_bounded_counted_and_admitted_by_default() {
    let (engine, _d) = engine_with(
        &[
            ("loop.wasm", core_policy(OK, NONE, LOOP)),
            ("trap.wasm", core_policy(OK, NONE, TRAP)),
            ("bomb.wasm", core_policy(OK, NONE, BOMB)),
            ("slow_configure.wasm", core_policy(LOOP, NONE, ADMIT)),
            ("wrong_world.wat", b"(component)".to_vec()),
            ("random.wasm", (0..300u32).map(|i| (i * 31 % 256) as u8).collect()),
        ],
        OnError::Admit,
    );
    for _ in 0..3 {
        let t = std::time::Instant::now();
        assert_eq!(engine.decide(&request(), &mem()), Decision::Admit);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let err = |n: &str| status(&engine, n).last_error.unwrap_or_default();
    assert_eq!(status(&engine, "loop").errors, 3);
    assert!(err("loop").contains("timeout_ms"), "{}", err("loop"));
    assert!(err("trap").contains("trapped"), "{}", err("trap"));
    assert!(status(&engine, "bomb").errors >= 3, "{}", err("bomb"));
    for bad in ["slow_configure", "wrong_world", "random"] {
        assert!(!status(&engine, bad).loaded, "{bad}");
    }
    assert!(
        err("slow_configure").contains("configure ran past"),
        "{}",
        err("slow_configure")
    );
    assert!(
        err("wrong_world").contains("admission-policy"),
        "{}",
        err("wrong_world")
    );
    assert!(err("random").contains("WebAssembly"), "{}", err("random"));
}

#[test]
fn on_error_reject_fails_closed_also_for_a_policy_that_did_not_load() {
    let (engine, _d) = engine_with(&[("trap.wasm", core_policy(OK, NONE, TRAP))], OnError::Reject);
    assert!(matches!(
        engine.decide(&request(), &mem()),
        Decision::Reject { status: 503, .. }
    ));
    let (engine, _d) = engine_with(&[("bad.wasm", b"\0asm\x0d\0\x01\0".to_vec())], OnError::Reject);
    assert!(matches!(
        engine.decide(&request(), &mem()),
        Decision::Reject { status: 503, .. }
    ));
}

#[test]
fn a_reused_instance_is_configured_once() {
    let (engine, _d) = engine_with(&[("gate.wasm", core_policy(OK, NONE, ADMIT))], OnError::Admit);
    for _ in 0..100 {
        assert_eq!(engine.decide(&request(), &mem()), Decision::Admit);
    }
    let p = &engine.current()[0];
    assert_eq!(
        p.pool.lock().unwrap().len(),
        1,
        "one pooled instance serves sequential calls"
    );
}
