//! The admission decision with one WASM policy against none, side by side.
//! Needs `make policies` first (it uses the shipped tenant gate). Run with `make bench`.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pensieve::config::PoliciesConfig;
use pensieve::memory::MemorySnapshot;
use pensieve::policy::{memory_record, PolicyEngine, Request};

fn engine_with(files: &[&str]) -> PolicyEngine {
    let dir = tempfile::tempdir().unwrap().keep();
    for f in files {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("policies/examples/target/wasm32-wasip2/release/{f}.wasm"));
        assert!(src.exists(), "{} is missing: run `make policies`", src.display());
        std::fs::copy(src, dir.join(format!("{f}.wasm"))).unwrap();
    }
    let mut config = PoliciesConfig {
        dir,
        ..PoliciesConfig::default()
    };
    config
        .settings
        .insert("tenant_gate".into(), serde_json::json!({"paused": ["acme"]}));
    let engine = PolicyEngine::new(&config).unwrap();
    engine.load_dir();
    engine
}

fn policy(c: &mut Criterion) {
    let request = Request {
        method: "POST".into(),
        path: "/v1/messages".into(),
        model: Some("demo".into()),
        max_tokens: Some(1024),
        input_tokens: Some(2000),
        streaming: true,
        in_flight: 0,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-tenant".into(), "globex".into()),
        ],
    };
    let mem = memory_record(&MemorySnapshot::unknown());
    let mut group = c.benchmark_group("policy");
    for (label, files) in [("none", &[][..]), ("tenant_gate", &["tenant_gate"][..])] {
        let engine = engine_with(files);
        group.bench_function(BenchmarkId::new("decide", label), |b| {
            b.iter(|| black_box(engine.decide(&request, &mem)))
        });
    }
    group.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
