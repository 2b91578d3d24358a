//! The memory lines: KV reservations, the context cap, MLX's limit.

use super::*;

#[test]
fn a_request_whose_kv_cache_would_not_fit_is_refused_before_its_prompt_is_processed() {
    // 1 MiB a token, 8 GB available, critical at 1 GB: 7168 tokens fit.
    let h = harness_with(4, 1 << 20);
    let e = events(h.generate("a", 8000));
    let refused = |e: &[Event]| match e {
        [Event::Failed(BackendError::TooLarge {
            message, fits_later, ..
        })] => Some((message.clone(), *fits_later)),
        _ => None,
    };
    let (message, later) = refused(&e).unwrap_or_else(|| panic!("{e:?}"));
    assert!(later, "{message}");
    assert!(
        message.contains("about 7.82 GB of KV cache (5 prompt tokens + max_tokens 8000")
            && message.contains("8.00 GB is available"),
        "{message}"
    );
    // Taken out of the batch before any step ran it.
    assert!(h.log().contains(&"cancel [0] keep=false".to_string()), "{:?}", h.log());
    assert_eq!(h.steps(), 0);
    // More than the whole machine: it can never fit, a 400.
    let (message, later) = refused(&events(h.generate("b", 20_000))).unwrap();
    assert!(!later && message.contains("cannot fit on this machine"), "{message}");
    // What fits runs.
    assert!(matches!(events(h.generate("c", 100)).pop(), Some(Event::Done { .. })));
}

#[test]
fn max_tokens_past_the_context_counts_only_up_to_the_context() {
    // 64 KiB a token, 7 GB of room above critical: 114,688 tokens. The fake's context is
    // 100,000, so max_tokens 128,000 reserves 100,000 tokens and fits.
    let h = harness_with(4, 64 << 10);
    let e = events(h.generate("brief", 128_000));
    assert!(matches!(e.last(), Some(Event::Done { .. })), "{e:?}");
}

#[test]
fn running_generations_reserve_their_future_kv_cache() {
    // 1 MiB a token and 7 GB of room above critical: 7168 tokens. One generation of 4000 runs;
    // a second of 4000 would fit alone, not beside it.
    let h = harness_with(4, 1 << 20);
    h.state.lock().unwrap().step_time = Duration::from_millis(1);
    let mut first = h.generate("a", 4000);
    assert!(matches!(first.events.blocking_recv(), Some(Event::Started { .. })));
    let e = events(h.generate("b", 4000));
    match &e[..] {
        [Event::Failed(BackendError::TooLarge {
            message, fits_later, ..
        })] => {
            assert!(*fits_later, "{message}");
            assert!(
                message.contains("the running generations have") && message.contains("GB reserved"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(first);
    h.wait_for("the first to leave", |st| {
        st.log.iter().any(|l| l.starts_with("cancel [0]"))
    });
    assert!(matches!(events(h.generate("c", 4000)).pop(), Some(Event::Done { .. })));
}

#[test]
fn mlx_gets_its_memory_limit_from_the_thresholds_or_the_configured_one() {
    // No limit configured: what MLX holds (0) + 8 GB available − emergency at 0.5 GB.
    let h = harness(2);
    events(h.generate("a", 2));
    assert!(
        h.log().contains(&format!("limit {}", (8u64 << 30) - (1 << 29))),
        "{:?}",
        h.log()
    );
    // Configured, and lower: that one.
    let config = BackendConfig {
        mlx_memory_limit_mb: 100,
        ..BackendConfig::default()
    };
    let h = harness_config(config, 1 << 20);
    events(h.generate("a", 2));
    assert!(h.log().contains(&format!("limit {}", 100u64 << 20)), "{:?}", h.log());
    assert_eq!(h.backend.status().mlx_memory_limit_bytes, 100 << 20);
    // A KV cache bigger than the limit can never fit: 400, before any step.
    let steps = h.steps();
    match &events(h.generate("b", 200))[..] {
        [Event::Failed(BackendError::TooLarge {
            message, fits_later, ..
        })] => assert!(
            !fits_later && message.contains("backend.mlx_memory_limit_mb"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.steps(), steps);
}

#[test]
fn a_step_over_mlxs_limit_fails_the_generation_it_names_and_no_other() {
    let h = harness(4);
    {
        let mut st = h.state.lock().unwrap();
        st.step_time = Duration::from_millis(1);
        st.over_limit_with = Some(2);
    }
    let a = h.generate("a", 20);
    let b = h.generate("b", 20);
    let (a, b) = (events(a), events(b));
    assert!(matches!(a.last(), Some(Event::Done { output_tokens: 20, .. })), "{a:?}");
    assert!(
        matches!(b.last(), Some(Event::Failed(BackendError::Aborted { message, retry_after_secs: 3 })) if message.contains("memory limit")),
        "{b:?}"
    );
    // The failure cleared the MLX cache.
    assert!(h.log().iter().any(|l| l == "clear"), "{:?}", h.log());
}
