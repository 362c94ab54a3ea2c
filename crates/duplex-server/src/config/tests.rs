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
    assert_eq!(c.server.port, 10000);
    assert_eq!(c.engines.providers, ProviderMode::Local);
    assert_eq!(c.assistant.audio_lead, Duration::from_millis(300));
    assert_eq!(
        c.assistant.first_chunk_wait,
        Some(Duration::from_millis(400))
    );
    let c = parse(&[("FIRST_CHUNK_WAIT_MS", "0")]).unwrap();
    assert_eq!(c.assistant.first_chunk_wait, None);
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
    assert_eq!(c.store.database_url, "sqlite://data/duplex.db?mode=rwc");
    assert!(c.billing.stripe_webhook_secret.is_none());
    assert_eq!(c.billing.stripe_webhook_path, "/webhooks/stripe");
    let c = parse(&[("DUPLEX_DATA_DIR", "/var/lib/duplex")]).unwrap();
    assert_eq!(
        c.store.database_url,
        "sqlite:///var/lib/duplex/duplex.db?mode=rwc"
    );
    let c = parse(&[
        ("DATABASE_URL", "postgres://duplex@db/duplex"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_abc"),
        ("STRIPE_PRICE_PLANS", "price_abc:pro,price_def:business"),
    ])
    .unwrap();
    assert_eq!(c.store.database_url, "postgres://duplex@db/duplex");
    assert!(c.billing.stripe_webhook_secret.is_some());
    assert!(
        !format!("{c:?}").contains("whsec_abc"),
        "Debug hides the secret"
    );
    assert_eq!(
        c.billing.stripe_price_plans.plan_for("price_def"),
        Some("business")
    );
}

#[test]
fn cloud_engines_resolve_explicit_then_keys_then_default() {
    let c = parse(&[]).unwrap().engines.cloud;
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
    .engines
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
    .engines
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
    .engines
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
    assert_eq!(c.engines.cloud.tts, TtsEngine::Azure);
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
    let known = |name: &str| VARS.iter().any(|v| v.name == name) || RESERVED_VARS.contains(&name);
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

/// The README's configuration tables are [`markdown_table`] between two markers. After
/// changing [`VARS`], `UPDATE_README=1 cargo test -p duplex-server --lib readme` rewrites them.
#[test]
fn readme_configuration_tables_are_generated_from_the_table() {
    const BEGIN: &str = "<!-- BEGIN configuration tables: generated from VARS in crates/duplex-server/src/config.rs -->";
    const END: &str = "<!-- END configuration tables -->";
    let path = deploy_files::root().join("README.md");
    let readme = deploy_files::read(&path);
    let (before, rest) = readme
        .split_once(BEGIN)
        .unwrap_or_else(|| panic!("README.md: no line {BEGIN}"));
    let (_, after) = rest
        .split_once(END)
        .unwrap_or_else(|| panic!("README.md: no line {END}"));
    let expected = format!("{before}{BEGIN}\n{}\n{END}{after}", markdown_table());
    if readme == expected {
        return;
    }
    if std::env::var_os("UPDATE_README").is_some() {
        std::fs::write(&path, expected).expect("README.md is writable");
        return;
    }
    panic!(
        "README.md's configuration tables differ from VARS; run \
         `UPDATE_README=1 cargo test -p duplex-server --lib readme` and commit the result"
    );
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let help = help();
    for var in VARS {
        let at = help
            .find(&format!("\n  {}\n", var.name))
            .unwrap_or_else(|| panic!("--help lacks {}", var.name));
        let entry = &help[at..];
        let title = format!("\n{}:\n", var.section.title());
        assert!(
            help[..=at].contains(&title),
            "{} is not under {title:?}",
            var.name
        );
        let default = entry
            .find("Default: ")
            .map(|i| entry[i + 9..].split_whitespace().next().unwrap_or(""))
            .expect("every entry has a Default line");
        let first = var.default.split_whitespace().next().unwrap_or("unset");
        assert_eq!(default, first, "{}", var.name);
    }
    assert!(wrap("a b c", 3).iter().all(|l| l.len() <= 3));
}

#[test]
fn every_variable_is_named_once_and_every_section_has_variables() {
    for (i, v) in VARS.iter().enumerate() {
        assert!(
            !VARS[..i].iter().any(|w| w.name == v.name),
            "{} is in VARS twice",
            v.name
        );
        assert!(
            v.help.ends_with('.'),
            "{}: help is a sentence ending with a full stop",
            v.name
        );
    }
    for s in Section::ALL {
        assert!(VARS.iter().any(|v| v.section == s), "{s:?} has no variable");
    }
}

#[test]
fn secrets_stay_out_of_errors_and_debug() {
    let e = parse(&[("LLM_ENDPOINTS", "groq|ftp://x|m|gsk_secret")]).unwrap_err();
    assert_eq!(e.name, "LLM_ENDPOINTS");
    assert!(!e.to_string().contains("gsk_secret"), "{e}");
    let c = parse(&[
        ("JWT_SECRET", "jwt-s3cret"),
        ("METRICS_TOKEN", "scrape-s3cret"),
        ("OPENAI_API_KEY", "sk-s3cret"),
        ("DATABASE_URL", "postgres://duplex:s3cret@db/duplex"),
    ])
    .unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
}

#[test]
fn anonymous_sessions_are_limited_on_a_public_bind() {
    // Loopback, no proxies: the zero-config local experience.
    let c = parse(&[("BIND_ADDR", "127.0.0.1")]).unwrap();
    let a = c.anonymous_policy().unwrap();
    assert_eq!(
        (a.public, a.per_client, a.plan.as_str()),
        (false, false, "unmetered")
    );
    let c = parse(&[("BIND_ADDR", "::1")]).unwrap();
    assert!(!c.anonymous_policy().unwrap().public);
    // The default bind (0.0.0.0) is public: free, one user per client IP.
    let c = parse(&[]).unwrap();
    let a = c.anonymous_policy().unwrap();
    assert_eq!(
        (a.public, a.per_client, a.plan.as_str()),
        (true, true, "free")
    );
    assert!(!a.plan_chosen);
    // A loopback bind behind a proxy on the same host is public too.
    let c = parse(&[("BIND_ADDR", "127.0.0.1"), ("TRUSTED_PROXIES", "127.0.0.1")]).unwrap();
    assert_eq!(c.anonymous_policy().unwrap().plan, "free");
    // Opting in to an unlimited public server is explicit; clients stay separate users.
    let c = parse(&[("ANONYMOUS_PLAN", "unmetered")]).unwrap();
    let a = c.anonymous_policy().unwrap();
    assert_eq!(
        (a.per_client, a.plan.as_str(), a.plan_chosen),
        (true, "unmetered", true)
    );
    // With auth there are no anonymous sessions.
    let c = parse(&[("JWT_SECRET", "s")]).unwrap();
    assert_eq!(c.anonymous_policy(), None);
    let e = parse(&[("ANONYMOUS_PLAN", "gold")]).unwrap_err();
    assert_eq!(e.name, "ANONYMOUS_PLAN");
}

#[test]
fn trusted_proxies_parse_as_cidr_blocks() {
    let c = parse(&[("TRUSTED_PROXIES", " 10.0.0.0/8, fd00::/8 ,192.0.2.1 ")]).unwrap();
    let blocks: Vec<String> = c
        .limits
        .trusted_proxies
        .iter()
        .map(|b| format!("{}/{}", b.addr, b.prefix))
        .collect();
    assert_eq!(blocks, ["10.0.0.0/8", "fd00::/8", "192.0.2.1/32"]);
    assert!(parse(&[]).unwrap().limits.trusted_proxies.is_empty());
    let e = parse(&[("TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal")]).unwrap_err();
    assert_eq!(e.name, "TRUSTED_PROXIES");
    let e = parse(&[("CLIENT_IP_HEADER", "x-real-ip")]).unwrap_err();
    assert_eq!(e.name, "CLIENT_IP_HEADER");
    let c = parse(&[("CLIENT_IP_HEADER", "forwarded")]).unwrap();
    assert_eq!(c.limits.client_ip_header, ClientIpHeader::Forwarded);
}
