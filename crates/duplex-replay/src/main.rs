//! `duplex-replay`: streams WAV files into duplex sessions and prints latencies.
//! Exit status: 0 when every session ran cleanly, 1 when any failed or saw a protocol or
//! server error, 2 on bad arguments or unreadable input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use duplex_replay::{LoadConfig, Mode, ServerProbe, ServerReport, Wav, run_load};

#[derive(Parser, Debug)]
#[command(name = "duplex-replay", version, about)]
struct Args {
    /// Server URL, e.g. ws://127.0.0.1:10000/v1/conversation
    #[arg(long)]
    url: String,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Start the sessions evenly over this many milliseconds.
    #[arg(long, default_value_t = 0)]
    ramp_up_ms: u64,
    /// Speech at real time times this (>= 1); 0 sends speech as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Barge in with the next WAV after this many ms of assistant audio.
    #[arg(long)]
    barge_in_after_ms: Option<u64>,
    /// User turns per session (WAVs are cycled); default: one per WAV, or unlimited
    /// within --duration-s.
    #[arg(long)]
    turns: Option<usize>,
    #[arg(long, value_enum, default_value_t = Mode::Conversation)]
    mode: Mode,
    /// Stop the whole run after this many seconds.
    #[arg(long)]
    duration_s: Option<u64>,
    /// Give up on an assistant turn after this many seconds from end of speech.
    #[arg(long, default_value_t = 30)]
    turn_timeout_s: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Include every session's report and per-turn timeline in the JSON.
    #[arg(long)]
    sessions_detail: bool,
    /// Play assistant audio back at real time times this (>= 1); default: as --speed.
    #[arg(long)]
    playback_speed: Option<f64>,
    /// Speak on a fixed beat: turn k of every session starts no earlier than 1 s + k times
    /// this after the run starts (later if its previous answer is still playing), so that
    /// concurrent sessions ask together.
    #[arg(long)]
    turn_interval_ms: Option<u64>,
    /// Report this server process's CPU and peak memory over the run (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Report the server's counters over the run, e.g. http://127.0.0.1:10000/metrics
    #[arg(long)]
    metrics_url: Option<String>,
    /// 16-bit PCM WAV files, one user turn each.
    #[arg(required = true)]
    wavs: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let wavs = match args
        .wavs
        .iter()
        .map(Wav::load)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(w) => w,
        Err(e) => {
            eprintln!("duplex-replay: {e}");
            return ExitCode::from(2);
        }
    };
    let max_duration = args.duration_s.map(Duration::from_secs);
    let turns = match (args.turns, max_duration) {
        (Some(n), _) => n,
        // Bounded by the duration: loop over the WAVs until it is up.
        (None, Some(_)) => usize::MAX,
        (None, None) => wavs.len(),
    };
    let cfg = LoadConfig {
        sessions: args.sessions,
        ramp_up: Duration::from_millis(args.ramp_up_ms),
        speed: args.speed,
        barge_in_after_ms: args.barge_in_after_ms,
        turns,
        mode: args.mode,
        max_duration,
        turn_timeout: Duration::from_secs(args.turn_timeout_s),
        keep_sessions: args.sessions_detail,
        playback_speed: args.playback_speed,
        turn_interval: args.turn_interval_ms.map(Duration::from_millis),
        ..LoadConfig::new(args.url, wavs)
    };
    if let Err(e) = cfg.validate() {
        eprintln!("duplex-replay: {e}");
        return ExitCode::from(2);
    }
    let probe = ServerProbe {
        pid: args.server_pid,
        metrics_url: args.metrics_url,
    };
    let watched = probe.pid.is_some() || probe.metrics_url.is_some();
    let before = probe.sample().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gauges = probe.watch_gauges(async {
        let _ = stop_rx.await;
    });
    let run = async {
        let report = run_load(&cfg).await;
        let _ = stop_tx.send(());
        report
    };
    let (mut report, gauges) = tokio::join!(run, gauges);
    if watched {
        let after = probe.sample().await;
        report.server = Some(ServerReport::between(&before, &after, &gauges));
    }
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
