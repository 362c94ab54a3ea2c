//! Timeline tests of the session machine: a made-up clock, inputs in, commands out. Each
//! timeline prints one line per command, prefixed with the ms since the connection arrived.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use duplex_proto::{ErrorCode, ServerMessage};
use expect_test::{Expect, expect};

use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn config(engines: bool) -> SessionConfig {
    SessionConfig {
        session_id: "s1".into(),
        engines: engines.then(|| duplex_proto::ProviderNames {
            stt: "stt-x".into(),
            llm: "llm-x".into(),
            tts: "tts-x".into(),
        }),
        system_prompt: "Be brief.".into(),
        audio_lead: Duration::from_millis(300),
        first_chunk_wait: None,
        vad_mode: VadMode::Aggressive,
        speech_start: Duration::from_millis(60),
        end_of_turn: Duration::from_millis(300),
        max_turn: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        pre_start_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(20),
        max_message_bytes: 65536,
        max_input_text_chars: 100,
        max_audio_ahead: Some(Duration::from_secs(2)),
        model_check: Some(ModelCheck::new(|plan, model| match (plan, model) {
            (Some("pro"), "big") | (_, "small") => Ok(()),
            _ => Err(format!("model {model:?} is not available on this plan")),
        })),
        usage_heartbeat: Duration::from_secs(5),
        final_write_timeout: Duration::from_secs(15),
        jitter_seed: 1,
    }
}

fn plan(daily_seconds: Option<u64>, turns_per_minute: Option<u32>) -> Plan {
    Plan {
        daily_seconds,
        turns_per_minute,
        ..Plan::unlimited("free")
    }
}

fn day() -> duplex_metering::UtcDate {
    duplex_metering::UtcDate::from_ymd(2026, 12, 2).unwrap()
}

/// A session under test and the commands it gave, as text.
struct T {
    s: Session,
    t0: Instant,
    now: Instant,
    log: String,
    /// Commands since the last check, unrendered.
    cmds: Vec<(u64, Command)>,
    /// Usage writes given and not answered yet: (seq, seconds).
    writes: Vec<(u64, u64)>,
    /// The user's seconds today as the made-up store has them.
    stored_seconds: u64,
}

impl T {
    fn new(engines: bool) -> T {
        T::with(config(engines), UserTurnLimiter::default())
    }

    fn with(config: SessionConfig, limiter: UserTurnLimiter) -> T {
        let t0 = Instant::now();
        let wall = UnixMs(day().start().0 + 9 * 3600 * 1000);
        T {
            s: Session::new(config, limiter, t0, wall),
            t0,
            now: t0,
            log: String::new(),
            cmds: Vec::new(),
            writes: Vec::new(),
            stored_seconds: 0,
        }
    }

    fn ms(&self) -> u64 {
        self.now.duration_since(self.t0).as_millis() as u64
    }

    fn collect(&mut self) {
        let ms = self.ms();
        while let Some(c) = self.s.poll_command() {
            writeln!(self.log, "{ms:<6} {}", render(&c)).unwrap();
            if let Command::Persist { delta, .. } = &c {
                self.writes.push((delta.seq, delta.seconds));
            }
            self.cmds.push((ms, c));
        }
    }

    fn input(&mut self, i: Input) -> &mut T {
        self.s.handle_input(self.now, i);
        self.collect();
        self
    }

    /// Admits an account on `plan` with `seconds_today` used.
    fn admit(&mut self, plan: Plan, seconds_today: u64) -> &mut T {
        self.stored_seconds = seconds_today;
        let totals = UsageTotals {
            seconds_today,
            ..UsageTotals::zero(day())
        };
        self.input(Input::Admission(Ok(Admitted {
            account: Account { user_id: 7, plan },
            totals,
            switches: Switches::default(),
        })))
    }

    fn llm(&mut self, turn: TurnId, event: LlmIn) -> &mut T {
        self.input(Input::Llm { turn, event })
    }

    fn tts(&mut self, turn: TurnId, event: TtsIn) -> &mut T {
        self.input(Input::Tts { turn, event })
    }

    fn text(&mut self, json: &str) -> &mut T {
        self.input(Input::Client(ClientIn::Text(json.to_owned())))
    }

    fn start(&mut self) -> &mut T {
        self.text(r#"{"type":"session.start","sample_rate":16000}"#)
    }

    fn binary(&mut self, bytes: Vec<u8>) -> &mut T {
        self.input(Input::Client(ClientIn::Binary(bytes.into())))
    }

    /// Lets `d` pass, handling every deadline on the way at its time.
    fn advance(&mut self, d: Duration) -> &mut T {
        let target = self.now + d;
        while let Some(at) = self.s.poll_timeout() {
            if at > target {
                break;
            }
            self.now = self.now.max(at);
            self.s.handle_timeout(self.now);
            self.collect();
        }
        self.now = target;
        self
    }

    /// Lets `d` pass in steps of 100 ms, answering every usage write at once.
    fn advance_acking(&mut self, d: Duration) -> &mut T {
        let step = Duration::from_millis(100);
        let mut left = d;
        while !left.is_zero() {
            let s = step.min(left);
            self.advance(s).ack_persists();
            left -= s;
        }
        self
    }

    /// Answers every `Persist` given so far with success.
    fn ack_persists(&mut self) -> &mut T {
        for (seq, seconds) in std::mem::take(&mut self.writes) {
            self.stored_seconds += seconds;
            let totals = UsageTotals {
                seconds_today: self.stored_seconds,
                ..UsageTotals::zero(day())
            };
            self.input(Input::Persisted {
                seq,
                result: Ok(totals),
            });
        }
        self
    }

    fn check(&mut self, expect: Expect) {
        expect.assert_eq(&std::mem::take(&mut self.log));
        self.cmds.clear();
    }

    /// The commands since the last check, without rendering.
    fn commands(&self) -> Vec<&Command> {
        self.cmds.iter().map(|(_, c)| c).collect()
    }

    fn errors(&self) -> Vec<(ErrorCode, bool)> {
        self.cmds
            .iter()
            .filter_map(|(_, c)| match c {
                Command::Send(ServerMessage::Error(e)) => Some((e.code, e.fatal)),
                _ => None,
            })
            .collect()
    }
}

/// Whether `log` has a line `text` at `ms`.
fn logged(log: &str, ms: u64, text: &str) -> bool {
    log.lines().any(|l| {
        let (t, rest) = l.split_once(' ').unwrap_or((l, ""));
        t.parse() == Ok(ms) && rest.trim_start() == text
    })
}

/// One line per command; audio frames and STT feeds show their size only.
fn render(c: &Command) -> String {
    match c {
        Command::Send(m) => {
            let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
            let ty = v["type"].as_str().unwrap_or("?").to_owned();
            match m {
                ServerMessage::Error(e) => format!(
                    "send error {}{}: {}",
                    e.code.as_str(),
                    if e.fatal { " (fatal)" } else { "" },
                    e.message
                ),
                ServerMessage::LimitExceeded(l) => {
                    format!(
                        "send limit_exceeded {} used={} allowed={}",
                        l.limit, l.used, l.allowed
                    )
                }
                ServerMessage::UsageUpdate(u) => format!(
                    "send usage_update seconds_today={} session_seconds={}",
                    u.seconds_used_today, u.session_seconds
                ),
                ServerMessage::SessionReady(_) | ServerMessage::Pong(_) => format!("send {ty}"),
                _ => format!("send {}", m.to_json()),
            }
        }
        Command::SendAudio(b) => format!("audio {} bytes", b.len()),
        Command::Close { code, reason } => format!("close {code} {reason}"),
        Command::OpenStt { language } => format!("open_stt {language:?}"),
        Command::FeedStt(s) => format!("feed_stt {}", s.len()),
        Command::FinalizeStt => "finalize_stt".into(),
        Command::CloseStt => "close_stt".into(),
        Command::StartLlm { turn, request } => format!(
            "start_llm turn={turn} history={:?} model={:?} plan={:?}",
            request
                .history
                .iter()
                .map(|h| h.text.as_str())
                .collect::<Vec<_>>(),
            request.model,
            request.plan
        ),
        Command::OpenTts {
            turn,
            preferred_sample_rate,
            ..
        } => {
            format!("open_tts turn={turn} rate={preferred_sample_rate}")
        }
        Command::TtsText { turn, index, text } => format!("tts_text turn={turn} #{index} {text:?}"),
        Command::TtsEnd { turn } => format!("tts_end turn={turn}"),
        Command::CancelTurn { turn } => format!("cancel_turn turn={turn}"),
        Command::MeteringStarted { user_id } => format!("metering_started user={user_id}"),
        Command::Persist { user_id, delta } => format!(
            "persist user={user_id} seq={} seconds={} tts_chars={} last={}",
            delta.seq, delta.seconds, delta.tts_characters, delta.last
        ),
        Command::HandOff { user_id, deltas } => format!(
            "hand_off user={user_id} {}",
            deltas
                .iter()
                .map(|d| format!(
                    "seq={} seconds={} last={} retried={}",
                    d.seq, d.seconds, d.last, d.retried
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Command::Release => "release".into(),
        Command::RecordEnd { reason } => format!("record_end {reason}"),
        Command::Done => "done".into(),
        Command::Observe(o) => match o {
            Observation::Latency {
                stage,
                provider,
                value,
            } => format!(
                "observe latency {} {} {}ms",
                stage.as_str(),
                provider.as_deref().unwrap_or("-"),
                value.as_millis()
            ),
            Observation::Endpointing(d) => format!("observe endpointing {}ms", d.as_millis()),
            Observation::TurnStarted => "observe turn_started".into(),
            Observation::Interrupted => "observe interrupted".into(),
            Observation::AudioTooFast => "observe audio_too_fast".into(),
        },
    }
}

/// 20 ms of a vowel-like signal (16 kHz PCM16 little-endian): the VAD calls it speech.
fn voiced(offset: usize) -> Vec<u8> {
    (0..320)
        .flat_map(|i| {
            let t = (offset + i) as f64 / 16000.0;
            let s: f64 = [(150.0, 1.0), (300.0, 0.6), (700.0, 0.5), (1200.0, 0.3)]
                .iter()
                .map(|(f, a)| a * (2.0 * std::f64::consts::PI * f * t).sin())
                .sum();
            ((s * 6000.0) as i16).to_le_bytes()
        })
        .collect()
}

fn silence() -> Vec<u8> {
    vec![0; 640]
}

/// `ms` of 16 kHz PCM at 16 kHz for TTS.
fn tts_audio(ms: usize) -> TtsIn {
    TtsIn::Audio {
        index: 0,
        samples: vec![1000; 16 * ms],
        sample_rate: 16000,
    }
}

// -- lifecycle ------------------------------------------------------------------------------

#[test]
fn a_ping_only_connection_is_closed_at_the_pre_start_deadline() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0);
    for _ in 0..9 {
        t.advance(SECOND).text(r#"{"type":"ping","id":"p"}"#);
    }
    t.advance(2 * SECOND);
    t.check(expect![[r#"
        1000   send pong
        2000   send pong
        3000   send pong
        4000   send pong
        5000   send pong
        6000   send pong
        7000   send pong
        8000   send pong
        9000   send pong
        10000  send error start_timeout (fatal): no session started within 10 s of connecting
        10000  close 4000 no session.start
        10000  release
        10000  done
    "#]]);
    assert!(t.s.is_done());
    assert_eq!(t.s.poll_timeout(), None);
}

#[test]
fn a_silent_running_session_is_closed_at_the_idle_deadline_and_its_usage_written() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    t.advance_acking(Duration::from_secs(29))
        .text(r#"{"type":"ping"}"#);
    t.advance_acking(Duration::from_secs(31));
    let log = std::mem::take(&mut t.log);
    let lines: Vec<&str> = log.lines().map(|l| l.trim()).collect();
    // Still open at 30 s (the ping at 29 s counts), closed at 59 s.
    assert!(
        logged(
            &log,
            59000,
            "send error idle_timeout (fatal): no message from the client within the idle timeout"
        ),
        "{log}"
    );
    assert!(logged(&log, 59000, "close 4000 idle timeout"), "{log}");
    assert_eq!(log.matches("close ").count(), 1, "{log}");
    // Every second up to the close is written: heartbeats of 5 s, then the last delta.
    let persisted: u64 = lines
        .iter()
        .filter(|l| l.contains(" persist "))
        .filter_map(|l| l.split(" seconds=").nth(1))
        .map(|s| s.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(persisted, 59, "{log}");
    assert!(log.ends_with("record_end closed\n59000  done\n"), "{log}");
}

#[test]
fn the_store_being_down_refuses_the_connection_with_a_clear_error() {
    let mut t = T::new(true);
    t.input(Input::Admission(Err("connection refused".into())));
    t.check(expect![[r#"
        0      send error internal (fatal): the usage store is unavailable; try again shortly
        0      close 1011 usage store unavailable
        0      release
        0      done
    "#]]);
}

#[test]
fn a_user_without_time_left_is_refused_at_admission() {
    let mut t = T::new(true);
    t.admit(plan(Some(60), None), 60);
    t.check(expect![[r#"
        0      send limit_exceeded daily_seconds used=60 allowed=60
        0      close 4029 limit exceeded
        0      release
        0      done
    "#]]);
}

// -- bad input ------------------------------------------------------------------------------

#[test]
fn bad_inputs_get_precise_errors_and_the_session_goes_on() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0);
    t.binary(silence());
    t.text(r#"{"type":"input.text","text":"hi"}"#);
    t.text("{not json");
    t.text(r#"{"type":"warp.drive"}"#);
    t.text(r#"{"type":"session.start","sample_rate":12345}"#);
    t.text(r#"{"type":"session.start","sample_rate":16000,"output_sample_rate":11025}"#);
    t.text(r#"{"type":"session.start","sample_rate":16000,"encoding":"opus"}"#);
    t.text(&format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(129)));
    assert_eq!(
        t.errors(),
        vec![
            (ErrorCode::AudioBeforeSessionStart, false),
            (ErrorCode::SessionNotStarted, false),
            (ErrorCode::MalformedJson, false),
            (ErrorCode::UnknownMessageType, false),
            (ErrorCode::UnsupportedSampleRate, false),
            (ErrorCode::UnsupportedSampleRate, false),
            (ErrorCode::UnsupportedEncoding, false),
            (ErrorCode::InvalidMessage, false),
        ]
    );
    t.cmds.clear();
    t.log.clear();
    t.start();
    t.text(r#"{"type":"session.start","sample_rate":16000}"#);
    t.binary(vec![0; 641]);
    t.text(&format!(
        r#"{{"type":"input.text","text":"{}"}}"#,
        "y".repeat(101)
    ));
    t.text(r#"{"type":"ping","id":"still here"}"#);
    t.check(expect![[r#"
        0      open_stt None
        0      send session.ready
        0      metering_started user=7
        0      send usage_update seconds_today=0 session_seconds=0
        0      send error session_already_started: the session has already started
        0      send error odd_frame_length: pcm16 frame has an odd length of 641 bytes
        0      send error invalid_message: input.text longer than 100 characters (MAX_INPUT_TEXT_CHARS)
        0      send pong
    "#]]);
}

#[test]
fn an_oversized_message_is_fatal_and_later_messages_get_session_ended() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    t.check(expect![[r#"
        0      open_stt None
        0      send session.ready
        0      metering_started user=7
        0      send usage_update seconds_today=0 session_seconds=0
    "#]]);
    t.advance(Duration::from_millis(1500));
    t.input(Input::Client(ClientIn::TooLarge));
    t.text(r#"{"type":"ping"}"#);
    t.input(Input::Client(ClientIn::Closed));
    t.ack_persists();
    t.check(expect![[r#"
        1500   send error message_too_large (fatal): message larger than the 65536-byte limit
        1500   close 1009 message too big
        1500   release
        1500   persist user=7 seq=1 seconds=2 tts_chars=0 last=true
        1500   record_end closed
        1500   done
    "#]]);
}

// -- turns, barge-in, limits ----------------------------------------------------------------

/// Runs a typed turn up to the assistant speaking: returns with audio flowing.
fn speak(t: &mut T, turn: TurnId) {
    t.text(r#"{"type":"input.text","text":"tell me a story"}"#);
    t.llm(
        turn,
        LlmIn::Delta("Once upon a time. There was a fox.".into()),
    );
    t.tts(turn, tts_audio(200));
}

#[test]
fn barge_in_during_a_metered_turn_cancels_the_streams_and_metering_goes_on() {
    let mut t = T::new(true);
    t.admit(plan(Some(3600), None), 0).start();
    t.check(expect![[r#"
        0      open_stt None
        0      send session.ready
        0      metering_started user=7
        0      send usage_update seconds_today=0 session_seconds=0
    "#]]);
    t.advance(Duration::from_millis(1000));
    speak(&mut t, 1);
    t.advance(Duration::from_millis(100));
    t.text(r#"{"type":"response.interrupt"}"#);
    t.check(expect![[r#"
        1000   send {"type":"user_transcript","text":"tell me a story","is_final":true}
        1000   observe turn_started
        1000   start_llm turn=1 history=["tell me a story"] model=None plan=Some("free")
        1000   open_tts turn=1 rate=16000
        1000   observe latency llm_first_token llm-x 0ms
        1000   send {"type":"assistant_message","turn_id":1,"delta":"Once upon a time. There was a fox.","is_final":false}
        1000   tts_text turn=1 #0 "Once upon a time."
        1000   observe latency tts_first_audio tts-x 0ms
        1000   send {"type":"assistant_audio.start","turn_id":1,"format":{"encoding":"pcm16","sample_rate":16000}}
        1000   audio 640 bytes
        1000   observe latency voice_to_voice - 0ms
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1000   audio 640 bytes
        1100   cancel_turn turn=1
        1100   send {"type":"interrupted","turn_id":1,"played_ms":100,"heard_text":"Once upon"}
        1100   send {"type":"assistant_audio.end","turn_id":1,"duration_ms":100,"reason":"interrupted"}
        1100   observe interrupted
        1100   send usage_update seconds_today=1 session_seconds=1
    "#]]);
    // Late events of the cancelled turn are ignored; the meter keeps counting.
    t.tts(1, tts_audio(100));
    t.llm(1, LlmIn::Delta(" The end.".into()));
    t.advance(Duration::from_millis(3900));
    t.check(expect![[r#"
        5000   persist user=7 seq=1 seconds=5 tts_chars=17 last=false
    "#]]);
    t.ack_persists();
    t.advance(Duration::from_millis(1));
    // The next turn is admitted and its history holds what the user heard.
    speak(&mut t, 2);
    let starts: Vec<String> = t
        .commands()
        .iter()
        .filter(|c| matches!(c, Command::StartLlm { .. }))
        .map(|c| render(c))
        .collect();
    assert_eq!(
        starts,
        vec![
            r#"start_llm turn=2 history=["tell me a story", "Once upon", "tell me a story"] model=None plan=Some("free")"#
        ]
    );
}

#[test]
fn the_limit_reached_while_the_assistant_speaks_lets_the_turn_finish_then_closes_4029() {
    let mut t = T::new(true);
    // 5 s left today.
    t.admit(plan(Some(60), None), 55).start();
    t.advance(Duration::from_millis(4000));
    speak(&mut t, 1);
    t.check(expect![[r#"
        0      open_stt None
        0      send session.ready
        0      metering_started user=7
        0      send usage_update seconds_today=55 session_seconds=0
        4000   send {"type":"user_transcript","text":"tell me a story","is_final":true}
        4000   observe turn_started
        4000   start_llm turn=1 history=["tell me a story"] model=None plan=Some("free")
        4000   open_tts turn=1 rate=16000
        4000   observe latency llm_first_token llm-x 0ms
        4000   send {"type":"assistant_message","turn_id":1,"delta":"Once upon a time. There was a fox.","is_final":false}
        4000   tts_text turn=1 #0 "Once upon a time."
        4000   observe latency tts_first_audio tts-x 0ms
        4000   send {"type":"assistant_audio.start","turn_id":1,"format":{"encoding":"pcm16","sample_rate":16000}}
        4000   audio 640 bytes
        4000   observe latency voice_to_voice - 0ms
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
        4000   audio 640 bytes
    "#]]);
    t.advance(Duration::from_millis(1500));
    let log = std::mem::take(&mut t.log);
    // At 5 s: told, but the turn in progress is not cut off.
    assert!(
        logged(
            &log,
            5000,
            "send limit_exceeded daily_seconds used=60 allowed=60"
        ),
        "{log}"
    );
    assert!(!log.contains("close"), "{log}");
    t.ack_persists();
    t.cmds.clear();
    t.tts(1, TtsIn::Finished);
    t.llm(1, LlmIn::Done { tokens: Some(12) });
    // The turn's audio is played out (200 ms queued at 4 s: done by 5.5 s) -> the session ends.
    t.advance(Duration::from_millis(100));
    t.ack_persists();
    t.check(expect![[r#"
        5500   send usage_update seconds_today=60 session_seconds=5
        5500   send {"type":"assistant_message","turn_id":1,"text":"Once upon a time. There was a fox.","is_final":true}
        5500   send {"type":"assistant_audio.end","turn_id":1,"duration_ms":200,"reason":"complete"}
        5500   send usage_update seconds_today=60 session_seconds=5
        5500   close 4029 limit exceeded
        5500   release
        5500   persist user=7 seq=2 seconds=1 tts_chars=16 last=true
        5600   record_end limit exceeded
        5600   done
    "#]]);
}

#[test]
fn a_turn_refused_by_the_per_user_rate_limit_across_sessions() {
    let limiter = UserTurnLimiter::default();
    let mut a = T::with(config(true), limiter.clone());
    let mut b = T::with(config(true), limiter);
    a.admit(plan(None, Some(1)), 0).start();
    b.admit(plan(None, Some(1)), 0).start();
    a.text(r#"{"type":"input.text","text":"one"}"#);
    assert!(
        a.commands()
            .iter()
            .any(|c| matches!(c, Command::StartLlm { turn: 1, .. }))
    );
    b.log.clear();
    b.text(r#"{"type":"input.text","text":"two"}"#);
    b.check(expect![[r#"
        0      send {"type":"user_transcript","text":"two","is_final":true}
        0      send error rate_limited: more than 1 turns a minute across your sessions
        0      send limit_exceeded turns_per_minute used=1 allowed=1
        0      send usage_update seconds_today=0 session_seconds=0
        0      send usage_update seconds_today=0 session_seconds=0
    "#]]);
}

#[test]
fn drain_during_a_turn_waits_for_the_turn_then_closes_1001() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    speak(&mut t, 1);
    t.log.clear();
    t.input(Input::Shutdown);
    t.tts(1, TtsIn::Finished);
    t.llm(1, LlmIn::Done { tokens: None });
    t.advance(Duration::from_millis(300));
    t.ack_persists();
    t.check(expect![[r#"
        0      send error server_shutting_down (fatal): the server is shutting down
        0      send {"type":"assistant_message","turn_id":1,"text":"Once upon a time. There was a fox.","is_final":true}
        0      send {"type":"assistant_audio.end","turn_id":1,"duration_ms":200,"reason":"complete"}
        0      send usage_update seconds_today=0 session_seconds=0
        0      close 1001 server shutting down
        0      release
        0      persist user=7 seq=1 seconds=0 tts_chars=33 last=true
        300    record_end closed
        300    done
    "#]]);
}

#[test]
fn shutdown_of_an_idle_session_closes_at_once() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    t.log.clear();
    t.input(Input::Shutdown);
    t.ack_persists();
    t.check(expect![[r#"
        0      send error server_shutting_down (fatal): the server is shutting down
        0      close 1001 server shutting down
        0      release
        0      record_end closed
        0      done
    "#]]);
}

// -- speech recognition ---------------------------------------------------------------------

#[test]
fn an_stt_failure_mid_utterance_reconnects_with_backoff_and_a_transcript_resets_it() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    t.log.clear();
    for i in 0..10 {
        t.binary(voiced(i * 320));
    }
    t.input(Input::Stt(SttIn::Error("socket reset".into())));
    // Audio while the stream is closed is not fed.
    t.binary(voiced(3200));
    t.advance(Duration::from_secs(1));
    t.input(Input::Stt(SttIn::Ended));
    t.advance(Duration::from_secs(1));
    t.input(Input::Stt(SttIn::Final("hello".into())));
    t.input(Input::Stt(SttIn::Ended));
    t.advance(Duration::from_secs(1));
    t.check(expect![[r#"
        0      feed_stt 320
        0      feed_stt 320
        0      feed_stt 320
        0      send {"type":"vad.speech_started","audio_ms":0}
        0      feed_stt 320
        0      feed_stt 320
        0      feed_stt 320
        0      feed_stt 320
        0      feed_stt 320
        0      feed_stt 320
        0      feed_stt 320
        0      close_stt
        0      send error stt_error: speech recognition failed: socket reset; reconnecting in 78 ms
        78     open_stt None
        1000   close_stt
        1000   send error stt_error: speech recognition stream ended; reconnecting in 174 ms
        1174   open_stt None
        2000   close_stt
        2000   send error stt_error: speech recognition stream ended; reconnecting in 98 ms
        2098   open_stt None
    "#]]);
}

#[test]
fn speech_ends_the_utterance_and_a_full_stt_queue_defers_the_finalize() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    t.log.clear();
    for i in 0..10 {
        t.binary(voiced(i * 320));
        t.advance(Duration::from_millis(20));
    }
    for _ in 0..60 {
        t.binary(silence());
        t.advance(Duration::from_millis(20));
    }
    let finalize_at = t
        .cmds
        .iter()
        .find(|(_, c)| *c == Command::FinalizeStt)
        .map(|(ms, _)| *ms)
        .unwrap_or_else(|| {
            panic!(
                "the end of speech asks for the final transcript:\n{}",
                t.log
            )
        });
    let feeds = t
        .cmds
        .iter()
        .filter(|(_, c)| matches!(c, Command::FeedStt(_)))
        .count();
    assert_eq!(feeds, 70, "every 20 ms frame goes to STT");
    t.cmds.clear();
    t.log.clear();
    t.input(Input::SttFinalizeDeferred);
    t.advance(Duration::from_millis(20));
    t.check(expect![[r#"
        1420   finalize_stt
    "#]]);
    assert!(finalize_at > 0);
}

// -- the client going away ------------------------------------------------------------------

#[test]
fn a_slow_consumer_during_a_turn_loses_no_usage() {
    let mut t = T::new(true);
    t.admit(plan(Some(3600), None), 0).start();
    t.advance(Duration::from_millis(2000));
    speak(&mut t, 1);
    t.advance(Duration::from_millis(1500));
    t.log.clear();
    t.cmds.clear();
    t.input(Input::WriterGone { slow: true });
    // A client message that was already queued changes nothing now.
    t.text(r#"{"type":"ping"}"#);
    t.ack_persists();
    t.check(expect![[r#"
        3500   cancel_turn turn=1
        3500   release
        3500   persist user=7 seq=1 seconds=4 tts_chars=17 last=true
        3500   record_end closed
        3500   done
    "#]]);
}

#[test]
fn the_final_write_gives_up_at_its_deadline_hands_its_usage_over_and_still_records_the_end() {
    let mut t = T::new(true);
    t.admit(plan(Some(3600), None), 0).start();
    t.advance(Duration::from_millis(2500));
    t.input(Input::Client(ClientIn::Closed));
    // The store never answers; a failed retry does not extend the deadline.
    t.advance(Duration::from_secs(10));
    t.input(Input::Persisted {
        seq: 1,
        result: Err("timed out".into()),
    });
    t.advance(Duration::from_secs(10));
    t.check(expect![[r#"
        0      open_stt None
        0      send session.ready
        0      metering_started user=7
        0      send usage_update seconds_today=0 session_seconds=0
        2500   release
        2500   persist user=7 seq=1 seconds=3 tts_chars=0 last=true
        17500  hand_off user=7 seq=1 seconds=3 last=true retried=true
        17500  record_end closed
        17500  done
    "#]]);
}

#[test]
fn session_end_lingers_then_closes_normally() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0).start();
    t.log.clear();
    t.advance(Duration::from_millis(700));
    t.text(r#"{"type":"session.end"}"#);
    t.advance(Duration::from_millis(100));
    t.text(r#"{"type":"ping"}"#);
    t.advance(Duration::from_millis(200));
    t.ack_persists();
    t.check(expect![[r#"
        800    send error session_ended: the session has ended
        950    close 1000 session ended
        950    release
        950    persist user=7 seq=1 seconds=1 tts_chars=0 last=true
        1000   record_end closed
        1000   done
    "#]]);
}

// -- echo mode ------------------------------------------------------------------------------

#[test]
fn echo_mode_returns_every_frame_after_the_front_end_and_reports_speech() {
    let mut t = T::new(false);
    t.input(Input::Admission(Ok(Admitted {
        account: Account {
            user_id: 1,
            plan: Plan::unlimited(duplex_metering::UNMETERED),
        },
        totals: UsageTotals::zero(day()),
        switches: Switches::default(),
    })));
    t.start();
    t.log.clear();
    for i in 0..8 {
        t.binary(voiced(i * 320));
        t.advance(Duration::from_millis(20));
    }
    t.check(expect![[r#"
        0      audio 640 bytes
        20     audio 640 bytes
        40     send {"type":"vad.speech_started","audio_ms":0}
        40     audio 640 bytes
        60     audio 640 bytes
        80     audio 640 bytes
        100    audio 640 bytes
        120    audio 640 bytes
        140    audio 640 bytes
    "#]]);
}

#[test]
fn a_model_outside_the_plan_is_refused_with_an_error_and_the_plan_default_applies() {
    let mut t = T::new(true);
    t.admit(plan(None, None), 0);
    t.text(r#"{"type":"session.start","sample_rate":16000,"model":"big"}"#);
    t.text(r#"{"type":"input.text","text":"hi"}"#);
    let log = std::mem::take(&mut t.log);
    assert!(
        logged(
            &log,
            0,
            "send error invalid_message: model \"big\" is not available on this plan"
        ),
        "{log}"
    );
    assert!(
        log.contains("start_llm turn=1 history=[\"hi\"] model=None"),
        "{log}"
    );

    let mut t = T::new(true);
    t.admit(plan(None, None), 0);
    t.text(r#"{"type":"session.start","sample_rate":16000,"model":"small"}"#);
    t.text(r#"{"type":"input.text","text":"hi"}"#);
    assert!(t.errors().is_empty());
    assert!(t.log.contains("model=Some(\"small\")"), "{}", t.log);
}

// -- limits ---------------------------------------------------------------------------------

#[test]
fn audio_faster_than_real_time_is_dropped_beyond_the_allowance_with_one_error_a_second() {
    let mut t = T::new(false);
    t.admit(plan(None, None), 0).start();
    t.log.clear();
    t.cmds.clear();
    // 3 s of audio at once: the first 2 s (the allowance) pass, the rest is dropped.
    for i in 0..150 {
        t.binary(voiced(i * 320));
    }
    let echoed = t
        .commands()
        .iter()
        .filter(|c| matches!(c, Command::SendAudio(_)))
        .count();
    assert_eq!(echoed, 100, "2 s of 20 ms frames");
    let dropped = t
        .commands()
        .iter()
        .filter(|c| matches!(c, Command::Observe(Observation::AudioTooFast)))
        .count();
    assert_eq!(dropped, 50);
    assert_eq!(t.errors(), vec![(ErrorCode::AudioTooFast, false)]);
    // Real time catches up: 500 ms later 25 more frames fit, and the next error waits for
    // its second.
    t.cmds.clear();
    t.advance(Duration::from_millis(500));
    for i in 0..30 {
        t.binary(voiced(i * 320));
    }
    let echoed = t
        .commands()
        .iter()
        .filter(|c| matches!(c, Command::SendAudio(_)))
        .count();
    assert_eq!(echoed, 25);
    assert!(t.errors().is_empty(), "one error a second at most");
    t.cmds.clear();
    t.advance(Duration::from_millis(600));
    for i in 0..40 {
        t.binary(voiced(i * 320));
    }
    assert_eq!(t.errors(), vec![(ErrorCode::AudioTooFast, false)]);
    // A real-time client never meets the bound.
    let mut t = T::new(false);
    t.admit(plan(None, None), 0).start();
    t.cmds.clear();
    for i in 0..500 {
        t.binary(voiced(i * 320));
        t.advance(Duration::from_millis(20));
    }
    assert!(t.errors().is_empty());
    t.log.clear();
}

#[test]
fn drain_keeps_part_of_the_grace_period_for_the_final_usage_write() {
    let mut t = T::new(true);
    t.admit(plan(Some(3600), None), 0).start();
    speak(&mut t, 1);
    t.log.clear();
    t.input(Input::Shutdown);
    // The turn never ends and the store never answers: the close comes 2 s before the end of
    // the 20 s grace period, and the final write is given up when the grace period ends.
    t.advance(Duration::from_secs(30));
    let log = std::mem::take(&mut t.log);
    assert!(
        logged(&log, 18000, "close 1001 server shutting down"),
        "{log}"
    );
    assert!(logged(&log, 20000, "record_end closed"), "{log}");
    assert!(logged(&log, 20000, "done"), "{log}");
}

#[test]
fn shutdown_while_the_final_usage_is_written_bounds_the_write_by_the_grace_period() {
    let mut t = T::with(
        SessionConfig {
            shutdown_grace: Duration::from_secs(5),
            ..config(true)
        },
        UserTurnLimiter::default(),
    );
    t.admit(plan(Some(3600), None), 0).start();
    t.advance(Duration::from_secs(1));
    t.input(Input::Client(ClientIn::Closed));
    t.advance(Duration::from_secs(1));
    // The store is stalled; the server starts shutting down 1 s after the client left.
    t.input(Input::Shutdown);
    t.advance(Duration::from_secs(30));
    let log = std::mem::take(&mut t.log);
    // Without the shutdown it would wait until 16 s (15 s after the close); with it, until
    // the end of the 5 s grace period.
    assert!(logged(&log, 7000, "done"), "{log}");
}

// -- provider faults ------------------------------------------------------------------------

/// Every provider fault of a turn, at every point of the turn: the client gets the precise
/// error, the turn ends, the next turn runs normally, and no usage is lost.
#[test]
fn fault_matrix_each_provider_fault_gives_its_error_and_the_session_goes_on() {
    struct Case {
        name: &'static str,
        /// Turn 1, up to the fault.
        fault: fn(&mut T),
        code: ErrorCode,
    }
    let cases = [
        Case {
            name: "LLM fails before its first token",
            fault: |t| {
                t.text(r#"{"type":"input.text","text":"first"}"#);
                t.llm(1, LlmIn::Error("HTTP 500".into()));
            },
            code: ErrorCode::LlmError,
        },
        Case {
            name: "LLM stream cut mid-answer",
            fault: |t| {
                speak(t, 1);
                t.llm(1, LlmIn::Ended);
            },
            code: ErrorCode::LlmError,
        },
        Case {
            name: "LLM fails mid-answer",
            fault: |t| {
                speak(t, 1);
                t.llm(1, LlmIn::Error("connection reset".into()));
            },
            code: ErrorCode::LlmError,
        },
        Case {
            name: "TTS fails before any audio",
            fault: |t| {
                t.text(r#"{"type":"input.text","text":"first"}"#);
                t.llm(1, LlmIn::Delta("Hello there.".into()));
                t.tts(1, TtsIn::Error("401 unauthorized".into()));
            },
            code: ErrorCode::TtsError,
        },
        Case {
            name: "TTS stream cut mid-audio",
            fault: |t| {
                speak(t, 1);
                t.tts(1, TtsIn::Ended);
            },
            code: ErrorCode::TtsError,
        },
        Case {
            name: "STT fails mid-utterance",
            fault: |t| {
                for i in 0..10 {
                    t.binary(voiced(i * 320));
                }
                t.input(Input::Stt(SttIn::Error("NET-0001".into())));
            },
            code: ErrorCode::SttError,
        },
    ];
    for case in cases {
        let mut t = T::new(true);
        t.admit(plan(Some(3600), None), 0).start();
        t.cmds.clear();
        (case.fault)(&mut t);
        let errors = t.errors();
        assert_eq!(errors, vec![(case.code, false)], "{}: {}", case.name, t.log);
        // Whatever was in flight finishes or is dropped; then a new turn runs end to end.
        t.llm(1, LlmIn::Done { tokens: None });
        t.tts(1, TtsIn::Finished);
        t.advance_acking(Duration::from_secs(3));
        t.cmds.clear();
        t.text(r#"{"type":"input.text","text":"again"}"#);
        let turn = t
            .commands()
            .iter()
            .find_map(|c| match c {
                Command::StartLlm { turn, .. } => Some(*turn),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{}: no next turn:\n{}", case.name, t.log));
        t.llm(turn, LlmIn::Delta("Sure.".into()));
        t.llm(turn, LlmIn::Done { tokens: Some(5) });
        t.tts(turn, tts_audio(100));
        t.tts(turn, TtsIn::Finished);
        t.advance_acking(Duration::from_secs(1));
        let ends: Vec<String> = t
            .cmds
            .iter()
            .filter_map(|(_, c)| match c {
                Command::Send(ServerMessage::AssistantAudioEnd(e)) => {
                    Some(format!("{} {:?}", e.turn_id, e.reason))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            ends,
            vec![format!("{turn} Complete")],
            "{}: the next turn completes:\n{}",
            case.name,
            t.log
        );
        assert!(t.errors().is_empty(), "{}: {}", case.name, t.log);
        // The client leaves: every second of the session is written.
        t.input(Input::Client(ClientIn::Closed));
        t.ack_persists();
        assert!(t.s.is_done(), "{}", case.name);
        assert_eq!(t.stored_seconds, 4, "{}: {}", case.name, t.log);
    }
}
