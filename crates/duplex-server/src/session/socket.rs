//! The socket side of a session: what a received message means, and the socket the shell
//! reads and writes in its own task, with its queue bounded by messages and by bytes.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use duplex_proto::{ErrorCode, ServerMessage};
use duplex_session::ClientIn;
use futures::{SinkExt, StreamExt};
use tokio::time::{Sleep, timeout};
use tracing::{debug, warn};

/// A socket that takes nothing for this long means the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a slow consumer's error and close frame may take before the connection is dropped.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(1);

/// What the shell queues for the socket.
#[derive(Debug)]
pub(super) enum Outbound {
    Text(String),
    Binary(axum::body::Bytes),
    Close(u16, String),
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Text(t) => t.len(),
            Outbound::Binary(b) => b.len(),
            Outbound::Close(_, reason) => reason.len() + 2,
        }
    }
}

/// The session's WebSocket, read and written by the shell's own task. There is no writer
/// task: an echoed or synthesized frame is written in the same wake-up that produced it (one
/// task, one channel hop and one cross-thread wake-up per frame fewer), and reading and writing
/// never contend for a lock between two halves of the socket.
///
/// What the socket does not take at once waits in a queue bounded by messages and by bytes;
/// a full queue means the client stopped reading ([`PushError::SlowConsumer`]).
pub(super) struct Socket {
    ws: WebSocket,
    queue: Outbox,
    /// Messages handed to the WebSocket since its last completed flush.
    unflushed: bool,
    /// A close frame was handed to the WebSocket: nothing more can follow it.
    closed: bool,
    /// Armed while the socket refuses to take or flush what is queued; reset by any progress.
    stall: Pin<Box<Sleep>>,
    stalled: bool,
    stall_limit: Duration,
}

/// What waits for the socket: bounded by messages and by bytes.
struct Outbox {
    queue: VecDeque<Outbound>,
    bytes: usize,
    capacity: usize,
    max_bytes: usize,
}

impl Outbox {
    fn new(capacity: usize, max_bytes: usize) -> Outbox {
        Outbox {
            queue: VecDeque::new(),
            bytes: 0,
            capacity,
            max_bytes,
        }
    }

    fn push(&mut self, msg: Outbound) -> Result<(), PushError> {
        let len = msg.len();
        if self.queue.len() >= self.capacity || self.bytes + len > self.max_bytes {
            return Err(PushError::SlowConsumer);
        }
        self.bytes += len;
        self.queue.push_back(msg);
        Ok(())
    }

    /// Queued whatever the bounds (the last words to a slow consumer).
    fn push_anyway(&mut self, msg: Outbound) {
        self.bytes += msg.len();
        self.queue.push_back(msg);
    }

    fn pop(&mut self) -> Option<Outbound> {
        let msg = self.queue.pop_front()?;
        self.bytes -= msg.len();
        Some(msg)
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn ends_with_close(&self) -> bool {
        matches!(self.queue.back(), Some(Outbound::Close(..)))
    }
}

/// Why a message could not be queued.
#[derive(Debug, PartialEq)]
pub(super) enum PushError {
    /// The queue is full (by messages or bytes): the client is not reading.
    SlowConsumer,
}

/// What the socket has for the shell.
pub(super) enum SocketEvent {
    /// A message from the client, or the end of its stream (`None`).
    Message(Option<Result<Message, axum::Error>>),
    /// A write failed, or nothing could be written for [`WRITE_TIMEOUT`]: the peer is gone.
    WriteFailed,
}

/// Why [`Socket::poll_write`] stopped.
enum WriteStop {
    Failed,
}

impl Socket {
    pub(super) fn new(ws: WebSocket, capacity: usize, max_bytes: usize) -> Socket {
        Socket {
            ws,
            queue: Outbox::new(capacity, max_bytes),
            unflushed: false,
            closed: false,
            stall: Box::pin(tokio::time::sleep(WRITE_TIMEOUT)),
            stalled: false,
            stall_limit: WRITE_TIMEOUT,
        }
    }

    /// Queues a message; it is written the next time the shell polls [`Socket::poll_io`].
    pub(super) fn push(&mut self, msg: Outbound) -> Result<(), PushError> {
        if self.closed || self.queue.ends_with_close() {
            // Nothing can follow a close frame.
            return Ok(());
        }
        self.queue.push(msg)
    }

    /// The client is not reading: what is queued is dropped, and only an error saying why and
    /// a close frame are left to write, within [`SLOW_CONSUMER_GRACE`].
    pub(super) fn slow_consumer(&mut self) {
        self.queue.clear();
        if !self.closed {
            let err = ServerMessage::error(
                ErrorCode::SlowConsumer,
                "client did not read audio fast enough",
                true,
            );
            self.queue.push_anyway(Outbound::Text(err.to_json()));
            self.queue.push_anyway(Outbound::Close(
                duplex_proto::close_code::SLOW_CONSUMER,
                "slow consumer".into(),
            ));
        }
        self.stall_limit = SLOW_CONSUMER_GRACE;
        self.stalled = false;
    }

    /// Hands what is queued to the WebSocket as far as it takes it, then, if `read`, reads the
    /// next message; only when there is nothing to read does it flush. A shell with several
    /// messages waiting (a busy server catching up) thus answers them all with one write to
    /// the socket, as a writer task would have found them queued; an idle one flushes at once.
    /// `Pending` once nothing is left to do; woken by the socket.
    pub(super) fn poll_io(&mut self, cx: &mut Context<'_>, read: bool) -> Poll<SocketEvent> {
        if let Poll::Ready(Err(WriteStop::Failed)) = self.poll_feed(cx) {
            return Poll::Ready(SocketEvent::WriteFailed);
        }
        if read && let Poll::Ready(m) = self.ws.poll_next_unpin(cx) {
            return Poll::Ready(SocketEvent::Message(m));
        }
        if let Poll::Ready(Err(WriteStop::Failed)) = self.poll_flush(cx) {
            return Poll::Ready(SocketEvent::WriteFailed);
        }
        Poll::Pending
    }

    /// `Ready(Ok)`: everything queued is written and flushed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteStop>> {
        match self.poll_feed(cx) {
            Poll::Ready(Ok(())) => self.poll_flush(cx),
            other => other,
        }
    }

    /// `Ready(Ok)`: everything queued is handed to the WebSocket (in its write buffer, or
    /// written if the buffer filled), not necessarily flushed.
    fn poll_feed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteStop>> {
        while !self.queue.is_empty() {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return failed(&e),
                Poll::Pending => return self.poll_stall(cx),
            }
            let Some(msg) = self.queue.pop() else { break };
            self.stalled = false;
            let msg = match msg {
                Outbound::Text(t) => Message::Text(t.into()),
                Outbound::Binary(b) => Message::Binary(b),
                Outbound::Close(code, reason) => {
                    // Nothing can follow a close frame.
                    self.queue.clear();
                    self.closed = true;
                    close_message(code, &reason)
                }
            };
            if let Err(e) = self.ws.start_send_unpin(msg) {
                return failed(&e);
            }
            self.unflushed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// `Ready(Ok)`: what was handed to the WebSocket is on the socket.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteStop>> {
        if self.unflushed {
            match self.ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    self.stalled = false;
                }
                Poll::Ready(Err(e)) => return failed(&e),
                Poll::Pending => return self.poll_stall(cx),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The socket took nothing: `Pending` until it does, `Failed` once that took too long.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteStop>> {
        if !self.stalled {
            self.stalled = true;
            let at = tokio::time::Instant::now() + self.stall_limit;
            self.stall.as_mut().reset(at);
        }
        match self.stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                warn!("socket write timed out");
                Poll::Ready(Err(WriteStop::Failed))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The session is over: writes what is queued, then a close frame if none was sent, then
    /// shuts the connection. Bounded: a stalled write ends it (after [`WRITE_TIMEOUT`], or
    /// [`SLOW_CONSUMER_GRACE`] for a slow consumer).
    pub(super) async fn finish(mut self) {
        if std::future::poll_fn(|cx| self.poll_write(cx))
            .await
            .is_err()
        {
            return;
        }
        if !self.closed {
            let limit = self.stall_limit;
            let _ = timeout(limit, self.ws.close()).await;
        }
    }
}

fn failed(e: &axum::Error) -> Poll<Result<(), WriteStop>> {
    debug!(error = %e, "socket write failed");
    Poll::Ready(Err(WriteStop::Failed))
}

/// What a message read from the socket means to the session; `None`: nothing (a ping or pong
/// frame, answered by the WebSocket layer). The end of the stream is `Closed`.
pub(super) fn client_in(
    msg: Option<Result<Message, axum::Error>>,
    max_message_bytes: usize,
) -> Option<ClientIn> {
    Some(match msg? {
        Ok(Message::Text(t)) if t.len() > max_message_bytes => ClientIn::TooLarge,
        Ok(Message::Binary(b)) if b.len() > max_message_bytes => ClientIn::TooLarge,
        Ok(Message::Text(t)) => ClientIn::Text(t.to_string()),
        Ok(Message::Binary(b)) => ClientIn::Binary(b),
        Ok(Message::Ping(_) | Message::Pong(_)) => return None,
        Ok(Message::Close(_)) => ClientIn::Closed,
        Err(e) => {
            if is_capacity_error(&e) {
                ClientIn::TooLarge
            } else {
                debug!(error = %e, "socket read failed");
                ClientIn::Closed
            }
        }
    })
}

fn is_capacity_error(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<tungstenite::Error>() {
            return matches!(t, tungstenite::Error::Capacity(_));
        }
        source = err.source();
    }
    false
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_queue_is_bounded_by_bytes_as_well_as_messages() {
        let mut q = Outbox::new(256, 10_000);
        // Large messages: the byte bound is reached long before 256 of them.
        for _ in 0..3 {
            q.push(Outbound::Binary(vec![0; 3000].into())).unwrap();
        }
        assert_eq!(
            q.push(Outbound::Binary(vec![0; 3000].into())),
            Err(PushError::SlowConsumer)
        );
        // Small ones still fit under the byte bound...
        q.push(Outbound::Text("x".repeat(500))).unwrap();
        // ...and what the socket takes leaves the count.
        assert!(matches!(q.pop(), Some(Outbound::Binary(_))));
        q.push(Outbound::Binary(vec![0; 3000].into())).unwrap();
        // Small messages: the message bound still holds.
        let mut q = Outbox::new(4, 10_000);
        for _ in 0..4 {
            q.push(Outbound::Text("{}".into())).unwrap();
        }
        assert_eq!(
            q.push(Outbound::Text("{}".into())),
            Err(PushError::SlowConsumer)
        );
        // The last words to a slow consumer go in whatever the bounds, and leave with it.
        q.push_anyway(Outbound::Close(4000, "slow consumer".into()));
        assert!(q.ends_with_close());
        q.clear();
        assert!(q.is_empty());
        q.push(Outbound::Text("x".repeat(10_000))).unwrap();
    }
}
