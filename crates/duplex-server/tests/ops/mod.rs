//! Operations: the deploy files and the monitoring files against the real server.
//!
//! - The binary started the way `deploy/` starts it (the Dockerfile's `ENV`, then the k8s
//!   ConfigMap and the Deployment's `env`, as Kubernetes layers them), as a non-root user, in a
//!   working directory it cannot write, with only the declared data volume writable: it must
//!   come up on the local engines and hold a spoken turn. Needs the models, so it is gated
//!   like the other local-engine tests by `DUPLEX_TEST_LOCAL=1` (set by `scripts/test.sh`).
//! - Every `duplex_*` metric named by the Grafana dashboard and the Prometheus rules is on a
//!   live server's `/metrics`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    let p = root().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `duplex_…` metric name in a text (histogram series reduced to their family).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("duplex_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        if !names.iter().any(|n| n == family) {
            names.push(family.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The PromQL expressions of the dashboard (`expr` of every target).
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/duplex.json")).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "the dashboard lost its panels");
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_owned()
        })
        .collect()
}

/// The `expr:` of every rule (block scalars included), by plain line reading.
fn rule_exprs() -> Vec<String> {
    let text = read("deploy/prometheus/alerts.yaml");
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(v) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        if v.trim() == "|" {
            let mut e = String::new();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() || next.len() - next.trim_start().len() > indent {
                    e.push_str(next);
                    e.push('\n');
                    lines.next();
                } else {
                    break;
                }
            }
            exprs.push(e);
        } else {
            exprs.push(v.trim().to_owned());
        }
    }
    assert!(exprs.len() >= 6, "alerts.yaml lost its rules: {exprs:?}");
    exprs
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported() {
    // A cloud LLM (the OpenAI fake) so that the router's failover and breaker series exist;
    // the other engines scripted.
    let openai = duplex_testkit::openai::OpenAiFake::start("sk-key", "Hello there.").await;
    let vars: HashMap<&str, String> = [
        ("OPENAI_API_KEY", "sk-key".to_owned()),
        ("OPENAI_BASE_URL", openai.base_url()),
        ("LLM_PROVIDER", "openai".to_owned()),
        ("STT_PROVIDER", "scripted".to_owned()),
        ("TTS_PROVIDER", "scripted".to_owned()),
    ]
    .into_iter()
    .collect();
    let parsed = Config::from_lookup(|k| vars.get(k).cloned()).expect("valid config");
    let mut config = test_config();
    config.engines.cloud = parsed.engines.cloud;
    let ts = TestServer::start(config).await;
    // One spoken turn: the cloud model's usage and cost reach the counters.
    let mut cfg = SessionConfig::new(ts.url());
    cfg.speed = 4.0;
    let report = run_session(&cfg, &[speech("What time is it?", 16000)]).await;
    assert!(report.ok, "{report:#?}");
    let (status, metrics) = ts.http("/metrics").await;
    assert_eq!(status, 200);
    let exported: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut missing = Vec::new();
    let mut checked = 0;
    for (file, exprs) in [
        ("deploy/grafana/duplex.json", dashboard_exprs()),
        ("deploy/prometheus/alerts.yaml", rule_exprs()),
    ] {
        for expr in &exprs {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{file}: no duplex metric in {expr}");
            for name in names {
                checked += 1;
                let found = exported.iter().any(|e| {
                    *e == name
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| e.strip_suffix(s) == Some(name.as_str()))
                });
                if !found {
                    missing.push(format!("{file}: {name}"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} names checked");
    assert!(
        missing.is_empty(),
        "not on /metrics: {missing:#?}\n{metrics}"
    );
    // Readiness and the router's series are live values, not just names.
    assert!(metrics.contains("duplex_ready 1"), "{metrics}");
    assert!(
        metrics.contains(r#"duplex_llm_breaker_open{endpoint="openai"} 0"#),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// The binary as the manifests start it
// ---------------------------------------------------------------------------------------------

/// The uid and gid of deploy/Dockerfile's `duplex` user (also `runAsUser` in deployment.yaml).
const DEPLOY_UID: u32 = 10001;

/// The environment a pod gets: the image's `ENV`, then the ConfigMap (`envFrom`), then the
/// container's `env`, later sources overriding earlier ones, as Kubernetes does. Empty values
/// stay empty (they override the image's value with "unset").
fn manifest_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(name, _)| name != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    let unquote = |v: &str| {
        let v = v.split(" #").next().unwrap_or("").trim();
        v.trim_matches('"').to_owned()
    };
    for line in read("deploy/Dockerfile").lines() {
        if let Some(pairs) = line.trim().strip_prefix("ENV ") {
            for pair in pairs.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV NAME=value");
                set(k, &unquote(v));
            }
        }
    }
    let configmap = read("deploy/k8s/configmap.yaml");
    let mut in_data = false;
    for line in configmap.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') {
            in_data = t == "data:";
        } else if in_data {
            let (k, v) = t.split_once(':').expect("a ConfigMap key");
            set(k.trim(), &unquote(v));
        }
    }
    // The Deployment's `env:` list: `- name: X` followed by `value: "Y"`.
    let deployment = read("deploy/k8s/deployment.yaml");
    let mut name = None;
    for line in deployment.lines() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- name: ") {
            name = Some(n.trim().to_owned());
        } else if let (Some(v), Some(n)) = (t.strip_prefix("value: "), name.take()) {
            set(&n, &unquote(v));
        }
    }
    env
}

/// A value of the manifests' environment.
fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// A mount point of deployment.yaml's container (`mountPath:` values).
fn mount_paths() -> Vec<String> {
    read("deploy/k8s/deployment.yaml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mountPath: "))
        .map(|p| p.trim().to_owned())
        .collect()
}

#[test]
fn the_manifests_select_real_engines_and_a_writable_data_volume() {
    let env = manifest_env();
    assert_ne!(get(&env, "DUPLEX_PROVIDERS"), Some("scripted"), "{env:?}");
    let render = read("render.yaml");
    assert!(
        !render.contains("value: scripted"),
        "render.yaml selects the scripted stand-ins"
    );
    // The data directory is a declared volume (k8s mount, Dockerfile VOLUME), and the models
    // directory is the image's.
    let data = get(&env, "DUPLEX_DATA_DIR").expect("DUPLEX_DATA_DIR is set");
    assert!(
        mount_paths().iter().any(|m| m == data),
        "{data} is not mounted"
    );
    let dockerfile = read("deploy/Dockerfile");
    assert!(
        dockerfile.contains(&format!(r#"VOLUME ["{data}"]"#)),
        "Dockerfile: no VOLUME {data}"
    );
    assert!(dockerfile.contains(&format!("install -d -o {DEPLOY_UID} -g {DEPLOY_UID}")));
    assert!(
        dockerfile.lines().any(
            |l| l.starts_with("WORKDIR ") && dockerfile.find(l) > dockerfile.find("AS runtime")
        )
    );
    let models = get(&env, "DUPLEX_MODELS_DIR").expect("DUPLEX_MODELS_DIR is set");
    assert!(dockerfile.contains(&format!("COPY --from=builder {models} {models}")));
    let deployment = read("deploy/k8s/deployment.yaml");
    assert!(deployment.contains(&format!("runAsUser: {DEPLOY_UID}")));
    assert!(deployment.contains("readOnlyRootFilesystem: true"));
}

/// Runs the `duplex` binary with only `env` set and waits at most 30 s for it to exit.
fn run_duplex(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let data = std::env::temp_dir().join(format!("duplex-cli-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(args)
        .env_clear()
        // Should the configuration be accepted after all, the server must not bind a public
        // port, load models or write to the working directory before the timeout kills it.
        .env("BIND_ADDR", "127.0.0.1")
        .env("PORT", "0")
        .env("DUPLEX_PROVIDERS", "echo")
        .env("DUPLEX_DATA_DIR", &data)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the duplex binary starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait for duplex").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("duplex {args:?} with {env:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&data);
    child.wait_with_output().expect("duplex's output")
}

#[test]
fn a_bad_value_exits_with_ex_usage_naming_the_variable() {
    for (name, value) in [
        ("PORT", "99999"),
        ("VAD_MODE", "7"),
        ("IDLE_TIMEOUT_SECS", "soon"),
        ("ANONYMOUS_PLAN", "gold"),
        ("TTS_PROVIDER", "azure"), // without AZURE_SPEECH_KEY, which the error names
    ] {
        let out = run_duplex(&[], &[(name, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}={value}: {stderr}");
        let named = if name == "TTS_PROVIDER" {
            "AZURE_SPEECH_KEY"
        } else {
            name
        };
        assert!(stderr.contains(named), "{name}={value}: {stderr}");
    }
    // A bad flag is a bad value too.
    let out = run_duplex(&["--providers", "magic"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DUPLEX_PROVIDERS"));
}

#[test]
fn help_lists_every_variable_by_section() {
    let out = run_duplex(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for section in duplex_server::config::Section::ALL {
        assert!(
            help.contains(&format!("\n{}:\n", section.title())),
            "{help}"
        );
    }
    for var in duplex_server::config::VARS {
        assert!(
            help.contains(&format!("\n  {}\n", var.name)),
            "{}",
            var.name
        );
    }
}

/// A copy of the test build's `duplex` binary where the deploy user can run it (the target
/// directory may sit in a home directory it cannot enter).
fn installed_binary(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("usr/local/bin/duplex");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_duplex"), &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown (running as root)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_started_as_the_manifests_say_holds_a_turn() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if std::env::var("DUPLEX_TEST_LOCAL").as_deref() != Ok("1") {
        eprintln!("skipped: set DUPLEX_TEST_LOCAL=1 after scripts/setup-models.sh --test-data");
        return;
    }
    let _engines = super::LOCAL_ENGINES.lock().await;
    let models = duplex_local::ModelDir::from_env().root().to_path_buf();
    let models = std::fs::canonicalize(&models).expect("the models directory exists");
    let env = manifest_env();
    // What the image and the pod provide, from the files themselves: the data volume (the
    // Dockerfile's VOLUME, mounted by the Deployment) and the models the image copies in.
    // Only these absolute paths are mapped to this machine; any other path stays as the
    // manifests say (a relative one lands in the read-only working directory).
    let dockerfile = read("deploy/Dockerfile");
    let data_mount = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("VOLUME [\""))
        .and_then(|l| l.split('"').next())
        .expect("the Dockerfile declares a VOLUME")
        .to_owned();
    assert!(
        mount_paths().contains(&data_mount),
        "{data_mount} not mounted in k8s"
    );
    let models_mount = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("COPY --from=builder /models "))
        .expect("the Dockerfile copies the models")
        .trim()
        .to_owned();

    // The "pod": a root-owned directory (world-readable), in it the binary, a working
    // directory nobody but root may write, and the data volume owned by the deploy user.
    let pod = std::env::temp_dir().join(format!("duplex-deploy-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pod);
    std::fs::create_dir_all(&pod).unwrap();
    std::fs::set_permissions(&pod, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = installed_binary(&pod);
    let workdir = pod.join("app");
    let data = pod.join("data");
    std::fs::create_dir_all(&workdir).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        chown(&data, DEPLOY_UID);
    } else {
        // Already unprivileged: take write permission away from the working directory.
        std::fs::set_permissions(&workdir, std::fs::Permissions::from_mode(0o555)).unwrap();
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let log_path = pod.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.env_clear().current_dir(&workdir);
    for (k, v) in &env {
        // The image's paths, mapped to this machine; the port, to a free one.
        let v = match k.as_str() {
            "PORT" => port.to_string(),
            _ if *v == data_mount => data.display().to_string(),
            _ if *v == models_mount => models.display().to_string(),
            _ => v.clone(),
        };
        cmd.env(k, v);
    }
    if root {
        cmd.uid(DEPLOY_UID).gid(DEPLOY_UID);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the duplex binary starts");
    let server_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    // Ready: loading the models takes seconds (debug build, shared cores: up to a minute).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the server exited during startup ({status}):\n{}",
                server_log()
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not listening within 120 s:\n{}",
            server_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(addr, "/readyz").await.0, 200);

    let question = "What is the capital of France?";
    let mut cfg = SessionConfig::new(format!("ws://{addr}/v1/conversation"));
    cfg.turn_timeout = Duration::from_secs(120);
    cfg.ready_timeout = Duration::from_secs(30);
    let report = run_session(&cfg, &[super::local::piper_speech(question)]).await;
    let log_text = server_log();
    assert!(report.ok, "{report:#?}\n{log_text}");
    let turn = &report.turns[0];
    assert_eq!(turn.outcome, TurnOutcome::Completed, "{turn:#?}");
    let heard = turn.user_transcript.as_deref().unwrap_or_default();
    assert!(
        heard.to_lowercase().contains("france"),
        "the local Whisper heard {heard:?}"
    );
    assert!(turn.assistant_audio_ms > 500, "{turn:#?}");
    // The local engines, not the scripted stand-ins.
    assert!(
        !log_text.contains("\"providers\":\"scripted\""),
        "{log_text}"
    );
    assert!(
        !turn
            .assistant_text
            .as_deref()
            .unwrap_or_default()
            .contains("scripted"),
        "{turn:#?}"
    );

    // Drain like a pod deletion: SIGTERM, then a clean exit within the grace period.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let grace: u64 = get(&env, "SHUTDOWN_GRACE_SECS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let deadline = std::time::Instant::now() + Duration::from_secs(grace + 5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}\n{}", server_log());

    // It wrote only to the data volume: the database is there, the working directory is empty.
    assert!(
        data.join("duplex.db").exists(),
        "no database in the data volume"
    );
    let written: Vec<_> = std::fs::read_dir(&workdir).unwrap().collect();
    assert!(
        written.is_empty(),
        "wrote into the working directory: {written:?}"
    );
    if root {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(data.join("duplex.db")).unwrap().uid();
        assert_eq!(
            owner, DEPLOY_UID,
            "the server did not run as the deploy user"
        );
    }
    let _ = std::fs::remove_dir_all(&pod);
}
