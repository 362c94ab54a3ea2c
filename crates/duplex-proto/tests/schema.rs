//! Keeps `proto/` (PROTOCOL.md, one JSON Schema per message, examples) in agreement with the
//! Rust types of this crate, which are the source of truth.
//!
//! File naming in `proto/`: `schema/<type>.json`, `examples/<type>.json` or
//! `examples/<type>.<n>.json`, and `examples/invalid/<error code>.<n>.json` for client messages
//! that must be rejected with that code.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use duplex_proto::{
    AssistantAudioEnd, AssistantAudioStart, AssistantMessage, AudioEndReason, AudioFormat,
    ClientMessage, Encoding, ErrorCode, InputText, Interrupted, LimitExceeded, Ping, PlanInfo,
    PlanLimits, PlaybackMark, Pong, ProviderNames, ResponseInterrupt, SUBPROTOCOL,
    SUPPORTED_SAMPLE_RATES, ServerMessage, SessionEnd, SessionReady, SessionStart, SpeechStarted,
    SpeechStopped, UsageUpdate, UserTranscript, close_code, parse_client_message,
    parse_server_message,
};
use serde_json::Value;

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto")
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `*.json` files directly in `dir` (not in subfolders), sorted by name.
fn json_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path
                .file_name()
                .expect("a file has a name")
                .to_string_lossy()
                .into_owned();
            (name, path)
        })
        .collect();
    files.sort();
    for (name, _) in &files {
        assert!(
            name.ends_with(".json"),
            "{}: unexpected non-JSON file {name}",
            dir.display()
        );
    }
    files
}

/// `session.start.json` and `session.start.2.json` -> `session.start`;
/// `invalid_message.1.json` -> `invalid_message`. Type names contain dots, so only an all-digit
/// last segment is an example number.
fn stem_of(file_name: &str) -> &str {
    let stem = file_name
        .strip_suffix(".json")
        .expect("json_files returns only .json files");
    match stem.rsplit_once('.') {
        Some((head, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => stem,
    }
}

fn is_client_type(kind: &str) -> bool {
    ClientMessage::TYPES.contains(&kind)
}

fn all_types() -> impl Iterator<Item = &'static str> {
    ClientMessage::TYPES.into_iter().chain(ServerMessage::TYPES)
}

/// Every schema in `proto/schema/`, by message type.
fn schemas() -> BTreeMap<String, Value> {
    json_files(&proto_dir().join("schema"))
        .into_iter()
        .map(|(name, path)| {
            let kind = name
                .strip_suffix(".json")
                .expect("json_files returns .json files");
            (kind.to_owned(), read_json(&path))
        })
        .collect()
}

fn validator(kind: &str, schema: &Value) -> jsonschema::Validator {
    jsonschema::draft202012::new(schema).unwrap_or_else(|e| panic!("schema {kind}: {e}"))
}

/// The schema errors of `instance`, one line each; empty when it is valid.
fn schema_errors(kind: &str, schema: &Value, instance: &Value) -> Vec<String> {
    validator(kind, schema)
        .iter_errors(instance)
        .map(|e| format!("{e} (at {})", e.instance_path))
        .collect()
}

/// Object keys of `value` that `schema` does not declare in `properties`, recursively.
/// Server schemas allow unknown fields (clients must ignore them), so validation alone would not
/// notice a Rust field the schema forgot; this does.
fn undeclared_keys(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let Some(object) = value.as_object() else {
        return;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    for (key, child) in object {
        match properties.and_then(|p| p.get(key)) {
            Some(child_schema) => {
                undeclared_keys(child_schema, child, &format!("{path}.{key}"), out)
            }
            None => out.push(format!("{path}.{key}")),
        }
    }
}

/// Validates a serialized message against its schema and checks that it declares every key.
fn assert_matches_schema(origin: &str, value: &Value, schemas: &BTreeMap<String, Value>) {
    let kind = value["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{origin}: no string `type`"));
    let schema = schemas
        .get(kind)
        .unwrap_or_else(|| panic!("{origin}: no schema for `{kind}`"));
    let errors = schema_errors(kind, schema, value);
    assert!(
        errors.is_empty(),
        "{origin} does not match schema {kind}:\n{}\n{value:#}",
        errors.join("\n")
    );
    let mut undeclared = Vec::new();
    undeclared_keys(schema, value, "", &mut undeclared);
    assert!(
        undeclared.is_empty(),
        "{origin}: schema {kind} does not declare {undeclared:?}"
    );
}

#[test]
fn every_type_has_a_schema_and_an_example_and_nothing_else_does() {
    let schemas = schemas();
    let examples = json_files(&proto_dir().join("examples"));

    for kind in all_types() {
        assert!(schemas.contains_key(kind), "no proto/schema/{kind}.json");
        assert!(
            examples.iter().any(|(name, _)| stem_of(name) == kind),
            "no proto/examples/{kind}.json"
        );
    }

    for (kind, schema) in &schemas {
        assert!(
            all_types().any(|t| t == kind),
            "schema/{kind}.json names no message type"
        );
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{kind}"
        );
        assert_eq!(
            schema["$id"],
            format!("https://duplex.dev/proto/v1/{kind}.json"),
            "{kind}"
        );
        assert_eq!(
            schema["properties"]["type"]["const"],
            kind.as_str(),
            "{kind}: type const"
        );
        assert!(
            schema["required"]
                .as_array()
                .is_some_and(|r| r.contains(&Value::from("type"))),
            "{kind}: `type` must be required"
        );
        if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
            panic!("schema/{kind}.json is not a valid draft 2020-12 schema: {e}");
        }
        // Client messages use deny_unknown_fields; clients must ignore unknown fields in server
        // messages, so server schemas must not forbid them (PROTOCOL.md, Versioning).
        let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
        assert_eq!(closed, is_client_type(kind), "{kind}: additionalProperties");
    }

    for (name, path) in &examples {
        let kind = stem_of(name);
        assert!(
            all_types().any(|t| t == kind),
            "examples/{name} names no message type"
        );
        assert_eq!(
            read_json(path)["type"],
            kind,
            "examples/{name}: `type` must match the file name"
        );
    }
}

#[test]
fn examples_validate_parse_and_round_trip() {
    let schemas = schemas();
    let examples = json_files(&proto_dir().join("examples"));
    assert!(examples.len() >= all_types().count());
    for (name, path) in &examples {
        let example = read_json(path);
        let origin = format!("examples/{name}");
        assert_matches_schema(&origin, &example, &schemas);

        let text = fs::read_to_string(path).expect("read above");
        let reserialized = if is_client_type(stem_of(name)) {
            let message = parse_client_message(&text)
                .unwrap_or_else(|e| panic!("{origin} does not parse: {e}"));
            serde_json::to_value(&message).expect("client messages serialize")
        } else {
            let message = parse_server_message(&text)
                .unwrap_or_else(|e| panic!("{origin} does not parse: {e}"));
            serde_json::to_value(&message).expect("server messages serialize")
        };
        assert_eq!(
            reserialized, example,
            "{origin} does not survive a round trip through Rust"
        );
    }
}

/// The type name of a server message. Exhaustive on purpose: a new variant fails to compile
/// here until it is added to `every_server_message` below.
fn server_type(message: &ServerMessage) -> &'static str {
    match message {
        ServerMessage::SessionReady(_) => "session.ready",
        ServerMessage::SpeechStarted(_) => "vad.speech_started",
        ServerMessage::SpeechStopped(_) => "vad.speech_stopped",
        ServerMessage::UserTranscript(_) => "user_transcript",
        ServerMessage::AssistantMessage(_) => "assistant_message",
        ServerMessage::AssistantAudioStart(_) => "assistant_audio.start",
        ServerMessage::AssistantAudioEnd(_) => "assistant_audio.end",
        ServerMessage::Interrupted(_) => "interrupted",
        ServerMessage::UsageUpdate(_) => "usage_update",
        ServerMessage::LimitExceeded(_) => "limit_exceeded",
        ServerMessage::Error(_) => "error",
        ServerMessage::Pong(_) => "pong",
    }
}

/// The type name of a client message; exhaustive like [`server_type`].
fn client_type(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::SessionStart(_) => "session.start",
        ClientMessage::InputText(_) => "input.text",
        ClientMessage::ResponseInterrupt(_) => "response.interrupt",
        ClientMessage::PlaybackMark(_) => "playback.mark",
        ClientMessage::SessionEnd(_) => "session.end",
        ClientMessage::Ping(_) => "ping",
    }
}

/// At least one of every server message, with every optional field set somewhere.
fn every_server_message() -> Vec<ServerMessage> {
    let pcm16k = AudioFormat {
        encoding: Encoding::Pcm16,
        sample_rate: 16000,
    };
    let mulaw8k = AudioFormat {
        encoding: Encoding::Mulaw,
        sample_rate: 8000,
    };
    let ready = |limits: PlanLimits| {
        ServerMessage::SessionReady(SessionReady {
            session_id: "sess_1".into(),
            protocol: SUBPROTOCOL.into(),
            input: mulaw8k,
            output: pcm16k,
            output_frame_ms: 20,
            plan: PlanInfo {
                name: "pro".into(),
                limits,
            },
            providers: ProviderNames {
                stt: "deepgram".into(),
                llm: "openai".into(),
                tts: "openai".into(),
            },
        })
    };
    let mut messages = vec![
        ready(PlanLimits {
            daily_seconds: Some(3600),
            trial_seconds: Some(1800),
            monthly_tts_characters: Some(1_000_000),
            turns_per_minute: Some(u32::MAX),
        }),
        ready(PlanLimits::default()),
        ServerMessage::SpeechStarted(SpeechStarted { audio_ms: 0 }),
        ServerMessage::SpeechStopped(SpeechStopped { audio_ms: u64::MAX }),
        ServerMessage::UserTranscript(UserTranscript {
            text: "hel".into(),
            is_final: false,
        }),
        ServerMessage::UserTranscript(UserTranscript {
            text: "hello".into(),
            is_final: true,
        }),
        ServerMessage::AssistantMessage(AssistantMessage {
            turn_id: 1,
            delta: Some("Hi".into()),
            text: None,
            is_final: false,
        }),
        ServerMessage::AssistantMessage(AssistantMessage {
            turn_id: 1,
            delta: None,
            text: Some("Hi there.".into()),
            is_final: true,
        }),
        ServerMessage::AssistantAudioStart(AssistantAudioStart {
            turn_id: 1,
            format: mulaw8k,
        }),
        ServerMessage::Interrupted(Interrupted {
            turn_id: 1,
            played_ms: 400,
            heard_text: "Hi".into(),
        }),
        ServerMessage::UsageUpdate(UsageUpdate {
            plan: "free".into(),
            seconds_used_today: 10,
            seconds_remaining: Some(590),
            session_seconds: 10,
        }),
        ServerMessage::UsageUpdate(UsageUpdate {
            plan: "unmetered".into(),
            seconds_used_today: 10,
            seconds_remaining: None,
            session_seconds: 10,
        }),
        ServerMessage::LimitExceeded(LimitExceeded {
            limit: "daily_seconds".into(),
            used: 600,
            allowed: 600,
            resets_at: Some("2025-06-02T00:00:00Z".into()),
            upgrade_hint: Some("Upgrade to Pro.".into()),
        }),
        ServerMessage::Pong(Pong {
            id: Some("7".into()),
        }),
        ServerMessage::Pong(Pong { id: None }),
    ];
    for reason in [
        AudioEndReason::Complete,
        AudioEndReason::Interrupted,
        AudioEndReason::Error,
    ] {
        messages.push(ServerMessage::AssistantAudioEnd(AssistantAudioEnd {
            turn_id: 1,
            duration_ms: 1000,
            reason,
        }));
    }
    for &code in ALL_ERROR_CODES {
        messages.push(ServerMessage::error(
            code,
            "something happened",
            is_fatal(code),
        ));
    }
    messages
}

/// At least one of every client message, with every optional field set somewhere.
fn every_client_message() -> Vec<ClientMessage> {
    vec![
        ClientMessage::SessionStart(SessionStart {
            sample_rate: 48000,
            encoding: Encoding::Pcm16,
            language: Some("de-DE".into()),
            voice: Some("nova".into()),
            model: Some("small".into()),
            system_prompt: Some("Be brief.".into()),
            output_sample_rate: Some(24000),
            output_encoding: Some(Encoding::Mulaw),
        }),
        ClientMessage::InputText(InputText {
            text: "hello".into(),
        }),
        ClientMessage::ResponseInterrupt(ResponseInterrupt {}),
        ClientMessage::PlaybackMark(PlaybackMark {
            turn_id: 2,
            played_ms: 780,
        }),
        ClientMessage::SessionEnd(SessionEnd {}),
        ClientMessage::Ping(Ping {
            id: Some("x".into()),
        }),
        ClientMessage::Ping(Ping { id: None }),
    ]
}

#[test]
fn every_server_message_built_in_rust_matches_its_schema() {
    let schemas = schemas();
    let mut seen = BTreeSet::new();
    for message in every_server_message() {
        let value = serde_json::to_value(&message).expect("server messages serialize");
        assert_eq!(value["type"], server_type(&message), "{message:?}");
        assert_eq!(
            value,
            serde_json::from_str::<Value>(&message.to_json()).expect("to_json is JSON")
        );
        assert_matches_schema(&format!("{message:?}"), &value, &schemas);
        seen.insert(server_type(&message));
    }
    assert_eq!(
        seen,
        ServerMessage::TYPES.into_iter().collect::<BTreeSet<_>>()
    );
}

#[test]
fn every_client_message_built_in_rust_matches_its_schema_and_parses_back() {
    let schemas = schemas();
    let mut seen = BTreeSet::new();
    for message in every_client_message() {
        let value = serde_json::to_value(&message).expect("client messages serialize");
        assert_eq!(value["type"], client_type(&message), "{message:?}");
        assert_matches_schema(&format!("{message:?}"), &value, &schemas);
        assert_eq!(
            parse_client_message(&value.to_string()),
            Ok(message.clone())
        );
        seen.insert(client_type(&message));
    }
    assert_eq!(
        seen,
        ClientMessage::TYPES.into_iter().collect::<BTreeSet<_>>()
    );
}

#[test]
fn invalid_examples_are_rejected_with_the_code_in_their_name() {
    let schemas = schemas();
    let client_validators: Vec<_> = ClientMessage::TYPES
        .iter()
        .map(|kind| (*kind, validator(kind, &schemas[*kind])))
        .collect();
    let invalid = json_files(&proto_dir().join("examples/invalid"));
    let mut codes = HashSet::new();
    for (name, path) in &invalid {
        let expected: ErrorCode = serde_json::from_value(Value::from(stem_of(name)))
            .unwrap_or_else(|e| {
                panic!("invalid/{name}: the file name must start with an error code: {e}")
            });
        codes.insert(expected);

        let text = fs::read_to_string(path).expect("listed above");
        match parse_client_message(&text) {
            Ok(message) => panic!("invalid/{name} was accepted as {message:?}"),
            Err(e) => assert_eq!(e.code(), expected, "invalid/{name}: {e}"),
        }
        // No client schema may accept it either, whatever its `type` says.
        let value = read_json(path);
        for (kind, validator) in &client_validators {
            assert!(
                !validator.is_valid(&value),
                "invalid/{name} is valid against schema/{kind}.json"
            );
        }
    }
    let required = [
        ErrorCode::MalformedJson,
        ErrorCode::UnknownMessageType,
        ErrorCode::InvalidMessage,
    ];
    for code in required {
        assert!(
            codes.contains(&code),
            "no proto/examples/invalid/{}.<n>.json",
            code.as_str()
        );
    }
}

/// Every error code, with its fatality. The macro also writes an exhaustive match, so adding a
/// variant to `ErrorCode` fails to compile here until the list (and PROTOCOL.md) is updated.
macro_rules! error_codes {
    ($($variant:ident => $fatal:literal),* $(,)?) => {
        const ALL_ERROR_CODES: &[ErrorCode] = &[$(ErrorCode::$variant),*];

        /// Whether the server closes the connection after an `error` with this code.
        fn is_fatal(code: ErrorCode) -> bool {
            match code {
                $(ErrorCode::$variant => $fatal),*
            }
        }
    };
}

error_codes! {
    MalformedJson => false,
    UnknownMessageType => false,
    InvalidMessage => false,
    SessionNotStarted => false,
    AudioBeforeSessionStart => false,
    SessionAlreadyStarted => false,
    UnsupportedSampleRate => false,
    UnsupportedEncoding => false,
    OddFrameLength => false,
    AudioTooFast => false,
    MessageTooLarge => true,
    SessionEnded => false,
    SlowConsumer => true,
    IdleTimeout => true,
    StartTimeout => true,
    SttError => false,
    LlmError => false,
    TtsError => false,
    ServerShuttingDown => true,
    GenerationDisabled => false,
    LimitExceeded => false,
    RateLimited => false,
    Internal => false,
}

#[test]
fn error_codes_agree_with_serde_and_the_error_schema() {
    let schema = &schemas()["error"];
    let schema_codes: Vec<&str> = schema["properties"]["code"]["enum"]
        .as_array()
        .expect("error.json has a code enum")
        .iter()
        .map(|v| v.as_str().expect("codes are strings"))
        .collect();
    let rust_codes: Vec<&str> = ALL_ERROR_CODES.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        schema_codes, rust_codes,
        "error.json's code enum must list every ErrorCode in order"
    );

    for &code in ALL_ERROR_CODES {
        let name = code.as_str();
        assert_eq!(
            serde_json::to_value(code).expect("serializes"),
            Value::from(name)
        );
        assert_eq!(
            serde_json::from_value::<ErrorCode>(Value::from(name)).expect("deserializes"),
            code
        );
    }

    // error.json requires `fatal: true` for exactly the fatal codes.
    let schema_fatal: BTreeSet<&str> = schema["if"]["properties"]["code"]["enum"]
        .as_array()
        .expect("error.json ties fatal codes to `fatal: true`")
        .iter()
        .map(|v| v.as_str().expect("codes are strings"))
        .collect();
    let rust_fatal: BTreeSet<&str> = ALL_ERROR_CODES
        .iter()
        .filter(|c| is_fatal(**c))
        .map(|c| c.as_str())
        .collect();
    assert_eq!(schema_fatal, rust_fatal);
    assert_eq!(schema["then"]["properties"]["fatal"]["const"], true);
    let error = |code: ErrorCode, fatal| {
        serde_json::to_value(ServerMessage::error(code, "x", fatal)).expect("serializes")
    };
    assert!(!validator("error", schema).is_valid(&error(ErrorCode::SlowConsumer, false)));
}

#[test]
fn sample_rates_and_protocol_name_agree_with_the_schemas() {
    let schemas = schemas();
    let rates: Vec<Value> = SUPPORTED_SAMPLE_RATES
        .iter()
        .map(|r| Value::from(*r))
        .collect();
    let start = &schemas["session.start"]["properties"];
    assert_eq!(start["sample_rate"]["enum"].as_array(), Some(&rates));
    assert_eq!(start["output_sample_rate"]["enum"].as_array(), Some(&rates));
    let ready = &schemas["session.ready"]["properties"];
    assert_eq!(
        ready["input"]["properties"]["sample_rate"]["enum"].as_array(),
        Some(&rates)
    );
    assert_eq!(
        ready["output"]["properties"]["sample_rate"]["enum"].as_array(),
        Some(&rates)
    );
    assert_eq!(ready["protocol"]["const"], SUBPROTOCOL);
}

/// The close codes of `close_code`, by name. Update with the module.
const CLOSE_CODES: [(&str, u16); 8] = [
    ("NORMAL", close_code::NORMAL),
    ("GOING_AWAY", close_code::GOING_AWAY),
    ("PROTOCOL_ERROR", close_code::PROTOCOL_ERROR),
    ("MESSAGE_TOO_BIG", close_code::MESSAGE_TOO_BIG),
    ("INTERNAL_ERROR", close_code::INTERNAL_ERROR),
    ("IDLE_TIMEOUT", close_code::IDLE_TIMEOUT),
    ("SLOW_CONSUMER", close_code::SLOW_CONSUMER),
    ("LIMIT_EXCEEDED", close_code::LIMIT_EXCEEDED),
];

/// The cells of the Markdown table row whose first cell is `first`, trimmed.
fn table_row<'a>(doc: &'a str, first: &str) -> Option<Vec<&'a str>> {
    doc.lines().find_map(|line| {
        let cells: Vec<&str> = line
            .trim()
            .strip_prefix('|')?
            .strip_suffix('|')?
            .split('|')
            .map(str::trim)
            .collect();
        (cells.first() == Some(&first)).then_some(cells)
    })
}

#[test]
fn protocol_md_documents_every_message_error_code_and_close_code() {
    let path = proto_dir().join("PROTOCOL.md");
    let doc = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for kind in all_types() {
        let heading = format!("### `{kind}`");
        assert!(
            doc.lines().any(|l| l.trim() == heading),
            "PROTOCOL.md has no `{heading}` section"
        );
    }
    for &code in ALL_ERROR_CODES {
        let cell = format!("`{}`", code.as_str());
        let row = table_row(&doc, &cell)
            .unwrap_or_else(|| panic!("PROTOCOL.md: no error table row {cell}"));
        let fatal = if is_fatal(code) { "yes" } else { "no" };
        assert_eq!(
            row.last(),
            Some(&fatal),
            "PROTOCOL.md: fatal column of {cell}"
        );
    }
    for (name, code) in CLOSE_CODES {
        let row = table_row(&doc, &code.to_string())
            .unwrap_or_else(|| panic!("PROTOCOL.md: no close code table row {code}"));
        assert_eq!(
            row.get(1),
            Some(&format!("`{name}`").as_str()),
            "PROTOCOL.md: name of close code {code}"
        );
    }
    assert!(doc.contains(SUBPROTOCOL) && doc.contains("/v1/conversation"));
}

/// The contents of the ```json blocks of a Markdown document.
fn json_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```json") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unterminated ```json block");
    blocks
}

#[test]
fn protocol_md_json_examples_are_valid_messages() {
    let schemas = schemas();
    let doc = fs::read_to_string(proto_dir().join("PROTOCOL.md")).expect("PROTOCOL.md exists");
    let blocks = json_blocks(&doc);
    assert!(
        blocks.len() >= all_types().count(),
        "PROTOCOL.md should show every message type"
    );
    for block in blocks {
        let value: Value = serde_json::from_str(&block)
            .unwrap_or_else(|e| panic!("PROTOCOL.md: a ```json block is not JSON ({e}):\n{block}"));
        assert_matches_schema(&format!("PROTOCOL.md block {block}"), &value, &schemas);
        let kind = value["type"]
            .as_str()
            .expect("checked by assert_matches_schema");
        let reserialized = if is_client_type(kind) {
            serde_json::to_value(parse_client_message(&block).expect("PROTOCOL.md example parses"))
        } else {
            serde_json::to_value(parse_server_message(&block).expect("PROTOCOL.md example parses"))
        };
        assert_eq!(
            reserialized.expect("serializes"),
            value,
            "PROTOCOL.md block round trip"
        );
    }
}

/// Property tests: the parser never panics on any text, and every refusal is one of the three
/// documented codes with a bounded message (a client cannot make the server echo its input).
mod fuzz {
    use duplex_proto::{ClientMessage, ErrorCode, parse_client_message};
    use proptest::prelude::*;

    /// Longest error text: a serde detail is capped at 4 x 64 characters plus the words around.
    const MAX_ERROR_CHARS: usize = 400;

    fn check(text: &str) {
        if let Err(e) = parse_client_message(text) {
            assert!(matches!(
                e.code(),
                ErrorCode::MalformedJson
                    | ErrorCode::UnknownMessageType
                    | ErrorCode::InvalidMessage
            ));
            let shown = e.to_string();
            assert!(
                shown.chars().count() <= MAX_ERROR_CHARS,
                "{} chars: {shown}",
                shown.chars().count()
            );
        }
    }

    /// A JSON value of a few levels.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            ".{0,300}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,80}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_text(text in ".{0,400}") {
            check(&text);
        }

        #[test]
        fn objects_of_every_known_type(
            kind in prop::sample::select(ClientMessage::TYPES.to_vec()),
            fields in prop::collection::btree_map(
                prop_oneof![
                    Just("sample_rate".to_owned()), Just("encoding".to_owned()),
                    Just("text".to_owned()), Just("turn_id".to_owned()),
                    Just("played_ms".to_owned()), Just("id".to_owned()),
                    Just("model".to_owned()), Just("output_sample_rate".to_owned()),
                    ".{0,100}",
                ],
                json(),
                0..5,
            ),
        ) {
            let mut map: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
            map.insert("type".into(), serde_json::Value::from(kind));
            check(&serde_json::Value::Object(map).to_string());
        }

        #[test]
        fn any_type_name(kind in json()) {
            check(&serde_json::json!({ "type": kind }).to_string());
        }
    }
}
