//! The admission decision with one WASM policy against none, side by side: `decide` itself,
//! and the whole policy layer around a no-op service (reading the body, parsing a Messages
//! request, `decide` on tokio's blocking pool), as a request sees it.
//! Needs `make policies` first (it uses the shipped tenant gate). Run with `make bench`.

use std::convert::Infallible;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pensieve_layers::config::PoliciesConfig;
use pensieve_layers::layers::PolicyLayer;
use pensieve_layers::memory::{MemorySnapshot, SnapshotHandle};
use pensieve_layers::policy::{memory_record, PolicyEngine, Request};
use tower::{Layer, ServiceExt};

fn engine_with(files: &[&str]) -> PolicyEngine {
    let dir = tempfile::tempdir().unwrap().keep();
    for f in files {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../policies/examples/target/wasm32-wasip2/release/{f}.wasm"));
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let body = serde_json::json!({"model": "demo", "max_tokens": 1024, "stream": true,
        "messages": [{"role": "user", "content": "hello ".repeat(200)}]})
    .to_string();
    for (label, files) in [("none", &[][..]), ("tenant_gate", &["tenant_gate"][..])] {
        let layer = PolicyLayer::new(
            Arc::new(engine_with(files)),
            SnapshotHandle::new(MemorySnapshot::unknown()),
        );
        let svc = layer.layer(tower::service_fn(|_r: http::Request<_>| async {
            Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
        }));
        group.bench_function(BenchmarkId::new("layer", label), |b| {
            b.iter(|| {
                let req = http::Request::post("/v1/messages")
                    .header("x-tenant", "globex")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                    .unwrap();
                let svc = svc.clone();
                rt.block_on(async move { black_box(svc.oneshot(req).await.unwrap().status()) })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
