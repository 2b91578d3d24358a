//! The admission decision on the request path, against a per-request `sysinfo` refresh
//! (what the project that inspired pensieve did, twice per request), side by side.
//!
//! Run with `make bench` or `cargo bench -p pensieve-layers --bench admission`.

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{Request, Response};
use pensieve_layers::config::{GuardConfig, MemoryConfig};
use pensieve_layers::layers::AdmissionLayer;
use pensieve_layers::memory::{Gate, MemoryProbe, MemorySnapshot, Sampler, SnapshotHandle, SystemProbe, Thresholds};
use pensieve_layers::stack::{Body, Stack};
use tower::{Layer, Service, ServiceExt};

fn admission(c: &mut Criterion) {
    let thresholds = Thresholds::from_config(&MemoryConfig::default());
    let mut probe = SystemProbe::new().unwrap();
    let first = Sampler::sample(&mut probe, &thresholds, &MemorySnapshot::unknown(), &Default::default());
    let handle = SnapshotHandle::new(first);
    let gate = Gate::new(handle.clone(), thresholds, 5);

    let mut group = c.benchmark_group("admission");
    group.bench_function(BenchmarkId::new("decision", "snapshot"), |b| {
        b.iter(|| black_box(gate.check().is_ok()))
    });
    group.bench_function(BenchmarkId::new("decision", "sysinfo_refresh_per_request"), |b| {
        let mut system = sysinfo::System::new().unwrap();
        b.iter(|| {
            system.refresh_memory();
            let available = system.available_memory();
            black_box(thresholds.raw(available).admits())
        })
    });
    group.bench_function(BenchmarkId::new("decision", "system_probe_per_request"), |b| {
        b.iter(|| black_box(thresholds.raw(probe.read().available_bytes).admits()))
    });

    // The whole layer around a no-op service, as a request sees it.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let svc = AdmissionLayer::new(gate.clone()).layer(tower::service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    }));
    group.bench_function(BenchmarkId::new("layer", "admit"), |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = svc.clone();
                let s = s.ready().await.unwrap();
                black_box(s.call(Request::new(())).await.unwrap().status())
            })
        })
    });
    group.finish();
}

/// The whole `/v1` stack (every layer on, metrics, no policy) around a no-op service: what a
/// request pays before the handler, admitted; and a refusal rendered in OpenAI's shape.
fn stack(c: &mut Criterion) {
    let thresholds = Thresholds::from_config(&MemoryConfig::default());
    let snapshot = |gb: u64| {
        SnapshotHandle::new(MemorySnapshot {
            tier: thresholds.raw(gb << 30),
            available_bytes: gb << 30,
            total_bytes: 16 << 30,
            ..MemorySnapshot::unknown()
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let config = GuardConfig::default();
    let ok = |_r: Request<Body>| async { Ok::<_, Infallible>(Response::new(Body::from("ok"))) };
    let mut group = c.benchmark_group("stack");
    for (label, gb, path) in [
        ("admit", 8, "/v1/messages"),
        ("refuse_openai", 0, "/v1/chat/completions"),
    ] {
        let stack = Stack::new(&config, Gate::new(snapshot(gb), thresholds, 5)).metrics(Default::default());
        let svc = stack.layer(tower::service_fn(ok));
        group.bench_function(BenchmarkId::new("whole", label), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let req = Request::post(path)
                        .header("content-type", "application/json")
                        .body(Body::from(r#"{"model":"m","max_tokens":8,"messages":[]}"#))
                        .unwrap();
                    black_box(svc.clone().oneshot(req).await.unwrap().status())
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, admission, stack);
criterion_main!(benches);
