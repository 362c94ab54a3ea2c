//! The transport floor: a bare tokio-tungstenite echo server, run as its own process (the bench
//! binary started again with [`ROLE_VAR`] set) so that its CPU time and memory are read from
//! `/proc` exactly like the duplex server's.
//!
//! It does what any WebSocket audio server must do and nothing else: accept, `set_nodelay`,
//! split, and send every binary message back as it arrives. To be driven by the same load
//! generator as duplex it answers the one `session.start` text message with a fixed
//! `session.ready` (the protocol's own example, with the session's audio format) and closes
//! normally on `session.end`; those two messages per session are the only difference from a
//! plain echo and cost nothing per frame.

use std::io::{BufRead, Write};

use duplex_proto::{AudioFormat, ClientMessage, ServerMessage};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message};

/// Set to the read buffer size in bytes (`default` for tungstenite's own) to make the bench
/// binary serve as the bare echo server; it prints its port on the first line of stdout and
/// exits when its stdin closes (when the bench ends, however it ends).
pub const ROLE_VAR: &str = "DUPLEX_BENCH_BARE_ECHO";

/// The `session.ready` every session gets, with `input`/`output` replaced by the session's
/// format (the load generator checks it).
const READY_EXAMPLE: &str = include_str!("../../../../proto/examples/session.ready.json");

/// Runs the server until stdin closes. `spec` is the value of [`ROLE_VAR`].
pub fn serve(spec: &str) {
    let mut config = WebSocketConfig::default();
    if spec != "default" {
        let bytes: usize = spec
            .parse()
            .unwrap_or_else(|_| panic!("{ROLE_VAR}: `default` or a byte count, got {spec:?}"));
        config = config.read_buffer_size(bytes);
    }
    // Bounded lifetime: the parent holds our stdin; EOF (the bench ended or died) ends us.
    std::thread::spawn(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        std::process::exit(0);
    });
    // The same runtime the duplex binary builds: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("a bound address").port();
        let mut out = std::io::stdout().lock();
        writeln!(out, "{port}").expect("stdout is the bench's pipe");
        out.flush().expect("stdout is the bench's pipe");
        drop(out);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                // EMFILE and friends: the load generator sees the failed connect.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(connection(tcp, config));
        }
    });
}

async fn connection(tcp: tokio::net::TcpStream, config: WebSocketConfig) {
    // Select `duplex.v1` like the server does: the client offers it and insists on an answer.
    // The error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    let select = |_: &Request, mut response: Response| {
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(duplex_proto::SUBPROTOCOL),
        );
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, select, Some(config)).await
    else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    while let Some(Ok(msg)) = stream.next().await {
        let sent = match msg {
            Message::Binary(bytes) => sink.send(Message::Binary(bytes)).await,
            Message::Text(text) => match duplex_proto::parse_client_message(text.as_str()) {
                Ok(ClientMessage::SessionStart(start)) => {
                    let ready = ready(AudioFormat {
                        encoding: start.encoding,
                        sample_rate: start.sample_rate,
                    });
                    sink.send(Message::text(ready)).await
                }
                Ok(ClientMessage::SessionEnd(_)) => {
                    let close = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "session ended".into(),
                    };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    return;
                }
                _ => Ok(()),
            },
            Message::Close(_) => return,
            _ => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

fn ready(format: AudioFormat) -> String {
    let mut ready: ServerMessage =
        serde_json::from_str(READY_EXAMPLE).expect("the protocol's example parses");
    if let ServerMessage::SessionReady(r) = &mut ready {
        r.input = format;
        r.output = format;
    }
    ready.to_json()
}
