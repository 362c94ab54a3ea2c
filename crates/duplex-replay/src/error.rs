//! The one error type of the replayer library.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while connecting, talking to a server or loading input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL could not be turned into a WebSocket request.
    #[error("invalid URL {url}: {detail}")]
    InvalidUrl { url: String, detail: String },
    /// TCP connect or WebSocket handshake failed (including a missing `duplex.v1` subprotocol).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The handshake did not finish within the connect timeout.
    #[error("connecting to {url} timed out after {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    /// Sending or receiving on an established connection failed.
    #[error("websocket error: {0}")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server sent a text frame that is not a valid `duplex.v1` server message.
    #[error("server sent invalid JSON message ({detail}): {text}")]
    BadServerJson { text: String, detail: String },
    /// The connection is gone and every event it produced has been read.
    #[error("connection closed")]
    Closed,
    /// `wait_for` saw no matching event in time.
    #[error("no matching event within {0:?}")]
    Timeout(Duration),
    /// The server's first message was not `session.ready`.
    #[error("expected session.ready, got {0}")]
    NotReady(String),
    /// A WAV file could not be read.
    #[error("cannot read WAV {path}: {source}")]
    WavRead {
        path: PathBuf,
        #[source]
        source: hound::Error,
    },
    /// A WAV file was readable but has a format the replayer does not stream.
    #[error("unsupported WAV {name}: {detail}")]
    WavFormat { name: String, detail: String },
    /// A replay or load configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(e))
    }
}

/// Result with the replayer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
