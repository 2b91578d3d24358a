//! The admission decision on the request path, against a per-request `sysinfo` refresh
//! (what the project that inspired pensieve did, twice per request), side by side.
//!
//! Run with `make bench` or `cargo bench --bench admission`.

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{Request, Response};
use pensieve_layers::config::MemoryConfig;
use pensieve_layers::layers::AdmissionLayer;
use pensieve_layers::memory::{Gate, MemoryProbe, MemorySnapshot, Sampler, SnapshotHandle, SystemProbe, Thresholds};
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

criterion_group!(benches, admission);
criterion_main!(benches);
