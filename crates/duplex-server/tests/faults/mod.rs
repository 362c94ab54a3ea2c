//! The provider fault matrix: every fault mode of the vendor fakes, at every stage it can
//! happen in, against the real server over loopback sockets. For each case the client gets an
//! `error` event whose code names the stage and whose message names the fault, the session
//! goes on and its next turn completes (the fake is healthy again: faults are one-shot), and
//! once the client has left, the fakes serve nothing and the runtime's task count (less the
//! idle keep-alive connections of the HTTP clients' pools) is back to what it was after a
//! healthy session.
//!
//! | mode \ stage | STT Deepgram | STT OpenAI | LLM OpenAI chat | TTS ElevenLabs | TTS OpenAI | TTS Azure |
//! |---|---|---|---|---|---|---|
//! | 401, 429, 500 | handshake | request | request | handshake | request | request |
//! | hang before first byte | handshake | request | request | handshake | request | request |
//! | stall after the first answer | transcript | headers (then whitespace) | token | audio | PCM piece | PCM piece |
//! | disconnect mid-stream | transcript | first body bytes | token | audio | PCM piece | PCM piece |
//! | malformed data | transcript | body | token | audio | — | — |
//!
//! Malformed data does not exist for the PCM synthesizers (OpenAI speech, Azure): their body
//! is headerless PCM16 and any bytes are samples. The timeouts are shortened through the
//! configuration variables, so the whole matrix takes seconds; each provider's column runs on
//! its own thread and runtime (its own server and fakes), so the task counts do not mix.

use std::collections::HashMap;
use std::time::Duration;

use duplex_proto::{AudioEndReason, ClientMessage, ErrorCode, InputText, ServerMessage};
use duplex_replay::client::{Client, Event};
use duplex_replay::wav::silence_frame;
use duplex_server::Config;
use duplex_testkit::Fault;
use duplex_testkit::azure::AzureFake;
use duplex_testkit::deepgram::DeepgramFake;
use duplex_testkit::elevenlabs::ElevenLabsFake;
use duplex_testkit::openai::{self, Api, OpenAiFake};

use super::{TestServer, speech};

const TRANSCRIPT: &str = "what is the weather like in paris";
/// Two sentences (two TTS chunks), short: the assistant's audio is paced in real time.
const REPLY: &str = "Sunny. Take a hat.";
/// Every provider timeout of these tests: the fakes answer within milliseconds, so a second
/// only ever passes in a fault.
const BOUND_MS: &str = "1000";
/// An error must arrive within this: the bound above plus the reconnect and scheduling slack.
const ERROR_WITHIN: Duration = Duration::from_secs(5);
/// A healthy turn, from the end of the user's input to its last audio frame.
const TURN_WITHIN: Duration = Duration::from_secs(10);
/// What the server and the fakes may take to let go of everything after the client left.
const SETTLE_WITHIN: Duration = Duration::from_secs(5);
const RATE: u32 = 16_000;

struct Fakes {
    deepgram: DeepgramFake,
    openai: OpenAiFake,
    elevenlabs: ElevenLabsFake,
    azure: AzureFake,
}

impl Fakes {
    async fn start() -> Fakes {
        let openai = OpenAiFake::start("sk-key", REPLY).await;
        openai.set_transcript(TRANSCRIPT);
        Fakes {
            deepgram: DeepgramFake::start("dg-key", &[TRANSCRIPT]).await,
            openai,
            elevenlabs: ElevenLabsFake::start("xi-key").await,
            azure: AzureFake::start("az-key").await,
        }
    }

    fn config(&self, stt: &str, tts: &str) -> Config {
        let vars: HashMap<String, String> = [
            ("STT_PROVIDER", stt.to_owned()),
            ("TTS_PROVIDER", tts.to_owned()),
            ("DEEPGRAM_API_KEY", "dg-key".to_owned()),
            ("DEEPGRAM_BASE_URL", self.deepgram.base_url()),
            ("OPENAI_API_KEY", "sk-key".to_owned()),
            ("OPENAI_BASE_URL", self.openai.base_url()),
            ("ELEVENLABS_API_KEY", "xi-key".to_owned()),
            ("ELEVENLABS_BASE_URL", self.elevenlabs.base_url()),
            ("AZURE_SPEECH_KEY", "az-key".to_owned()),
            ("AZURE_SPEECH_ENDPOINT", self.azure.endpoint()),
            // One endpoint, no retry: a failure before the first token is the turn's error.
            ("LLM_RETRIES", "0".to_owned()),
            // Every case fails the endpoint once; the breaker is not what is tested here.
            ("LLM_BREAKER_FAILURES", "1000".to_owned()),
            ("LLM_FIRST_TOKEN_TIMEOUT_MS", BOUND_MS.to_owned()),
            ("LLM_IDLE_TIMEOUT_MS", BOUND_MS.to_owned()),
            ("PROVIDER_CONNECT_TIMEOUT_MS", BOUND_MS.to_owned()),
            ("PROVIDER_READ_TIMEOUT_MS", BOUND_MS.to_owned()),
            ("PROVIDER_SEND_TIMEOUT_MS", BOUND_MS.to_owned()),
            ("ELEVENLABS_RESPONSE_TIMEOUT_MS", BOUND_MS.to_owned()),
            ("OPENAI_STT_TIMEOUT_MS", "2000".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let parsed = Config::from_lookup(|k| vars.get(k).cloned()).expect("valid config");
        let mut c = super::test_config();
        c.engines.cloud = parsed.engines.cloud;
        c
    }

    /// TCP connections open to the fakes.
    fn tcp(&self) -> usize {
        self.deepgram.tcp_connections()
            + self.openai.tcp_connections()
            + self.elevenlabs.tcp_connections()
            + self.azure.tcp_connections()
    }

    /// Connections and requests the fakes are still serving.
    fn open(&self) -> [usize; 4] {
        [
            self.deepgram.open(),
            self.openai.open(),
            self.elevenlabs.open(),
            self.azure.open(),
        ]
    }
}

/// The stage a column exercises, and how to break its vendor once.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Column {
    Deepgram,
    OpenAiStt,
    Chat,
    ElevenLabs,
    OpenAiTts,
    Azure,
}

/// A fault mode of the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Status(u16),
    Hang,
    Stall,
    Disconnect,
    Malformed,
}

const MODES: &[Mode] = &[
    Mode::Status(401),
    Mode::Status(429),
    Mode::Status(500),
    Mode::Hang,
    Mode::Stall,
    Mode::Disconnect,
    Mode::Malformed,
];

impl Column {
    fn stt(self) -> &'static str {
        match self {
            Column::OpenAiStt => "openai",
            _ => "deepgram",
        }
    }

    fn tts(self) -> &'static str {
        match self {
            Column::ElevenLabs => "elevenlabs",
            Column::Azure => "azure",
            _ => "openai",
        }
    }

    fn code(self) -> ErrorCode {
        match self {
            Column::Deepgram | Column::OpenAiStt => ErrorCode::SttError,
            Column::Chat => ErrorCode::LlmError,
            _ => ErrorCode::TtsError,
        }
    }

    /// How the session machine names the stage in its message.
    fn stage(self) -> &'static str {
        match self {
            Column::Deepgram | Column::OpenAiStt => "speech recognition failed",
            Column::Chat => "language model failed",
            _ => "speech synthesis failed",
        }
    }

    fn spoken(self) -> bool {
        matches!(self, Column::Deepgram | Column::OpenAiStt)
    }

    /// Whether the mode exists for this vendor (see the module docs).
    fn has(self, mode: Mode) -> bool {
        !(mode == Mode::Malformed && matches!(self, Column::OpenAiTts | Column::Azure))
    }

    /// The fault hits the stream's connection or request before any answer: a Deepgram
    /// stream opens with the session, so the error comes before the user speaks.
    fn at_session_start(self, mode: Mode) -> bool {
        self == Column::Deepgram && matches!(mode, Mode::Status(_) | Mode::Hang)
    }

    fn arm(self, fakes: &Fakes, mode: Mode) {
        let shared = match mode {
            Mode::Status(s) => Fault::Refuse(s),
            Mode::Hang => Fault::HangBeforeFirstByte,
            Mode::Stall => Fault::StallAfterFirst,
            Mode::Disconnect => Fault::DisconnectAfterFirst,
            Mode::Malformed => Fault::MalformedAfterFirst,
        };
        let oa = match mode {
            Mode::Status(401) => openai::Fault::Unauthorized,
            Mode::Status(429) => openai::Fault::RateLimited {
                retry_after_secs: 1,
            },
            Mode::Status(_) => openai::Fault::ServerError,
            Mode::Hang => openai::Fault::HangBeforeFirstByte,
            Mode::Stall => openai::Fault::StallAfter(1),
            Mode::Disconnect => openai::Fault::DisconnectAfter(1),
            Mode::Malformed => openai::Fault::MalformedAfter(1),
        };
        match self {
            Column::Deepgram => fakes.deepgram.push_fault(shared),
            Column::ElevenLabs => fakes.elevenlabs.push_fault(shared),
            Column::Azure => fakes.azure.push_fault(shared),
            Column::OpenAiStt => fakes.openai.push_fault(Api::Transcriptions, oa),
            Column::Chat => fakes.openai.push_fault(Api::Chat, oa),
            Column::OpenAiTts => fakes.openai.push_fault(Api::Speech, oa),
        }
    }

    /// What the message must say besides the stage, per mode.
    fn expected(self, mode: Mode) -> &'static [&'static str] {
        match (self, mode) {
            (_, Mode::Status(401)) => &["HTTP 401"],
            (_, Mode::Status(429)) => &["rate limited"],
            (_, Mode::Status(_)) => &["HTTP 500"],
            (Column::Deepgram, Mode::Hang) => &["timed out", "Deepgram connect"],
            (Column::ElevenLabs, Mode::Hang) => &["timed out", "ElevenLabs connect"],
            (Column::Chat, Mode::Hang) => &["timed out", "first token"],
            (_, Mode::Hang) => &["timed out"],
            (Column::Deepgram, Mode::Stall) => &["timed out", "Deepgram did not take a frame"],
            (Column::ElevenLabs, Mode::Stall) => &["timed out", "ElevenLabs sent nothing"],
            (Column::Chat, Mode::Stall) => &["timed out", "openai sent no token"],
            (Column::OpenAiStt, Mode::Stall) => &["timed out", "OpenAI transcription"],
            (_, Mode::Stall) => &["timed out"],
            (Column::Deepgram, Mode::Disconnect) => &["Deepgram"],
            (Column::ElevenLabs, Mode::Disconnect) => &["ElevenLabs"],
            (_, Mode::Disconnect) => &["closed"],
            (_, Mode::Malformed) => &["protocol violation"],
        }
    }
}

/// Streams `wav` at four times real time, then a second of silence (the end of the turn).
async fn speak(c: &mut Client, text: &str) {
    let wav = speech(text, RATE);
    for frame in wav.frames() {
        c.send_audio(&frame).await.expect("audio sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let silence = silence_frame(RATE);
    for _ in 0..50 {
        c.send_audio(&silence).await.expect("audio sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads events until one matches, sending silence meanwhile if `mic` (a microphone streams
/// all the time; a stalled recognizer is only noticed while audio is owed to it).
async fn until(
    c: &mut Client,
    mic: bool,
    within: Duration,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + within;
    let silence = silence_frame(RATE);
    while tokio::time::Instant::now() < deadline {
        if mic {
            c.send_audio(&silence).await.expect("audio sent");
        }
        let wait = Duration::from_millis(if mic { 5 } else { 50 });
        match c.next_event(wait).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(_) => {}
            Err(e) => panic!("{what}: the connection failed: {e}"),
        }
    }
    let labels: Vec<String> = c.events().iter().map(|e| e.label()).collect();
    panic!("{what}: nothing within {within:?}; events: {labels:?}")
}

/// Streams silence for `d`, reading events meanwhile.
async fn listen(c: &mut Client, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    let silence = silence_frame(RATE);
    while tokio::time::Instant::now() < deadline {
        c.send_audio(&silence).await.expect("audio sent");
        let _ = c.next_event(Duration::from_millis(5)).await;
    }
}

/// One turn: spoken for the STT columns, typed for the others.
async fn take_turn(column: Column, c: &mut Client) {
    if column.spoken() {
        speak(c, "What is the weather like today in Paris?").await;
    } else {
        c.send_json(&ClientMessage::InputText(InputText {
            text: TRANSCRIPT.into(),
        }))
        .await
        .expect("text sent");
    }
}

/// A turn that completes: its audio ends with reason `complete`.
async fn healthy_turn(column: Column, c: &mut Client, what: &str) {
    take_turn(column, c).await;
    until(c, column.spoken(), TURN_WITHIN, what, |e| {
        matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(a)) if a.reason == AudioEndReason::Complete)
    })
    .await;
}

/// The runtime's live tasks less two per TCP connection open to the fakes: an idle
/// keep-alive connection in a client's pool is one task on each side, and whether a pool
/// keeps a connection depends on whether the client read the last response to its very end
/// (async-openai stops at `data: [DONE]`, before the body's final chunk), not on a leak.
/// What remains is every task of the server, the sessions and the provider streams.
fn tasks(fakes: &Fakes) -> isize {
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    alive as isize - 2 * fakes.tcp() as isize
}

async fn connect(ts: &TestServer) -> Client {
    let mut c = Client::connect(&ts.url(), Some(super::start(RATE)))
        .await
        .expect("connects");
    c.wait_ready(TURN_WITHIN).await.expect("session.ready");
    c
}

/// Runs every mode of `column` on one server; panics with the case on the first failure.
async fn column_cases(column: Column) {
    let fakes = Fakes::start().await;
    let ts = TestServer::start(fakes.config(column.stt(), column.tts())).await;

    // The baseline: what is alive after a healthy session has come and gone (connection
    // pools warm, the server idle).
    let mut c = connect(&ts).await;
    healthy_turn(column, &mut c, &format!("{column:?} healthy")).await;
    c.close().await.expect("closed");
    let settled = duplex_testkit::eventually(SETTLE_WITHIN, || fakes.open() == [0; 4]).await;
    assert!(
        settled,
        "{column:?}: the fakes still serve {:?}",
        fakes.open()
    );
    // Let stragglers (connection tasks finishing their close) go before the count is taken.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = tasks(&fakes);

    for &mode in MODES.iter().filter(|m| column.has(**m)) {
        let case = format!("{column:?} x {mode:?}");
        column.arm(&fakes, mode);
        let mut c = connect(&ts).await;
        if !column.at_session_start(mode) {
            take_turn(column, &mut c).await;
        }
        let e = until(&mut c, column.spoken(), ERROR_WITHIN, &case, |e| {
            e.error_code().is_some()
        })
        .await;
        let Some(ServerMessage::Error(err)) = e.json() else {
            unreachable!("matched an error")
        };
        assert_eq!(err.code, column.code(), "{case}: {err:?}");
        assert!(!err.fatal, "{case}: {err:?}");
        assert!(err.message.starts_with(column.stage()), "{case}: {err:?}");
        for needle in column.expected(mode) {
            assert!(
                err.message.contains(needle),
                "{case}: {needle:?} in {err:?}"
            );
        }
        if column.spoken() {
            // The recognizer reconnects with backoff (50-100 ms for a first failure).
            listen(&mut c, Duration::from_millis(300)).await;
        }
        healthy_turn(column, &mut c, &format!("{case}: the next turn")).await;
        c.close().await.expect("closed");

        let mut last = (0, [0; 4]);
        let settled = duplex_testkit::eventually(SETTLE_WITHIN, || {
            last = (tasks(&fakes), fakes.open());
            last.0 <= baseline && last.1 == [0; 4]
        })
        .await;
        assert!(
            settled,
            "{case}: tasks {} (baseline {baseline}), fakes still serving {:?}",
            last.0, last.1
        );
    }
}

/// Runs each column on its own thread and runtime, all at once; reports every failed column.
#[test]
fn every_fault_of_every_stage_is_an_error_event_and_the_session_recovers() {
    let columns = [
        Column::Deepgram,
        Column::OpenAiStt,
        Column::Chat,
        Column::ElevenLabs,
        Column::OpenAiTts,
        Column::Azure,
    ];
    let threads: Vec<_> = columns
        .into_iter()
        .map(|column| {
            std::thread::Builder::new()
                .name(format!("faults-{column:?}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime");
                    rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(120), column_cases(column))
                            .await
                            .unwrap_or_else(|_| panic!("{column:?}: the column took too long"))
                    });
                })
                .expect("a thread")
        })
        .collect();
    let failed: Vec<Column> = columns
        .into_iter()
        .zip(threads)
        .filter_map(|(column, t)| t.join().is_err().then_some(column))
        .collect();
    assert!(failed.is_empty(), "failed columns: {failed:?}");
}
