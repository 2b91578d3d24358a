//! Several models on the one thread, with fake batchers: loading on demand, sharing the
//! thread, unloading by idle time and by memory, and a load refused because it cannot fit.
//! (`tests/models.rs` does the same with the real server, the real bridge and real models.)

use std::collections::BTreeMap;

use super::*;
use crate::backend::mlx::worker::pool::Loader;
use crate::backend::BridgeError;
use crate::config::{Fallback, ModelConfig, ServerConfig};

/// Makes a [`Fake`] per model, and logs loads and releases in the shared state.
struct FakeLoader {
    state: Arc<Mutex<State>>,
}

impl Loader for FakeLoader {
    type Batcher = Fake;

    fn load(&mut self, spec: &ModelSpec) -> Result<Fake, BridgeError> {
        self.state.lock().unwrap().log.push(format!("load {}", spec.name));
        Ok(Fake {
            state: self.state.clone(),
            gens: BTreeMap::new(),
            reading: BTreeMap::new(),
            next: 0,
            kv_bytes_per_token: 0,
        })
    }

    fn release(&mut self) -> Option<u64> {
        self.state.lock().unwrap().log.push("release".into());
        Some(0)
    }
}

fn model(path: &str, keep_alive_secs: u64, aliases: &[&str]) -> ModelConfig {
    ModelConfig {
        path: path.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        keep_alive_secs,
        ..ModelConfig::default()
    }
}

/// Models `a` (the default, preloaded), and whatever `others` adds; memory Safe at 8 GB.
fn pool(others: &[(&str, ModelConfig)]) -> Harness {
    let state = Arc::new(Mutex::new(State::default()));
    let snapshot = SnapshotHandle::new(memory(Tier::Safe, 8.0));
    let mut models = BTreeMap::from([("a".to_string(), model("demo", 0, &[]))]);
    models.extend(others.iter().map(|(n, m)| (n.to_string(), m.clone())));
    let mut config = Config {
        models,
        server: ServerConfig {
            default_model: Some("a".into()),
            fallback: Fallback::Default,
            ..ServerConfig::default()
        },
        ..Config::default()
    };
    config.backend.max_queue = 8;
    config.memory.sample_interval_ms = 20;
    let loader = FakeLoader { state: state.clone() };
    let gate = Gate::new(snapshot.clone(), thresholds(), 3);
    let backend = MlxBackend::spawn(&config, gate, move || Ok(loader)).unwrap();
    Harness {
        backend,
        state,
        snapshot,
    }
}

fn on(model: &str, content: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        ..request(content, max_tokens)
    }
}

fn state_of(h: &Harness, name: &str) -> crate::backend::ModelStatus {
    let status = h.backend.status();
    status.models.into_iter().find(|m| m.name == name).unwrap()
}

fn wait_state(h: &Harness, name: &str, f: impl Fn(&crate::backend::ModelStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(&state_of(h, name)) {
        assert!(
            Instant::now() < deadline,
            "{name}: {:?} {:?}",
            state_of(h, name),
            h.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_model_loads_on_its_first_request_and_two_models_decode_at_once() {
    let h = pool(&[("b", model("demo", 0, &["b-*"]))]);
    assert_eq!(h.log(), ["load a"], "only the preloaded model");
    assert!(!state_of(&h, "b").loaded);
    assert_eq!(h.backend.resolve("b-latest").unwrap(), "b");
    h.state.lock().unwrap().step_time = Duration::from_millis(2);
    let first = h.backend.generate(on("a", "x", 20)).unwrap();
    let second = h.backend.generate(on("b", "y", 20)).unwrap();
    let (first, second) = (events(first), events(second));
    assert_eq!(text(&first), (0..20).map(|i| format!("w{i} ")).collect::<String>());
    assert_eq!(text(&second), text(&first));
    let log = h.log();
    assert_eq!(log.iter().filter(|l| *l == "load b").count(), 1, "{log:?}");
    // One thread, one step per model per round: 20 tokens each in about 40 steps, not 20.
    assert!(h.steps() >= 39, "{} steps", h.steps());
    let b = state_of(&h, "b");
    assert!(b.loaded && b.loads == 1 && b.generations == 1, "{b:?}");
    assert_eq!(h.backend.status().active_generations, 0);
}

#[test]
fn an_idle_model_is_unloaded_after_keep_alive_and_its_memory_released() {
    let h = pool(&[("b", model("demo", 1, &[]))]);
    let started = Instant::now();
    events(h.backend.generate(on("b", "x", 3)).unwrap());
    assert!(state_of(&h, "b").loaded);
    wait_state(&h, "b", |m| !m.loaded);
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    let b = state_of(&h, "b");
    assert_eq!((b.unloads_idle, b.unloads_memory, b.bytes), (1, 0, 0), "{b:?}");
    // Its prompt cache went to its disk tier, then its batch was dropped (clearing MLX's cache)
    // and what Python held released.
    let log = h.log();
    assert_eq!(log[log.len() - 3..], ["caching Off", "clear", "release"], "{log:?}");
    // The default model stays; the next request for b loads it again.
    assert!(state_of(&h, "a").loaded);
    events(h.backend.generate(on("b", "x", 3)).unwrap());
    assert_eq!(state_of(&h, "b").loads, 2);
}

#[test]
fn under_warning_idle_models_but_the_default_are_unloaded_one_at_a_time() {
    let h = pool(&[("b", model("demo", 0, &[])), ("c", model("demo", 600, &[]))]);
    events(h.backend.generate(on("b", "x", 2)).unwrap());
    events(h.backend.generate(on("c", "x", 2)).unwrap());
    // b is running a long generation: never unloaded while busy.
    h.state.lock().unwrap().step_time = Duration::from_millis(5);
    let busy = h.backend.generate(on("b", "x", 400)).unwrap();
    h.snapshot.store(memory(Tier::Warning, 1.5));
    wait_state(&h, "c", |m| !m.loaded);
    assert_eq!(state_of(&h, "c").unloads_memory, 1);
    assert!(state_of(&h, "b").loaded, "busy");
    let rest = events(busy);
    assert!(matches!(rest.last(), Some(Event::Done { .. })), "{rest:?}");
    wait_state(&h, "b", |m| !m.loaded);
    std::thread::sleep(Duration::from_millis(200));
    assert!(state_of(&h, "a").loaded, "the default model stays");
    assert!(
        h.log().iter().any(|l| l == "caching Disk"),
        "the prompt caches went first (to disk)"
    );
}

#[test]
fn a_load_that_cannot_fit_even_without_the_idle_models_is_refused_naming_the_model() {
    // A folder whose safetensors header claims 64 GB of weights.
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"w": {"dtype": "F16", "shape": [1], "data_offsets": [0, 68719476736]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let path = dir.path().to_str().unwrap();
    let h = pool(&[("c", model("demo", 0, &[])), ("huge", model(path, 0, &[]))]);
    events(h.backend.generate(on("c", "x", 2)).unwrap());
    let e = events(h.backend.generate(on("huge", "x", 2)).unwrap());
    let message = match e.as_slice() {
        [Event::Failed(BackendError::LoadRefused { message, .. })] => message.clone(),
        other => panic!("{other:?}"),
    };
    for needle in [
        "`huge`",
        "64.00 GB of weights",
        "8.00 GB is available",
        "2 idle model(s)",
        "not enough",
    ] {
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
    assert!(!state_of(&h, "huge").loaded && !h.log().contains(&"load huge".to_string()));
    // Unloading the idle models could not have been enough: they stay.
    assert!(state_of(&h, "c").loaded && state_of(&h, "a").loaded);
    assert_eq!(text(&events(h.backend.generate(on("c", "x", 2)).unwrap())), "w0 w1 ");
}
