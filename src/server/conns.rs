//! Serving connections so that sockets which send nothing, or send slowly, cannot freeze the
//! server (HTTP/1.1 only: no cleartext HTTP/2, which local clients do not use).
//!
//! - A request head must arrive within `server.header_timeout_secs` of the connection opening
//!   or going idle between requests (hyper's header read timeout): a slowloris head, or an idle
//!   keep-alive connection, is closed then.
//! - A request body must arrive whole within `server.body_timeout_secs` of its head: a body
//!   sent a byte at a time fails its read ([`Deadline`]), a 400 that says so.
//! - `server.max_connections` bounds open sockets, but a socket without a request in flight
//!   (it has sent no whole head yet, or waits between requests) does not keep a new connection
//!   out: at the limit, the oldest such socket is closed for the newcomer. Only connections
//!   with a request in flight make new ones wait (in the kernel's backlog).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tower::ServiceExt;

/// How connections are bounded, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open sockets at most (`server.max_connections`).
    pub max_connections: usize,
    /// For a request head to arrive (`server.header_timeout_secs`).
    pub header_timeout: Duration,
    /// For a request body to arrive whole (`server.body_timeout_secs`).
    pub body_timeout: Duration,
}

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Conn {
    /// Requests in flight on it (their responses not yet sent whole).
    busy: AtomicUsize,
    /// Closes it (when idle) for a newcomer, or for shutdown.
    close: Notify,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    /// A connection closed, or finished its requests.
    changed: Notify,
}

/// Whether a connection just accepted may be served.
enum Room {
    /// Under the limit, or the oldest idle connection was told to close for it.
    Made,
    /// Every connection has a request in flight.
    Full,
}

impl Registry {
    /// Makes room for a connection just accepted (see [`Room`]).
    fn make_room(&self, max: usize) -> Room {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < max {
            return Room::Made;
        }
        match conns.values().find(|c| c.busy.load(Ordering::SeqCst) == 0) {
            Some(idle) => {
                idle.close.notify_one();
                Room::Made
            }
            None => Room::Full,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then open connections finish their
/// requests and close, and this returns once they have (the caller bounds the wait).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let registry = Arc::new(Registry::default());
    let stopping = Arc::new(tokio::sync::watch::channel(false).0);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut next_id = 0u64;
    'accept: loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // It waits, unserved (and nothing more is accepted), while every connection is busy.
        let mut warned = false;
        while let Room::Full = registry.make_room(limits.max_connections) {
            if !warned {
                tracing::warn!(
                    max = limits.max_connections,
                    "connection limit reached (server.max_connections), every connection busy; new connections wait"
                );
                warned = true;
            }
            tokio::select! {
                _ = registry.changed.notified() => {}
                _ = &mut shutdown => break 'accept,
            }
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let conn = Arc::new(Conn::default());
        registry
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(next_id, conn.clone());
        tokio::spawn(serve_one(
            stream,
            app.clone(),
            limits,
            next_id,
            conn,
            registry.clone(),
            stopping.subscribe(),
        ));
    }
    drop(listener);
    let _ = stopping.send(true);
    // Idle connections close now; busy ones once their requests are answered.
    loop {
        let open = registry.conns.lock().unwrap_or_else(|e| e.into_inner()).len();
        if open == 0 {
            return;
        }
        for c in registry.conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
            c.close.notify_one();
        }
        tokio::select! {
            _ = registry.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    app: Router,
    limits: Limits,
    id: u64,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let service = {
        let conn = conn.clone();
        let registry = registry.clone();
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let busy = Busy::start(conn.clone(), registry.clone());
            let app = app.clone();
            let req = req.map(|b| Body::new(Deadline::new(b, limits.body_timeout)));
            async move {
                let res = app.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, Infallible>(res.map(|b| Body::new(Tracked { inner: b, _busy: busy })))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut served = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut closing = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = conn.close.notified(), if !closing => {
                if conn.busy.load(Ordering::SeqCst) == 0 {
                    break; // idle: closed for a newcomer, or for shutdown
                }
                // A request arrived meanwhile: it finishes, then the connection closes.
                served.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = stopping.wait_for(|s| *s), if !closing => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
    registry.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    registry.changed.notify_waiters();
    registry.changed.notify_one();
}

/// A request in flight on a connection, until its response is sent whole (or dropped).
struct Busy {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Busy {
    fn start(conn: Arc<Conn>, registry: Arc<Registry>) -> Busy {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Busy { conn, registry }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.conn.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.registry.changed.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that must arrive whole before a deadline.
struct Deadline {
    inner: Incoming,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(inner: Incoming, timeout: Duration) -> Deadline {
        Deadline {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// A body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} s (server.body_timeout_secs)")]
pub struct BodyTimeout(u64);

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tower::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            let secs = self.timeout.as_secs();
            return Poll::Ready(Some(Err(BodyTimeout(secs).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
