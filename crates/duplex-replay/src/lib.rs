//! duplex-replay: the reference client of the duplex server.
//!
//! It streams WAV files into sessions the way a microphone would and measures what comes
//! back. Layers, bottom up:
//! - [`Client`]: one WebSocket connection; raw sends (valid or deliberately broken) and
//!   timestamped [`Event`]s. The server's integration tests drive it directly.
//! - [`run_session`]: one scripted conversation (or echo benchmark), measured per turn.
//! - [`run_load`]: N concurrent sessions over a ramp-up, aggregated into a [`LoadReport`].
//! - [`ServerProbe`]: the server's CPU, peak memory and `/metrics` counters over a run.
//!
//! **Invariant:** every wait has a bound; no call here can hang on a silent server.

pub mod client;
pub mod error;
pub mod load;
pub mod server;
pub mod session;
pub mod stats;
pub mod wav;
pub mod wer;

pub use client::{Client, Event, EventKind};
pub use error::{Error, Result};
pub use load::{LoadConfig, LoadReport, MetricSummaries, run_load};
pub use server::{ServerProbe, ServerReport};
pub use session::{
    Mode, SessionConfig, SessionReport, TimelineEntry, TurnMetrics, TurnOutcome, TurnReport,
    TurnSchedule, run_session,
};
pub use stats::{Summary, percentile};
pub use wav::Wav;
