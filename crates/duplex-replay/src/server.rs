//! Watching the server during a run: its CPU time and peak memory from Linux's `/proc`, and
//! its counters from Prometheus `/metrics`, sampled before and after (and the gauges every
//! [`GAUGE_POLL`] in between), summarised as a [`ServerReport`].
//!
//! The parsing and arithmetic are pure functions over the text `/proc` and `/metrics` return
//! (tested on samples); [`ServerProbe`] only reads them. A figure the server does not expose
//! stays `None` (printed "n/a"), never guessed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Clock ticks per second of `utime`/`stime` in `/proc/PID/stat` (`USER_HZ`): 100 on every
/// mainstream Linux architecture, whatever the kernel's internal tick rate.
pub const USER_HZ: f64 = 100.0;
/// How often the gauges (answers decoding, batch size) are read during a run: often enough
/// to catch a batch that lasts a few seconds, rare enough that scraping costs nothing.
pub const GAUGE_POLL: Duration = Duration::from_millis(500);
/// A `/metrics` request on loopback answers in milliseconds; five seconds only trips on a
/// wedged server.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `/metrics` body read (a few hundred series are ~100 KiB).
const MAX_SCRAPE_BYTES: u64 = 4 * 1024 * 1024;

/// Tokens the local model processed (counter).
pub const LLM_TOKENS: &str = "duplex_local_llm_tokens_total";
/// Time turns waited for a local engine (histogram, label `engine`).
pub const QUEUE_WAIT: &str = "duplex_local_queue_wait_seconds";
/// Answers decoding together (gauge).
pub const ACTIVE_SEQUENCES: &str = "duplex_local_llm_active_sequences";
/// Sequences in the last decode step (gauge).
pub const BATCH_SIZE: &str = "duplex_local_llm_batch_size";
/// Provider usage (counter, labels `provider`, `model`, `kind`).
pub const PROVIDER_USAGE: &str = "duplex_provider_usage_total";

/// `utime + stime` of a process in clock ticks, from the text of `/proc/PID/stat`. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted after the
/// last `)`: state is field 3, utime 14, stime 15.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/PID/status` (`VmHWM`, `VmRSS`...), in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// CPU used between two samples as a percentage of one core (200 = both of two cores busy).
pub fn cpu_percent(ticks_before: u64, ticks_after: u64, wall: Duration) -> Option<f64> {
    let secs = wall.as_secs_f64();
    (secs > 0.0 && ticks_after >= ticks_before)
        .then(|| (ticks_after - ticks_before) as f64 / USER_HZ / secs * 100.0)
}

/// A sample's labels, `(name, value)` in the order written.
type Labels = Vec<(String, String)>;

/// One sample of the Prometheus text format: name, labels, value.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        // key="value" pairs; values may hold escaped quotes and commas.
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => value.push(match chars.next()?.1 {
                                'n' => '\n',
                                other => other,
                            }),
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
        rest = &inner[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// The sum of the samples named `name` whose labels include every pair of `labels`; `None`
/// when the text has no such sample (the server does not expose it).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for (n, have, v) in text.lines().filter_map(parse_sample) {
        let matches = n == name
            && labels
                .iter()
                .all(|(k, want)| have.iter().any(|(hk, hv)| hk == k && hv == want));
        if matches {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The samples named `name` summed per value of `label` (samples without it are skipped).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (n, have, v) in text.lines().filter_map(parse_sample) {
        if n != name {
            continue;
        }
        if let Some((_, value)) = have.iter().find(|(k, _)| k == label) {
            *out.entry(value.clone()).or_insert(0.0) += v;
        }
    }
    out
}

/// What the server did during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerReport {
    /// Wall time between the two samples.
    pub wall_s: f64,
    /// User + system CPU of the server process over the run, as % of one core.
    pub cpu_percent: Option<f64>,
    /// The process's peak resident memory since it started (`VmHWM`), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Increase of `duplex_local_llm_tokens_total` and that per second of the run.
    pub llm_tokens: Option<f64>,
    pub llm_tokens_per_s: Option<f64>,
    /// Increase of the local model's completion tokens in `duplex_provider_usage_total`
    /// (counted when an answer ends) and that per second of the run.
    pub answer_tokens: Option<f64>,
    pub answer_tokens_per_s: Option<f64>,
    /// Mean wait for a local engine over the run, per `engine` label, ms.
    pub queue_wait_mean_ms: BTreeMap<String, f64>,
    /// Highest `duplex_local_llm_active_sequences` / `duplex_local_llm_batch_size` read
    /// during the run (every [`GAUGE_POLL`]).
    pub max_active_sequences: Option<f64>,
    pub max_batch_size: Option<f64>,
}

/// One reading of the server: `/proc` and `/metrics` as text, `None` where unavailable.
#[derive(Debug, Clone)]
pub struct ProbeSample {
    pub at: Instant,
    pub stat: Option<String>,
    pub status: Option<String>,
    pub metrics: Option<String>,
}

/// Increase of a counter between two scrapes; `None` if either lacks it.
fn increase(
    before: Option<&str>,
    after: Option<&str>,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let a = metric_sum(after?, name, labels)?;
    let b = before
        .and_then(|t| metric_sum(t, name, labels))
        .unwrap_or(0.0);
    Some((a - b).max(0.0))
}

impl ServerReport {
    /// Compares two samples; `gauge_max` holds the highest gauges seen in between.
    pub fn between(
        before: &ProbeSample,
        after: &ProbeSample,
        gauge_max: &GaugeMax,
    ) -> ServerReport {
        let wall = after.at.saturating_duration_since(before.at);
        let wall_s = wall.as_secs_f64();
        let ticks = |s: &ProbeSample| s.stat.as_deref().and_then(stat_cpu_ticks);
        let cpu_percent = match (ticks(before), ticks(after)) {
            (Some(b), Some(a)) => cpu_percent(b, a, wall),
            _ => None,
        };
        let peak_rss_mib = after
            .status
            .as_deref()
            .and_then(|s| status_kib(s, "VmHWM"))
            .map(|kib| kib as f64 / 1024.0);
        let (mb, ma) = (before.metrics.as_deref(), after.metrics.as_deref());
        let per_s = |n: Option<f64>| n.filter(|_| wall_s > 0.0).map(|n| n / wall_s);
        let llm_tokens = increase(mb, ma, LLM_TOKENS, &[]);
        let local_completion = [("provider", "local"), ("kind", "llm_completion_tokens")];
        let answer_tokens = increase(mb, ma, PROVIDER_USAGE, &local_completion);
        let mut queue_wait_mean_ms = BTreeMap::new();
        if let Some(ma) = ma {
            let by = |t: &str, suffix: &str| {
                metric_by_label(t, &format!("{QUEUE_WAIT}{suffix}"), "engine")
            };
            let (sum_a, count_a) = (by(ma, "_sum"), by(ma, "_count"));
            let (sum_b, count_b) = mb
                .map(|t| (by(t, "_sum"), by(t, "_count")))
                .unwrap_or_default();
            for (engine, n) in &count_a {
                let n = n - count_b.get(engine).copied().unwrap_or(0.0);
                let sum = sum_a.get(engine).copied().unwrap_or(0.0)
                    - sum_b.get(engine).copied().unwrap_or(0.0);
                if n > 0.0 {
                    queue_wait_mean_ms.insert(engine.clone(), sum / n * 1000.0);
                }
            }
        }
        ServerReport {
            wall_s,
            cpu_percent,
            peak_rss_mib,
            llm_tokens,
            llm_tokens_per_s: per_s(llm_tokens),
            answer_tokens,
            answer_tokens_per_s: per_s(answer_tokens),
            queue_wait_mean_ms,
            max_active_sequences: gauge_max.active_sequences,
            max_batch_size: gauge_max.batch_size,
        }
    }
}

/// The highest gauges seen over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GaugeMax {
    pub active_sequences: Option<f64>,
    pub batch_size: Option<f64>,
}

impl GaugeMax {
    /// Folds in one `/metrics` scrape.
    pub fn observe(&mut self, metrics: &str) {
        let max = |slot: &mut Option<f64>, v: Option<f64>| {
            if let Some(v) = v {
                *slot = Some(slot.map_or(v, |s| s.max(v)));
            }
        };
        max(
            &mut self.active_sequences,
            metric_sum(metrics, ACTIVE_SEQUENCES, &[]),
        );
        max(&mut self.batch_size, metric_sum(metrics, BATCH_SIZE, &[]));
    }
}

/// Reads a server process (by pid, same machine) and its `/metrics` (by URL).
#[derive(Debug, Clone, Default)]
pub struct ServerProbe {
    pub pid: Option<u32>,
    /// `http://HOST:PORT/metrics` (plain HTTP, as the server serves it).
    pub metrics_url: Option<String>,
}

impl ServerProbe {
    /// Reads everything now; what cannot be read is `None`.
    pub async fn sample(&self) -> ProbeSample {
        let proc_file = |f: &str| {
            self.pid
                .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/{f}")).ok())
        };
        let (stat, status) = (proc_file("stat"), proc_file("status"));
        let metrics = self.scrape().await;
        ProbeSample {
            at: Instant::now(),
            stat,
            status,
            metrics,
        }
    }

    /// The `/metrics` text, or `None` (no URL, unreachable, not 200).
    pub async fn scrape(&self) -> Option<String> {
        let url = self.metrics_url.as_deref()?;
        match tokio::time::timeout(SCRAPE_TIMEOUT, http_get(url)).await {
            Ok(Ok(body)) => Some(body),
            Ok(Err(e)) => {
                tracing::warn!(%url, error = %e, "metrics scrape failed");
                None
            }
            Err(_) => {
                tracing::warn!(%url, "metrics scrape timed out");
                None
            }
        }
    }

    /// Scrapes every [`GAUGE_POLL`] until `stop` resolves, keeping the highest gauges.
    pub async fn watch_gauges(&self, stop: impl std::future::Future<Output = ()>) -> GaugeMax {
        let mut max = GaugeMax::default();
        if self.metrics_url.is_none() {
            stop.await;
            return max;
        }
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(GAUGE_POLL);
        loop {
            tokio::select! {
                () = &mut stop => return max,
                _ = tick.tick() => {
                    if let Some(text) = self.scrape().await {
                        max.observe(&text);
                    }
                }
            }
        }
    }
}

/// A plain HTTP/1.0 GET (the server closes after the response, so the body is read to the
/// end): enough for loopback `/metrics` without an HTTP client dependency.
async fn http_get(url: &str) -> std::io::Result<String> {
    let bad =
        |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{url}: {why}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// is supported"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    stream.take(MAX_SCRAPE_BYTES).read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(bad(&format!("HTTP status {status}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real /proc/PID/stat line, command name with a space and a parenthesis.
    const STAT: &str = "4242 (duplex (x) y) S 1 4242 4242 0 -1 4194560 51234 0 12 0 \
                        1234 567 0 0 20 0 9 0 1000 2000000000 120000 18446744073709551615";

    #[test]
    fn cpu_ticks_are_utime_plus_stime_counted_after_the_command_name() {
        assert_eq!(stat_cpu_ticks(STAT), Some(1234 + 567));
        assert_eq!(stat_cpu_ticks("4242 (duplex) S 1"), None);
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn cpu_percent_is_of_one_core() {
        // 150 ticks = 1.5 s of CPU over 1 s: one and a half cores.
        assert_eq!(cpu_percent(100, 250, Duration::from_secs(1)), Some(150.0));
        assert_eq!(cpu_percent(0, 50, Duration::from_secs(2)), Some(25.0));
        assert_eq!(cpu_percent(0, 50, Duration::ZERO), None);
        assert_eq!(cpu_percent(60, 50, Duration::from_secs(1)), None);
    }

    #[test]
    fn status_lines_in_kib() {
        let status =
            "Name:\tduplex\nVmPeak:\t 2000000 kB\nVmHWM:\t  812345 kB\nVmRSS:\t  700000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(812_345));
        assert_eq!(status_kib(status, "VmRSS"), Some(700_000));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    const METRICS_BEFORE: &str = r#"# HELP duplex_provider_usage_total Usage.
# TYPE duplex_provider_usage_total counter
duplex_provider_usage_total{kind="llm_completion_tokens",model="qwen",provider="local"} 100
duplex_provider_usage_total{kind="llm_prompt_tokens",model="qwen",provider="local"} 900
duplex_local_llm_tokens_total 1000
duplex_local_queue_wait_seconds_sum{engine="llm"} 1.5
duplex_local_queue_wait_seconds_count{engine="llm"} 3
duplex_local_queue_wait_seconds_bucket{engine="llm",le="+Inf"} 3
"#;
    const METRICS_AFTER: &str = r#"duplex_provider_usage_total{kind="llm_completion_tokens",model="qwen",provider="local"} 400
duplex_provider_usage_total{kind="llm_completion_tokens",model="gpt",provider="openai"} 77
duplex_provider_usage_total{kind="llm_prompt_tokens",model="qwen",provider="local"} 2000
duplex_local_llm_tokens_total 1600
duplex_local_queue_wait_seconds_sum{engine="llm"} 3.5
duplex_local_queue_wait_seconds_count{engine="llm"} 7
duplex_local_queue_wait_seconds_sum{engine="tts"} 0.2
duplex_local_queue_wait_seconds_count{engine="tts"} 4
duplex_local_llm_active_sequences 0
weird{a="x\"y,z",b="w"} +Inf
"#;

    #[test]
    fn prometheus_samples_by_name_and_labels() {
        let local = [("provider", "local"), ("kind", "llm_completion_tokens")];
        assert_eq!(
            metric_sum(METRICS_AFTER, PROVIDER_USAGE, &local),
            Some(400.0)
        );
        assert_eq!(metric_sum(METRICS_AFTER, PROVIDER_USAGE, &[]), Some(2477.0));
        assert_eq!(metric_sum(METRICS_AFTER, LLM_TOKENS, &[]), Some(1600.0));
        assert_eq!(
            metric_sum(METRICS_AFTER, "weird", &[("a", "x\"y,z")]),
            Some(f64::INFINITY)
        );
        assert_eq!(metric_sum(METRICS_AFTER, "weird", &[("a", "x")]), None);
        assert_eq!(metric_sum(METRICS_AFTER, BATCH_SIZE, &[]), None);
        let by = metric_by_label(
            METRICS_AFTER,
            "duplex_local_queue_wait_seconds_count",
            "engine",
        );
        assert_eq!(by.get("llm"), Some(&7.0));
        assert_eq!(by.get("tts"), Some(&4.0));
    }

    #[test]
    fn report_between_two_samples() {
        let t0 = Instant::now();
        let sample = |secs: u64, stat: &str, metrics: Option<&str>| ProbeSample {
            at: t0 + Duration::from_secs(secs),
            stat: Some(stat.to_string()),
            status: Some("VmHWM:\t 1048576 kB\n".to_string()),
            metrics: metrics.map(String::from),
        };
        let later = STAT.replace(" 1234 567 ", " 2234 767 ");
        let before = sample(0, STAT, Some(METRICS_BEFORE));
        let after = sample(10, &later, Some(METRICS_AFTER));
        let mut gauges = GaugeMax::default();
        gauges.observe("duplex_local_llm_active_sequences 2\nduplex_local_llm_batch_size 3\n");
        gauges.observe("duplex_local_llm_active_sequences 4\nduplex_local_llm_batch_size 1\n");
        let r = ServerReport::between(&before, &after, &gauges);
        assert_eq!(r.wall_s, 10.0);
        // 1,200 ticks = 12 s of CPU in 10 s.
        assert_eq!(r.cpu_percent, Some(120.0));
        assert_eq!(r.peak_rss_mib, Some(1024.0));
        assert_eq!(
            (r.llm_tokens, r.llm_tokens_per_s),
            (Some(600.0), Some(60.0))
        );
        assert_eq!(
            (r.answer_tokens, r.answer_tokens_per_s),
            (Some(300.0), Some(30.0))
        );
        // llm: (3.5 - 1.5) s over 4 waits; tts: new since the first sample.
        assert_eq!(r.queue_wait_mean_ms.get("llm"), Some(&500.0));
        assert_eq!(r.queue_wait_mean_ms.get("tts"), Some(&50.0));
        assert_eq!(
            (r.max_active_sequences, r.max_batch_size),
            (Some(4.0), Some(3.0))
        );

        // A server without the local metrics: n/a, not zero.
        let bare = sample(10, &later, Some("duplex_active_sessions 1\n"));
        let r = ServerReport::between(&before, &bare, &GaugeMax::default());
        assert_eq!(
            (r.llm_tokens, r.answer_tokens, r.max_batch_size),
            (None, None, None)
        );
        assert!(r.queue_wait_mean_ms.is_empty());
        let unreadable = ProbeSample {
            stat: None,
            status: None,
            metrics: None,
            ..bare
        };
        let r = ServerReport::between(&before, &unreadable, &GaugeMax::default());
        assert_eq!(
            (r.cpu_percent, r.peak_rss_mib, r.llm_tokens),
            (None, None, None)
        );
    }
}
