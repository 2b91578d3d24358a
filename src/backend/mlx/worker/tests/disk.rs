//! A request waiting for its prompt cache to be read from disk keeps its place while the batch
//! runs.

use super::*;

fn reads_in(log: &[String]) -> Vec<&String> {
    log.iter().filter(|l| l.starts_with("reading")).collect()
}

#[test]
fn a_request_waiting_for_its_disk_read_keeps_its_place_while_the_batch_runs() {
    let h = harness(4);
    {
        let mut st = h.state.lock().unwrap();
        st.reads_left = 3;
        st.step_time = Duration::from_millis(2);
    }
    let long = h.generate("hi", 400);
    let disk = h.generate("disk", 3);
    let e = events(disk);
    assert_eq!(text(&e), "w0 w1 w2 ", "{e:?}");
    let log = h.log();
    let reads = reads_in(&log);
    assert_eq!(reads.len(), 3, "{reads:?}");
    // Added again at each round while the batch went on: the long one was decoding.
    assert!(reads[0] != reads[2], "no step between the tries: {reads:?}");
    assert_eq!(text(&events(long)).split_whitespace().count(), 400);
    assert_eq!(h.backend.status().queued, 0, "no count left behind");
}
