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
        default: "scripted",
        help: "Engine set: `scripted` (deterministic test stand-ins) or `echo` (transport test).",
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
        default: "You are a helpful voice assistant. Answer in short spoken sentences, without markdown.",
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
];

/// Variables that deployments (`render.yaml`, `deploy/`) already declare as secrets or
/// settings for features that are not built yet: this version's [`Config`] does not read
/// them. `RUST_LOG` is the one exception that is read, by `tracing-subscriber`'s `EnvFilter`
/// in `main.rs`, outside `Config`. A test checks that deploy files name only [`VARS`] and
/// these.
pub const RESERVED_VARS: &[&str] = &[
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_MODEL",
    "DEEPGRAM_API_KEY",
    "DEEPGRAM_BASE_URL",
    "ELEVENLABS_API_KEY",
    "ELEVENLABS_VOICE_ID",
    "ELEVENLABS_BASE_URL",
    "AZURE_SPEECH_KEY",
    "AZURE_SPEECH_REGION",
    "AZURE_SPEECH_ENDPOINT",
    "TTS_PROVIDER",
    "STT_PROVIDER",
    "LLM_PROVIDER",
    "DUPLEX_MODELS_DIR",
    "DATABASE_URL",
    "JWT_SECRET",
    "JWT_JWKS_URL",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PRICE_PLANS",
    "FREE_DAILY_LIMIT_SECONDS",
    "FREE_TRIAL_SECONDS",
    "AI_GENERATION_ENABLED",
    "FREE_TIER_ENABLED",
    "MAX_DAILY_SPEND_USD",
    "RUST_LOG",
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
