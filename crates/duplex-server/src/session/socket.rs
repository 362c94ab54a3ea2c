//! The socket side of a session: what a received message means, the writer task, and the
//! writer's queue, bounded by messages and by bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use duplex_proto::{ErrorCode, ServerMessage};
use duplex_session::ClientIn;
use futures::SinkExt;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A single socket write blocked this long means the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the shell hands the writer.
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

/// The shell's end of the writer queue: bounded by messages and by bytes.
pub(super) struct OutboundTx {
    tx: mpsc::Sender<Outbound>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The writer's end; every message taken leaves the byte count.
pub(super) struct OutboundRx {
    rx: mpsc::Receiver<Outbound>,
    queued: Arc<AtomicUsize>,
}

/// Why a message could not be queued.
#[derive(Debug, PartialEq)]
pub(super) enum PushError {
    /// The queue is full (by messages or bytes): the client is not reading.
    SlowConsumer,
    /// The writer is gone.
    Closed,
}

pub(super) fn outbound(capacity: usize, max_bytes: usize) -> (OutboundTx, OutboundRx) {
    let (tx, rx) = mpsc::channel(capacity);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        OutboundTx {
            tx,
            queued: queued.clone(),
            max_bytes,
        },
        OutboundRx { rx, queued },
    )
}

impl OutboundTx {
    pub(super) fn push(&self, msg: Outbound) -> Result<(), PushError> {
        let len = msg.len();
        // Only this task adds, so the check and the add cannot race with another push.
        if self.queued.load(Ordering::Acquire) + len > self.max_bytes {
            return Err(if self.tx.is_closed() {
                PushError::Closed
            } else {
                PushError::SlowConsumer
            });
        }
        self.queued.fetch_add(len, Ordering::AcqRel);
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(len, Ordering::AcqRel);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => PushError::SlowConsumer,
                    mpsc::error::TrySendError::Closed(_) => PushError::Closed,
                })
            }
        }
    }
}

impl OutboundRx {
    async fn recv(&mut self) -> Option<Outbound> {
        let msg = self.rx.recv().await?;
        self.queued.fetch_sub(msg.len(), Ordering::AcqRel);
        Some(msg)
    }

    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
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

pub(super) async fn writer(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: OutboundRx,
    kill: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = kill.cancelled() => {
                // The queue is full because the client does not read: skip it and try to say why.
                let err = ServerMessage::error(
                    ErrorCode::SlowConsumer,
                    "client did not read audio fast enough",
                    true,
                );
                let _ = timeout(Duration::from_secs(1), async {
                    sink.send(Message::Text(err.to_json().into())).await?;
                    sink.send(close_message(duplex_proto::close_code::SLOW_CONSUMER, "slow consumer")).await
                })
                .await;
                return;
            }
            next = rx.recv() => next,
        };
        let msg = match next {
            None => {
                let _ = timeout(WRITE_TIMEOUT, sink.close()).await;
                return;
            }
            Some(Outbound::Text(t)) => Message::Text(t.into()),
            Some(Outbound::Binary(b)) => Message::Binary(b),
            Some(Outbound::Close(code, reason)) => {
                let _ = timeout(WRITE_TIMEOUT, sink.send(close_message(code, &reason))).await;
                return;
            }
        };
        // Feed without flushing while more is queued: one syscall for a burst of frames.
        let write = async {
            sink.feed(msg).await?;
            if rx.is_empty() {
                sink.flush().await
            } else {
                Ok(())
            }
        };
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "socket write failed");
                return;
            }
            Err(_) => {
                warn!("socket write timed out");
                return;
            }
        }
    }
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
    fn the_writer_queue_is_bounded_by_bytes_as_well_as_messages() {
        let (tx, mut rx) = outbound(256, 10_000);
        // Large messages: the byte bound is reached long before 256 of them.
        for _ in 0..3 {
            tx.push(Outbound::Binary(vec![0; 3000].into())).unwrap();
        }
        assert_eq!(
            tx.push(Outbound::Binary(vec![0; 3000].into())),
            Err(PushError::SlowConsumer)
        );
        // Small ones still fit under the byte bound...
        tx.push(Outbound::Text("x".repeat(500))).unwrap();
        // ...and what the writer takes leaves the count.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(matches!(rx.recv().await, Some(Outbound::Binary(_))));
        });
        tx.push(Outbound::Binary(vec![0; 3000].into())).unwrap();
        // Small messages: the message bound still holds.
        let (tx, _rx) = outbound(4, 10_000);
        for _ in 0..4 {
            tx.push(Outbound::Text("{}".into())).unwrap();
        }
        assert_eq!(
            tx.push(Outbound::Text("{}".into())),
            Err(PushError::SlowConsumer)
        );
        // A gone writer is not a slow consumer.
        let (tx, rx) = outbound(4, 10_000);
        drop(rx);
        assert_eq!(tx.push(Outbound::Text("{}".into())), Err(PushError::Closed));
    }
}
