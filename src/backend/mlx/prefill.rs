//! Progress of long prompts being read: a generation whose prompt leaves more than
//! [`REPORT_FROM`] tokens for the model to read reports the tokens read so far of its total in
//! `/health` (its model's `prefill_progress`), on the dashboard, and in a log line at most
//! every [`LOG_EVERY`] (and one when the prompt has been read, with its rate). The worker asks
//! the batcher only while such a prompt is being read, once a step.

use std::time::Instant;

use serde::Serialize;

pub use super::loading::LOG_EVERY;

/// Prompts with at least this many tokens to read (past the prompt cache) report progress.
pub const REPORT_FROM: u32 = 2048;

/// How far a long prompt has been read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PrefillProgress {
    /// Prompt tokens in its KV cache: the cached ones, then those the model has read.
    pub done_tokens: u32,
    /// The prompt's tokens.
    pub total_tokens: u32,
    /// Of those, the ones taken from the prompt cache.
    pub cached_tokens: u32,
    /// Seconds since it started being read.
    pub elapsed_secs: f64,
}

/// One generation's prompt being read, as the worker follows it.
#[derive(Debug)]
pub(crate) struct Prefill {
    done: u32,
    total: u32,
    cached: u32,
    started: Instant,
    logged: Option<Instant>,
}

impl Prefill {
    /// A tracker for a prompt of `total` tokens, `cached` of them from the prompt cache: `None`
    /// when it leaves fewer than [`REPORT_FROM`] to read.
    pub fn of_long(total: u32, cached: u32) -> Option<Prefill> {
        (total.saturating_sub(cached) >= REPORT_FROM).then(|| Prefill {
            done: cached,
            total,
            cached,
            started: Instant::now(),
            logged: None,
        })
    }

    /// The batcher says `done` tokens are read (in the generation's span: the log line names
    /// its request). Monotonic whatever it says.
    pub fn update(&mut self, done: u32) {
        self.done = done.clamp(self.done, self.total);
        if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.logged = Some(Instant::now());
            tracing::info!(
                done_tokens = self.done,
                total_tokens = self.total,
                cached_tokens = self.cached,
                percent = percent(self.done, self.total),
                "reading the prompt"
            );
        }
    }

    /// Its first token came: the prompt is read.
    pub fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        let read = self.total - self.cached;
        tracing::info!(
            total_tokens = self.total,
            cached_tokens = self.cached,
            secs = (secs * 100.0).round() / 100.0,
            tokens_per_sec = (read as f64 / secs.max(1e-3)).round(),
            "read the prompt"
        );
    }

    /// What `/health` shows.
    pub fn progress(&self) -> PrefillProgress {
        PrefillProgress {
            done_tokens: self.done,
            total_tokens: self.total,
            cached_tokens: self.cached,
            elapsed_secs: (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        }
    }
}

fn percent(done: u32, total: u32) -> f64 {
    if total == 0 {
        return 100.0;
    }
    (done as f64 * 1000.0 / total as f64).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prompts_with_much_left_to_read_are_followed_and_progress_never_goes_back() {
        assert!(Prefill::of_long(REPORT_FROM - 1, 0).is_none());
        assert!(Prefill::of_long(10_000, 9_000).is_none(), "mostly cached");
        let mut p = Prefill::of_long(10_000, 1_000).expect("long");
        assert_eq!(p.progress().done_tokens, 1_000);
        p.update(4_000);
        p.update(3_000);
        assert_eq!(p.progress().done_tokens, 4_000);
        p.update(20_000);
        assert_eq!(p.progress().done_tokens, 10_000);
        assert_eq!(p.progress().total_tokens, 10_000);
        assert_eq!(percent(1, 3), 33.3);
    }
}
