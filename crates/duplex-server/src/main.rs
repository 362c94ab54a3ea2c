//! `duplex`: the server binary. Reads the configuration (environment, overridden by flags),
//! sets up logging and metrics, serves until SIGTERM/SIGINT, then drains. `duplex migrate`
//! applies the database migrations and exits (the server also applies them at startup);
//! `duplex admin …` answers operators' questions from the store (`admin.rs`). `duplex --help`
//! lists every environment variable, from the table in `config.rs`.

use clap::{CommandFactory, FromArgMatches, Parser};
use duplex_server::config::LogFormat;
use duplex_server::{Config, Metrics, Server};

/// Exit status of a bad configuration value: `EX_USAGE` of sysexits(3), so that supervisors
/// and scripts can tell "fix the settings" from a crash.
const EX_USAGE: u8 = 64;

/// Realtime voice-conversation server. Every setting is an environment variable (listed
/// below); these flags override the most common ones.
#[derive(Parser, Debug)]
#[command(name = "duplex", version)]
struct Cli {
    /// Engine set: `local` (embedded offline engines, the default), `scripted` (deterministic
    /// test stand-ins) or `echo` (transport test).
    #[arg(long)]
    providers: Option<String>,
    /// Port to listen on (default $PORT or 10000).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on (default $BIND_ADDR or 0.0.0.0).
    #[arg(long)]
    bind: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Apply pending database migrations to DATABASE_URL (or the SQLite file in
    /// DUPLEX_DATA_DIR) and exit.
    Migrate,
    /// Operator commands on the store: top users, one user's history, set a plan, close stale
    /// sessions, export usage as CSV (`duplex admin --help`).
    Admin(duplex_server::admin::AdminArgs),
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command()
        .after_help(duplex_server::config::help())
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = Config::from_lookup(|name| {
        let flag = match name {
            "DUPLEX_PROVIDERS" => cli.providers.clone(),
            "PORT" => cli.port.map(|p| p.to_string()),
            "BIND_ADDR" => cli.bind.clone(),
            _ => None,
        };
        flag.or_else(|| std::env::var(name).ok())
    });
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duplex: {e}");
            return std::process::ExitCode::from(EX_USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    let command = match cli.command {
        Some(Command::Admin(args)) => {
            // Output is the command's answer; errors are one line on stderr.
            let now = time::OffsetDateTime::now_utc();
            let mut out = std::io::stdout().lock();
            let run = duplex_server::admin::run(
                &config.store,
                &config.metering.plans,
                args,
                now,
                &mut out,
            );
            return match runtime.block_on(run) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("duplex admin: {e}");
                    std::process::ExitCode::from(1)
                }
            };
        }
        other => other,
    };
    init_logging(config.server.log_format);
    if let Some(Command::Migrate) = command {
        return runtime.block_on(migrate(&config.store));
    }
    runtime.block_on(async move {
        let server = match Server::bind(config.clone(), Metrics::new()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, bind = %config.server.bind_addr, port = config.server.port, "cannot start");
                return std::process::ExitCode::from(1);
            }
        };
        tracing::info!(
            addr = %server.local_addr(),
            providers = config.engines.providers.as_str(),
            "duplex is ready: ws://{}/v1/conversation",
            server.local_addr()
        );
        let token = server.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: draining sessions");
            token.cancel();
        });
        server.wait().await;
        tracing::info!("bye");
        std::process::ExitCode::SUCCESS
    })
}

async fn migrate(store: &duplex_server::config::StoreConfig) -> std::process::ExitCode {
    let url = store.database_url_for_logs();
    match duplex_server::Store::open(&store.database_url).await {
        Ok(store) => {
            store.close().await;
            tracing::info!(database = %url, "migrations applied");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(database = %url, error = %e, "migration failed");
            std::process::ExitCode::from(1)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
}
