//! The audio front end of duplex: from the client's binary frames to 20 ms frames of 16 kHz
//! audio with voice-activity decisions and turn boundaries.
//!
//! ```text
//! bytes -> codec (pcm16 / mu-law) -> Resampler (client rate -> 16 kHz) -> Reframer (320)
//!       -> Vad (voiced?) -> Endpointer (SpeechStarted / SpeechStopped)
//! ```
//!
//! [`FrontEnd`] chains them for one client stream; each stage is public and usable alone.
//! [`OutputStage`] is its mirror for assistant speech going out: provider audio -> Resampler
//! (provider rate -> output rate) -> 20 ms frames -> codec.
//!
//! **Invariant:** this crate is sans-IO: no sockets, no async runtime, no clock reads, no
//! threads. Time is the audio position (`audio_ms`, milliseconds of 16 kHz audio since the
//! stream began), which makes a minute of conversation testable in milliseconds.

pub mod codec;
pub mod endpoint;
mod frontend;
mod output;
pub mod reframe;
pub mod resample;
pub mod vad;

pub use endpoint::{EndpointConfig, EndpointEvent, Endpointer, FRAME_MS};
pub use frontend::{FRAME_SAMPLES, FrontEnd, FrontEndConfig, FrontEndEvent, INTERNAL_RATE};
pub use output::{OutputFrame, OutputStage};
pub use reframe::Reframer;
pub use resample::{Resampler, SUPPORTED_RATES};
pub use vad::{Vad, VadMode};

/// Errors of the audio front end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudioError {
    /// The sample rate is not one of [`SUPPORTED_RATES`].
    #[error("unsupported sample rate {0} Hz")]
    UnsupportedSampleRate(u32),
    /// A pcm16 frame had an odd number of bytes (the frame is dropped; the stream goes on).
    #[error("pcm16 frame has an odd length of {0} bytes")]
    OddLength(usize),
    /// rubato refused to build a resampler.
    #[error("resampler: {0}")]
    Resampler(String),
    /// A VAD frame was not 10, 20 or 30 ms at 16 kHz (160, 320 or 480 samples).
    #[error("VAD frame of {0} samples; expected 160, 320 or 480")]
    VadFrameLength(usize),
}
