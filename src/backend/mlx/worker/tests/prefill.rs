//! Long prompts' progress while they are read, and tokens counted as they come.

use super::*;

#[test]
fn a_long_prompt_reports_its_progress_while_it_is_read_and_tokens_are_counted_as_they_come() {
    let h = harness(4);
    h.state.lock().unwrap().step_time = Duration::from_millis(20);
    let short = h.generate("short prompt", 2);
    let long = h.generate("read 5500", 2);
    let mut seen: Vec<(u32, u32)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let model = &h.backend.status().models[0];
        match model.prefill_progress.as_slice() {
            [] if !seen.is_empty() => break,
            [] => {}
            [p] => {
                assert_eq!((p.total_tokens, p.cached_tokens), (5500, 0));
                if seen.last() != Some(&(p.done_tokens, p.total_tokens)) {
                    seen.push((p.done_tokens, p.total_tokens));
                }
            }
            more => panic!("one long prompt, not {more:?}"),
        }
        assert!(Instant::now() < deadline, "{seen:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // A thousand tokens a step: 1,000 … 5,000 are seen (5,500 is the step that ends it).
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "not monotonic: {seen:?}");
    assert!(
        seen.iter().all(|&(done, _)| done % 1000 == 0 && done <= 5000),
        "{seen:?}"
    );
    let long = events(long);
    assert_eq!(text(&long), "w0 w1 ");
    assert_eq!(text(&events(short)), "w0 w1 ");
    // Every token generated is counted, as it was generated.
    assert_eq!(h.backend.status().models[0].output_tokens, 4);
    assert!(h.backend.status().models[0].prefill_progress.is_empty());
}

#[test]
fn a_long_prompt_whose_client_left_leaves_no_progress_behind() {
    let h = harness(4);
    h.state.lock().unwrap().step_time = Duration::from_millis(5);
    let long = h.generate("read 500000", 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.backend.status().models[0].prefill_progress.is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(long);
    while !h.backend.status().models[0].prefill_progress.is_empty() {
        assert!(Instant::now() < deadline, "progress left behind");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(h.backend.status().active_generations, 0);
}

/// The bridge's step budget reads a long prompt a chunk a step beside decoding streams (the
/// fake: a thousand tokens a step). The worker's part: each step's tokens reach their streams
/// as that step ends, while the prompt is still being read, not when it is done.
#[test]
fn a_stream_gets_a_token_every_step_while_a_long_prompt_is_read_beside_it() {
    let h = harness(4);
    h.state.lock().unwrap().step_time = Duration::from_millis(5);
    let mut stream = h.generate("stream", 100_000);
    assert!(matches!(stream.events.blocking_recv(), Some(Event::Started { .. })));
    assert!(matches!(stream.events.blocking_recv(), Some(Event::Text(_))));
    let long = h.generate("read 30000", 1); // 30 steps of a thousand tokens
    let (mut during, mut read_at) = (0u32, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match stream.events.blocking_recv() {
            Some(Event::Text(_)) => {}
            other => panic!("the stream ended: {other:?}"),
        }
        let progress = h.backend.status().models[0].prefill_progress.clone();
        match progress.as_slice() {
            [p] => {
                during += 1;
                read_at.push(p.done_tokens);
            }
            [] if !read_at.is_empty() => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "{read_at:?}");
    }
    // A token for (nearly) every step of the prompt's 30, each seen while the prompt was read
    // further and further: tokens did not wait for the prompt.
    assert!(during >= 25, "{during} tokens while the prompt was read: {read_at:?}");
    assert!(read_at.windows(2).all(|w| w[0] <= w[1]), "{read_at:?}");
    assert!(read_at.first() < read_at.last(), "{read_at:?}");
    assert_eq!(text(&events(long)), "w0 ");
    drop(stream);
}
