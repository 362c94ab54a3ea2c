//! Server configuration: every environment variable the server reads, in one table.
//!
//! [`VARS`] names each variable once, with its [`Section`], its default, its meaning and the
//! parser that stores it in a typed field. The table drives [`Config::from_lookup`] (parsed
//! once, before any port is bound; tests build it from a map), `duplex --help` ([`help`]) and
//! the README's configuration table ([`markdown_table`]; a test keeps the README in sync), and a
//! test checks that the deploy files name only variables of the table.
//!
//! [`Config`] is a struct of sections, one per subsystem, and each subsystem is handed only its
//! own: the `Authenticator` gets [`AuthConfig`], the provider builder [`EnginesConfig`], the
//! store [`StoreConfig`], and so on. This module uses no other module of the server.
//!
//! Adding a variable is one [`Var`] in [`VARS`] plus one typed field in its section. Rules that
//! span variables (a provider chosen without its key, the store's SQLite default, the
//! anonymous plan being a plan) run after every variable is parsed, in `Config::resolve`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use duplex_audio::VadMode;
use duplex_billing::{PricePlans, WebhookSecret};
use duplex_metering::{PlanTable, Switches};

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// Every setting of the server, one section per subsystem.
///
/// `Config::default()` is only the blank slate (zeros, empty strings) that
/// [`Config::from_lookup`] fills in from [`VARS`]; the documented defaults are
/// `Config::from_lookup(|_| None)`.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub turns: TurnConfig,
    pub assistant: AssistantConfig,
    pub engines: EnginesConfig,
    pub auth: AuthConfig,
    pub metering: MeteringConfig,
    pub store: StoreConfig,
    pub billing: BillingConfig,
}

/// Where the server listens and how it logs (`Server::bind`, `main`, the HTTP router).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind_addr: IpAddr,
    pub port: u16,
    pub log_format: LogFormat,
    /// Whether `GET /` serves the browser client.
    pub web_client: bool,
}

// By hand: `IpAddr` has no `Default`.
impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
            log_format: LogFormat::default(),
            web_client: false,
        }
    }
}

/// What one client may do: connection caps, message sizes and timeouts (the HTTP edge and
/// the session).
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// WebSocket connection attempts per minute per client IP; 0 = no limit.
    pub connect_rate_per_min: u32,
    pub max_message_bytes: usize,
    /// How long a session may stay silent.
    pub idle_timeout: Duration,
    /// How long a connection may stay without a session.
    pub pre_start_timeout: Duration,
    /// The longest typed turn, in characters.
    pub max_input_text_chars: usize,
    /// How far a client's audio may run ahead of real time; `None`: no bound.
    pub max_audio_ahead: Option<Duration>,
    /// On shutdown, how long sessions may finish their turn.
    pub shutdown_grace: Duration,
    /// How long a TCP connection may take to send a request's headers (from accept, or from
    /// the previous response on a kept-alive connection) before it is closed.
    pub header_read_timeout: Duration,
    /// TCP connections that have not upgraded to a WebSocket (or are between HTTP requests);
    /// a connection past this is closed at accept.
    pub max_pending_connections: usize,
    /// Proxies whose `X-Forwarded-For`/`Forwarded` names the client; empty: the TCP peer is
    /// the client.
    pub trusted_proxies: Vec<Cidr>,
    /// Which header a trusted proxy sets.
    pub client_ip_header: ClientIpHeader,
}

/// A block of addresses (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 address counts as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr.to_canonical(), ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy1, …` (Render, ingress-nginx, most load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for=proxy1`.
    Forwarded,
}

/// Turn detection: the audio front end's VAD and endpointer (`duplex_audio::FrontEnd`).
#[derive(Debug, Clone, Default)]
pub struct TurnConfig {
    pub vad_mode: VadMode,
    pub speech_start: Duration,
    pub end_of_turn: Duration,
    pub max_turn: Duration,
}

/// The conversation core's defaults (`duplex_core::Conversation`).
#[derive(Debug, Clone, Default)]
pub struct AssistantConfig {
    /// Used when the session sends none.
    pub system_prompt: String,
    /// Assistant audio sent ahead of the client's playhead.
    pub audio_lead: Duration,
    /// How old an answer's first text may get before its first chunk of speech ends at a word
    /// boundary; `None`: first chunks end only at sentence ends and clauses.
    pub first_chunk_wait: Option<Duration>,
}

/// The engines sessions run on (`providers::build`).
#[derive(Debug, Clone, Default)]
pub struct EnginesConfig {
    pub providers: ProviderMode,
    /// Where the local engines' models are.
    pub models_dir: PathBuf,
    pub local_llm: duplex_local::LlmChoice,
    pub local_llm_engine: duplex_local::LlmEngine,
    pub local_llm_max_tokens: usize,
    /// Answers the batched local LLM decodes at once; further turns queue.
    pub local_llm_max_sequences: usize,
    /// KV cache tokens per conversation (prompt and answer) of the batched local LLM.
    pub local_llm_context_tokens: usize,
    /// The local engines' steps share the cores (`LOCAL_OVERLAP_STEPS=on`) instead of taking
    /// every core each, one at a time.
    pub local_overlap_steps: bool,
    pub scripted_llm_first_token: Duration,
    pub scripted_llm_token_interval: Duration,
    pub scripted_tts_latency: Duration,
    /// Cloud engines and their settings.
    pub cloud: CloudConfig,
}

/// Who may connect (`auth`: the `Authenticator`, the `Origin` allow-list, `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// HS256 key of bearer tokens. With `jwt_jwks_url` and `clerk_secret_key` also unset:
    /// anonymous dev mode.
    pub jwt_secret: Option<Secret>,
    /// JWKS of an identity provider, for RS256 tokens.
    pub jwt_jwks_url: Option<String>,
    /// Clerk secret key: the JWKS comes from Clerk's Backend API (`clerk_api_url`) with it.
    pub clerk_secret_key: Option<Secret>,
    /// Base URL of Clerk's Backend API, without the `/v1` prefix.
    pub clerk_api_url: String,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// `Origin`s allowed to open sessions; empty = all.
    pub allowed_origins: Vec<String>,
    /// The bearer token `/metrics` requires, if any.
    pub metrics_token: Option<Secret>,
}

/// Plans, usage writes and kill switches (`metering`, `switches`).
#[derive(Debug, Clone, Default)]
pub struct MeteringConfig {
    /// Plan of anonymous sessions (no auth configured) as set; `None`: chosen by the bind
    /// address (see [`Config::anonymous_policy`]). `Server::bind` fills it in.
    pub anonymous_plan: Option<String>,
    /// Every plan and its limits.
    pub plans: PlanTable,
    pub usage_heartbeat: Duration,
    /// Open sessions without a usage write this long are closed as abandoned.
    pub session_reap_after: Duration,
    /// Kill switches at startup; `switches_file` overrides them at run time.
    pub switches: Switches,
    pub switches_file: Option<PathBuf>,
}

/// The store (`duplex_store::Store::open`). `Debug` hides the database password.
#[derive(Clone, Default)]
pub struct StoreConfig {
    /// `DATABASE_URL`, or the SQLite file in `data_dir` when that is unset.
    pub database_url: String,
    pub data_dir: PathBuf,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("database_url", &self.database_url_for_logs())
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl StoreConfig {
    /// `database_url` without its password, for logs and error messages.
    pub fn database_url_for_logs(&self) -> String {
        redact_url(&self.database_url)
    }
}

/// Stripe (`duplex_billing::Billing` and its webhook endpoint).
#[derive(Debug, Clone, Default)]
pub struct BillingConfig {
    /// `None`: the Stripe webhook endpoint answers 503 (unsigned events are never accepted).
    pub stripe_webhook_secret: Option<WebhookSecret>,
    pub stripe_price_plans: PricePlans,
    pub stripe_webhook_path: String,
}

/// How sessions are metered when no auth is configured ([`Config::anonymous_policy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonymousPolicy {
    /// Reachable by others: not a loopback bind, or behind trusted proxies.
    pub public: bool,
    /// Each client IP (IPv6: its /64) is its own user `anon:<ip>`; else all are `anonymous`.
    pub per_client: bool,
    /// The plan of every anonymous session.
    pub plan: String,
    /// `ANONYMOUS_PLAN` was set (the operator chose the plan).
    pub plan_chosen: bool,
}

/// Which engines a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderMode {
    /// The embedded offline engines (Whisper, a GGUF chat model, Piper) from
    /// `DUPLEX_MODELS_DIR`: the default, no API key needed.
    #[default]
    Local,
    /// Deterministic stand-ins (not speech recognition, not a language model, not a voice).
    Scripted,
    /// Transport test mode: one binary frame back for every binary frame in, after the audio
    /// front end has processed it.
    Echo,
}

impl ProviderMode {
    /// The `DUPLEX_PROVIDERS` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderMode::Local => "local",
            ProviderMode::Scripted => "scripted",
            ProviderMode::Echo => "echo",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

/// A secret that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

/// A group of variables in `--help` and the README, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Server,
    Limits,
    Turns,
    Assistant,
    Engines,
    Cloud,
    Auth,
    Metering,
    Store,
    Billing,
}

impl Section {
    pub const ALL: [Section; 10] = [
        Section::Server,
        Section::Limits,
        Section::Turns,
        Section::Assistant,
        Section::Engines,
        Section::Cloud,
        Section::Auth,
        Section::Metering,
        Section::Store,
        Section::Billing,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Section::Server => "Server",
            Section::Limits => "Connections and limits",
            Section::Turns => "Turn detection",
            Section::Assistant => "Assistant",
            Section::Engines => "Engines",
            Section::Cloud => "Cloud providers",
            Section::Auth => "Auth",
            Section::Metering => "Plans, metering and kill switches",
            Section::Store => "Store",
            Section::Billing => "Billing (Stripe)",
        }
    }
}

/// One environment variable.
pub struct Var {
    pub name: &'static str,
    pub section: Section,
    /// The value when the variable is unset or empty; `""`: none.
    pub default: &'static str,
    /// What it means (`--help`, README).
    pub help: &'static str,
    /// Stores the value, or the default, in its typed field.
    pub parse: fn(&mut Config, Value<'_>) -> Result<(), Invalid>,
}

/// Every variable the server reads.
pub const VARS: &[Var] = &[
    // Server
    Var {
        name: "BIND_ADDR",
        section: Section::Server,
        default: "0.0.0.0",
        help: "Address to listen on.",
        parse: |c, v| v.num().map(|a| c.server.bind_addr = a),
    },
    Var {
        name: "PORT",
        section: Section::Server,
        default: "10000",
        help: "Port for HTTP and WebSocket.",
        parse: |c, v| v.num().map(|p| c.server.port = p),
    },
    Var {
        name: "LOG_FORMAT",
        section: Section::Server,
        default: "json",
        help: "`json` or `pretty` log lines (on stderr; `RUST_LOG` filters them).",
        parse: |c, v| {
            v.one_of(&[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)])
                .map(|f| c.server.log_format = f)
        },
    },
    Var {
        name: "WEB_CLIENT",
        section: Section::Server,
        default: "true",
        help: "Serve the browser voice client at `/` (`true`/`false`); the WebSocket API does not depend on it.",
        parse: |c, v| {
            v.one_of(&[
                ("true", true),
                ("1", true),
                ("on", true),
                ("false", false),
                ("0", false),
                ("off", false),
            ])
            .map(|b| c.server.web_client = b)
        },
    },
    // Connections and limits
    Var {
        name: "MAX_CONNECTIONS",
        section: Section::Limits,
        default: "1000",
        help: "Concurrent WebSocket sessions.",
        parse: |c, v| v.at_least(1).map(|n| c.limits.max_connections = n),
    },
    Var {
        name: "MAX_CONNECTIONS_PER_IP",
        section: Section::Limits,
        default: "50",
        help: "Concurrent sessions per client IP.",
        parse: |c, v| v.at_least(1).map(|n| c.limits.max_connections_per_ip = n),
    },
    Var {
        name: "CONNECT_RATE_PER_MIN",
        section: Section::Limits,
        default: "60",
        help: "WebSocket connection attempts per minute per client IP (token bucket, bursts of the same size); past it 429; `0`: off.",
        parse: |c, v| v.num().map(|n| c.limits.connect_rate_per_min = n),
    },
    Var {
        name: "MAX_MESSAGE_BYTES",
        section: Section::Limits,
        default: "262144",
        help: "Largest client message (at least 1024); larger: `message_too_large`, close 1009.",
        parse: |c, v| v.at_least(1024).map(|n| c.limits.max_message_bytes = n),
    },
    Var {
        name: "IDLE_TIMEOUT_SECS",
        section: Section::Limits,
        default: "60",
        help: "Close a session that sent nothing for this long (4000).",
        parse: |c, v| v.secs().map(|d| c.limits.idle_timeout = d),
    },
    Var {
        name: "PRE_START_TIMEOUT_SECS",
        section: Section::Limits,
        default: "10",
        help: "Close a connection that has not started its session this long after the upgrade (`start_timeout`, 4000; pings do not count).",
        parse: |c, v| v.secs().map(|d| c.limits.pre_start_timeout = d),
    },
    Var {
        name: "MAX_INPUT_TEXT_CHARS",
        section: Section::Limits,
        default: "4000",
        help: "Longest `input.text` in characters; longer: `invalid_message`, no turn.",
        parse: |c, v| v.num().map(|n| c.limits.max_input_text_chars = n),
    },
    Var {
        name: "MAX_AUDIO_AHEAD_MS",
        section: Section::Limits,
        default: "2000",
        help: "How much audio a client may send ahead of real time (a burst after a network stall); beyond it frames are dropped with `audio_too_fast`, so a client cannot multiply recognition work and cost. `0`: no bound.",
        parse: |c, v| {
            v.ms()
                .map(|d| c.limits.max_audio_ahead = (!d.is_zero()).then_some(d))
        },
    },
    Var {
        name: "SHUTDOWN_GRACE_SECS",
        section: Section::Limits,
        default: "10",
        help: "On SIGTERM, how long sessions may finish their turn.",
        parse: |c, v| v.secs().map(|d| c.limits.shutdown_grace = d),
    },
    Var {
        name: "HEADER_READ_TIMEOUT_SECS",
        section: Section::Limits,
        default: "10",
        help: "Close a TCP connection that has not sent a whole request head (request line and headers) this long after connecting or after its previous response (slow-header attacks, idle keep-alive); at least 1.",
        parse: |c, v| {
            v.at_least(1)
                .map(|s| c.limits.header_read_timeout = Duration::from_secs(s))
        },
    },
    Var {
        name: "MAX_PENDING_CONNECTIONS",
        section: Section::Limits,
        default: "512",
        help: "TCP connections not (yet) upgraded to a WebSocket: sending a request, waiting for its answer, or kept alive between requests; past it a new connection gets a bare 503 and is closed (`duplex_connections_rejected_total{reason=\"pending\"}`). Established sessions do not count.",
        parse: |c, v| v.at_least(1).map(|n| c.limits.max_pending_connections = n),
    },
    Var {
        name: "TRUSTED_PROXIES",
        section: Section::Limits,
        default: "",
        help: "Comma-separated CIDR blocks (e.g. `10.0.0.0/8,fd00::/8`) of reverse proxies in front of the server. Only a TCP peer inside one is believed about the client: the client IP is then the right-most address of `CLIENT_IP_HEADER` that is not itself a trusted proxy; otherwise the header is ignored. The client IP keys the per-IP caps, the connect rate, anonymous users and logs (IPv6 per /64). Empty: the TCP peer is the client.",
        parse: |c, v| {
            c.limits.trusted_proxies = v
                .raw
                .split(',')
                .map(str::trim)
                .filter(|b| !b.is_empty())
                .map(|b| b.parse::<Cidr>().map_err(Invalid::from))
                .collect::<Result<_, _>>()?;
            Ok(())
        },
    },
    Var {
        name: "CLIENT_IP_HEADER",
        section: Section::Limits,
        default: "x-forwarded-for",
        help: "The header trusted proxies name the client in: `x-forwarded-for` or `forwarded` (RFC 7239 `for=`). Only this one is read: set the one your proxy writes, or a client could send the other.",
        parse: |c, v| {
            v.one_of(&[
                ("x-forwarded-for", ClientIpHeader::XForwardedFor),
                ("forwarded", ClientIpHeader::Forwarded),
            ])
            .map(|h| c.limits.client_ip_header = h)
        },
    },
    // Turn detection
    Var {
        name: "VAD_MODE",
        section: Section::Turns,
        default: "3",
        help: "webrtc-vad aggressiveness, `0` (lenient) to `3` (strictest).",
        parse: |c, v| {
            v.one_of(&[
                ("0", VadMode::Quality),
                ("1", VadMode::LowBitrate),
                ("2", VadMode::Aggressive),
                ("3", VadMode::VeryAggressive),
            ])
            .map(|m| c.turns.vad_mode = m)
        },
    },
    Var {
        name: "SPEECH_START_MS",
        section: Section::Turns,
        default: "60",
        help: "Voiced audio that starts a user turn.",
        parse: |c, v| v.ms().map(|d| c.turns.speech_start = d),
    },
    Var {
        name: "END_OF_TURN_MS",
        section: Section::Turns,
        default: "700",
        help: "Silence that ends a user turn.",
        parse: |c, v| v.ms().map(|d| c.turns.end_of_turn = d),
    },
    Var {
        name: "MAX_TURN_MS",
        section: Section::Turns,
        default: "30000",
        help: "Longest user utterance before it is cut.",
        parse: |c, v| v.ms().map(|d| c.turns.max_turn = d),
    },
    // Assistant
    Var {
        name: "SYSTEM_PROMPT",
        section: Section::Assistant,
        default: "You are a friendly voice assistant. Your answers are spoken aloud, so reply in one to three short sentences of plain text: no lists, no markdown, no code and no emoji.",
        help: "Default system prompt (a session may send its own).",
        parse: |c, v| {
            c.assistant.system_prompt = v.raw.to_owned();
            Ok(())
        },
    },
    Var {
        name: "AUDIO_LEAD_MS",
        section: Section::Assistant,
        default: "300",
        help: "Assistant audio sent ahead of the client's playhead (bounds barge-in lag).",
        parse: |c, v| v.ms().map(|d| c.assistant.audio_lead = d),
    },
    Var {
        name: "FIRST_CHUNK_WAIT_MS",
        section: Section::Assistant,
        default: "400",
        help: "Once an answer's first text is this old and its first sentence (or a clause of 20 characters) has not ended, the words so far are spoken as the first chunk, so a slowly written long first sentence does not delay the first audio. `0`: the first chunk waits for its sentence end or clause.",
        parse: |c, v| {
            v.ms()
                .map(|d| c.assistant.first_chunk_wait = (!d.is_zero()).then_some(d))
        },
    },
    // Engines
    Var {
        name: "DUPLEX_PROVIDERS",
        section: Section::Engines,
        default: "local",
        help: "Engine set of every engine not given a cloud key or a `*_PROVIDER`: `local` (the embedded offline engines), `scripted` (deterministic test stand-ins) or `echo` (transport test: one binary frame back per frame in, after the audio front end processed it).",
        parse: |c, v| {
            v.one_of(&[
                ("local", ProviderMode::Local),
                ("scripted", ProviderMode::Scripted),
                ("echo", ProviderMode::Echo),
            ])
            .map(|m| c.engines.providers = m)
        },
    },
    Var {
        name: "DUPLEX_MODELS_DIR",
        section: Section::Engines,
        default: "models",
        help: "Directory of the local engines' models, as `scripts/setup-models.sh` installs them.",
        parse: |c, v| v.text().map(|d| c.engines.models_dir = d.into()),
    },
    Var {
        name: "LOCAL_LLM_MODEL",
        section: Section::Engines,
        default: "qwen2.5-0.5b",
        help: "Local language model: `qwen2.5-0.5b` (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) or `smollm2-135m` (SmolLM2-135M-Instruct: faster, weaker answers).",
        parse: |c, v| {
            v.one_of(&[
                ("qwen2.5-0.5b", duplex_local::LlmChoice::Qwen05b),
                ("smollm2-135m", duplex_local::LlmChoice::SmolLm135m),
            ])
            .map(|m| c.engines.local_llm = m)
        },
    },
    Var {
        name: "LOCAL_LLM_ENGINE",
        section: Section::Engines,
        default: "llama",
        help: "Engine of the local language model: `llama` (llama.cpp with continuous batching: several conversations decode together, each keeps its KV cache), `llama-serial` (llama.cpp, one answer at a time: the engine before batching, for comparison) or `candle` (pure Rust, slower).",
        parse: |c, v| {
            v.one_of(&[
                ("llama", duplex_local::LlmEngine::Llama),
                ("llama-serial", duplex_local::LlmEngine::LlamaSerial),
                ("candle", duplex_local::LlmEngine::Candle),
            ])
            .map(|e| c.engines.local_llm_engine = e)
        },
    },
    Var {
        name: "LOCAL_LLM_MAX_TOKENS",
        section: Section::Engines,
        default: "120",
        help: "Longest local LLM answer in tokens.",
        parse: |c, v| v.at_least(1).map(|n| c.engines.local_llm_max_tokens = n),
    },
    Var {
        name: "LOCAL_LLM_MAX_SEQUENCES",
        section: Section::Engines,
        default: "4",
        help: "Local LLM (`llama`): answers decoded together in one batch; further turns wait in a queue (never refused). Each costs `LOCAL_LLM_CONTEXT_TOKENS` x ~12 KiB of KV cache with the default model.",
        parse: |c, v| v.at_least(1).map(|n| c.engines.local_llm_max_sequences = n),
    },
    Var {
        name: "LOCAL_LLM_CONTEXT_TOKENS",
        section: Section::Engines,
        default: "2048",
        help: "Local LLM (`llama`): KV cache tokens per conversation, prompt and answer together (older history is cut from the front beyond it).",
        parse: |c, v| {
            v.at_least(256)
                .map(|n| c.engines.local_llm_context_tokens = n)
        },
    },
    Var {
        name: "LOCAL_OVERLAP_STEPS",
        section: Section::Engines,
        default: "on",
        help: "Local engines: `on`, each step takes the cores it runs on (an LLM step every core, a Piper sentence one, a Whisper step one or all), so a sentence of speech or a transcription runs beside another on the second core; `off`, every step takes the whole machine, one at a time across Whisper, the LLM and Piper (the behaviour before, for comparison).",
        parse: |c, v| {
            v.one_of(&[("on", true), ("off", false)])
                .map(|on| c.engines.local_overlap_steps = on)
        },
    },
    Var {
        name: "SCRIPTED_LLM_FIRST_TOKEN_MS",
        section: Section::Engines,
        default: "150",
        help: "Scripted LLM: delay to the first token.",
        parse: |c, v| v.ms().map(|d| c.engines.scripted_llm_first_token = d),
    },
    Var {
        name: "SCRIPTED_LLM_TOKEN_MS",
        section: Section::Engines,
        default: "16",
        help: "Scripted LLM: delay between tokens.",
        parse: |c, v| v.ms().map(|d| c.engines.scripted_llm_token_interval = d),
    },
    Var {
        name: "SCRIPTED_TTS_LATENCY_MS",
        section: Section::Engines,
        default: "80",
        help: "Scripted TTS: delay to the first audio of each chunk.",
        parse: |c, v| v.ms().map(|d| c.engines.scripted_tts_latency = d),
    },
    // Cloud providers (crates/duplex-providers; README "Cloud providers").
    Var {
        name: "STT_PROVIDER",
        section: Section::Cloud,
        default: "",
        help: "Speech recognition: `deepgram`, `openai` (non-streaming transcription), `local` (Whisper tiny.en) or `scripted`; unset: Deepgram if `DEEPGRAM_API_KEY` is set, else OpenAI if `OPENAI_API_KEY` is set, else the `DUPLEX_PROVIDERS` set.",
        parse: |c, v| {
            v.choice(&[
                ("deepgram", SttEngine::Deepgram),
                ("openai", SttEngine::OpenAi),
                ("local", SttEngine::Local),
                ("scripted", SttEngine::Scripted),
            ])
            .map(|e| c.engines.cloud.stt = e.unwrap_or(SttEngine::Default))
        },
    },
    Var {
        name: "LLM_PROVIDER",
        section: Section::Cloud,
        default: "",
        help: "Language model: `openai` (the router over `OPENAI_*` and `LLM_ENDPOINTS`), `local` (`LOCAL_LLM_MODEL`) or `scripted`; unset: `openai` if `OPENAI_API_KEY`, `OPENAI_BASE_URL` or `LLM_ENDPOINTS` is set, else the `DUPLEX_PROVIDERS` set.",
        parse: |c, v| {
            v.choice(&[
                ("openai", LlmEngine::OpenAi),
                ("local", LlmEngine::Local),
                ("scripted", LlmEngine::Scripted),
            ])
            .map(|e| c.engines.cloud.llm = e.unwrap_or(LlmEngine::Default))
        },
    },
    Var {
        name: "TTS_PROVIDER",
        section: Section::Cloud,
        default: "",
        help: "Speech synthesis: `azure`, `elevenlabs`, `openai`, `local` (the Piper voice en_US-joe-medium), `espeak` (espeak-ng: robotic, instant) or `scripted`; unset: the first of those whose key is set, else the `DUPLEX_PROVIDERS` set.",
        parse: |c, v| {
            v.choice(&[
                ("azure", TtsEngine::Azure),
                ("elevenlabs", TtsEngine::ElevenLabs),
                ("openai", TtsEngine::OpenAi),
                ("local", TtsEngine::Local),
                ("espeak", TtsEngine::Espeak),
                ("scripted", TtsEngine::Scripted),
            ])
            .map(|e| c.engines.cloud.tts = e.unwrap_or(TtsEngine::Default))
        },
    },
    Var {
        name: "OPENAI_API_KEY",
        section: Section::Cloud,
        default: "",
        help: "OpenAI (or compatible) API key: LLM endpoint `openai`, OpenAI TTS and transcription.",
        parse: |c, v| v.opt().map(|k| c.engines.cloud.openai_api_key = k),
    },
    Var {
        name: "OPENAI_BASE_URL",
        section: Section::Cloud,
        default: "https://api.openai.com/v1",
        help: "Base URL with the version prefix of the `openai` endpoint (any OpenAI-compatible server; `http://` accepted); setting it alone adds a keyless `openai` endpoint (local servers).",
        parse: |c, v| v.url(ANY_URL).map(|u| c.engines.cloud.openai_base_url = u),
    },
    Var {
        name: "OPENAI_MODEL",
        section: Section::Cloud,
        default: "gpt-4o-mini",
        help: "Chat model of the `openai` LLM endpoint.",
        parse: |c, v| v.text().map(|m| c.engines.cloud.openai_model = m),
    },
    Var {
        name: "OPENAI_TTS_MODEL",
        section: Section::Cloud,
        default: "gpt-4o-mini-tts",
        help: "OpenAI speech model (`/audio/speech`, 24 kHz PCM).",
        parse: |c, v| v.text().map(|m| c.engines.cloud.openai_tts_model = m),
    },
    Var {
        name: "OPENAI_TTS_VOICE",
        section: Section::Cloud,
        default: "alloy",
        help: "OpenAI voice when the session names none.",
        parse: |c, v| v.text().map(|m| c.engines.cloud.openai_tts_voice = m),
    },
    Var {
        name: "OPENAI_STT_MODEL",
        section: Section::Cloud,
        default: "whisper-1",
        help: "OpenAI transcription model (`/audio/transcriptions`).",
        parse: |c, v| v.text().map(|m| c.engines.cloud.openai_stt_model = m),
    },
    Var {
        name: "LLM_ENDPOINTS",
        section: Section::Cloud,
        default: "",
        help: "Extra OpenAI-compatible endpoints, `;`-separated `name|base_url|model|api_key` (key optional), e.g. `groq|https://api.groq.com/openai/v1|llama-3.1-8b-instant|gsk_…`.",
        parse: |c, v| parse_llm_endpoints(v.raw).map(|e| c.engines.cloud.llm_endpoints = e),
    },
    Var {
        name: "LLM_ROUTES",
        section: Section::Cloud,
        default: "",
        help: "Routing rules, `;`-separated `CONDITIONS => endpoint,endpoint` with conditions `plan=NAME`, `tokens>N` (also `>=`, `<`, `<=`; estimated as characters/4), `budget<USD`, `*`, joined by `&`; first match wins; unset: every endpoint in order (`openai` first).",
        parse: |c, v| {
            duplex_providers::router::parse_routes(v.raw)
                .map(|r| c.engines.cloud.llm_routes = r)
                .map_err(Invalid::from)
        },
    },
    Var {
        name: "LLM_FIRST_TOKEN_TIMEOUT_MS",
        section: Section::Cloud,
        default: "5000",
        help: "No first token within this (connect included): fail over to the next endpoint.",
        parse: |c, v| v.ms().map(|d| c.engines.cloud.llm_first_token_timeout = d),
    },
    Var {
        name: "LLM_IDLE_TIMEOUT_MS",
        section: Section::Cloud,
        default: "10000",
        help: "After the first token, no next token within this (SSE keep-alive comments do not count) ends the answer with `llm_error` (no failover: the start was already spoken).",
        parse: |c, v| v.ms().map(|d| c.engines.cloud.llm_idle_timeout = d),
    },
    Var {
        name: "PROVIDER_CONNECT_TIMEOUT_MS",
        section: Section::Cloud,
        default: "5000",
        help: "Cloud providers: TCP and TLS setup, and for Deepgram and ElevenLabs the WebSocket handshake; past it the stage fails.",
        parse: |c, v| v.ms().map(|d| c.engines.cloud.connect_timeout = d),
    },
    Var {
        name: "PROVIDER_READ_TIMEOUT_MS",
        section: Section::Cloud,
        default: "15000",
        help: "HTTP providers (LLM endpoints, OpenAI and Azure TTS, OpenAI transcription): no byte within this, before the response headers or between two pieces of the body, fails the stage.",
        parse: |c, v| v.ms().map(|d| c.engines.cloud.read_timeout = d),
    },
    Var {
        name: "PROVIDER_SEND_TIMEOUT_MS",
        section: Section::Cloud,
        default: "5000",
        help: "WebSocket providers (Deepgram audio, ElevenLabs text): a frame the provider has not taken within this (it stopped reading) fails the stream.",
        parse: |c, v| v.ms().map(|d| c.engines.cloud.send_timeout = d),
    },
    Var {
        name: "ELEVENLABS_RESPONSE_TIMEOUT_MS",
        section: Section::Cloud,
        default: "10000",
        help: "ElevenLabs sending nothing this long while audio is owed (before the first audio, or between two messages) fails the turn's speech.",
        parse: |c, v| {
            v.ms()
                .map(|d| c.engines.cloud.elevenlabs_response_timeout = d)
        },
    },
    Var {
        name: "OPENAI_STT_TIMEOUT_MS",
        section: Section::Cloud,
        default: "15000",
        help: "OpenAI transcription: the whole request of one utterance (upload, recognition, answer) must finish within this, however the answer trickles.",
        parse: |c, v| v.ms().map(|d| c.engines.cloud.openai_stt_timeout = d),
    },
    Var {
        name: "LLM_RETRIES",
        section: Section::Cloud,
        default: "1",
        help: "Extra passes over the endpoint chain (with exponential backoff and jitter) when every endpoint failed before the first token; at most 10.",
        parse: |c, v| {
            v.num::<u64>()
                .map(|n| c.engines.cloud.llm_retries = n.min(10) as u32)
        },
    },
    Var {
        name: "LLM_BREAKER_FAILURES",
        section: Section::Cloud,
        default: "3",
        help: "Consecutive failures that open an endpoint's circuit breaker.",
        parse: |c, v| {
            v.at_least(1)
                .map(|n| c.engines.cloud.llm_breaker_failures = n)
        },
    },
    Var {
        name: "LLM_BREAKER_COOLDOWN_SECS",
        section: Section::Cloud,
        default: "30",
        help: "How long an open breaker skips its endpoint before it lets one probe request through.",
        parse: |c, v| v.secs().map(|d| c.engines.cloud.llm_breaker_cool_down = d),
    },
    Var {
        name: "LLM_CACHE_TTL_SECS",
        section: Section::Cloud,
        default: "0",
        help: "Cache identical (endpoint, model, prompt) answers this long; `0`: no cache.",
        parse: |c, v| {
            v.secs()
                .map(|d| c.engines.cloud.llm_cache_ttl = (!d.is_zero()).then_some(d))
        },
    },
    Var {
        name: "DEEPGRAM_API_KEY",
        section: Section::Cloud,
        default: "",
        help: "Deepgram API key (live streaming STT).",
        parse: |c, v| v.opt().map(|k| c.engines.cloud.deepgram_api_key = k),
    },
    Var {
        name: "DEEPGRAM_BASE_URL",
        section: Section::Cloud,
        default: "wss://api.deepgram.com",
        help: "Deepgram base URL (`ws://`, `http(s)://` accepted).",
        parse: |c, v| {
            v.url(ANY_URL)
                .map(|u| c.engines.cloud.deepgram_base_url = u)
        },
    },
    Var {
        name: "DEEPGRAM_MODEL",
        section: Section::Cloud,
        default: "nova-3",
        help: "Deepgram model.",
        parse: |c, v| v.text().map(|m| c.engines.cloud.deepgram_model = m),
    },
    Var {
        name: "ELEVENLABS_API_KEY",
        section: Section::Cloud,
        default: "",
        help: "ElevenLabs API key (stream-input WebSocket TTS).",
        parse: |c, v| v.opt().map(|k| c.engines.cloud.elevenlabs_api_key = k),
    },
    Var {
        name: "ELEVENLABS_VOICE_ID",
        section: Section::Cloud,
        default: "21m00Tcm4TlvDq8ikWAM",
        help: "ElevenLabs voice when the session names none (default: the premade voice Rachel).",
        parse: |c, v| v.text().map(|id| c.engines.cloud.elevenlabs_voice_id = id),
    },
    Var {
        name: "ELEVENLABS_BASE_URL",
        section: Section::Cloud,
        default: "wss://api.elevenlabs.io",
        help: "ElevenLabs base URL (`ws://`, `http(s)://` accepted).",
        parse: |c, v| {
            v.url(ANY_URL)
                .map(|u| c.engines.cloud.elevenlabs_base_url = u)
        },
    },
    Var {
        name: "ELEVENLABS_MODEL",
        section: Section::Cloud,
        default: "eleven_flash_v2_5",
        help: "ElevenLabs model (`model_id`).",
        parse: |c, v| v.text().map(|m| c.engines.cloud.elevenlabs_model = m),
    },
    Var {
        name: "AZURE_SPEECH_KEY",
        section: Section::Cloud,
        default: "",
        help: "Azure Speech resource key (REST TTS).",
        parse: |c, v| v.opt().map(|k| c.engines.cloud.azure_speech_key = k),
    },
    Var {
        name: "AZURE_SPEECH_REGION",
        section: Section::Cloud,
        default: "",
        help: "Azure region, e.g. `westeurope`; required with `AZURE_SPEECH_KEY` unless `AZURE_SPEECH_ENDPOINT` is set.",
        parse: |c, v| v.text().map(|r| c.engines.cloud.azure_speech_region = r),
    },
    Var {
        name: "AZURE_SPEECH_ENDPOINT",
        section: Section::Cloud,
        default: "",
        help: "Overrides `https://{region}.tts.speech.microsoft.com` (`http://` accepted).",
        parse: |c, v| v.opt().map(|e| c.engines.cloud.azure_speech_endpoint = e),
    },
    Var {
        name: "AZURE_SPEECH_VOICE",
        section: Section::Cloud,
        default: "en-US-AvaMultilingualNeural",
        help: "Azure voice when the session names none.",
        parse: |c, v| {
            v.text()
                .map(|voice| c.engines.cloud.azure_speech_voice = voice)
        },
    },
    Var {
        name: "PROVIDER_PRICES",
        section: Section::Cloud,
        default: "",
        help: "Price overrides, `provider/model:kind=usd[,…][;…]`, per minute for `stt_seconds`, per million for `llm_prompt_tokens`, `llm_completion_tokens` and `tts_characters`; the defaults are list-price estimates of mid-2025.",
        parse: |c, v| {
            let mut prices = duplex_providers::PriceTable::defaults();
            prices
                .apply_overrides(v.raw)
                .map_err(|e| Invalid::from(e.to_string()))?;
            c.engines.cloud.prices = prices;
            Ok(())
        },
    },
    // Auth
    Var {
        name: "JWT_SECRET",
        section: Section::Auth,
        default: "",
        help: "HS256 secret of bearer JWTs (self-hosting). Setting it, `JWT_JWKS_URL` or `CLERK_SECRET_KEY` turns anonymous dev mode off.",
        parse: |c, v| v.opt().map(|s| c.auth.jwt_secret = s.map(Secret)),
    },
    Var {
        name: "JWT_JWKS_URL",
        section: Section::Auth,
        default: "",
        help: "JWKS URL of an identity provider (Clerk, Auth0, …) for RS256 JWTs; keys cached by `kid`, refetched on an unknown `kid` (at most every 30 s) and every 10 min.",
        parse: |c, v| v.opt().map(|u| c.auth.jwt_jwks_url = u),
    },
    Var {
        name: "CLERK_SECRET_KEY",
        section: Section::Auth,
        default: "",
        help: "Clerk secret key (`sk_live_…`/`sk_test_…`): session tokens are verified against the instance's JWKS, fetched from Clerk's Backend API with this key (see \"Using Clerk\"); ignored when `JWT_JWKS_URL` is set. Turns anonymous dev mode off.",
        parse: |c, v| v.opt().map(|s| c.auth.clerk_secret_key = s.map(Secret)),
    },
    Var {
        name: "CLERK_API_URL",
        section: Section::Auth,
        default: "https://api.clerk.com",
        help: "Base URL of Clerk's Backend API (the JWKS is `{base}/v1/jwks`); for tests or a proxy.",
        parse: |c, v| {
            v.url(HTTP_URL)
                .map(|u| c.auth.clerk_api_url = u.trim_end_matches('/').to_owned())
        },
    },
    Var {
        name: "JWT_ISSUER",
        section: Section::Auth,
        default: "",
        help: "Required `iss` claim of tokens; unset: not checked.",
        parse: |c, v| v.opt().map(|s| c.auth.jwt_issuer = s),
    },
    Var {
        name: "JWT_AUDIENCE",
        section: Section::Auth,
        default: "",
        help: "Required `aud` claim of tokens; unset: not checked.",
        parse: |c, v| v.opt().map(|s| c.auth.jwt_audience = s),
    },
    Var {
        name: "ALLOWED_ORIGINS",
        section: Section::Auth,
        default: "",
        help: "Comma-separated `Origin`s (e.g. `https://app.example.com`) allowed to open sessions, 403 otherwise; empty: all. Requests without `Origin` (non-browser clients) are allowed.",
        parse: |c, v| {
            c.auth.allowed_origins = v
                .raw
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect();
            Ok(())
        },
    },
    Var {
        name: "METRICS_TOKEN",
        section: Section::Auth,
        default: "",
        help: "Bearer token `GET /metrics` requires (`Authorization: Bearer <token>`, 401 otherwise); unset: `/metrics` is open.",
        parse: |c, v| v.opt().map(|t| c.auth.metrics_token = t.map(Secret)),
    },
    // Plans, metering and kill switches
    Var {
        name: "ANONYMOUS_PLAN",
        section: Section::Metering,
        default: "",
        help: "Plan of anonymous sessions (no `JWT_SECRET`, `JWT_JWKS_URL` or `CLERK_SECRET_KEY`). Unset: `unmetered` on a loopback `BIND_ADDR` without `TRUSTED_PROXIES` (one user, `anonymous`), else `free`, each client IP (IPv6 /64) its own user `anon:<ip>`. Set `unmetered` to open a public server without limits on purpose (each client IP is still its own user).",
        parse: |c, v| v.opt().map(|p| c.metering.anonymous_plan = p),
    },
    Var {
        name: "PLAN_LIMITS",
        section: Section::Metering,
        default: "",
        help: "Plan limits `plan:key=value,…;plan:…` with keys `daily_seconds`, `trial_seconds`, `monthly_tts_characters`, `turns_per_minute` (a number or `unlimited`), overriding the defaults key by key: free 5,000 TTS characters a month and 5 turns a minute; pro 7,200 s a day, 50,000 characters, 30 turns a minute; business 28,800 s a day, 500,000 characters, 120 turns a minute. A new plan name starts unlimited.",
        parse: |c, v| {
            c.metering
                .plans
                .amend(v.raw)
                .map_err(|e| Invalid::from(e.to_string()))
        },
    },
    Var {
        name: "FREE_DAILY_LIMIT_SECONDS",
        section: Section::Metering,
        default: "600",
        help: "Free plan: seconds of conversation per UTC day, or `unlimited`.",
        parse: |c, v| {
            let seconds = match v.raw.trim() {
                "unlimited" => None,
                _ => Some(v.num().map_err(|_| "a whole number or `unlimited`")?),
            };
            c.metering.plans.set_free_daily_seconds(seconds);
            Ok(())
        },
    },
    Var {
        name: "FREE_TRIAL_SECONDS",
        section: Section::Metering,
        default: "0",
        help: "Free plan: one-time trial seconds on top of the daily allowance, used only for seconds beyond it; `0`: no trial.",
        parse: |c, v| v.num().map(|s| c.metering.plans.set_free_trial_seconds(s)),
    },
    Var {
        name: "USAGE_HEARTBEAT_SECS",
        section: Section::Metering,
        default: "5",
        help: "How often each session writes its usage to the store (a crash loses at most this much).",
        parse: |c, v| {
            v.at_least(1)
                .map(|s| c.metering.usage_heartbeat = Duration::from_secs(s))
        },
    },
    Var {
        name: "SESSION_REAP_AFTER_SECS",
        section: Section::Metering,
        default: "600",
        help: "An open session with no usage write for this long belongs to a server that crashed or was killed: any server closes its row (at start-up and every 5 minutes). Keep it many heartbeats long.",
        parse: |c, v| {
            v.at_least(1)
                .map(|s| c.metering.session_reap_after = Duration::from_secs(s))
        },
    },
    Var {
        name: "AI_GENERATION_ENABLED",
        section: Section::Metering,
        default: "true",
        help: "Kill switch: `false` denies every assistant turn (`generation_disabled`) and refuses new sessions.",
        parse: set_switch,
    },
    Var {
        name: "FREE_TIER_ENABLED",
        section: Section::Metering,
        default: "true",
        help: "Kill switch: `false` refuses users on the free plan.",
        parse: set_switch,
    },
    Var {
        name: "MAX_DAILY_SPEND_USD",
        section: Section::Metering,
        default: "",
        help: "Kill switch: generation stops for everyone once the UTC day's provider cost recorded in the store reaches this many USD; unset: no cap.",
        parse: set_switch,
    },
    Var {
        name: "DUPLEX_SWITCHES_FILE",
        section: Section::Metering,
        default: "",
        help: "File of `KEY=VALUE` lines for the three kill switches, re-read every 5 s (no restart needed); a bad file is logged and the last good switches stay.",
        parse: |c, v| {
            v.opt()
                .map(|p| c.metering.switches_file = p.map(PathBuf::from))
        },
    },
    // Store
    Var {
        name: "DUPLEX_DATA_DIR",
        section: Section::Store,
        default: "data",
        help: "Directory of the embedded SQLite database `duplex.db` (created on first run).",
        parse: |c, v| {
            c.store.data_dir = PathBuf::from(v.raw);
            Ok(())
        },
    },
    Var {
        name: "DATABASE_URL",
        section: Section::Store,
        default: "",
        help: "The store: `postgres://user:pass@host/db` for production (several servers may share one), or `sqlite://PATH?mode=rwc`; unset: SQLite in `DUPLEX_DATA_DIR`.",
        parse: |c, v| {
            let url = v.raw.trim();
            if !url.is_empty() {
                duplex_store::Backend::from_url(url).map_err(|e| Invalid::secret(e.to_string()))?;
            }
            c.store.database_url = url.to_owned();
            Ok(())
        },
    },
    // Billing
    Var {
        name: "STRIPE_WEBHOOK_SECRET",
        section: Section::Billing,
        default: "",
        help: "Signing secret (`whsec_…`) of the Stripe webhook endpoint; unset: the endpoint answers 503.",
        parse: |c, v| {
            c.billing.stripe_webhook_secret = WebhookSecret::new(v.raw);
            Ok(())
        },
    },
    Var {
        name: "STRIPE_PRICE_PLANS",
        section: Section::Billing,
        default: "",
        help: "Stripe price ids and the plans they grant, e.g. `price_abc:pro,price_def:business`.",
        parse: |c, v| {
            PricePlans::parse(v.raw)
                .map(|p| c.billing.stripe_price_plans = p)
                .map_err(Invalid::from)
        },
    },
    Var {
        name: "STRIPE_WEBHOOK_PATH",
        section: Section::Billing,
        default: "/webhooks/stripe",
        help: "Path of the Stripe webhook endpoint (POST); not `/` or under `/assets/` while `WEB_CLIENT` is on.",
        parse: |c, v| {
            let path = v.raw.trim();
            if !path.starts_with('/') || path.contains(['{', '}', '*']) {
                return Err("a literal path starting with /".into());
            }
            c.billing.stripe_webhook_path = path.to_owned();
            Ok(())
        },
    },
];

/// Variables that deployments (`render.yaml`, `deploy/`) may declare besides [`VARS`]: read
/// outside [`Config`]. Today only `RUST_LOG` (`tracing-subscriber`'s `EnvFilter` in
/// `main.rs`). A test checks that deploy files name only [`VARS`] and these.
pub const RESERVED_VARS: &[&str] = &["RUST_LOG"];

/// Base URLs of vendors that speak HTTP or WebSocket.
const ANY_URL: &[&str] = &["http://", "https://", "ws://", "wss://"];
const HTTP_URL: &[&str] = &["http://", "https://"];

/// A kill switch; unset (only `MAX_DAILY_SPEND_USD` has no default) leaves it off.
fn set_switch(c: &mut Config, v: Value<'_>) -> Result<(), Invalid> {
    if v.raw.trim().is_empty() {
        return Ok(());
    }
    c.metering.switches.set(v.name, v.raw).map_err(|e| match e {
        duplex_metering::Error::Switch { reason, .. } => Invalid::from(reason),
        other => Invalid::from(other.to_string()),
    })
}

/// `LLM_ENDPOINTS`: `name|base_url|model|api_key;…`. Errors never show the value: it holds keys.
fn parse_llm_endpoints(spec: &str) -> Result<Vec<LlmEndpointConfig>, Invalid> {
    let mut endpoints: Vec<LlmEndpointConfig> = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let fields: Vec<&str> = entry.split('|').map(str::trim).collect();
        let [name, base_url, model, rest @ ..] = fields.as_slice() else {
            return Err(Invalid::secret(format!(
                "entry {:?}: expected name|base_url|model|api_key",
                entry.split('|').next().unwrap_or("")
            )));
        };
        if name.is_empty()
            || model.is_empty()
            || !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || rest.len() > 1
        {
            return Err(Invalid::secret(format!(
                "entry {name:?}: expected name|http(s)://base_url|model|api_key"
            )));
        }
        if endpoints.iter().any(|e| e.name == *name) {
            return Err(Invalid::secret(format!(
                "endpoint name {name:?} is used twice"
            )));
        }
        endpoints.push(LlmEndpointConfig {
            name: name.to_string(),
            base_url: base_url.to_string(),
            model: model.to_string(),
            api_key: rest.first().map(|k| k.to_string()).unwrap_or_default(),
        });
    }
    Ok(endpoints)
}

/// A variable's value (or its default) as its parser sees it. Every accessor returns a
/// `Result`, so a parser reads `v.secs().map(|d| c.section.field = d)`.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a> {
    pub name: &'static str,
    /// As set, untrimmed.
    pub raw: &'a str,
}

impl Value<'_> {
    /// The trimmed text.
    pub fn text(self) -> Result<String, Invalid> {
        Ok(self.raw.trim().to_owned())
    }

    /// The trimmed text; `None` when empty.
    pub fn opt(self) -> Result<Option<String>, Invalid> {
        Ok(Some(self.raw.trim().to_owned()).filter(|v| !v.is_empty()))
    }

    pub fn num<T: FromStr>(self) -> Result<T, Invalid>
    where
        T::Err: fmt::Display,
    {
        self.raw
            .trim()
            .parse()
            .map_err(|e: T::Err| e.to_string().into())
    }

    /// A whole number no smaller than `min`.
    pub fn at_least<T: FromStr + PartialOrd + fmt::Display>(self, min: T) -> Result<T, Invalid>
    where
        T::Err: fmt::Display,
    {
        let n = self.num()?;
        if n < min {
            return Err(format!("must be at least {min}").into());
        }
        Ok(n)
    }

    pub fn secs(self) -> Result<Duration, Invalid> {
        self.num().map(Duration::from_secs)
    }

    pub fn ms(self) -> Result<Duration, Invalid> {
        self.num().map(Duration::from_millis)
    }

    /// One of the listed spellings.
    pub fn one_of<T: Copy>(self, choices: &[(&str, T)]) -> Result<T, Invalid> {
        let v = self.raw.trim();
        choices
            .iter()
            .find(|(s, _)| *s == v)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<String> = choices.iter().map(|(s, _)| format!("`{s}`")).collect();
                format!("expected one of {}", names.join(", ")).into()
            })
    }

    /// An optional choice, case-insensitive; `None` when empty.
    pub fn choice<T: Copy>(self, choices: &[(&str, T)]) -> Result<Option<T>, Invalid> {
        let v = self.raw.trim().to_ascii_lowercase();
        if v.is_empty() {
            return Ok(None);
        }
        Value { raw: &v, ..self }.one_of(choices).map(Some)
    }

    /// A URL with one of the `schemes` (e.g. `"https://"`).
    pub fn url(self, schemes: &[&str]) -> Result<String, Invalid> {
        let v = self.raw.trim();
        if !schemes.iter().any(|s| v.starts_with(s)) {
            return Err(format!("expected a {} URL", schemes.join(" or ")).into());
        }
        Ok(v.to_owned())
    }
}

/// Why a value was refused.
#[derive(Debug)]
pub struct Invalid {
    reason: String,
    /// The value is kept out of the message (it holds a password or keys).
    secret: bool,
}

impl Invalid {
    /// A refusal whose message must not repeat the value.
    pub fn secret(reason: impl Into<String>) -> Invalid {
        Invalid {
            reason: reason.into(),
            secret: true,
        }
    }
}

impl From<String> for Invalid {
    fn from(reason: String) -> Invalid {
        Invalid {
            reason,
            secret: false,
        }
    }
}

impl From<&str> for Invalid {
    fn from(reason: &str) -> Invalid {
        Invalid::from(reason.to_owned())
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

impl ConfigError {
    fn new(name: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            name,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

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

impl Config {
    /// Parses the configuration from a variable lookup (the environment in `main`, a map in
    /// tests). Unset or empty variables take their default from [`VARS`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let set = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut config = Config::default();
        for var in VARS {
            let raw = set(var.name).unwrap_or_else(|| var.default.to_owned());
            let value = Value {
                name: var.name,
                raw: &raw,
            };
            (var.parse)(&mut config, value).map_err(|e| {
                let shown = if e.secret {
                    "<redacted>".into()
                } else {
                    raw.clone()
                };
                ConfigError::new(var.name, shown, e.reason)
            })?;
        }
        config.resolve(&set)?;
        Ok(config)
    }

    /// The rules that span variables, once each is parsed. `set` gives a variable's value
    /// only when it is set (non-empty), telling it from one at its default.
    fn resolve(&mut self, set: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if self.store.database_url.is_empty() {
            self.store.database_url = duplex_store::sqlite_url_in(&self.store.data_dir);
        }
        let path = &self.billing.stripe_webhook_path;
        if self.server.web_client && (path == "/" || path.starts_with("/assets/")) {
            return Err(ConfigError::new(
                "STRIPE_WEBHOOK_PATH",
                path,
                "a path other than / and /assets/… (the browser client's), or WEB_CLIENT=false",
            ));
        }
        let plans = &self.metering.plans;
        if let Some(plan) = &self.metering.anonymous_plan
            && plans.get(plan).is_none()
        {
            let known: Vec<&str> = plans.names().collect();
            return Err(ConfigError::new(
                "ANONYMOUS_PLAN",
                plan,
                format!("not a plan; known: {}", known.join(", ")),
            ));
        }
        self.engines.cloud.resolve(set)
    }

    /// Who anonymous sessions are and what they may use; `None` when auth is configured (no
    /// session is anonymous). Public means reachable by others: a bind address other than
    /// loopback, or trusted proxies in front (a proxy on the same host makes a loopback
    /// bind public). A public server without auth meters each client IP as its own user on
    /// `free` unless `ANONYMOUS_PLAN` says otherwise; a private one keeps the zero-config
    /// experience (one user, `unmetered`).
    pub fn anonymous_policy(&self) -> Option<AnonymousPolicy> {
        let a = &self.auth;
        if a.jwt_secret.is_some() || a.jwt_jwks_url.is_some() || a.clerk_secret_key.is_some() {
            return None;
        }
        let public =
            !self.server.bind_addr.is_loopback() || !self.limits.trusted_proxies.is_empty();
        let default = if public { "free" } else { "unmetered" };
        Some(AnonymousPolicy {
            public,
            per_client: public,
            plan: self
                .metering
                .anonymous_plan
                .clone()
                .unwrap_or_else(|| default.to_owned()),
            plan_chosen: self.metering.anonymous_plan.is_some(),
        })
    }

    /// The configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults, for tests: loopback, port 0 (the OS picks), scripted providers, a private
    /// in-memory SQLite store.
    pub fn for_tests() -> Config {
        let mut c = Config::from_lookup(|_| None).expect("defaults are valid");
        c.server.bind_addr = IpAddr::from([127, 0, 0, 1]);
        c.server.port = 0;
        // Tests open many connections from 127.0.0.1; the auth tests set their own limit.
        c.limits.connect_rate_per_min = 0;
        c.store.database_url = "sqlite::memory:".to_owned();
        // Tests that want the local engines ask for them.
        c.engines.providers = ProviderMode::Scripted;
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Help and docs, from the table
// ---------------------------------------------------------------------------------------------

/// Every variable with its default and meaning, grouped by section: the tail of
/// `duplex --help`.
pub fn help() -> String {
    const WIDTH: usize = 100;
    let intro = "Environment variables, by section. An unset or empty variable takes its \
                 default; --providers, --port and --bind override DUPLEX_PROVIDERS, PORT and \
                 BIND_ADDR.";
    let mut out = wrap(intro, WIDTH).join("\n") + "\n";
    for section in Section::ALL {
        out.push_str(&format!("\n{}:\n", section.title()));
        for var in VARS.iter().filter(|v| v.section == section) {
            out.push_str(&format!("  {}\n", var.name));
            let default = match var.default {
                "" => "unset".to_owned(),
                d => d.to_owned(),
            };
            for text in [var.help.to_owned(), format!("Default: {default}")] {
                for line in wrap(&text, WIDTH - 6) {
                    out.push_str(&format!("      {line}\n"));
                }
            }
        }
    }
    out
}

/// `text` in lines of at most `width` characters (a longer word gets its own line).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// The README's configuration tables: one per section.
pub fn markdown_table() -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::new();
    for section in Section::ALL {
        out.push_str(&format!(
            "\n**{}**\n\n| variable | default | meaning |\n|---|---|---|\n",
            section.title()
        ));
        for var in VARS.iter().filter(|v| v.section == section) {
            let default = match var.default {
                "" => "unset".to_owned(),
                d => format!("`{}`", cell(d)),
            };
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                var.name,
                default,
                cell(var.help)
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Cloud providers
// ---------------------------------------------------------------------------------------------

/// Which recognizer sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SttEngine {
    /// The `DUPLEX_PROVIDERS` set.
    #[default]
    Default,
    Deepgram,
    OpenAi,
    /// Whisper tiny.en on candle.
    Local,
    Scripted,
}

/// Which language model sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlmEngine {
    #[default]
    Default,
    /// The router over `OPENAI_*` and `LLM_ENDPOINTS`.
    OpenAi,
    /// The GGUF chat model of `LOCAL_LLM_MODEL`.
    Local,
    Scripted,
}

/// Which synthesizer sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtsEngine {
    #[default]
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

impl fmt::Debug for LlmEndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmEndpointConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Settings of the cloud adapters, the LLM router and cost accounting. Keys are kept out of
/// `Debug`.
#[derive(Clone, Default)]
pub struct CloudConfig {
    pub stt: SttEngine,
    pub llm: LlmEngine,
    pub tts: TtsEngine,
    pub openai_api_key: Option<String>,
    pub openai_base_url: String,
    /// Chat model of the `openai` endpoint.
    pub openai_model: String,
    pub openai_tts_model: String,
    pub openai_tts_voice: String,
    pub openai_stt_model: String,
    /// The router's endpoints in order: `openai` (when configured) then `LLM_ENDPOINTS`.
    pub llm_endpoints: Vec<LlmEndpointConfig>,
    pub llm_routes: Vec<duplex_providers::router::Route>,
    pub llm_first_token_timeout: Duration,
    /// The longest gap between two tokens after the first.
    pub llm_idle_timeout: Duration,
    /// TCP + TLS (+ WebSocket handshake) of every cloud provider.
    pub connect_timeout: Duration,
    /// HTTP providers: silence before the headers or between body pieces.
    pub read_timeout: Duration,
    /// WebSocket providers: one frame's write.
    pub send_timeout: Duration,
    pub elevenlabs_response_timeout: Duration,
    /// One OpenAI transcription, whole.
    pub openai_stt_timeout: Duration,
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

impl fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    /// Adds the `openai` endpoint, checks routes against the endpoints, and resolves each
    /// engine: the explicit `*_PROVIDER` (whose key must be set), else a vendor whose key is
    /// set, else `Default` (the `DUPLEX_PROVIDERS` set).
    fn resolve(&mut self, set: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let require = |key: &Option<String>, var: &'static str, why: &str| match key {
            Some(_) => Ok(()),
            None => Err(ConfigError::new(var, "", format!("required by {why}"))),
        };

        if self.openai_api_key.is_some() || set("OPENAI_BASE_URL").is_some() {
            if self.llm_endpoints.iter().any(|e| e.name == "openai") {
                return Err(ConfigError::new(
                    "LLM_ENDPOINTS",
                    "<redacted>",
                    "endpoint name \"openai\" is used twice",
                ));
            }
            self.llm_endpoints.insert(
                0,
                LlmEndpointConfig {
                    name: "openai".into(),
                    base_url: self.openai_base_url.clone(),
                    model: self.openai_model.clone(),
                    api_key: self.openai_api_key.clone().unwrap_or_default(),
                },
            );
        }
        for r in &self.llm_routes {
            for e in &r.chain {
                if !self.llm_endpoints.iter().any(|x| &x.name == e) {
                    return Err(ConfigError::new(
                        "LLM_ROUTES",
                        set("LLM_ROUTES").unwrap_or_default(),
                        format!("route names unknown endpoint {e:?}"),
                    ));
                }
            }
        }

        self.stt = match self.stt {
            SttEngine::Deepgram => {
                require(
                    &self.deepgram_api_key,
                    "DEEPGRAM_API_KEY",
                    "STT_PROVIDER=deepgram",
                )?;
                SttEngine::Deepgram
            }
            SttEngine::OpenAi => {
                require(
                    &self.openai_api_key,
                    "OPENAI_API_KEY",
                    "STT_PROVIDER=openai",
                )?;
                SttEngine::OpenAi
            }
            SttEngine::Default if self.deepgram_api_key.is_some() => SttEngine::Deepgram,
            SttEngine::Default if self.openai_api_key.is_some() => SttEngine::OpenAi,
            other => other,
        };
        self.llm = match self.llm {
            LlmEngine::OpenAi => {
                if self.llm_endpoints.is_empty() {
                    require(
                        &self.openai_api_key,
                        "OPENAI_API_KEY",
                        "LLM_PROVIDER=openai (or set LLM_ENDPOINTS)",
                    )?;
                }
                LlmEngine::OpenAi
            }
            LlmEngine::Default if !self.llm_endpoints.is_empty() => LlmEngine::OpenAi,
            other => other,
        };
        let azure_ok = || {
            if self.azure_speech_endpoint.is_none() && self.azure_speech_region.is_empty() {
                return Err(ConfigError::new(
                    "AZURE_SPEECH_REGION",
                    "",
                    "required with AZURE_SPEECH_KEY unless AZURE_SPEECH_ENDPOINT is set",
                ));
            }
            Ok(())
        };
        self.tts = match self.tts {
            TtsEngine::Azure => {
                require(
                    &self.azure_speech_key,
                    "AZURE_SPEECH_KEY",
                    "TTS_PROVIDER=azure",
                )?;
                azure_ok()?;
                TtsEngine::Azure
            }
            TtsEngine::ElevenLabs => {
                require(
                    &self.elevenlabs_api_key,
                    "ELEVENLABS_API_KEY",
                    "TTS_PROVIDER=elevenlabs",
                )?;
                TtsEngine::ElevenLabs
            }
            TtsEngine::OpenAi => {
                require(
                    &self.openai_api_key,
                    "OPENAI_API_KEY",
                    "TTS_PROVIDER=openai",
                )?;
                TtsEngine::OpenAi
            }
            TtsEngine::Default if self.azure_speech_key.is_some() => {
                azure_ok()?;
                TtsEngine::Azure
            }
            TtsEngine::Default if self.elevenlabs_api_key.is_some() => TtsEngine::ElevenLabs,
            TtsEngine::Default if self.openai_api_key.is_some() => TtsEngine::OpenAi,
            other => other,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests;
