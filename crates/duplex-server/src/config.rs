//! Server configuration: every environment variable the server reads, its default and its
//! meaning, in this one file. [`Config::from_lookup`] parses them into one typed struct before
//! any port is bound; tests build it from a map. A bad value is an error naming the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use duplex_billing::{PricePlans, WebhookSecret};

/// Which engines a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderMode {
    /// The embedded offline engines (Whisper, a GGUF chat model, Piper) from
    /// `DUPLEX_MODELS_DIR`: the default, no API key needed.
    Local,
    /// Deterministic stand-ins (not speech recognition, not a language model, not a voice).
    Scripted,
    /// Transport test mode: one binary frame back for every binary frame in, after the audio
    /// front end has processed it.
    Echo,
}

impl ProviderMode {
    pub fn parse(s: &str) -> Option<ProviderMode> {
        match s {
            "local" => Some(ProviderMode::Local),
            "scripted" => Some(ProviderMode::Scripted),
            "echo" => Some(ProviderMode::Echo),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderMode::Local => "local",
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
    /// `PRE_START_TIMEOUT_SECS`: how long a connection may stay without a session.
    pub pre_start_timeout: Duration,
    /// `MAX_INPUT_TEXT_CHARS`: the longest typed turn.
    pub max_input_text_chars: usize,
    pub shutdown_grace: Duration,
    pub audio_lead: Duration,
    pub vad_mode: u8,
    pub speech_start: Duration,
    pub end_of_turn: Duration,
    pub max_turn: Duration,
    pub system_prompt: String,
    /// Where the local engines' models are (`DUPLEX_MODELS_DIR`).
    pub models_dir: PathBuf,
    pub local_llm: duplex_local::LlmChoice,
    pub local_llm_engine: duplex_local::LlmEngine,
    pub local_llm_max_tokens: usize,
    pub scripted_llm_first_token: Duration,
    pub scripted_llm_token_interval: Duration,
    pub scripted_tts_latency: Duration,
    /// Cloud engines and their settings.
    pub cloud: CloudConfig,
    /// HS256 key of bearer tokens. With `jwt_jwks_url` also unset: anonymous dev mode.
    pub jwt_secret: Option<crate::auth::Secret>,
    /// JWKS of an identity provider, for RS256 tokens.
    pub jwt_jwks_url: Option<String>,
    /// Clerk secret key: the JWKS comes from Clerk's Backend API (`clerk_api_url`) with it.
    pub clerk_secret_key: Option<crate::auth::Secret>,
    /// Base URL of Clerk's Backend API, without the `/v1` prefix.
    pub clerk_api_url: String,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// WebSocket connection attempts per minute per client IP; 0 = no limit.
    pub connect_rate_per_min: u32,
    /// `Origin`s allowed to open sessions; empty = all.
    pub allowed_origins: Vec<String>,
    /// `METRICS_TOKEN`: the bearer token `/metrics` requires, if any.
    pub metrics_token: Option<crate::auth::Secret>,
    /// Whether `GET /` serves the browser client (`WEB_CLIENT`).
    pub web_client: bool,
    /// Plan of anonymous dev-mode sessions.
    pub anonymous_plan: String,
    /// Every plan and its limits (`PLAN_LIMITS`, `FREE_DAILY_LIMIT_SECONDS`,
    /// `FREE_TRIAL_SECONDS`).
    pub plans: duplex_metering::PlanTable,
    pub usage_heartbeat: Duration,
    /// Kill switches at startup; `switches_file` overrides them at run time.
    pub switches: duplex_metering::Switches,
    pub switches_file: Option<PathBuf>,
    /// The store: `DATABASE_URL`, or the SQLite file in `data_dir` when that is unset.
    pub database_url: String,
    pub data_dir: PathBuf,
    /// `None`: the Stripe webhook endpoint answers 503 (unsigned events are never accepted).
    pub stripe_webhook_secret: Option<WebhookSecret>,
    pub stripe_price_plans: PricePlans,
    pub stripe_webhook_path: String,
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
    Var {
        name: "BIND_ADDR",
        default: "0.0.0.0",
        help: "Address to listen on.",
    },
    Var {
        name: "PORT",
        default: "10000",
        help: "Port for HTTP and WebSocket.",
    },
    Var {
        name: "DUPLEX_PROVIDERS",
        default: "local",
        help: "Engine set of every engine not given a cloud key or a `*_PROVIDER`: `local` (the embedded offline engines), `scripted` (deterministic test stand-ins) or `echo` (transport test).",
    },
    Var {
        name: "DUPLEX_MODELS_DIR",
        default: "models",
        help: "Directory of the local engines' models, as `scripts/setup-models.sh` installs them.",
    },
    Var {
        name: "LOCAL_LLM_MODEL",
        default: "qwen2.5-0.5b",
        help: "Local language model: `qwen2.5-0.5b` (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) or `smollm2-135m` (SmolLM2-135M-Instruct: faster, weaker answers).",
    },
    Var {
        name: "LOCAL_LLM_ENGINE",
        default: "llama",
        help: "Engine of the local language model: `llama` (llama.cpp: faster, keeps each conversation's cache) or `candle` (pure Rust).",
    },
    Var {
        name: "LOCAL_LLM_MAX_TOKENS",
        default: "120",
        help: "Longest local LLM answer in tokens.",
    },
    Var {
        name: "LOG_FORMAT",
        default: "json",
        help: "`json` or `pretty` log lines.",
    },
    Var {
        name: "MAX_CONNECTIONS",
        default: "1000",
        help: "Concurrent WebSocket sessions.",
    },
    Var {
        name: "MAX_CONNECTIONS_PER_IP",
        default: "50",
        help: "Concurrent sessions per client IP.",
    },
    Var {
        name: "MAX_MESSAGE_BYTES",
        default: "262144",
        help: "Largest client message; larger ones close the session with 1009.",
    },
    Var {
        name: "IDLE_TIMEOUT_SECS",
        default: "60",
        help: "Close a session silent this long.",
    },
    Var {
        name: "PRE_START_TIMEOUT_SECS",
        default: "10",
        help: "Close a connection that has not started its session this long after the upgrade (pings do not count): `start_timeout`, 4000.",
    },
    Var {
        name: "MAX_INPUT_TEXT_CHARS",
        default: "4000",
        help: "Longest `input.text` in characters; longer: `invalid_message`, no turn.",
    },
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
    Var {
        name: "VAD_MODE",
        default: "3",
        help: "webrtc-vad aggressiveness, 0 (lenient) to 3.",
    },
    Var {
        name: "SPEECH_START_MS",
        default: "60",
        help: "Voiced audio that starts a user turn.",
    },
    Var {
        name: "END_OF_TURN_MS",
        default: "700",
        help: "Silence that ends a user turn.",
    },
    Var {
        name: "MAX_TURN_MS",
        default: "30000",
        help: "Longest user utterance before it is cut.",
    },
    Var {
        name: "SYSTEM_PROMPT",
        default: "You are a friendly voice assistant. Your answers are spoken aloud, so reply in one to three short sentences of plain text: no lists, no markdown, no code and no emoji.",
        help: "Default system prompt (a session may send its own).",
    },
    Var {
        name: "SCRIPTED_LLM_FIRST_TOKEN_MS",
        default: "150",
        help: "Scripted LLM: delay to first token.",
    },
    Var {
        name: "SCRIPTED_LLM_TOKEN_MS",
        default: "16",
        help: "Scripted LLM: delay between tokens.",
    },
    Var {
        name: "SCRIPTED_TTS_LATENCY_MS",
        default: "80",
        help: "Scripted TTS: delay to first audio of a chunk.",
    },
    // Cloud providers (crates/duplex-providers; README "Cloud providers").
    Var {
        name: "STT_PROVIDER",
        default: "",
        help: "Speech recognition: `deepgram`, `openai` (non-streaming transcription), `local` (Whisper tiny.en) or `scripted`; unset: Deepgram if DEEPGRAM_API_KEY is set, else OpenAI if OPENAI_API_KEY is set, else the DUPLEX_PROVIDERS set.",
    },
    Var {
        name: "LLM_PROVIDER",
        default: "",
        help: "Language model: `openai` (the router over OPENAI_* and LLM_ENDPOINTS), `local` (LOCAL_LLM_MODEL) or `scripted`; unset: `openai` if OPENAI_API_KEY or LLM_ENDPOINTS is set, else the DUPLEX_PROVIDERS set.",
    },
    Var {
        name: "TTS_PROVIDER",
        default: "",
        help: "Speech synthesis: `azure`, `elevenlabs`, `openai`, `local` (the Piper voice en_US-joe-medium), `espeak` (espeak-ng: robotic, instant) or `scripted`; unset: the first of those whose key is set, else the DUPLEX_PROVIDERS set.",
    },
    Var {
        name: "OPENAI_API_KEY",
        default: "",
        help: "OpenAI (or compatible) API key: LLM endpoint `openai`, OpenAI TTS and transcription.",
    },
    Var {
        name: "OPENAI_BASE_URL",
        default: "https://api.openai.com/v1",
        help: "Base URL with the version prefix of the `openai` endpoint (any OpenAI-compatible server; `http://` accepted).",
    },
    Var {
        name: "OPENAI_MODEL",
        default: "gpt-4o-mini",
        help: "Chat model of the `openai` LLM endpoint.",
    },
    Var {
        name: "OPENAI_TTS_MODEL",
        default: "gpt-4o-mini-tts",
        help: "OpenAI speech model (`/audio/speech`, 24 kHz PCM).",
    },
    Var {
        name: "OPENAI_TTS_VOICE",
        default: "alloy",
        help: "OpenAI voice when the session names none.",
    },
    Var {
        name: "OPENAI_STT_MODEL",
        default: "whisper-1",
        help: "OpenAI transcription model (`/audio/transcriptions`).",
    },
    Var {
        name: "LLM_ENDPOINTS",
        default: "",
        help: "Extra OpenAI-compatible endpoints, `;`-separated `name|base_url|model|api_key` (key optional), e.g. `groq|https://api.groq.com/openai/v1|llama-3.1-8b-instant|gsk_…`.",
    },
    Var {
        name: "LLM_ROUTES",
        default: "",
        help: "Routing rules, `;`-separated `CONDITIONS => endpoint,endpoint` with conditions `plan=NAME`, `tokens>N` (`>=`,`<`,`<=`), `budget<USD`, `*`, joined by `&`; first match wins; unset: all endpoints in order (`openai` first).",
    },
    Var {
        name: "LLM_FIRST_TOKEN_TIMEOUT_MS",
        default: "5000",
        help: "No first token within this (connect included): fail over to the next endpoint.",
    },
    Var {
        name: "LLM_RETRIES",
        default: "1",
        help: "Extra passes over the endpoint chain (with exponential backoff and jitter) when all failed before the first token.",
    },
    Var {
        name: "LLM_BREAKER_FAILURES",
        default: "3",
        help: "Consecutive failures that open an endpoint's circuit breaker.",
    },
    Var {
        name: "LLM_BREAKER_COOLDOWN_SECS",
        default: "30",
        help: "How long an open breaker skips its endpoint before one probe request.",
    },
    Var {
        name: "LLM_CACHE_TTL_SECS",
        default: "0",
        help: "Cache identical (endpoint, model, prompt) answers this long; 0 turns the cache off.",
    },
    Var {
        name: "DEEPGRAM_API_KEY",
        default: "",
        help: "Deepgram API key (live streaming STT).",
    },
    Var {
        name: "DEEPGRAM_BASE_URL",
        default: "wss://api.deepgram.com",
        help: "Deepgram base URL (`ws://`, `http(s)://` accepted).",
    },
    Var {
        name: "DEEPGRAM_MODEL",
        default: "nova-3",
        help: "Deepgram model.",
    },
    Var {
        name: "ELEVENLABS_API_KEY",
        default: "",
        help: "ElevenLabs API key (stream-input WebSocket TTS).",
    },
    Var {
        name: "ELEVENLABS_VOICE_ID",
        default: "21m00Tcm4TlvDq8ikWAM",
        help: "ElevenLabs voice when the session names none (default: the premade voice Rachel).",
    },
    Var {
        name: "ELEVENLABS_BASE_URL",
        default: "wss://api.elevenlabs.io",
        help: "ElevenLabs base URL (`ws://`, `http(s)://` accepted).",
    },
    Var {
        name: "ELEVENLABS_MODEL",
        default: "eleven_flash_v2_5",
        help: "ElevenLabs model (`model_id`).",
    },
    Var {
        name: "AZURE_SPEECH_KEY",
        default: "",
        help: "Azure Speech resource key (REST TTS).",
    },
    Var {
        name: "AZURE_SPEECH_REGION",
        default: "",
        help: "Azure region, e.g. `westeurope`; required with AZURE_SPEECH_KEY unless AZURE_SPEECH_ENDPOINT is set.",
    },
    Var {
        name: "AZURE_SPEECH_ENDPOINT",
        default: "",
        help: "Overrides `https://{region}.tts.speech.microsoft.com` (`http://` accepted).",
    },
    Var {
        name: "AZURE_SPEECH_VOICE",
        default: "en-US-AvaMultilingualNeural",
        help: "Azure voice when the session names none.",
    },
    Var {
        name: "PROVIDER_PRICES",
        default: "",
        help: "Price overrides, `provider/model:kind=usd[,…][;…]` per minute (`stt_seconds`) or per million (`llm_prompt_tokens`, `llm_completion_tokens`, `tts_characters`); defaults are mid-2025 list-price estimates.",
    },
    Var {
        name: "JWT_SECRET",
        default: "",
        help: "HS256 secret of bearer JWTs (self-hosting). Setting it, JWT_JWKS_URL or CLERK_SECRET_KEY turns anonymous dev mode off.",
    },
    Var {
        name: "JWT_JWKS_URL",
        default: "",
        help: "JWKS URL of an identity provider (Clerk, Auth0, ...) for RS256 JWTs; keys cached, refetched on an unknown `kid` (at most every 30 s) and every 10 min.",
    },
    Var {
        name: "CLERK_SECRET_KEY",
        default: "",
        help: "Clerk secret key (`sk_live_…`/`sk_test_…`): session tokens are verified against the instance's JWKS, fetched from Clerk's Backend API with this key (unless JWT_JWKS_URL is set). Turns anonymous dev mode off.",
    },
    Var {
        name: "CLERK_API_URL",
        default: "https://api.clerk.com",
        help: "Base URL of Clerk's Backend API (the JWKS is `{base}/v1/jwks`); for tests or a proxy.",
    },
    Var {
        name: "JWT_ISSUER",
        default: "",
        help: "Required `iss` claim of tokens; unset: not checked.",
    },
    Var {
        name: "JWT_AUDIENCE",
        default: "",
        help: "Required `aud` claim of tokens; unset: not checked.",
    },
    Var {
        name: "CONNECT_RATE_PER_MIN",
        default: "60",
        help: "WebSocket connection attempts per minute per client IP (token bucket, bursts of the same size); past it 429. 0 = off.",
    },
    Var {
        name: "WEB_CLIENT",
        default: "true",
        help: "Serve the browser voice client at `/` (`true`/`false`); the WebSocket API does not depend on it.",
    },
    Var {
        name: "METRICS_TOKEN",
        default: "",
        help: "Bearer token `GET /metrics` requires (`Authorization: Bearer <token>`, 401 otherwise); empty: /metrics is open.",
    },
    Var {
        name: "ALLOWED_ORIGINS",
        default: "",
        help: "Comma-separated `Origin`s (e.g. `https://app.example.com`) allowed to open sessions, 403 otherwise; empty = all. Requests without `Origin` (non-browser clients) are allowed.",
    },
    Var {
        name: "ANONYMOUS_PLAN",
        default: "unmetered",
        help: "Plan of sessions in anonymous dev mode (no JWT_SECRET / JWT_JWKS_URL); `unmetered` has no limits.",
    },
    Var {
        name: "FREE_DAILY_LIMIT_SECONDS",
        default: "600",
        help: "Free plan: seconds of conversation per UTC day, or `unlimited`.",
    },
    Var {
        name: "FREE_TRIAL_SECONDS",
        default: "0",
        help: "Free plan: one-time trial seconds on top of the daily allowance, used only for seconds beyond it; 0 = no trial.",
    },
    Var {
        name: "PLAN_LIMITS",
        default: "",
        help: "Plan limits `plan:key=value,...;plan:...` (keys daily_seconds, trial_seconds, monthly_tts_characters, turns_per_minute; value a number or `unlimited`), overriding the defaults key by key: free 5000 TTS characters/month and 5 turns/min; pro 7200 s/day, 50000 characters, 30 turns/min; business 28800 s/day, 500000 characters, 120 turns/min.",
    },
    Var {
        name: "USAGE_HEARTBEAT_SECS",
        default: "5",
        help: "How often each session writes its usage to the store (a crash loses at most this much).",
    },
    Var {
        name: "AI_GENERATION_ENABLED",
        default: "true",
        help: "Kill switch: `false` denies every assistant turn (`generation_disabled`) and refuses new sessions.",
    },
    Var {
        name: "FREE_TIER_ENABLED",
        default: "true",
        help: "Kill switch: `false` refuses users on the free plan.",
    },
    Var {
        name: "MAX_DAILY_SPEND_USD",
        default: "",
        help: "Kill switch: generation stops for everyone once the day's (UTC) provider cost recorded in the store reaches this many USD; unset: no cap.",
    },
    Var {
        name: "DUPLEX_SWITCHES_FILE",
        default: "",
        help: "Optional file of `KEY=VALUE` lines for the three kill switches, re-read every 5 s: flips them without a restart (a bad file is logged and ignored).",
    },
    Var {
        name: "DUPLEX_DATA_DIR",
        default: "data",
        help: "Directory of the embedded SQLite database (`duplex.db`, created on first run).",
    },
    Var {
        name: "DATABASE_URL",
        default: "",
        help: "Store: `postgres://…` for production, `sqlite://PATH?mode=rwc`; unset: SQLite in DUPLEX_DATA_DIR.",
    },
    Var {
        name: "STRIPE_WEBHOOK_SECRET",
        default: "",
        help: "Signing secret (`whsec_…`) of the Stripe webhook endpoint; unset: the endpoint answers 503.",
    },
    Var {
        name: "STRIPE_PRICE_PLANS",
        default: "",
        help: "Stripe price ids and the plans they grant: `price_abc:pro,price_def:business`.",
    },
    Var {
        name: "STRIPE_WEBHOOK_PATH",
        default: "/webhooks/stripe",
        help: "Path of the Stripe webhook endpoint (POST).",
    },
];

/// Variables that deployments (`render.yaml`, `deploy/`) may declare besides [`VARS`]: read
/// outside [`Config`]. Today only `RUST_LOG` (`tracing-subscriber`'s `EnvFilter` in
/// `main.rs`). A test checks that deploy files name only [`VARS`] and these.
pub const RESERVED_VARS: &[&str] = &["RUST_LOG"];

/// A URL with the password of its user-info part replaced by `***`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..host_end].rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or("");
            let password = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{password}@{host}{}", &rest[host_end..])
        }
        None => url.to_owned(),
    }
}

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
            let default = VARS
                .iter()
                .find(|v| v.name == name)
                .expect("every name is in VARS")
                .default;
            (
                name,
                lookup(name)
                    .filter(|v| !v.trim().is_empty())
                    .unwrap_or_else(|| default.to_owned()),
            )
        };
        let num = |name: &'static str| -> Result<u64, ConfigError> {
            let (name, value) = get(name);
            value.trim().parse::<u64>().map_err(|e| ConfigError {
                name,
                value,
                reason: e.to_string(),
            })
        };
        let ms = |name| num(name).map(Duration::from_millis);
        let secs = |name| num(name).map(Duration::from_secs);
        let bad = |name: &'static str, value: String, reason: &str| ConfigError {
            name,
            value,
            reason: reason.to_owned(),
        };

        let (n, v) = get("BIND_ADDR");
        let bind_addr = v
            .parse()
            .map_err(|_| bad(n, v.clone(), "not an IP address"))?;
        let port =
            u16::try_from(num("PORT")?).map_err(|_| bad("PORT", get("PORT").1, "not a port"))?;
        let (n, v) = get("DUPLEX_PROVIDERS");
        let providers = ProviderMode::parse(v.trim())
            .ok_or_else(|| bad(n, v.clone(), "expected `local`, `scripted` or `echo`"))?;
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
            return Err(bad(
                "MAX_MESSAGE_BYTES",
                max_message_bytes.to_string(),
                "at least 1024",
            ));
        }
        let positive = |name: &'static str| -> Result<usize, ConfigError> {
            let v = num(name)?;
            if v == 0 {
                return Err(bad(name, "0".into(), "must be at least 1"));
            }
            Ok(v as usize)
        };
        let data_dir = PathBuf::from(get("DUPLEX_DATA_DIR").1);
        let (n, v) = get("DATABASE_URL");
        let database_url = if v.trim().is_empty() {
            duplex_store::sqlite_url_in(&data_dir)
        } else {
            duplex_store::Backend::from_url(v.trim())
                .map_err(|e| bad(n, "<redacted>".into(), &e.to_string()))?;
            v.trim().to_owned()
        };
        let stripe_webhook_secret = WebhookSecret::new(get("STRIPE_WEBHOOK_SECRET").1);
        let (n, v) = get("STRIPE_PRICE_PLANS");
        let stripe_price_plans = PricePlans::parse(&v).map_err(|e| bad(n, v.clone(), &e))?;
        let (n, v) = get("STRIPE_WEBHOOK_PATH");
        let stripe_webhook_path = v.trim().to_owned();
        if !stripe_webhook_path.starts_with('/') || stripe_webhook_path.contains(['{', '}', '*']) {
            return Err(bad(n, v, "a literal path starting with /"));
        }
        let opt =
            |name: &'static str| Some(get(name).1.trim().to_owned()).filter(|v| !v.is_empty());
        let connect_rate_per_min = u32::try_from(num("CONNECT_RATE_PER_MIN")?).map_err(|_| {
            bad(
                "CONNECT_RATE_PER_MIN",
                get("CONNECT_RATE_PER_MIN").1,
                "too large",
            )
        })?;
        let (n, v) = get("WEB_CLIENT");
        let web_client = match v.trim() {
            "true" | "1" | "on" => true,
            "false" | "0" | "off" => false,
            _ => return Err(bad(n, v, "true or false")),
        };
        if web_client && (stripe_webhook_path == "/" || stripe_webhook_path.starts_with("/assets/"))
        {
            return Err(bad(
                "STRIPE_WEBHOOK_PATH",
                stripe_webhook_path.clone(),
                "a path other than / and /assets/… (the browser client's), or WEB_CLIENT=false",
            ));
        }
        let metrics_token = Some(get("METRICS_TOKEN").1.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(crate::auth::Secret);
        let allowed_origins = get("ALLOWED_ORIGINS")
            .1
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        let (n, v) = get("FREE_DAILY_LIMIT_SECONDS");
        let free_daily = match v.trim() {
            "unlimited" => None,
            t => Some(
                t.parse::<u64>()
                    .map_err(|_| bad(n, v.clone(), "a whole number or `unlimited`"))?,
            ),
        };
        let free_trial = num("FREE_TRIAL_SECONDS")?;
        let (n, v) = get("PLAN_LIMITS");
        let plans = duplex_metering::PlanTable::parse(&v, free_daily, Some(free_trial))
            .map_err(|e| bad(n, v.clone(), &e.to_string()))?;
        let (n, anonymous_plan) = get("ANONYMOUS_PLAN");
        if plans.get(anonymous_plan.trim()).is_none() {
            let known: Vec<&str> = plans.names().collect();
            return Err(bad(
                n,
                anonymous_plan,
                &format!("not a plan; known: {}", known.join(", ")),
            ));
        }
        let usage_heartbeat = secs("USAGE_HEARTBEAT_SECS")?;
        if usage_heartbeat.is_zero() {
            return Err(bad(
                "USAGE_HEARTBEAT_SECS",
                "0".into(),
                "must be at least 1",
            ));
        }
        let switches = duplex_metering::Switches::from_lookup(&lookup).map_err(|e| {
            let (name, value, reason) = match e {
                duplex_metering::Error::Switch {
                    name,
                    value,
                    reason,
                } => (name, value, reason),
                other => (String::new(), String::new(), other.to_string()),
            };
            let name = duplex_metering::SWITCH_VARS
                .into_iter()
                .find(|v| *v == name)
                .unwrap_or("AI_GENERATION_ENABLED");
            bad(name, value, &reason)
        })?;
        Ok(Config {
            jwt_secret: opt("JWT_SECRET").map(crate::auth::Secret),
            jwt_jwks_url: opt("JWT_JWKS_URL"),
            clerk_secret_key: opt("CLERK_SECRET_KEY").map(crate::auth::Secret),
            clerk_api_url: {
                let (n, v) = get("CLERK_API_URL");
                let url = v.trim().trim_end_matches('/').to_owned();
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(bad(n, v, "expected an http(s) URL"));
                }
                url
            },
            jwt_issuer: opt("JWT_ISSUER"),
            jwt_audience: opt("JWT_AUDIENCE"),
            connect_rate_per_min,
            allowed_origins,
            metrics_token,
            web_client,
            anonymous_plan: anonymous_plan.trim().to_owned(),
            plans,
            usage_heartbeat,
            switches,
            switches_file: opt("DUPLEX_SWITCHES_FILE").map(PathBuf::from),
            bind_addr,
            port,
            providers,
            log_format,
            max_connections: positive("MAX_CONNECTIONS")?,
            max_connections_per_ip: positive("MAX_CONNECTIONS_PER_IP")?,
            max_message_bytes,
            idle_timeout: secs("IDLE_TIMEOUT_SECS")?,
            pre_start_timeout: secs("PRE_START_TIMEOUT_SECS")?,
            max_input_text_chars: num("MAX_INPUT_TEXT_CHARS")? as usize,
            shutdown_grace: secs("SHUTDOWN_GRACE_SECS")?,
            audio_lead: ms("AUDIO_LEAD_MS")?,
            vad_mode: vad_mode as u8,
            speech_start: ms("SPEECH_START_MS")?,
            end_of_turn: ms("END_OF_TURN_MS")?,
            max_turn: ms("MAX_TURN_MS")?,
            system_prompt: get("SYSTEM_PROMPT").1,
            models_dir: PathBuf::from(get("DUPLEX_MODELS_DIR").1.trim()),
            local_llm: {
                let (n, v) = get("LOCAL_LLM_MODEL");
                duplex_local::LlmChoice::parse(v.trim())
                    .ok_or_else(|| bad(n, v.clone(), "expected `qwen2.5-0.5b` or `smollm2-135m`"))?
            },
            local_llm_engine: {
                let (n, v) = get("LOCAL_LLM_ENGINE");
                duplex_local::LlmEngine::parse(v.trim())
                    .ok_or_else(|| bad(n, v.clone(), "expected `llama` or `candle`"))?
            },
            local_llm_max_tokens: match num("LOCAL_LLM_MAX_TOKENS")? {
                0 => {
                    return Err(bad(
                        "LOCAL_LLM_MAX_TOKENS",
                        "0".into(),
                        "must be at least 1",
                    ));
                }
                n => n as usize,
            },
            scripted_llm_first_token: ms("SCRIPTED_LLM_FIRST_TOKEN_MS")?,
            scripted_llm_token_interval: ms("SCRIPTED_LLM_TOKEN_MS")?,
            scripted_tts_latency: ms("SCRIPTED_TTS_LATENCY_MS")?,
            cloud: CloudConfig::parse(&get, &|n: &str| lookup(n).filter(|v| !v.trim().is_empty()))?,
            database_url,
            data_dir,
            stripe_webhook_secret,
            stripe_price_plans,
            stripe_webhook_path,
        })
    }

    /// `database_url` without its password, for logs and error messages.
    pub fn database_url_for_logs(&self) -> String {
        redact_url(&self.database_url)
    }

    /// The configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults, for tests: loopback, port 0 (the OS picks), scripted providers, a private
    /// in-memory SQLite store.
    pub fn for_tests() -> Config {
        let mut c = Config::from_lookup(|_| None).expect("defaults are valid");
        c.bind_addr = IpAddr::from([127, 0, 0, 1]);
        c.port = 0;
        // Tests open many connections from 127.0.0.1; the auth tests set their own limit.
        c.connect_rate_per_min = 0;
        c.database_url = "sqlite::memory:".to_owned();
        // Tests that want the local engines ask for them.
        c.providers = ProviderMode::Scripted;
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud providers
// ---------------------------------------------------------------------------------------------

/// Which recognizer sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SttEngine {
    /// The `DUPLEX_PROVIDERS` set.
    Default,
    Deepgram,
    OpenAi,
    /// Whisper tiny.en on candle.
    Local,
    Scripted,
}

/// Which language model sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmEngine {
    Default,
    /// The router over `OPENAI_*` and `LLM_ENDPOINTS`.
    OpenAi,
    /// The GGUF chat model of `LOCAL_LLM_MODEL`.
    Local,
    Scripted,
}

/// Which synthesizer sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtsEngine {
    Default,
    Azure,
    ElevenLabs,
    OpenAi,
    /// The Piper voice.
    Local,
    /// espeak-ng.
    Espeak,
    Scripted,
}

/// One OpenAI-compatible LLM endpoint.
#[derive(Clone, PartialEq)]
pub struct LlmEndpointConfig {
    pub name: String,
    pub base_url: String,
    pub model: String,
    pub api_key: String,
}

impl std::fmt::Debug for LlmEndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmEndpointConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Settings of the cloud adapters, the LLM router and cost accounting. Keys are kept out of
/// `Debug`.
#[derive(Clone)]
pub struct CloudConfig {
    pub stt: SttEngine,
    pub llm: LlmEngine,
    pub tts: TtsEngine,
    pub openai_api_key: Option<String>,
    pub openai_base_url: String,
    pub openai_tts_model: String,
    pub openai_tts_voice: String,
    pub openai_stt_model: String,
    /// The router's endpoints in order: `openai` (when configured) then `LLM_ENDPOINTS`.
    pub llm_endpoints: Vec<LlmEndpointConfig>,
    pub llm_routes: Vec<duplex_providers::router::Route>,
    pub llm_first_token_timeout: Duration,
    pub llm_retries: u32,
    pub llm_breaker_failures: u32,
    pub llm_breaker_cool_down: Duration,
    /// `None`: no response cache.
    pub llm_cache_ttl: Option<Duration>,
    pub deepgram_api_key: Option<String>,
    pub deepgram_base_url: String,
    pub deepgram_model: String,
    pub elevenlabs_api_key: Option<String>,
    pub elevenlabs_voice_id: String,
    pub elevenlabs_base_url: String,
    pub elevenlabs_model: String,
    pub azure_speech_key: Option<String>,
    pub azure_speech_region: String,
    pub azure_speech_endpoint: Option<String>,
    pub azure_speech_voice: String,
    pub prices: duplex_providers::PriceTable,
}

impl std::fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudConfig")
            .field("stt", &self.stt)
            .field("llm", &self.llm)
            .field("tts", &self.tts)
            .field("llm_endpoints", &self.llm_endpoints)
            .field("llm_routes", &self.llm_routes)
            .finish_non_exhaustive()
    }
}

impl CloudConfig {
    /// `get` gives a variable's value or its default; `set` gives it only when set non-empty.
    fn parse(
        get: &dyn Fn(&'static str) -> (&'static str, String),
        set: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CloudConfig, ConfigError> {
        let bad = |name: &'static str, value: String, reason: String| ConfigError {
            name,
            value,
            reason,
        };
        let val = |name: &'static str| get(name).1.trim().to_owned();
        let key = |name: &'static str| set(name).map(|v| v.trim().to_owned());
        let num = |name: &'static str| -> Result<u64, ConfigError> {
            let v = val(name);
            v.parse()
                .map_err(|_| bad(name, v.clone(), "not a number".into()))
        };
        let choice =
            |name: &'static str, allowed: &[&str]| -> Result<Option<String>, ConfigError> {
                match set(name).map(|v| v.trim().to_ascii_lowercase()) {
                    None => Ok(None),
                    Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v)),
                    Some(v) => Err(bad(
                        name,
                        v,
                        format!("expected one of {}", allowed.join(", ")),
                    )),
                }
            };
        let require = |var: &'static str, why: &str| -> Result<String, ConfigError> {
            key(var).ok_or_else(|| bad(var, String::new(), format!("required by {why}")))
        };

        let openai_api_key = key("OPENAI_API_KEY");
        let deepgram_api_key = key("DEEPGRAM_API_KEY");
        let elevenlabs_api_key = key("ELEVENLABS_API_KEY");
        let azure_speech_key = key("AZURE_SPEECH_KEY");
        let azure_speech_endpoint = key("AZURE_SPEECH_ENDPOINT");
        let azure_speech_region = val("AZURE_SPEECH_REGION");
        for name in [
            "OPENAI_BASE_URL",
            "DEEPGRAM_BASE_URL",
            "ELEVENLABS_BASE_URL",
        ] {
            let v = val(name);
            if !["http://", "https://", "ws://", "wss://"]
                .iter()
                .any(|p| v.starts_with(p))
            {
                return Err(bad(
                    name,
                    v,
                    "expected an http(s):// or ws(s):// URL".into(),
                ));
            }
        }

        // LLM endpoints: `openai` from OPENAI_*, then LLM_ENDPOINTS.
        let mut llm_endpoints = Vec::new();
        if openai_api_key.is_some() || set("OPENAI_BASE_URL").is_some() {
            llm_endpoints.push(LlmEndpointConfig {
                name: "openai".into(),
                base_url: val("OPENAI_BASE_URL"),
                model: val("OPENAI_MODEL"),
                api_key: openai_api_key.clone().unwrap_or_default(),
            });
        }
        let (n, spec) = get("LLM_ENDPOINTS");
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let fields: Vec<&str> = entry.split('|').map(str::trim).collect();
            let [name, base_url, model, rest @ ..] = fields.as_slice() else {
                return Err(bad(
                    n,
                    "<redacted>".into(),
                    format!(
                        "entry {:?}: expected name|base_url|model|api_key",
                        entry.split('|').next().unwrap_or("")
                    ),
                ));
            };
            if name.is_empty()
                || model.is_empty()
                || !(base_url.starts_with("http://") || base_url.starts_with("https://"))
                || rest.len() > 1
            {
                return Err(bad(
                    n,
                    "<redacted>".into(),
                    format!("entry {name:?}: expected name|http(s)://base_url|model|api_key"),
                ));
            }
            if llm_endpoints
                .iter()
                .any(|e: &LlmEndpointConfig| e.name == *name)
            {
                return Err(bad(
                    n,
                    "<redacted>".into(),
                    format!("endpoint name {name:?} is used twice"),
                ));
            }
            llm_endpoints.push(LlmEndpointConfig {
                name: name.to_string(),
                base_url: base_url.to_string(),
                model: model.to_string(),
                api_key: rest.first().map(|k| k.to_string()).unwrap_or_default(),
            });
        }
        let (n, spec) = get("LLM_ROUTES");
        let llm_routes =
            duplex_providers::router::parse_routes(&spec).map_err(|e| bad(n, spec.clone(), e))?;
        for r in &llm_routes {
            for e in &r.chain {
                if !llm_endpoints.iter().any(|x| &x.name == e) {
                    return Err(bad(
                        n,
                        spec.clone(),
                        format!("route names unknown endpoint {e:?}"),
                    ));
                }
            }
        }

        let stt = match choice("STT_PROVIDER", &["deepgram", "openai", "local", "scripted"])?
            .as_deref()
        {
            Some("deepgram") => {
                require("DEEPGRAM_API_KEY", "STT_PROVIDER=deepgram")?;
                SttEngine::Deepgram
            }
            Some("openai") => {
                require("OPENAI_API_KEY", "STT_PROVIDER=openai")?;
                SttEngine::OpenAi
            }
            Some("local") => SttEngine::Local,
            Some(_) => SttEngine::Scripted,
            None if deepgram_api_key.is_some() => SttEngine::Deepgram,
            None if openai_api_key.is_some() => SttEngine::OpenAi,
            None => SttEngine::Default,
        };
        let llm = match choice("LLM_PROVIDER", &["openai", "local", "scripted"])?.as_deref() {
            Some("openai") => {
                if llm_endpoints.is_empty() {
                    require(
                        "OPENAI_API_KEY",
                        "LLM_PROVIDER=openai (or set LLM_ENDPOINTS)",
                    )?;
                }
                LlmEngine::OpenAi
            }
            Some("local") => LlmEngine::Local,
            Some(_) => LlmEngine::Scripted,
            None if !llm_endpoints.is_empty() => LlmEngine::OpenAi,
            None => LlmEngine::Default,
        };
        let azure_ok = || -> Result<(), ConfigError> {
            if azure_speech_endpoint.is_none() && azure_speech_region.is_empty() {
                return Err(bad(
                    "AZURE_SPEECH_REGION",
                    String::new(),
                    "required with AZURE_SPEECH_KEY unless AZURE_SPEECH_ENDPOINT is set".into(),
                ));
            }
            Ok(())
        };
        let tts = match choice(
            "TTS_PROVIDER",
            &[
                "azure",
                "elevenlabs",
                "openai",
                "local",
                "espeak",
                "scripted",
            ],
        )?
        .as_deref()
        {
            Some("azure") => {
                require("AZURE_SPEECH_KEY", "TTS_PROVIDER=azure")?;
                azure_ok()?;
                TtsEngine::Azure
            }
            Some("elevenlabs") => {
                require("ELEVENLABS_API_KEY", "TTS_PROVIDER=elevenlabs")?;
                TtsEngine::ElevenLabs
            }
            Some("openai") => {
                require("OPENAI_API_KEY", "TTS_PROVIDER=openai")?;
                TtsEngine::OpenAi
            }
            Some("local") => TtsEngine::Local,
            Some("espeak") => TtsEngine::Espeak,
            Some(_) => TtsEngine::Scripted,
            None if azure_speech_key.is_some() => {
                azure_ok()?;
                TtsEngine::Azure
            }
            None if elevenlabs_api_key.is_some() => TtsEngine::ElevenLabs,
            None if openai_api_key.is_some() => TtsEngine::OpenAi,
            None => TtsEngine::Default,
        };
        let mut prices = duplex_providers::PriceTable::defaults();
        let (n, spec) = get("PROVIDER_PRICES");
        prices
            .apply_overrides(&spec)
            .map_err(|e| bad(n, spec.clone(), e.to_string()))?;
        let cache = num("LLM_CACHE_TTL_SECS")?;
        let failures = num("LLM_BREAKER_FAILURES")?;
        if failures == 0 {
            return Err(bad(
                "LLM_BREAKER_FAILURES",
                "0".into(),
                "must be at least 1".into(),
            ));
        }
        Ok(CloudConfig {
            stt,
            llm,
            tts,
            openai_api_key,
            openai_base_url: val("OPENAI_BASE_URL"),
            openai_tts_model: val("OPENAI_TTS_MODEL"),
            openai_tts_voice: val("OPENAI_TTS_VOICE"),
            openai_stt_model: val("OPENAI_STT_MODEL"),
            llm_endpoints,
            llm_routes,
            llm_first_token_timeout: Duration::from_millis(num("LLM_FIRST_TOKEN_TIMEOUT_MS")?),
            llm_retries: num("LLM_RETRIES")?.min(10) as u32,
            llm_breaker_failures: failures.min(u64::from(u32::MAX)) as u32,
            llm_breaker_cool_down: Duration::from_secs(num("LLM_BREAKER_COOLDOWN_SECS")?),
            llm_cache_ttl: (cache > 0).then(|| Duration::from_secs(cache)),
            deepgram_api_key,
            deepgram_base_url: val("DEEPGRAM_BASE_URL"),
            deepgram_model: val("DEEPGRAM_MODEL"),
            elevenlabs_api_key,
            elevenlabs_voice_id: val("ELEVENLABS_VOICE_ID"),
            elevenlabs_base_url: val("ELEVENLABS_BASE_URL"),
            elevenlabs_model: val("ELEVENLABS_MODEL"),
            azure_speech_key,
            azure_speech_region,
            azure_speech_endpoint,
            azure_speech_voice: val("AZURE_SPEECH_VOICE"),
            prices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_parse() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 10000);
        assert_eq!(c.providers, ProviderMode::Local);
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
        let e = parse(&[("DATABASE_URL", "mysql://root:hunter2@db/duplex")]).unwrap_err();
        assert_eq!(e.name, "DATABASE_URL");
        assert!(
            !e.to_string().contains("hunter2"),
            "no password in errors: {e}"
        );
        let e = parse(&[("STRIPE_PRICE_PLANS", "price_abc")]).unwrap_err();
        assert_eq!(e.name, "STRIPE_PRICE_PLANS");
        let e = parse(&[("STRIPE_WEBHOOK_PATH", "webhooks")]).unwrap_err();
        assert_eq!(e.name, "STRIPE_WEBHOOK_PATH");
    }

    #[test]
    fn database_urls_are_redacted_for_logs() {
        assert_eq!(
            redact_url("postgres://duplex:s3cret@db:5432/duplex?sslmode=require"),
            "postgres://duplex:***@db:5432/duplex?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://duplex@db/x"),
            "postgres://duplex@db/x"
        );
        assert_eq!(
            redact_url("sqlite://data/duplex.db?mode=rwc"),
            "sqlite://data/duplex.db?mode=rwc"
        );
    }

    #[test]
    fn store_and_stripe_settings() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.database_url, "sqlite://data/duplex.db?mode=rwc");
        assert!(c.stripe_webhook_secret.is_none());
        assert_eq!(c.stripe_webhook_path, "/webhooks/stripe");
        let c = parse(&[("DUPLEX_DATA_DIR", "/var/lib/duplex")]).unwrap();
        assert_eq!(
            c.database_url,
            "sqlite:///var/lib/duplex/duplex.db?mode=rwc"
        );
        let c = parse(&[
            ("DATABASE_URL", "postgres://duplex@db/duplex"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_abc"),
            ("STRIPE_PRICE_PLANS", "price_abc:pro,price_def:business"),
        ])
        .unwrap();
        assert_eq!(c.database_url, "postgres://duplex@db/duplex");
        assert!(c.stripe_webhook_secret.is_some());
        assert!(
            !format!("{c:?}").contains("whsec_abc"),
            "Debug hides the secret"
        );
        assert_eq!(c.stripe_price_plans.plan_for("price_def"), Some("business"));
    }

    #[test]
    fn cloud_engines_resolve_explicit_then_keys_then_default() {
        let c = parse(&[]).unwrap().cloud;
        assert_eq!(
            (c.stt, c.llm, c.tts),
            (SttEngine::Default, LlmEngine::Default, TtsEngine::Default)
        );
        let c = parse(&[
            ("DEEPGRAM_API_KEY", "dg"),
            ("OPENAI_API_KEY", "sk"),
            ("ELEVENLABS_API_KEY", "xi"),
        ])
        .unwrap()
        .cloud;
        assert_eq!(
            (c.stt, c.llm, c.tts),
            (
                SttEngine::Deepgram,
                LlmEngine::OpenAi,
                TtsEngine::ElevenLabs
            )
        );
        assert_eq!(c.llm_endpoints[0].name, "openai");
        assert_eq!(c.llm_endpoints[0].model, "gpt-4o-mini");
        let c = parse(&[
            ("OPENAI_API_KEY", "sk"),
            ("TTS_PROVIDER", "scripted"),
            ("STT_PROVIDER", "Scripted"),
        ])
        .unwrap()
        .cloud;
        assert_eq!(
            (c.stt, c.llm, c.tts),
            (SttEngine::Scripted, LlmEngine::OpenAi, TtsEngine::Scripted)
        );
        let c = parse(&[
            ("LLM_ENDPOINTS", "groq|https://api.groq.com/openai/v1|llama-3.1-8b-instant|gsk_x; local|http://127.0.0.1:8080/v1|qwen"),
            ("LLM_ROUTES", "plan=free => local; * => groq,local"),
            ("LLM_CACHE_TTL_SECS", "60"),
        ])
        .unwrap()
        .cloud;
        assert_eq!(c.llm, LlmEngine::OpenAi);
        assert_eq!(c.llm_endpoints.len(), 2);
        assert_eq!(c.llm_endpoints[1].api_key, "");
        assert_eq!(c.llm_routes.len(), 2);
        assert_eq!(c.llm_cache_ttl, Some(Duration::from_secs(60)));
        assert!(!format!("{c:?}").contains("gsk_x"), "Debug hides keys");
    }

    #[test]
    fn cloud_errors_name_the_missing_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("TTS_PROVIDER", "azure")], "AZURE_SPEECH_KEY"),
            (
                &[("TTS_PROVIDER", "azure"), ("AZURE_SPEECH_KEY", "k")],
                "AZURE_SPEECH_REGION",
            ),
            (&[("TTS_PROVIDER", "elevenlabs")], "ELEVENLABS_API_KEY"),
            (&[("TTS_PROVIDER", "openai")], "OPENAI_API_KEY"),
            (&[("TTS_PROVIDER", "polly")], "TTS_PROVIDER"),
            (&[("STT_PROVIDER", "deepgram")], "DEEPGRAM_API_KEY"),
            (&[("LLM_PROVIDER", "openai")], "OPENAI_API_KEY"),
            (&[("LLM_ENDPOINTS", "x|ftp://y|m")], "LLM_ENDPOINTS"),
            (
                &[("OPENAI_API_KEY", "k"), ("LLM_ROUTES", "* => nowhere")],
                "LLM_ROUTES",
            ),
            (&[("PROVIDER_PRICES", "openai/x:foo=1")], "PROVIDER_PRICES"),
            (
                &[("DEEPGRAM_BASE_URL", "api.deepgram.com")],
                "DEEPGRAM_BASE_URL",
            ),
        ];
        for (pairs, name) in cases {
            let e = parse(pairs).unwrap_err();
            assert_eq!(e.name, *name, "{pairs:?}: {e}");
        }
        // An Azure endpoint stands in for the region.
        let c = parse(&[
            ("AZURE_SPEECH_KEY", "k"),
            ("AZURE_SPEECH_ENDPOINT", "http://127.0.0.1:1"),
        ])
        .unwrap();
        assert_eq!(c.cloud.tts, TtsEngine::Azure);
    }

    #[test]
    fn every_var_has_a_valid_default() {
        for v in VARS {
            let c = parse(&[(v.name, v.default)]);
            assert!(c.is_ok(), "{}: {:?}", v.name, c.err());
        }
    }

    /// Deploy files live outside the crate and are YAML/Dockerfile text: they are read with
    /// plain line matching, enough for the block styles these files use (a parser would be a
    /// dependency for one test). The helpers fail the test rather than guess when a file
    /// does not have the expected shape.
    mod deploy_files {
        use std::collections::HashMap;
        use std::path::{Path, PathBuf};

        pub fn root() -> PathBuf {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
        }

        pub fn read(path: &Path) -> String {
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }

        fn indent(line: &str) -> usize {
            line.len() - line.trim_start().len()
        }

        fn is_content(line: &str) -> bool {
            let t = line.trim();
            !t.is_empty() && !t.starts_with('#')
        }

        /// A YAML scalar without its trailing comment and quotes.
        pub fn scalar(v: &str) -> String {
            let v = v.split(" #").next().unwrap_or("").trim();
            v.trim_matches('"').trim_matches('\'').to_owned()
        }

        /// The items of every block list under a line `header` (e.g. `env:`), each as its
        /// first-level `field: value` pairs.
        pub fn list_items(text: &str, header: &str) -> Vec<HashMap<String, String>> {
            let lines: Vec<&str> = text.lines().collect();
            let mut items = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                if line.trim() != header {
                    continue;
                }
                let h = indent(line);
                let mut item_indent = None;
                for line in lines[i + 1..].iter().filter(|l| is_content(l)) {
                    let (ind, t) = (indent(line), line.trim());
                    if ind < h || (ind == h && !t.starts_with("- ")) {
                        break;
                    }
                    let item_indent = *item_indent.get_or_insert(ind);
                    let field = if ind == item_indent {
                        let rest = t
                            .strip_prefix("- ")
                            .unwrap_or_else(|| panic!("not a list item: {t}"));
                        items.push(HashMap::new());
                        rest
                    } else if ind == item_indent + 2 {
                        t
                    } else {
                        continue; // deeper: nested maps (valueFrom, …) are not names
                    };
                    if let Some((k, v)) = field.split_once(':') {
                        items
                            .last_mut()
                            .expect("pushed above")
                            .insert(k.trim().to_owned(), scalar(v));
                    }
                }
            }
            items
        }

        /// The keys of a top-level map `header` (e.g. a ConfigMap's `data:`).
        pub fn top_level_keys(text: &str, header: &str) -> Vec<String> {
            let mut keys = Vec::new();
            let mut inside = false;
            for line in text.lines().filter(|l| is_content(l)) {
                if indent(line) == 0 {
                    inside = line.trim() == header;
                } else if inside {
                    let (k, _) = line
                        .trim()
                        .split_once(':')
                        .unwrap_or_else(|| panic!("not a key: {line}"));
                    keys.push(k.trim().to_owned());
                }
            }
            keys
        }

        /// Every value of `key:` anywhere in the file (also as the first field of a list item).
        pub fn values(text: &str, key: &str) -> Vec<String> {
            let prefix = format!("{key}:");
            text.lines()
                .filter(|l| is_content(l))
                .map(|l| l.trim().trim_start_matches("- "))
                .filter_map(|t| t.strip_prefix(&prefix))
                .map(scalar)
                .collect()
        }

        /// The first `key:` value nested under the line `block` (e.g. `livenessProbe:`).
        pub fn value_under(text: &str, block: &str, key: &str) -> Option<String> {
            let lines: Vec<&str> = text.lines().collect();
            let i = lines.iter().position(|l| l.trim() == block)?;
            let h = indent(lines[i]);
            lines[i + 1..]
                .iter()
                .filter(|l| is_content(l))
                .take_while(|l| indent(l) > h)
                .find_map(|l| l.trim().strip_prefix(&format!("{key}:")).map(scalar))
        }
    }

    #[test]
    fn deploy_files_name_only_known_variables() {
        use deploy_files::*;
        let default = |name: &str| {
            VARS.iter()
                .find(|v| v.name == name)
                .expect("in VARS")
                .default
        };
        let port = default("PORT");
        assert_eq!(
            port, "10000",
            "deploy files, README and Dockerfile assume 10000"
        );
        let known =
            |name: &str| VARS.iter().any(|v| v.name == name) || RESERVED_VARS.contains(&name);
        // No platform-provided names are needed: Render's own PORT (10000) is ours too, and
        // Kubernetes injects nothing we read. So every name must be in VARS or RESERVED_VARS.
        let mut unknown = Vec::new();
        let mut check = |file: &str, names: &[String]| {
            assert!(
                !names.is_empty(),
                "{file}: no variable names found (file shape changed?)"
            );
            for n in names {
                if !known(n) {
                    unknown.push(format!("{file}: {n}"));
                }
            }
        };
        for r in RESERVED_VARS {
            assert!(
                !VARS.iter().any(|v| v.name == *r),
                "{r} is read now: remove it from RESERVED_VARS"
            );
        }

        // render.yaml
        let root = root();
        let render = read(&root.join("render.yaml"));
        let items = list_items(&render, "envVars:");
        let render_env: HashMap<String, Option<String>> = items
            .iter()
            .map(|i| {
                (
                    i.get("key").expect("every envVars item has a key").clone(),
                    i.get("value").cloned(),
                )
            })
            .collect();
        let names: Vec<String> = render_env.keys().cloned().collect();
        check("render.yaml", &names);
        assert_eq!(values(&render, "healthCheckPath"), ["/healthz"]);
        assert_eq!(
            render_env.get("PORT"),
            Some(&Some(port.to_owned())),
            "render.yaml PORT"
        );
        for r in RESERVED_VARS {
            assert!(
                render_env.contains_key(*r),
                "render.yaml does not declare {r}"
            );
        }
        let grace = |v: Option<&String>| -> u64 {
            v.map_or(default("SHUTDOWN_GRACE_SECS"), |s| s.as_str())
                .parse()
                .expect("a number")
        };
        // Server::wait exits at most this long after the grace period (2 s close handshakes,
        // 2 s HTTP server stop).
        const EXIT_MARGIN_SECS: u64 = 4;
        let render_grace = grace(
            render_env
                .get("SHUTDOWN_GRACE_SECS")
                .and_then(|v| v.as_ref()),
        );
        let max_delay: u64 = values(&render, "maxShutdownDelaySeconds")
            .first()
            .map_or(30, |v| v.parse().expect("a number")); // 30: Render's default
        assert!(
            render_grace + EXIT_MARGIN_SECS < max_delay,
            "render.yaml: SHUTDOWN_GRACE_SECS={render_grace} does not fit maxShutdownDelaySeconds={max_delay}"
        );

        // deploy/Dockerfile: `ENV A=1 B=2` lines.
        let dockerfile = read(&root.join("deploy/Dockerfile"));
        let mut docker_env = HashMap::new();
        for line in dockerfile
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ENV "))
        {
            for pair in line.split_whitespace() {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("Dockerfile: use ENV NAME=value: {pair}"));
                docker_env.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
        let names: Vec<String> = docker_env.keys().cloned().collect();
        check("deploy/Dockerfile", &names);
        assert_eq!(
            docker_env.get("PORT").map(String::as_str),
            Some(port),
            "Dockerfile ENV PORT"
        );
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim() == format!("EXPOSE {port}")),
            "Dockerfile: EXPOSE {port}"
        );

        // deploy/k8s/*: container `env:` lists, ConfigMap/Secret keys (passed with envFrom).
        let mut k8s = HashMap::new();
        for entry in std::fs::read_dir(root.join("deploy/k8s")).expect("deploy/k8s exists") {
            let path = entry.expect("readable dir entry").path();
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            k8s.insert(name, read(&path));
        }
        let mut k8s_names = Vec::new();
        for (file, text) in &k8s {
            let mut names: Vec<String> = list_items(text, "env:")
                .iter()
                .filter_map(|i| i.get("name").cloned())
                .collect();
            names.extend(top_level_keys(text, "data:"));
            names.extend(top_level_keys(text, "stringData:"));
            if !names.is_empty() {
                check(&format!("deploy/k8s/{file}"), &names);
            }
            k8s_names.extend(names);
            for p in values(text, "containerPort")
                .iter()
                .chain(&values(text, "targetPort"))
            {
                assert_eq!(
                    p, port,
                    "deploy/k8s/{file}: container ports must be PORT's {port}"
                );
            }
        }
        for r in RESERVED_VARS {
            assert!(
                k8s_names.iter().any(|n| n == r),
                "deploy/k8s does not declare {r}"
            );
        }
        let deployment = k8s
            .get("deployment.yaml")
            .expect("deploy/k8s/deployment.yaml");
        let service = k8s.get("service.yaml").expect("deploy/k8s/service.yaml");
        let configmap = k8s
            .get("configmap.yaml")
            .expect("deploy/k8s/configmap.yaml");
        assert_eq!(
            value_under(deployment, "livenessProbe:", "path").as_deref(),
            Some("/healthz")
        );
        assert_eq!(
            value_under(deployment, "readinessProbe:", "path").as_deref(),
            Some("/readyz")
        );
        assert_eq!(values(deployment, "containerPort"), [port]);
        assert_eq!(values(service, "targetPort"), [port]);
        assert!(
            values(configmap, "PORT").iter().all(|p| p == port),
            "configmap.yaml: PORT must be {port}"
        );
        // Termination budget: preStop sleep + grace + exit margin < terminationGracePeriodSeconds.
        let env = list_items(deployment, "env:");
        let grace_value = env
            .iter()
            .find(|i| i.get("name").map(String::as_str) == Some("SHUTDOWN_GRACE_SECS"))
            .and_then(|i| i.get("value"));
        let k8s_grace = grace(grace_value);
        let pre_stop: u64 = deployment
            .split(r#"["sleep", ""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map_or(0, |s| s.parse().expect("preStop sleep seconds"));
        let termination: u64 = values(deployment, "terminationGracePeriodSeconds")
            .first()
            .map_or(30, |v| v.parse().expect("a number")); // 30: Kubernetes' default
        assert!(
            pre_stop > 0 && pre_stop + k8s_grace + EXIT_MARGIN_SECS < termination,
            "deployment.yaml: preStop {pre_stop} s + SHUTDOWN_GRACE_SECS {k8s_grace} s + {EXIT_MARGIN_SECS} s \
             must fit terminationGracePeriodSeconds {termination} s"
        );

        assert!(
            unknown.is_empty(),
            "deploy files name variables duplex does not know: {unknown:#?}"
        );
    }
}
