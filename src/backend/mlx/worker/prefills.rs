//! The worker's side of long prompts' progress (`super::super::prefill`): asked of the
//! batcher once a step while such a prompt is read, logged, and put in `/health`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{Batcher, Worker};
use crate::backend::mlx::prefill::Prefill;

impl<B: Batcher> Worker<'_, B> {
    /// Long prompts being read: their progress from the batcher (one call, only while there
    /// are some), logged and shown in `/health`; a prompt whose first token came is read.
    pub(super) fn follow_prefills(&mut self) {
        let mut uids = Vec::new();
        for (uid, r) in self.running.iter_mut() {
            if r.output_tokens > 0 {
                if let Some(p) = r.prefill.take() {
                    r.span.in_scope(|| p.finish());
                }
            } else if r.prefill.is_some() {
                uids.push(*uid);
            }
        }
        if !uids.is_empty() {
            match catch_unwind(AssertUnwindSafe(|| self.batcher.prefill_progress(&uids))) {
                Ok(Ok(done)) => {
                    for (uid, done) in uids.iter().zip(done) {
                        let (Some(r), Some(done)) = (self.running.get_mut(uid), done) else {
                            continue;
                        };
                        if let Some(p) = r.prefill.as_mut() {
                            r.span.in_scope(|| p.update(done));
                        }
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "reading prompts' progress failed"),
                Err(_) => tracing::error!("reading prompts' progress panicked"),
            }
        }
        self.show_prefills();
    }

    /// Puts the long prompts' progress in `/health` (nothing to do when none was shown and
    /// none is read).
    pub(super) fn show_prefills(&mut self) {
        if !self.prefills_shown && self.running.values().all(|r| r.prefill.is_none()) {
            return;
        }
        let shown: Vec<_> = self
            .running
            .values()
            .filter_map(|r| r.prefill.as_ref().map(Prefill::progress))
            .collect();
        self.prefills_shown = !shown.is_empty();
        *self.shared.prefills.lock().unwrap_or_else(|e| e.into_inner()) = shown;
    }
}
