//! Events on their way to one client: sent at once when its channel has room, held (a bounded
//! number, for a bounded time) while it has none, so that one slow reader never stalls the batch.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::backend::Event;

/// Events a client may fall behind by before its generation is abandoned.
pub(crate) const MAX_HELD: usize = 4096;
/// How long the backend waits for a client that does not read before it gives up.
pub(crate) const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a client can still be written to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Open,
    /// Gone, or too slow: its generation is abandoned.
    Closed,
}

/// One client's channel and the events it has not taken yet. See the [module docs](self).
pub(crate) struct Outbox {
    events: mpsc::Sender<Event>,
    held: VecDeque<Event>,
    stalled_since: Option<Instant>,
}

impl Outbox {
    pub fn new(events: mpsc::Sender<Event>) -> Self {
        Outbox {
            events,
            held: VecDeque::new(),
            stalled_since: None,
        }
    }

    /// Sends `event` after the held ones, or holds it.
    pub fn push(&mut self, event: Event) -> Flow {
        self.held.push_back(event);
        if self.held.len() > MAX_HELD {
            tracing::warn!(held = self.held.len(), "client stopped reading; generation abandoned");
            return Flow::Closed;
        }
        self.flush()
    }

    /// Sends what the channel takes of the held events.
    pub fn flush(&mut self) -> Flow {
        while let Some(event) = self.held.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => self.stalled_since = None,
                Err(mpsc::error::TrySendError::Closed(_)) => return Flow::Closed,
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.held.push_front(event);
                    let since = *self.stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > CLIENT_WRITE_TIMEOUT {
                        tracing::warn!("client stopped reading; generation abandoned");
                        return Flow::Closed;
                    }
                    return Flow::Open;
                }
            }
        }
        Flow::Open
    }

    /// Events still held.
    pub fn is_drained(&self) -> bool {
        self.held.is_empty()
    }

    /// The client has gone.
    pub fn is_closed(&self) -> bool {
        self.events.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_holds_events_in_order_and_a_closed_one_says_so() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut o = Outbox::new(tx);
        assert_eq!(o.push(Event::Text("a".into())), Flow::Open);
        assert_eq!(o.push(Event::Text("b".into())), Flow::Open);
        assert!(!o.is_drained());
        assert_eq!(rx.try_recv().unwrap(), Event::Text("a".into()));
        assert_eq!(o.flush(), Flow::Open);
        assert!(o.is_drained());
        assert_eq!(rx.try_recv().unwrap(), Event::Text("b".into()));
        drop(rx);
        assert!(o.is_closed());
        assert_eq!(o.push(Event::Text("c".into())), Flow::Closed);
    }

    #[test]
    fn a_client_that_never_reads_is_abandoned_past_the_bound() {
        let (tx, _rx) = mpsc::channel(1);
        let mut o = Outbox::new(tx);
        let flows: Vec<Flow> = (0..=MAX_HELD + 1).map(|i| o.push(Event::Text(i.to_string()))).collect();
        assert_eq!(flows.last(), Some(&Flow::Closed));
        assert!(flows[..MAX_HELD].iter().all(|f| *f == Flow::Open));
    }
}
