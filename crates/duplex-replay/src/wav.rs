//! `Wav`: user speech to stream, loaded from 16-bit PCM WAV files and cut into 20 ms frames.

use std::path::Path;
use std::time::Duration;

use duplex_audio::codec;
use duplex_proto::Encoding;

use crate::error::{Error, Result};

/// Duration of every audio frame the replayer sends (the protocol's frame size).
pub const FRAME_MS: u32 = 20;

/// Mono 16-bit speech at one of the protocol's sample rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Wav {
    /// File name (or a test's label), for reports.
    pub name: String,
    pub sample_rate: u32,
    pub samples: Vec<i16>,
    /// What is said in it, when known (`foo.txt` next to `foo.wav`): the report then gives
    /// the server's word error rate.
    pub reference: Option<String>,
}

impl Wav {
    /// Reads a 16-bit integer PCM WAV, and what is said in it from the `.txt` file of the same
    /// name, if there is one. Stereo (or more channels) is downmixed to mono by
    /// averaging; rates other than [`duplex_proto::SUPPORTED_SAMPLE_RATES`] are rejected.
    pub fn load(path: impl AsRef<Path>) -> Result<Wav> {
        let path = path.as_ref();
        let read_err = |source| Error::WavRead {
            path: path.to_path_buf(),
            source,
        };
        let mut reader = hound::WavReader::open(path).map_err(read_err)?;
        let spec = reader.spec();
        let name = path.display().to_string();
        if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
            return Err(Error::WavFormat {
                name,
                detail: format!(
                    "{} {}-bit samples; only 16-bit integer PCM is streamed \
                     (convert with `sox in.wav -b 16 out.wav`)",
                    match spec.sample_format {
                        hound::SampleFormat::Int => "integer",
                        hound::SampleFormat::Float => "float",
                    },
                    spec.bits_per_sample
                ),
            });
        }
        let interleaved = reader
            .samples::<i16>()
            .collect::<Result<Vec<i16>, _>>()
            .map_err(read_err)?;
        let channels = usize::from(spec.channels.max(1));
        let samples = if channels == 1 {
            interleaved
        } else {
            interleaved
                .chunks_exact(channels)
                .map(|c| {
                    let sum: i32 = c.iter().map(|&s| i32::from(s)).sum();
                    (sum / channels as i32) as i16
                })
                .collect()
        };
        let mut wav = Wav::from_samples(name, spec.sample_rate, samples)?;
        let reference = path.with_extension("txt");
        if let Ok(text) = std::fs::read_to_string(&reference) {
            wav.reference = Some(text.trim().to_string());
        }
        Ok(wav)
    }

    /// Builds a WAV from samples already in memory, checking the sample rate.
    pub fn from_samples(
        name: impl Into<String>,
        sample_rate: u32,
        samples: Vec<i16>,
    ) -> Result<Wav> {
        let name = name.into();
        if !duplex_proto::SUPPORTED_SAMPLE_RATES.contains(&sample_rate) {
            return Err(Error::WavFormat {
                name,
                detail: format!(
                    "sample rate {sample_rate} Hz is not one of {:?}",
                    duplex_proto::SUPPORTED_SAMPLE_RATES
                ),
            });
        }
        Ok(Wav {
            name,
            sample_rate,
            samples,
            reference: None,
        })
    }

    /// Samples in one 20 ms frame at this rate (882 at 44.1 kHz).
    pub fn frame_samples(&self) -> usize {
        frame_samples(self.sample_rate)
    }

    /// The audio as PCM16LE 20 ms frames; the last one is padded with silence.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        self.frames_as(Encoding::Pcm16)
    }

    /// The samples as 20 ms frames in `encoding`, the last one padded with silence.
    pub fn frames_as(&self, encoding: Encoding) -> Vec<Vec<u8>> {
        let n = self.frame_samples();
        self.samples
            .chunks(n)
            .map(|chunk| {
                let mut padded = chunk.to_vec();
                padded.resize(n, 0);
                let mut bytes = Vec::with_capacity(n * encoding.bytes_per_sample());
                match encoding {
                    Encoding::Pcm16 => codec::encode_pcm16(&padded, &mut bytes),
                    Encoding::Mulaw => codec::encode_mulaw(&padded, &mut bytes),
                }
                bytes
            })
            .collect()
    }

    /// Playing time.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.samples.len() as f64 / f64::from(self.sample_rate))
    }
}

/// Samples in one 20 ms frame at `sample_rate`.
pub fn frame_samples(sample_rate: u32) -> usize {
    (sample_rate * FRAME_MS / 1000) as usize
}

/// One 20 ms PCM16LE frame of digital silence at `sample_rate`.
pub fn silence_frame(sample_rate: u32) -> Vec<u8> {
    silence_frame_as(sample_rate, Encoding::Pcm16)
}

/// One 20 ms frame of digital silence at `sample_rate` in `encoding`.
pub fn silence_frame_as(sample_rate: u32, encoding: Encoding) -> Vec<u8> {
    let mut bytes = Vec::new();
    let zeros = vec![0i16; frame_samples(sample_rate)];
    match encoding {
        Encoding::Pcm16 => codec::encode_pcm16(&zeros, &mut bytes),
        Encoding::Mulaw => codec::encode_mulaw(&zeros, &mut bytes),
    }
    bytes
}
