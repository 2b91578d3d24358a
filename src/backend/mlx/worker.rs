//! The backend thread's loop: takes work off the queue, starts generations while there are free
//! slots, runs one decoding step of the whole batch, and hands each client its events.
//!
//! Its guarantees, each with a unit test below (a fake [`Batcher`], no Python):
//! - the MLX cache is cleared whenever the batch becomes idle, and after any generation that
//!   fails or is aborted; a generation's last event is sent only after that, so a client that
//!   has seen its answer end on an idle server sees `cache_bytes: 0`;
//! - a client that hangs up leaves the batch within one step;
//! - a slow reader never stalls the batch (its [`Outbox`] holds its events);
//! - every call into the batcher runs inside a panic boundary: a panic while starting a
//!   request fails that request, a panic in a step fails the generations of that step, a
//!   panic while counting tokens fails that count; the loop goes on.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use self::dispatch::{client_gone, dispatch, Step};
use super::outbox::{Flow, Outbox};
use super::prefill::Prefill;
use super::protocol::{Added, Batcher, Caching};
use super::Shared;
use crate::backend::{BackendError, BridgeError, Chat, Event, GenerateRequest, StopMatcher};
use crate::memory::{Gate, Tier};

/// How often an idle backend looks at memory (to release the prompt cache) and at slow clients.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// How often an idle backend hands held events to clients that are catching up.
const DRAIN_TICK: Duration = Duration::from_millis(2);
/// Memory counters are read again after this many decoding steps.
const MEMORY_EVERY: u32 = 32;

/// A generation to run, from the API.
pub(crate) struct Job {
    /// The model's index.
    pub model: usize,
    pub request: GenerateRequest,
    pub events: mpsc::Sender<Event>,
    pub span: Span,
}

/// What the backend thread is asked to do.
pub(crate) enum Work {
    Generate(Job),
    Count(Count),
}

/// A token count to answer.
pub(crate) struct Count {
    pub model: usize,
    pub chat: Chat,
    pub reply: oneshot::Sender<Result<u32, BackendError>>,
    pub span: Span,
}

/// One generation in the batch.
struct Running {
    span: Span,
    stops: StopMatcher,
    output_tokens: u32,
    outbox: Outbox,
    /// Prompt tokens, and the most it may generate (`max_tokens`, at most to the context):
    /// what its KV cache may grow to, reserved at admission.
    input_tokens: u32,
    max_tokens: u32,
    /// The id of the tool call streaming now, between its `ToolStart` and its `ToolUse`.
    call: Option<String>,
    /// Its long prompt, while it is read.
    prefill: Option<Prefill>,
}

impl Running {
    /// Tokens of KV cache it may still add: its whole reservation until its first token (the
    /// memory sample may not show its prompt yet), then what it may still generate.
    fn outstanding_tokens(&self) -> u64 {
        if self.output_tokens == 0 {
            self.input_tokens as u64 + self.max_tokens as u64
        } else {
            self.max_tokens.saturating_sub(self.output_tokens) as u64
        }
    }
}

/// One model's state on the loop: the batcher, the running generations and the events still
/// owed ([`pool`] drives one per loaded model).
pub(crate) struct Worker<'a, B: Batcher> {
    batcher: B,
    max_concurrent: usize,
    /// KV cache bytes the other models' running generations may still add.
    elsewhere: u64,
    shared: &'a Shared,
    gate: &'a Gate,
    running: HashMap<u64, Running>,
    /// Generations taken off the queue, waiting for a free slot (still counted as queued).
    waiting: VecDeque<Job>,
    /// Generations waiting for their prompt's cache to be read from disk (counted as queued):
    /// added again at the next round, ahead of the others.
    reading: Vec<Job>,
    /// Token counts whose long prompt is rendered off this thread (counted as queued): asked
    /// again at the next round.
    counting: Vec<Count>,
    /// Finished generations whose last events the client has not taken yet.
    draining: Vec<Outbox>,
    steps: u32,
    /// Where finished generations' caches go (by memory tier).
    caching: Caching,
    /// The memory limit MLX was last given (0: none yet).
    mlx_limit: u64,
    /// Long prompts' progress is shown in `/health` (cleared once none is read).
    prefills_shown: bool,
    /// The batcher's speculation counters as last added to the model's.
    speculation: crate::backend::Speculation,
}

/// The drop guard of the batch: however the loop ends (the queue closed at shutdown, a panic
/// that escaped), generations still running fail and the MLX cache is cleared.
impl<B: Batcher> Drop for Worker<'_, B> {
    fn drop(&mut self) {
        if self.running.is_empty() {
            self.clear_cache();
        } else {
            self.fail_all(BackendError::Stopped);
        }
    }
}

impl<'a, B: Batcher> Worker<'a, B> {
    fn new(batcher: B, shared: &'a Shared, gate: &'a Gate) -> Self {
        Worker {
            batcher,
            max_concurrent: shared.max_concurrent.load(Ordering::Relaxed).max(1) as usize,
            elsewhere: 0,
            shared,
            gate,
            running: HashMap::new(),
            waiting: VecDeque::new(),
            reading: Vec::new(),
            counting: Vec::new(),
            draining: Vec::new(),
            steps: 0,
            caching: Caching::Memory,
            mlx_limit: 0,
            prefills_shown: false,
            speculation: Default::default(),
        }
    }

    /// Generations running or waiting (for a slot, a disk read or a render), or counts waiting.
    fn busy(&self) -> bool {
        self.computing() || self.preparing()
    }

    /// Something is prepared off this thread (a disk read, a long prompt's render): the loop
    /// asks again soon.
    fn preparing(&self) -> bool {
        !self.reading.is_empty() || !self.counting.is_empty()
    }

    /// Generations running or waiting for a slot: the loop has work at once.
    fn computing(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Drops waiting requests whose clients left, and starts waiting ones while slots are free.
    fn admit(&mut self) {
        for count in std::mem::take(&mut self.counting) {
            self.count(count);
        }
        for job in std::mem::take(&mut self.reading).into_iter().rev() {
            self.waiting.push_front(job);
        }
        let queued = &self.shared.global.queued;
        self.waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                queued.fetch_sub(1, Ordering::SeqCst);
            }
            !gone
        });
        while self.running.len() < self.max_concurrent {
            let Some(job) = self.waiting.pop_front() else { break };
            self.start(job);
        }
    }

    /// KV cache bytes its running generations may still add.
    fn reserved_bytes(&self) -> u64 {
        let per_token = self.shared.kv_bytes_per_token.load(Ordering::Relaxed);
        self.running
            .values()
            .map(Running::outstanding_tokens)
            .sum::<u64>()
            .saturating_mul(per_token)
    }

    /// Takes work off the queue: a token count is answered now, a generation waits for a slot.
    fn take(&mut self, work: Work) {
        match work {
            Work::Generate(job) => self.waiting.push_back(job),
            Work::Count(count) => {
                // A model loaded for this count is checked here, before its prompt is rendered.
                let context = self.batcher.context_length();
                match count.chat.cannot_fit(context, self.batcher.max_token_bytes()) {
                    Some(message) => {
                        self.shared.global.queued.fetch_sub(1, Ordering::SeqCst);
                        let _ = count.reply.send(Err(BackendError::InvalidRequest(message)));
                    }
                    None => self.count(count),
                }
            }
        }
    }

    /// Answers a token count, or keeps it to ask again next round while its long prompt is
    /// rendered off this thread.
    fn count(&mut self, count: Count) {
        let queued = &self.shared.global.queued;
        if count.reply.is_closed() {
            queued.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let counted = {
            let _enter = count.span.enter();
            catch_unwind(AssertUnwindSafe(|| self.batcher.count_tokens(&count.chat)))
                .unwrap_or(Err(BridgeError::Panicked))
                .map_err(refused_or_failed)
        };
        let counted = match counted {
            Ok(Some(n)) => Ok(n),
            Ok(None) => return self.counting.push(count),
            Err(e) => Err(e),
        };
        queued.fetch_sub(1, Ordering::SeqCst);
        let _ = count.reply.send(counted);
    }

    /// Starts a waiting generation: admission again, then into the batch.
    fn start(&mut self, mut job: Job) {
        self.shared.global.queued.fetch_sub(1, Ordering::SeqCst);
        let _enter = job.span.enter();
        if job.events.is_closed() {
            tracing::debug!("client left while queued");
            return;
        }
        // Memory may have fallen while the request waited.
        if let Err(refusal) = self.gate.check() {
            let _ = job.events.try_send(Event::Failed(BackendError::Memory(refusal)));
            return;
        }
        let context = self.batcher.context_length();
        // `max_tokens` past the context means "to the context" (an OpenAI request without one).
        let asked = job.request.sampling.max_tokens;
        job.request.sampling.max_tokens = match context {
            0 if asked == u32::MAX => 4096,
            0 => asked,
            context => asked.min(context),
        };
        let fail = |e: BackendError| {
            let _ = job.events.try_send(Event::Failed(e));
        };
        // A model loaded for this request is checked here, before its prompt is rendered.
        if let Some(message) = job.request.chat.cannot_fit(context, self.batcher.max_token_bytes()) {
            return fail(BackendError::InvalidRequest(message));
        }
        let added = catch_unwind(AssertUnwindSafe(|| self.batcher.add(&job.request, context)));
        let (uid, input_tokens, cached_tokens) = match added {
            Ok(Ok(Added::Started {
                uid,
                input_tokens,
                cached_tokens,
            })) => (uid, input_tokens, cached_tokens),
            Ok(Ok(Added::Refused { field, message })) => {
                return fail(BackendError::Refused {
                    field,
                    problem: message,
                })
            }
            Ok(Ok(Added::Reading)) => {
                // Its place is kept: it is added again at the next round.
                drop(_enter);
                self.shared.global.queued.fetch_add(1, Ordering::SeqCst);
                self.reading.push(job);
                return;
            }
            Ok(Ok(Added::TooLong { input_tokens })) => {
                let msg = format!("prompt is too long: {input_tokens} tokens > {context} maximum");
                return fail(BackendError::InvalidRequest(msg));
            }
            Ok(Err(e)) => return fail(refused_or_failed(e)),
            Err(_) => {
                tracing::error!("starting a generation panicked; that request fails");
                return fail(BackendError::Generation(BridgeError::Panicked));
            }
        };
        // Before its prompt is processed: the KV cache it may grow to must fit.
        let max_tokens = match context {
            0 => job.request.sampling.max_tokens,
            context => job
                .request
                .sampling
                .max_tokens
                .min(context.saturating_sub(input_tokens)),
        };
        if let Err(e) = self.room_for(input_tokens, asked, max_tokens) {
            if let Err(e) = self.batcher.cancel(&[uid], false) {
                tracing::error!(error = %e, "cancelling a refused generation failed");
            }
            return fail(e);
        }
        tracing::debug!(uid, input_tokens, cached_tokens, "generation started");
        self.shared.generations.fetch_add(1, Ordering::Relaxed);
        let mut outbox = Outbox::new(job.events);
        let _ = outbox.push(Event::Started {
            input_tokens,
            cached_tokens,
        });
        drop(_enter);
        self.running.insert(
            uid,
            Running {
                span: job.span,
                stops: StopMatcher::new(&job.request.stop_sequences),
                output_tokens: 0,
                outbox,
                input_tokens,
                max_tokens,
                call: None,
                prefill: Prefill::of_long(input_tokens, cached_tokens),
            },
        );
        self.shared.active.store(self.running.len() as u32, Ordering::SeqCst);
        self.refresh();
    }

    /// Memory, slow clients, then one decoding step of the batch.
    fn turn(&mut self) {
        let snapshot = self.gate.snapshot().load();
        self.update_mlx_limit(&snapshot);
        let caching = Caching::for_tier(snapshot.tier);
        if caching != self.caching {
            // Out of Safe, the prompt cache is the first thing given back, and stays empty; at
            // Warning, finished generations still go to disk.
            let tier = snapshot.tier;
            match (self.caching, caching) {
                (_, Caching::Memory) => tracing::info!("memory is Safe again: the prompt cache is back on"),
                (Caching::Memory, _) => tracing::info!(?tier, ?caching, "memory left Safe: releasing the prompt cache"),
                (_, Caching::Disk) => tracing::info!(?tier, "finished generations are written to disk again"),
                _ => tracing::info!(?tier, "finished generations are no longer written to disk"),
            }
            if let Err(e) = self.batcher.set_caching(caching) {
                tracing::error!(error = %e, "switching the prompt cache failed");
            }
            self.caching = caching;
            self.refresh();
        } else if self.shared.disk_pending() > 0 {
            // The disk tier's writer finished some: what they held is freed on this thread.
            self.refresh();
        }
        if snapshot.tier == Tier::Emergency && !self.running.is_empty() {
            let message = format!(
                "generation aborted: memory tier Emergency ({:.2} GB available)",
                snapshot.available_gb()
            );
            tracing::warn!(generations = self.running.len(), "{message}");
            let retry_after_secs = self.gate.retry_after_secs();
            self.fail_all(BackendError::Aborted {
                message,
                retry_after_secs,
            });
            return;
        }
        self.draining.retain_mut(|o| o.flush() == Flow::Open && !o.is_drained());
        let gone: Vec<u64> = self
            .running
            .iter_mut()
            .filter_map(|(uid, r)| (r.outbox.is_closed() || r.outbox.flush() == Flow::Closed).then_some(*uid))
            .collect();
        if !gone.is_empty() {
            for uid in &gone {
                if let Some(r) = self.running.remove(uid) {
                    r.span.in_scope(|| client_gone(r.output_tokens));
                }
            }
            self.cancel(&gone);
            self.settle(Vec::new(), true);
        }
        if self.running.is_empty() {
            return;
        }
        let stepped = match self.batcher.step() {
            Ok(stepped) => stepped,
            Err(e) => {
                tracing::error!(error = %e, generations = self.running.len(), "generation raised");
                self.fail_all(BackendError::Generation(e));
                return;
            }
        };
        self.shared
            .output_tokens
            .fetch_add(stepped.len() as u64, Ordering::Relaxed);
        let before = self.running.len();
        let retry_after_secs = self.gate.retry_after_secs();
        let mut ended = Vec::new();
        let mut cancel = Vec::new();
        let mut failed = false;
        for s in stepped {
            let Some(r) = self.running.get_mut(&s.uid) else {
                continue;
            };
            let _enter = r.span.clone().entered();
            match dispatch(r, s.pieces, s.finish, retry_after_secs) {
                Step::Going => continue,
                Step::Ended {
                    last,
                    cancel: still_running,
                } => {
                    failed |= matches!(last, Event::Failed(_));
                    if still_running {
                        cancel.push(s.uid);
                    }
                    let r = self.running.remove(&s.uid).expect("present");
                    ended.push((r.outbox, last));
                }
                Step::Gone => {
                    client_gone(r.output_tokens);
                    if s.finish.is_none() {
                        cancel.push(s.uid);
                    }
                    self.running.remove(&s.uid);
                }
            }
        }
        if !cancel.is_empty() {
            self.cancel(&cancel);
        }
        self.follow_prefills();
        self.steps = self.steps.wrapping_add(1);
        // Anything that left the batch (ended, cut by a stop sequence, its client gone on the
        // last token) settles: the count, and the cache when the batch is now idle.
        if self.running.len() != before {
            self.settle(ended, failed || !cancel.is_empty());
        } else if self.steps % MEMORY_EVERY == 0 {
            self.refresh();
        }
    }

    /// After generations left the batch: clears the cache when the batch is idle or one of them
    /// failed or was aborted, then sends their last events.
    fn settle(&mut self, ended: Vec<(Outbox, Event)>, abnormal: bool) {
        self.shared.active.store(self.running.len() as u32, Ordering::SeqCst);
        self.show_prefills();
        if self.running.is_empty() || abnormal {
            self.clear_cache();
        }
        for (mut outbox, last) in ended {
            if outbox.push(last) == Flow::Open && !outbox.is_drained() {
                self.draining.push(outbox);
            }
        }
    }

    /// Ends every running generation with `error`, resets the batch and clears the cache.
    fn fail_all(&mut self, error: BackendError) {
        let ended: Vec<(Outbox, Event)> = self
            .running
            .drain()
            .map(|(_, r)| (r.outbox, Event::Failed(error.clone())))
            .collect();
        if let Err(e) = self.batcher.reset() {
            tracing::error!(error = %e, "resetting the batch failed");
        }
        self.settle(ended, true);
    }

    /// Removes generations from the batch, keeping what they computed in the prompt cache
    /// (clients that left, stop sequences).
    fn cancel(&mut self, uids: &[u64]) {
        if let Err(e) = self.batcher.cancel(uids, true) {
            tracing::error!(error = %e, "cancelling generations failed; resetting the batch");
            let _ = self.batcher.reset();
        }
    }

    /// Clears the MLX cache (with the cycle collector when reference counting left something
    /// on an idle batch).
    fn clear_cache(&mut self) {
        match self.batcher.clear_cache(false) {
            Ok(0) => {}
            Ok(bytes) if self.running.is_empty() => {
                tracing::debug!(bytes, "cache not empty after clearing; running the cycle collector");
                if let Err(e) = self.batcher.clear_cache(true) {
                    tracing::error!(error = %e, "clearing the MLX cache failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "clearing the MLX cache failed"),
        }
        self.refresh();
    }

    /// The prompt cache leaves memory, to its disk tier when there is one (the model unloads, or
    /// the server stops).
    fn spill(&mut self) {
        if let Err(e) = self.batcher.set_caching(Caching::Off) {
            tracing::error!(error = %e, "releasing the prompt cache failed");
        }
        self.caching = Caching::Off;
        self.refresh();
    }

    /// Reads MLX's memory counters and the prompt cache's size into the shared status.
    fn refresh(&mut self) {
        // The disk tier first: reading it frees what finished writes held (and clears MLX's
        // cache after), so that the memory counters read next are the ones that stay.
        match self.batcher.disk_stats() {
            Ok(disk) => self.shared.store_disk(disk),
            Err(e) => tracing::warn!(error = %e, "could not read the prompt cache's disk tier"),
        }
        match self.batcher.memory() {
            Ok(m) => self.shared.store_memory(&m),
            Err(e) => tracing::warn!(error = %e, "could not read MLX memory counters"),
        }
        match self.batcher.speculation() {
            Ok(now) => {
                let more = now.since(&self.speculation);
                self.speculation = now;
                self.shared
                    .speculation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(&more);
            }
            Err(e) => tracing::warn!(error = %e, "could not read speculation's counters"),
        }
    }
}

mod dispatch;
mod memory;
pub(crate) mod pool;
mod prefills;
/// What Python's failure to render or start a request means for its client: the request's own
/// fault (the chat template refused it, a bad value: 400, naming the problem), or the backend's
/// (anything else: 500).
fn refused_or_failed(e: BridgeError) -> BackendError {
    if e.is_request_error() {
        BackendError::InvalidRequest(format!(
            "the model's chat template cannot render this conversation: {e}"
        ))
    } else {
        BackendError::Generation(e)
    }
}

#[cfg(test)]
mod tests;
