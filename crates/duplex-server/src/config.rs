//! Server configuration: every environment variable the server reads, its default and its
//! meaning, in this one file. [`Config::from_lookup`] parses them into one typed struct before
//! any port is bound; tests build it from a map. A bad value is an error naming the variable.

use std::net::IpAddr;
use std::time::Duration;

/// Which engines a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderMode {
    /// Deterministic stand-ins (not speech recognition, not a language model, not a voice).
    Scripted,
    /// Transport test mode: one binary frame back for every binary frame in, after the audio
    /// front end has processed it.
    Echo,
}

impl ProviderMode {
    pub fn parse(s: &str) -> Option<ProviderMode> {
        match s {
            "scripted" => Some(ProviderMode::Scripted),
            "echo" => Some(ProviderMode::Echo),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderMode::Scripted => "scripted",
            ProviderMode::Echo => "echo",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every setting of the server.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind_addr: IpAddr,
    pub port: u16,
    pub providers: ProviderMode,
    pub log_format: LogFormat,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_message_bytes: usize,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub audio_lead: Duration,
    pub vad_mode: u8,
    pub speech_start: Duration,
    pub end_of_turn: Duration,
    pub max_turn: Duration,
    pub system_prompt: String,
    pub scripted_llm_first_token: Duration,
    pub scripted_llm_token_interval: Duration,
    pub scripted_tts_latency: Duration,
}

/// One environment variable: name, default, and what it means (the README's table is made
/// from this list; a test checks that deploy files name only these).
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable the server reads.
pub const VARS: &[Var] = &[
    Var { name: "BIND_ADDR", default: "0.0.0.0", help: "Address to listen on." },
    Var { name: "PORT", default: "10000", help: "Port for HTTP and WebSocket." },
    Var {
        name: "DUPLEX_PROVIDERS",
        default: "scripted",
        help: "Engine set: `scripted` (deterministic test stand-ins) or `echo` (transport test).",
    },
    Var { name: "LOG_FORMAT", default: "json", help: "`json` or `pretty` log lines." },
    Var { name: "MAX_CONNECTIONS", default: "1000", help: "Concurrent WebSocket sessions." },
    Var { name: "MAX_CONNECTIONS_PER_IP", default: "50", help: "Concurrent sessions per client IP." },
    Var {
        name: "MAX_MESSAGE_BYTES",
        default: "262144",
        help: "Largest client message; larger ones close the session with 1009.",
    },
    Var { name: "IDLE_TIMEOUT_SECS", default: "60", help: "Close a session silent this long." },
    Var {
        name: "SHUTDOWN_GRACE_SECS",
        default: "10",
        help: "On SIGTERM, how long sessions may finish their turn.",
    },
    Var {
        name: "AUDIO_LEAD_MS",
        default: "300",
        help: "Assistant audio sent ahead of the client's playhead (bounds barge-in lag).",
    },
    Var { name: "VAD_MODE", default: "3", help: "webrtc-vad aggressiveness, 0 (lenient) to 3." },
    Var { name: "SPEECH_START_MS", default: "60", help: "Voiced audio that starts a user turn." },
    Var { name: "END_OF_TURN_MS", default: "700", help: "Silence that ends a user turn." },
    Var { name: "MAX_TURN_MS", default: "30000", help: "Longest user utterance before it is cut." },
    Var {
        name: "SYSTEM_PROMPT",
        default: "You are a helpful voice assistant. Answer in short spoken sentences, without markdown.",
        help: "Default system prompt (a session may send its own).",
    },
    Var { name: "SCRIPTED_LLM_FIRST_TOKEN_MS", default: "150", help: "Scripted LLM: delay to first token." },
    Var { name: "SCRIPTED_LLM_TOKEN_MS", default: "16", help: "Scripted LLM: delay between tokens." },
    Var { name: "SCRIPTED_TTS_LATENCY_MS", default: "80", help: "Scripted TTS: delay to first audio of a chunk." },
];

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Parses the configuration from a variable lookup (the environment in `main`, a map in
    /// tests). Unset variables take their default from [`VARS`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &'static str| -> (&'static str, String) {
            let default = VARS.iter().find(|v| v.name == name).expect("every name is in VARS").default;
            (name, lookup(name).filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.to_owned()))
        };
        let num = |name: &'static str| -> Result<u64, ConfigError> {
            let (name, value) = get(name);
            value.trim().parse::<u64>().map_err(|e| ConfigError { name, value, reason: e.to_string() })
        };
        let ms = |name| num(name).map(Duration::from_millis);
        let secs = |name| num(name).map(Duration::from_secs);
        let bad = |name: &'static str, value: String, reason: &str| ConfigError {
            name,
            value,
            reason: reason.to_owned(),
        };

        let (n, v) = get("BIND_ADDR");
        let bind_addr = v.parse().map_err(|_| bad(n, v.clone(), "not an IP address"))?;
        let port = u16::try_from(num("PORT")?).map_err(|_| bad("PORT", get("PORT").1, "not a port"))?;
        let (n, v) = get("DUPLEX_PROVIDERS");
        let providers = ProviderMode::parse(v.trim())
            .ok_or_else(|| bad(n, v.clone(), "expected `scripted` or `echo`"))?;
        let (n, v) = get("LOG_FORMAT");
        let log_format = match v.trim() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            _ => return Err(bad(n, v, "expected `json` or `pretty`")),
        };
        let vad_mode = num("VAD_MODE")?;
        if vad_mode > 3 {
            return Err(bad("VAD_MODE", vad_mode.to_string(), "expected 0..=3"));
        }
        let max_message_bytes = num("MAX_MESSAGE_BYTES")? as usize;
        if max_message_bytes < 1024 {
            return Err(bad("MAX_MESSAGE_BYTES", max_message_bytes.to_string(), "at least 1024"));
        }
        let positive = |name: &'static str| -> Result<usize, ConfigError> {
            let v = num(name)?;
            if v == 0 {
                return Err(bad(name, "0".into(), "must be at least 1"));
            }
            Ok(v as usize)
        };
        Ok(Config {
            bind_addr,
            port,
            providers,
            log_format,
            max_connections: positive("MAX_CONNECTIONS")?,
            max_connections_per_ip: positive("MAX_CONNECTIONS_PER_IP")?,
            max_message_bytes,
            idle_timeout: secs("IDLE_TIMEOUT_SECS")?,
            shutdown_grace: secs("SHUTDOWN_GRACE_SECS")?,
            audio_lead: ms("AUDIO_LEAD_MS")?,
            vad_mode: vad_mode as u8,
            speech_start: ms("SPEECH_START_MS")?,
            end_of_turn: ms("END_OF_TURN_MS")?,
            max_turn: ms("MAX_TURN_MS")?,
            system_prompt: get("SYSTEM_PROMPT").1,
            scripted_llm_first_token: ms("SCRIPTED_LLM_FIRST_TOKEN_MS")?,
            scripted_llm_token_interval: ms("SCRIPTED_LLM_TOKEN_MS")?,
            scripted_tts_latency: ms("SCRIPTED_TTS_LATENCY_MS")?,
        })
    }

    /// The configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults, for tests: loopback, port 0 (the OS picks), scripted providers.
    pub fn for_tests() -> Config {
        let mut c = Config::from_lookup(|_| None).expect("defaults are valid");
        c.bind_addr = IpAddr::from([127, 0, 0, 1]);
        c.port = 0;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_parse() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 10000);
        assert_eq!(c.providers, ProviderMode::Scripted);
        assert_eq!(c.audio_lead, Duration::from_millis(300));
    }

    #[test]
    fn errors_name_the_variable() {
        let e = parse(&[("PORT", "99999")]).unwrap_err();
        assert_eq!(e.name, "PORT");
        let e = parse(&[("DUPLEX_PROVIDERS", "magic")]).unwrap_err();
        assert!(e.to_string().contains("DUPLEX_PROVIDERS"), "{e}");
        let e = parse(&[("VAD_MODE", "7")]).unwrap_err();
        assert_eq!(e.name, "VAD_MODE");
        let e = parse(&[("IDLE_TIMEOUT_SECS", "soon")]).unwrap_err();
        assert_eq!(e.name, "IDLE_TIMEOUT_SECS");
    }

    #[test]
    fn every_var_has_a_valid_default() {
        for v in VARS {
            let c = parse(&[(v.name, v.default)]);
            assert!(c.is_ok(), "{}: {:?}", v.name, c.err());
        }
    }
}
