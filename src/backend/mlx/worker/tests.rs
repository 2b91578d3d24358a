//! The worker's guarantees, with a fake batcher (no Python) behind the real `MlxBackend` queue,
//! loop, outboxes and stop matcher.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::protocol::{Added, Batcher, Caching, Finish, Memory, Piece, Stepped};
use super::super::MlxBackend;
use crate::backend::{Backend, BackendError, BridgeError, Chat, Event, GenerateRequest, Generation, StopReason};
use crate::config::{BackendConfig, Config, ModelSpec};
use crate::memory::{Gate, MemorySnapshot, SnapshotHandle, Source, Thresholds, Tier, GIB};

/// What the fake did, and knobs for what it does next.
#[derive(Default)]
struct State {
    log: Vec<String>,
    /// The fake allocator cache: grows with every step, emptied by `clear_cache`.
    cache: u64,
    steps: u32,
    /// The next step with this many generations running fails with this message.
    fail_with: Option<(usize, BridgeError)>,
    /// The next step with this many generations running panics.
    panic_with: Option<usize>,
    /// How long each step takes.
    step_time: Duration,
    /// The next step with this many generations running goes over MLX's memory limit: the
    /// last of them ends with `Finish::Memory`, as the bridge ends the largest.
    over_limit_with: Option<usize>,
    /// A prompt `disk` is reported as waiting for its disk read this many times.
    reads_left: u32,
}

/// A batcher whose generation `i` says `w0 w1 … w{max_tokens-1}`, one word a step (prompt
/// `brief`: three words at most). Prompts `panic`, `template` and `long` make `add` panic,
/// fail, or report a prompt too long; `read N` is a prompt of N tokens read a thousand a step
/// before its first word.
struct Fake {
    state: Arc<Mutex<State>>,
    gens: BTreeMap<u64, (u32, u32)>,
    /// Prompts being read (`read N`: N tokens, a thousand a step): tokens read, of the total.
    reading: BTreeMap<u64, (u32, u32)>,
    next: u64,
    /// 0: unknown, so the KV check is off.
    kv_bytes_per_token: u64,
}

impl Batcher for Fake {
    fn context_length(&self) -> u32 {
        100_000
    }

    fn kv_bytes_per_token(&self) -> u64 {
        self.kv_bytes_per_token
    }

    fn add(&mut self, request: &GenerateRequest, _context: u32) -> Result<Added, BridgeError> {
        match request.chat.messages[0].content.as_str() {
            "panic" => panic!("add panicked"),
            "template" => return Err(raised("TemplateError", "the template refused")),
            "oom" => return Err(raised("MemoryError", "std::bad_alloc")),
            "long" => return Ok(Added::TooLong { input_tokens: 200_000 }),
            "disk" => {
                let mut st = self.state.lock().unwrap();
                if st.reads_left > 0 {
                    st.reads_left -= 1;
                    let at = format!("reading at step {}", st.steps);
                    st.log.push(at);
                    return Ok(Added::Reading);
                }
            }
            _ => {}
        }
        let uid = self.next;
        self.next += 1;
        let content = request.chat.messages[0].content.as_str();
        let max_tokens = match content {
            "brief" => request.sampling.max_tokens.min(3),
            _ => request.sampling.max_tokens,
        };
        let input_tokens = match content.strip_prefix("read ") {
            Some(n) => {
                let n = n.parse().unwrap();
                self.reading.insert(uid, (0, n));
                n
            }
            None => 5,
        };
        self.gens.insert(uid, (0, max_tokens));
        self.state.lock().unwrap().log.push(format!("add {uid}"));
        Ok(Added::Started {
            uid,
            input_tokens,
            cached_tokens: 0,
        })
    }

    fn step(&mut self) -> Result<Vec<Stepped>, BridgeError> {
        let pause = self.state.lock().unwrap().step_time;
        std::thread::sleep(pause);
        let mut st = self.state.lock().unwrap();
        st.steps += 1;
        st.cache += 100;
        if st.fail_with.as_ref().is_some_and(|(n, _)| self.gens.len() >= *n) {
            return Err(st.fail_with.take().unwrap().1);
        }
        if st.panic_with.is_some_and(|n| self.gens.len() >= n) {
            st.panic_with = None;
            drop(st);
            panic!("step panicked");
        }
        let mut out = Vec::new();
        if st.over_limit_with.is_some_and(|n| self.gens.len() >= n) {
            st.over_limit_with = None;
            let (&uid, _) = self.gens.iter().next_back().unwrap();
            self.gens.remove(&uid);
            out.push(Stepped {
                uid,
                pieces: vec![Piece::Error("MLX went over its memory limit".into())],
                finish: Some(Finish::Memory),
            });
        }
        for (uid, (produced, max)) in self.gens.iter_mut() {
            if let Some((read, total)) = self.reading.get_mut(uid) {
                *read = (*read + 1000).min(*total);
                if read < total {
                    continue;
                }
            }
            *produced += 1;
            out.push(Stepped {
                uid: *uid,
                pieces: vec![Piece::Text(format!("w{} ", *produced - 1))],
                finish: (*produced == *max).then_some(Finish::Length),
            });
        }
        self.gens.retain(|_, (produced, max)| produced < max);
        let gens = &self.gens;
        self.reading
            .retain(|uid, (read, total)| read < total && gens.contains_key(uid));
        Ok(out)
    }

    fn prefill_progress(&mut self, uids: &[u64]) -> Result<Vec<Option<u32>>, BridgeError> {
        Ok(uids.iter().map(|uid| self.reading.get(uid).map(|r| r.0)).collect())
    }

    fn cancel(&mut self, uids: &[u64], keep: bool) -> Result<(), BridgeError> {
        self.state
            .lock()
            .unwrap()
            .log
            .push(format!("cancel {uids:?} keep={keep}"));
        for uid in uids {
            self.gens.remove(uid);
            self.reading.remove(uid);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BridgeError> {
        self.state.lock().unwrap().log.push("reset".into());
        self.gens.clear();
        self.reading.clear();
        Ok(())
    }

    fn set_caching(&mut self, caching: Caching) -> Result<(), BridgeError> {
        self.state.lock().unwrap().log.push(format!("caching {caching:?}"));
        Ok(())
    }

    fn count_tokens(&mut self, chat: &Chat) -> Result<Option<u32>, BridgeError> {
        if chat.messages[0].content == "panic" {
            panic!("count panicked");
        }
        Ok(Some(chat.messages.len() as u32 * 5))
    }

    fn clear_cache(&mut self, _thorough: bool) -> Result<u64, BridgeError> {
        let mut st = self.state.lock().unwrap();
        st.cache = 0;
        st.log.push("clear".into());
        Ok(0)
    }

    fn memory(&mut self) -> Result<Memory, BridgeError> {
        Ok(Memory {
            cache: self.state.lock().unwrap().cache,
            ..Memory::default()
        })
    }

    fn set_memory_limit(&mut self, bytes: u64) -> Result<(), BridgeError> {
        self.state.lock().unwrap().log.push(format!("limit {bytes}"));
        Ok(())
    }
}

struct Harness {
    backend: MlxBackend,
    state: Arc<Mutex<State>>,
    snapshot: SnapshotHandle,
}

fn harness(max_concurrent: usize) -> Harness {
    harness_with(max_concurrent, 0)
}

fn harness_with(max_concurrent: usize, kv_bytes_per_token: u64) -> Harness {
    harness_config(
        BackendConfig {
            max_concurrent,
            ..BackendConfig::default()
        },
        kv_bytes_per_token,
    )
}

/// Warning at 2 GB, Critical at 1, Emergency at 0.5.
fn thresholds() -> Thresholds {
    Thresholds {
        warning: 2 << 30,
        critical: 1 << 30,
        emergency: 1 << 29,
        hysteresis: 0.1,
    }
}

fn harness_config(config: BackendConfig, kv_bytes_per_token: u64) -> Harness {
    let state = Arc::new(Mutex::new(State::default()));
    let snapshot = SnapshotHandle::new(memory(Tier::Safe, 8.0));
    let thresholds = thresholds();
    let config = BackendConfig {
        model: "fake".into(),
        max_queue: 4,
        ..config
    };
    let fake = Fake {
        state: state.clone(),
        gens: BTreeMap::new(),
        reading: BTreeMap::new(),
        next: 0,
        kv_bytes_per_token,
    };
    let config = Config {
        backend: config,
        ..Config::default()
    };
    let mut fake = Some(fake);
    let loader = move |_: &ModelSpec| fake.take().ok_or(BridgeError::Protocol("loaded twice".into()));
    let backend = MlxBackend::spawn(&config, Gate::new(snapshot.clone(), thresholds, 3), move || Ok(loader)).unwrap();
    Harness {
        backend,
        state,
        snapshot,
    }
}

fn memory(tier: Tier, gb: f64) -> MemorySnapshot {
    MemorySnapshot {
        tier,
        available_bytes: (gb * GIB) as u64,
        total_bytes: 16 << 30,
        source: Source::Custom,
        ..MemorySnapshot::unknown()
    }
}

fn request(content: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest::user("fake", content, max_tokens)
}

impl Harness {
    fn generate(&self, content: &str, max_tokens: u32) -> Generation {
        self.backend.generate(request(content, max_tokens)).unwrap()
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn steps(&self) -> u32 {
        self.state.lock().unwrap().steps
    }

    fn wait_for(&self, what: &str, f: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(&self.state.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Every event until the backend drops the channel.
fn events(mut g: Generation) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = g.events.blocking_recv() {
        out.push(e);
    }
    out
}

fn text(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_idle_batch_clears_the_cache_before_the_last_event_is_sent() {
    let h = harness(4);
    let mut g = h.generate("hi", 3);
    let mut seen = Vec::new();
    while let Some(e) = g.events.blocking_recv() {
        if matches!(e, Event::Done { .. }) {
            // Received after it was sent, and it was sent after the clear: the cache is 0 now.
            assert_eq!(h.state.lock().unwrap().cache, 0, "{:?}", h.log());
        }
        seen.push(e);
    }
    assert_eq!(
        seen,
        [
            Event::Started {
                input_tokens: 5,
                cached_tokens: 0
            },
            Event::Text("w0 ".into()),
            Event::Text("w1 ".into()),
            Event::Text("w2 ".into()),
            Event::Done {
                reason: StopReason::MaxTokens,
                stop_sequence: None,
                output_tokens: 3
            },
        ]
    );
    assert_eq!(h.backend.status().cache_bytes, 0);
}

#[test]
fn a_failed_step_fails_every_generation_resets_the_batch_and_clears_the_cache() {
    let h = harness(4);
    h.state.lock().unwrap().step_time = Duration::from_millis(1);
    h.state.lock().unwrap().fail_with = Some((2, raised("ValueError", "the model broke")));
    let (a, b) = (h.generate("a", 100_000), h.generate("b", 100_000));
    for g in [a, b] {
        let last = events(g).pop().unwrap();
        assert_eq!(
            last,
            Event::Failed(BackendError::Generation(raised("ValueError", "the model broke")))
        );
    }
    let log = h.log();
    let reset = log.iter().position(|l| l == "reset").expect("reset");
    assert!(log[reset..].contains(&"clear".to_string()), "{log:?}");
    // The next request is served.
    assert!(matches!(events(h.generate("c", 2)).pop(), Some(Event::Done { .. })));
}

#[test]
fn a_panicking_step_fails_its_generations_and_the_loop_goes_on() {
    let h = harness(4);
    h.state.lock().unwrap().panic_with = Some(1);
    let g = h.generate("a", 1000);
    assert_eq!(
        events(g).pop(),
        Some(Event::Failed(BackendError::Generation(BridgeError::Panicked)))
    );
    assert!(h.log().contains(&"reset".to_string()));
    assert!(matches!(events(h.generate("b", 2)).pop(), Some(Event::Done { .. })));
    assert!(h.backend.status().ready);
}

#[test]
fn a_panic_while_starting_fails_only_that_request() {
    let h = harness(4);
    let running = h.generate("a", 50);
    let panics = events(h.generate("panic", 5));
    assert_eq!(panics, [Event::Failed(BackendError::Generation(BridgeError::Panicked))]);
    let a = events(running);
    assert_eq!(
        a.last(),
        Some(&Event::Done {
            reason: StopReason::MaxTokens,
            stop_sequence: None,
            output_tokens: 50
        })
    );
}

#[test]
fn a_token_count_that_panics_fails_only_that_count() {
    let h = harness(4);
    let count = |content: &str| {
        let mut chat = request(content, 1).chat;
        chat.messages.push(chat.messages[0].clone());
        h.backend.count_tokens("fake", chat).unwrap().blocking_recv().unwrap()
    };
    assert_eq!(count("panic"), Err(BackendError::Generation(BridgeError::Panicked)));
    assert_eq!(count("hello"), Ok(10));
    assert_eq!(h.backend.status().queued, 0);
}

#[test]
fn prompts_too_long_and_template_refusals_are_invalid_requests_naming_the_problem() {
    let h = harness(4);
    let too_long = events(h.generate("long", 5));
    assert!(
        matches!(&too_long[..], [Event::Failed(BackendError::InvalidRequest(m))] if m == "prompt is too long: 200000 tokens > 100000 maximum"),
        "{too_long:?}"
    );
    let template = events(h.generate("template", 5));
    assert!(
        matches!(&template[..], [Event::Failed(BackendError::InvalidRequest(m))] if m.contains("TemplateError: the template refused")),
        "{template:?}"
    );
    // Python's exception type decides: out of memory is the backend's fault, not the request's.
    assert_eq!(
        events(h.generate("oom", 5)),
        [Event::Failed(BackendError::Generation(raised(
            "MemoryError",
            "std::bad_alloc"
        )))]
    );
}

fn raised(kind: &str, message: &str) -> BridgeError {
    BridgeError::Raised {
        kind: kind.into(),
        message: message.into(),
    }
}

#[test]
fn a_client_that_hangs_up_leaves_the_batch_within_a_step() {
    let h = harness(4);
    let mut g = h.generate("a", 1_000_000);
    for _ in 0..3 {
        g.events.blocking_recv().unwrap();
    }
    let steps = h.steps();
    drop(g);
    h.wait_for("cancel", |s| s.log.iter().any(|l| l.starts_with("cancel [0]")));
    assert!(
        h.steps() <= steps + 2,
        "{} steps after the client left",
        h.steps() - steps
    );
    // What it computed is kept for the prompt cache; idle again, the cache is cleared.
    assert!(h.log().contains(&"cancel [0] keep=true".to_string()));
    h.wait_for("a clear", |s| s.cache == 0);
    assert_eq!(h.backend.status().active_generations, 0);
}

#[test]
fn a_slow_reader_never_stalls_the_batch() {
    let h = harness(4);
    // 2 s for the slow one's 2000 steps, 0.3 s for the fast one's 300.
    h.state.lock().unwrap().step_time = Duration::from_millis(1);
    // Never read: its channel fills (64 events) and its outbox holds the rest.
    let slow = h.generate("slow", 2000);
    let fast = events(h.generate("fast", 300));
    assert_eq!(fast.len(), 302, "{:?}", fast.last());
    assert!(matches!(fast.last(), Some(Event::Done { output_tokens: 300, .. })));
    assert_eq!(h.backend.status().active_generations, 1, "the slow one still runs");
    let slow = events(slow);
    assert_eq!(slow.len(), 2002);
    assert_eq!(text(&slow).split_whitespace().count(), 2000);
}

#[test]
fn emergency_aborts_running_generations_and_clears_the_cache() {
    let h = harness(4);
    // Slow enough that the unread client is not abandoned (4096 events held) first.
    h.state.lock().unwrap().step_time = Duration::from_millis(1);
    let g = h.generate("a", 1_000_000);
    h.wait_for("a step", |s| s.steps > 0);
    h.snapshot.store(memory(Tier::Emergency, 0.2));
    let last = events(g).pop().unwrap();
    assert!(
        matches!(&last, Event::Failed(BackendError::Aborted { message, retry_after_secs: 3 }) if message.contains("Emergency (0.20 GB")),
        "{last:?}"
    );
    assert_eq!(h.state.lock().unwrap().cache, 0);
    // The prompt cache was released when memory left Safe.
    assert!(h.log().contains(&"caching Off".to_string()));
}

#[test]
fn finished_generations_go_to_memory_when_safe_to_disk_at_warning_and_nowhere_beyond() {
    let h = harness(4);
    h.state.lock().unwrap().step_time = Duration::from_millis(1);
    let g = h.generate("a", 1_000_000); // keeps the loop turning
    h.wait_for("a step", |s| s.steps > 0);
    let caching = |s: &State| {
        s.log
            .iter()
            .filter(|l| l.starts_with("caching"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut want = Vec::new();
    for (tier, gb, mode) in [
        (Tier::Warning, 3.0, "Disk"),
        (Tier::Critical, 0.8, "Off"),
        (Tier::Warning, 3.0, "Disk"),
        (Tier::Safe, 8.0, "Memory"),
    ] {
        h.snapshot.store(memory(tier, gb));
        want.push(format!("caching {mode}"));
        h.wait_for(&format!("{want:?}"), |s| caching(s) == want);
        let steps = h.steps();
        h.wait_for("steps at this tier", |s| s.steps > steps + 3);
    }
    // Told once per change, not at every step.
    assert_eq!(caching(&h.state.lock().unwrap()), want);
    drop(g);
}

#[test]
fn memory_is_checked_again_when_a_queued_request_starts() {
    let h = harness(4);
    h.snapshot.store(memory(Tier::Critical, 0.8));
    let e = events(h.generate("a", 5));
    assert!(
        matches!(&e[..], [Event::Failed(BackendError::Memory(r))] if r.tier == Tier::Critical),
        "{e:?}"
    );
    assert!(!h.log().iter().any(|l| l.starts_with("add")));
}

#[test]
fn a_stop_sequence_across_pieces_ends_the_generation_names_it_and_removes_it_from_the_batch() {
    let h = harness(4);
    let mut req = request("a", 100);
    req.stop_sequences = vec!["w3 w".into()];
    let e = events(h.backend.generate(req).unwrap());
    assert_eq!(text(&e), "w0 w1 w2 ");
    assert_eq!(
        e.last(),
        Some(&Event::Done {
            reason: StopReason::StopSequence,
            stop_sequence: Some("w3 w".into()),
            output_tokens: 5
        })
    );
    assert!(h.log().contains(&"cancel [0] keep=true".to_string()), "{:?}", h.log());
}

#[test]
fn the_queue_is_bounded_and_says_how_many_wait() {
    let h = harness(1);
    // Slow enough that the unread client is not abandoned, freeing its slot, during the test.
    h.state.lock().unwrap().step_time = Duration::from_millis(1);
    let _running = h.generate("a", 1_000_000);
    h.wait_for("a step", |s| s.steps > 0);
    let waiting: Vec<Generation> = (0..4).map(|_| h.generate("b", 5)).collect();
    assert_eq!(
        h.backend.generate(request("c", 5)).unwrap_err(),
        BackendError::QueueFull { queued: 4 }
    );
    drop(waiting);
}

mod disk;
mod memory;
mod pool;
mod prefill;
