//! Azure Speech text-to-speech over REST.
//!
//! Per Microsoft's "Text to speech REST API": `POST https://{region}.tts.speech.microsoft.com
//! /cognitiveservices/v1` with headers `Ocp-Apim-Subscription-Key`, `Content-Type:
//! application/ssml+xml`, `X-Microsoft-OutputFormat` (here `raw-24khz-16bit-mono-pcm` or
//! `raw-16khz-16bit-mono-pcm`: headerless little-endian PCM) and `User-Agent`; the body is
//! SSML with one `<voice>`. The response body is the audio, streamed here chunk by chunk. One
//! request per text chunk, in order.
//!
//! The protocol's pure parts are [`AzureTtsConfig::request`] (URL, headers, SSML body as an
//! [`HttpRequest`]) and the shared [`crate::http::PcmChunkCodec`] (one request per chunk, PCM
//! decoding, chunk completion); [`crate::http::run_chunked_tts`] is the driver.

use crate::http::{HttpRequest, run_chunked_tts};
use crate::usage::{Meter, UsageKind};
use crate::{TextToSpeech, TtsParams, TtsStream};

/// Settings of the Azure adapter.
#[derive(Debug, Clone)]
pub struct AzureTtsConfig {
    pub key: String,
    pub region: String,
    /// Overrides `https://{region}.tts.speech.microsoft.com`; a full URL ending in
    /// `/cognitiveservices/v1` is used as is.
    pub endpoint: Option<String>,
    /// Used when the session names no voice.
    pub voice: String,
    /// Used when the session names no language.
    pub language: String,
    /// 16000 or 24000: selects `raw-16khz-16bit-mono-pcm` or `raw-24khz-16bit-mono-pcm`.
    pub sample_rate: u32,
    /// No byte for this long (before the headers or between body pieces) fails the turn.
    pub read_timeout: std::time::Duration,
    /// TCP + TLS setup.
    pub connect_timeout: std::time::Duration,
}

impl AzureTtsConfig {
    pub fn new(key: impl Into<String>, region: impl Into<String>) -> AzureTtsConfig {
        AzureTtsConfig {
            key: key.into(),
            region: region.into(),
            endpoint: None,
            voice: "en-US-AvaMultilingualNeural".into(),
            language: "en-US".into(),
            sample_rate: 24_000,
            read_timeout: crate::http::READ_TIMEOUT,
            connect_timeout: crate::http::CONNECT_TIMEOUT,
        }
    }

    pub fn url(&self) -> String {
        let base = match &self.endpoint {
            Some(e) => e.trim().trim_end_matches('/').to_owned(),
            None => format!("https://{}.tts.speech.microsoft.com", self.region.trim()),
        };
        if base.ends_with("/cognitiveservices/v1") {
            base
        } else {
            format!("{base}/cognitiveservices/v1")
        }
    }

    pub fn output_format(&self) -> &'static str {
        if self.sample_rate == 16_000 {
            "raw-16khz-16bit-mono-pcm"
        } else {
            "raw-24khz-16bit-mono-pcm"
        }
    }

    /// The synthesis request for one chunk: SSML in, headerless PCM out.
    pub fn request(&self, language: &str, voice: &str, text: &str) -> HttpRequest {
        HttpRequest {
            url: self.url(),
            headers: vec![
                ("Ocp-Apim-Subscription-Key", self.key.clone()),
                ("Content-Type", "application/ssml+xml".into()),
                ("X-Microsoft-OutputFormat", self.output_format().into()),
            ],
            body: ssml(language, voice, text).into_bytes(),
        }
    }

    fn rate(&self) -> u32 {
        if self.sample_rate == 16_000 {
            16_000
        } else {
            24_000
        }
    }
}

/// The SSML document for one chunk.
pub fn ssml(language: &str, voice: &str, text: &str) -> String {
    format!(
        "<speak version=\"1.0\" xmlns=\"http://www.w3.org/2001/10/synthesis\" xml:lang=\"{}\">\
         <voice name=\"{}\">{}</voice></speak>",
        xml_escape(language),
        xml_escape(voice),
        xml_escape(text)
    )
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Azure neural TTS.
#[derive(Debug, Clone)]
pub struct AzureTts {
    config: AzureTtsConfig,
    client: reqwest::Client,
    meter: Meter,
}

impl AzureTts {
    pub fn new(config: AzureTtsConfig, meter: Meter) -> AzureTts {
        AzureTts {
            client: crate::http::http_client_with(config.connect_timeout, config.read_timeout),
            config,
            meter,
        }
    }
}

impl TextToSpeech for AzureTts {
    fn name(&self) -> &str {
        "azure"
    }

    fn open(&self, params: TtsParams) -> TtsStream {
        let (stream, task) = TtsStream::channel();
        let config = self.config.clone();
        let meter = self.meter.clone();
        let voice = params.voice.clone().unwrap_or(config.voice.clone());
        let language = params.language.clone().unwrap_or(config.language.clone());
        run_chunked_tts(
            task,
            config.rate(),
            self.client.clone(),
            move |text: &str| {
                meter.record(
                    &params.session_id,
                    "azure",
                    "neural",
                    UsageKind::TtsCharacters,
                    text.chars().count() as f64,
                );
                config.request(&language, &voice, text)
            },
        );
        stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_ssml() {
        let mut c = AzureTtsConfig::new("k", "westeurope");
        assert_eq!(
            c.url(),
            "https://westeurope.tts.speech.microsoft.com/cognitiveservices/v1"
        );
        c.endpoint = Some("http://127.0.0.1:5/".into());
        assert_eq!(c.url(), "http://127.0.0.1:5/cognitiveservices/v1");
        c.endpoint = Some("https://x.example/cognitiveservices/v1".into());
        assert_eq!(c.url(), "https://x.example/cognitiveservices/v1");
        assert_eq!(
            ssml("en-US", "en-US-AvaMultilingualNeural", "Fish & <chips>"),
            "<speak version=\"1.0\" xmlns=\"http://www.w3.org/2001/10/synthesis\" xml:lang=\"en-US\">\
             <voice name=\"en-US-AvaMultilingualNeural\">Fish &amp; &lt;chips&gt;</voice></speak>"
        );
    }

    #[test]
    fn request_carries_key_ssml_and_the_pcm_output_format() {
        let mut c = AzureTtsConfig::new("az-key", "westeurope");
        c.sample_rate = 16_000;
        let r = c.request("en-GB", "en-GB-SoniaNeural", "Hi & bye.");
        assert_eq!(
            r.url,
            "https://westeurope.tts.speech.microsoft.com/cognitiveservices/v1"
        );
        assert_eq!(
            r.headers,
            [
                ("Ocp-Apim-Subscription-Key", "az-key".to_owned()),
                ("Content-Type", "application/ssml+xml".to_owned()),
                (
                    "X-Microsoft-OutputFormat",
                    "raw-16khz-16bit-mono-pcm".to_owned()
                ),
            ]
        );
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            ssml("en-GB", "en-GB-SoniaNeural", "Hi & bye.")
        );
        assert_eq!(c.rate(), 16_000);
        c.sample_rate = 22_050; // not offered as raw PCM: 24 kHz is asked for instead
        assert_eq!(c.output_format(), "raw-24khz-16bit-mono-pcm");
        assert_eq!(c.rate(), 24_000);
    }
}
