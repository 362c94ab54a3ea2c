//! Cost accounting: what each provider call consumed and what it cost.
//!
//! Every adapter reports a [`UsageRecord`] per billable quantity through a [`Meter`], which
//! prices it from a [`PriceTable`] and hands it to a [`UsageSink`]. The sink is an
//! `Arc<dyn UsageSink>` so the server can fan it out (Prometheus counters now, the metering
//! store later) with [`FanOut`].
//!
//! What is counted, and when:
//! - STT: seconds of audio sent to the recognizer (Deepgram bills streamed audio time; OpenAI
//!   transcription bills the uploaded clip), reported when the audio is handed over.
//! - LLM: prompt and completion tokens from the provider's final `usage` chunk
//!   (`stream_options.include_usage`); nothing is recorded when a stream ends without one.
//! - TTS: characters of text sent for synthesis, reported when the text is sent (vendors bill
//!   text accepted, whether or not the audio was played).
//!
//! # Default prices
//!
//! [`PriceTable::defaults`] holds list prices (pay-as-you-go, USD) as the vendors published
//! them around mid-2025. They are **estimates**: vendors change prices, volume tiers and
//! plans differ, and newer models (e.g. `gpt-4o-mini-tts`, billed per audio token) are
//! approximated per character. Override them with `PROVIDER_PRICES`. A model not in the
//! table is recorded with its quantity and a cost of 0.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// What a quantity counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageKind {
    /// Seconds of audio recognized.
    SttSeconds,
    /// Prompt (input) tokens of a completion.
    LlmPromptTokens,
    /// Completion (output) tokens.
    LlmCompletionTokens,
    /// Characters of text synthesized.
    TtsCharacters,
}

impl UsageKind {
    /// The label used in metrics and in `PROVIDER_PRICES`.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::SttSeconds => "stt_seconds",
            UsageKind::LlmPromptTokens => "llm_prompt_tokens",
            UsageKind::LlmCompletionTokens => "llm_completion_tokens",
            UsageKind::TtsCharacters => "tts_characters",
        }
    }

    pub fn parse(s: &str) -> Option<UsageKind> {
        Some(match s {
            "stt_seconds" => UsageKind::SttSeconds,
            "llm_prompt_tokens" => UsageKind::LlmPromptTokens,
            "llm_completion_tokens" => UsageKind::LlmCompletionTokens,
            "tts_characters" => UsageKind::TtsCharacters,
            _ => return None,
        })
    }

    /// How many units a price in `PROVIDER_PRICES` is quoted for: vendors quote STT per
    /// minute, tokens and characters per million.
    pub fn price_unit(self) -> f64 {
        match self {
            UsageKind::SttSeconds => 60.0,
            UsageKind::LlmPromptTokens
            | UsageKind::LlmCompletionTokens
            | UsageKind::TtsCharacters => 1_000_000.0,
        }
    }
}

impl fmt::Display for UsageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One billable quantity of one provider call.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub session_id: String,
    /// Provider (or router endpoint) name, e.g. `deepgram`, `openai`, `groq`.
    pub provider: String,
    pub model: String,
    pub kind: UsageKind,
    pub quantity: f64,
    /// `quantity` priced from the [`PriceTable`]; 0 for a model without a price.
    pub cost_usd: f64,
}

/// Receives usage records. Implementations must not block: they are called from provider
/// tasks in the audio path (increment a counter, push to a bounded queue).
pub trait UsageSink: Send + Sync + 'static {
    fn record(&self, record: UsageRecord);
}

/// Discards records.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl UsageSink for NullSink {
    fn record(&self, _record: UsageRecord) {}
}

/// Hands every record to several sinks (e.g. metrics and the metering store).
#[derive(Clone, Default)]
pub struct FanOut(pub Vec<Arc<dyn UsageSink>>);

impl UsageSink for FanOut {
    fn record(&self, record: UsageRecord) {
        if let Some((last, rest)) = self.0.split_last() {
            for sink in rest {
                sink.record(record.clone());
            }
            last.record(record);
        }
    }
}

/// Keeps records in memory; for tests.
#[derive(Debug, Default)]
pub struct MemorySink(Mutex<Vec<UsageRecord>>);

impl MemorySink {
    pub fn records(&self) -> Vec<UsageRecord> {
        self.0.lock().expect("not poisoned").clone()
    }

    /// Sum of quantities of one kind.
    pub fn total(&self, kind: UsageKind) -> f64 {
        self.records()
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.quantity)
            .sum()
    }
}

impl UsageSink for MemorySink {
    fn record(&self, record: UsageRecord) {
        self.0.lock().expect("not poisoned").push(record);
    }
}

/// USD per unit, by provider, model and kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    /// (provider, model, kind) → USD per single unit (second, token, character).
    prices: HashMap<(String, String, UsageKind), f64>,
}

/// Default list prices, USD per vendor unit (per minute of audio; per million tokens or
/// characters), as published around mid-2025. Estimates: see the module docs.
const DEFAULT_PRICES: &[(&str, &str, UsageKind, f64)] = &[
    // Deepgram streaming, pay-as-you-go.
    ("deepgram", "nova-3", UsageKind::SttSeconds, 0.0077),
    ("deepgram", "nova-2", UsageKind::SttSeconds, 0.0058),
    // OpenAI transcription.
    ("openai", "whisper-1", UsageKind::SttSeconds, 0.006),
    ("openai", "gpt-4o-transcribe", UsageKind::SttSeconds, 0.006),
    (
        "openai",
        "gpt-4o-mini-transcribe",
        UsageKind::SttSeconds,
        0.003,
    ),
    // OpenAI chat models (standard tier).
    ("openai", "gpt-4o-mini", UsageKind::LlmPromptTokens, 0.15),
    (
        "openai",
        "gpt-4o-mini",
        UsageKind::LlmCompletionTokens,
        0.60,
    ),
    ("openai", "gpt-4o", UsageKind::LlmPromptTokens, 2.50),
    ("openai", "gpt-4o", UsageKind::LlmCompletionTokens, 10.00),
    ("openai", "gpt-4.1", UsageKind::LlmPromptTokens, 2.00),
    ("openai", "gpt-4.1", UsageKind::LlmCompletionTokens, 8.00),
    ("openai", "gpt-4.1-mini", UsageKind::LlmPromptTokens, 0.40),
    (
        "openai",
        "gpt-4.1-mini",
        UsageKind::LlmCompletionTokens,
        1.60,
    ),
    ("openai", "gpt-4.1-nano", UsageKind::LlmPromptTokens, 0.10),
    (
        "openai",
        "gpt-4.1-nano",
        UsageKind::LlmCompletionTokens,
        0.40,
    ),
    // OpenAI speech. gpt-4o-mini-tts is billed per token; ~$15 per million characters is
    // OpenAI's own per-minute estimate converted at ~1,000 characters per minute of speech.
    ("openai", "tts-1", UsageKind::TtsCharacters, 15.0),
    ("openai", "tts-1-hd", UsageKind::TtsCharacters, 30.0),
    ("openai", "gpt-4o-mini-tts", UsageKind::TtsCharacters, 15.0),
    // ElevenLabs API (per 1,000 characters: Flash/Turbo $0.05, Multilingual $0.10).
    (
        "elevenlabs",
        "eleven_flash_v2_5",
        UsageKind::TtsCharacters,
        50.0,
    ),
    (
        "elevenlabs",
        "eleven_turbo_v2_5",
        UsageKind::TtsCharacters,
        50.0,
    ),
    (
        "elevenlabs",
        "eleven_multilingual_v2",
        UsageKind::TtsCharacters,
        100.0,
    ),
    // Azure neural voices, standard tier. Azure bills per voice family, not per voice.
    ("azure", "neural", UsageKind::TtsCharacters, 15.0),
];

/// A `PROVIDER_PRICES` entry that could not be parsed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("bad price entry {entry:?}: {reason}")]
pub struct PriceParseError {
    pub entry: String,
    pub reason: String,
}

impl PriceTable {
    /// An empty table: everything costs 0.
    pub fn empty() -> PriceTable {
        PriceTable::default()
    }

    /// The default list prices (estimates; see the module docs).
    pub fn defaults() -> PriceTable {
        let mut t = PriceTable::empty();
        for &(provider, model, kind, per_vendor_unit) in DEFAULT_PRICES {
            t.set(provider, model, kind, per_vendor_unit);
        }
        t
    }

    /// Sets a price quoted per vendor unit ([`UsageKind::price_unit`]).
    pub fn set(&mut self, provider: &str, model: &str, kind: UsageKind, per_vendor_unit: f64) {
        self.prices.insert(
            (provider.to_owned(), model.to_owned(), kind),
            per_vendor_unit / kind.price_unit(),
        );
    }

    /// USD per single unit, if known.
    pub fn unit_price(&self, provider: &str, model: &str, kind: UsageKind) -> Option<f64> {
        self.prices
            .get(&(provider.to_owned(), model.to_owned(), kind))
            .copied()
    }

    /// Cost of `quantity` units; 0 when the model has no price.
    pub fn cost(&self, provider: &str, model: &str, kind: UsageKind, quantity: f64) -> f64 {
        self.unit_price(provider, model, kind).unwrap_or(0.0) * quantity
    }

    /// Applies overrides in the `PROVIDER_PRICES` syntax:
    /// `provider/model:kind=usd[,kind=usd…][;provider/model:…]`, prices per vendor unit (per
    /// minute for `stt_seconds`, per million for tokens and characters). Example:
    /// `openai/gpt-4o-mini:llm_prompt_tokens=0.15,llm_completion_tokens=0.6;deepgram/nova-3:stt_seconds=0.0043`.
    pub fn apply_overrides(&mut self, spec: &str) -> Result<(), PriceParseError> {
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |reason: &str| PriceParseError {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            };
            let (target, prices) = entry
                .split_once(':')
                .ok_or_else(|| err("expected provider/model:kind=price"))?;
            let (provider, model) = target
                .trim()
                .split_once('/')
                .ok_or_else(|| err("expected provider/model before ':'"))?;
            for pair in prices.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (kind, price) = pair
                    .split_once('=')
                    .ok_or_else(|| err("expected kind=price"))?;
                let kind = UsageKind::parse(kind.trim()).ok_or_else(|| {
                    err("kind must be stt_seconds, llm_prompt_tokens, llm_completion_tokens or tts_characters")
                })?;
                let price: f64 = price
                    .trim()
                    .parse()
                    .map_err(|_| err("price is not a number"))?;
                if !(price.is_finite() && price >= 0.0) {
                    return Err(err("price must be a non-negative number"));
                }
                self.set(provider.trim(), model.trim(), kind, price);
            }
        }
        Ok(())
    }
}

/// Prices usage and hands it to the sink; every adapter holds one.
#[derive(Clone)]
pub struct Meter {
    sink: Arc<dyn UsageSink>,
    prices: Arc<PriceTable>,
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter").finish_non_exhaustive()
    }
}

impl Default for Meter {
    fn default() -> Self {
        Meter::none()
    }
}

impl Meter {
    pub fn new(sink: Arc<dyn UsageSink>, prices: Arc<PriceTable>) -> Meter {
        Meter { sink, prices }
    }

    /// Records nothing.
    pub fn none() -> Meter {
        Meter::new(Arc::new(NullSink), Arc::new(PriceTable::empty()))
    }

    /// Records `quantity` (ignored when zero or negative).
    pub fn record(
        &self,
        session_id: &str,
        provider: &str,
        model: &str,
        kind: UsageKind,
        quantity: f64,
    ) {
        if quantity <= 0.0 || !quantity.is_finite() {
            return;
        }
        let cost_usd = self.prices.cost(provider, model, kind, quantity);
        self.sink.record(UsageRecord {
            session_id: session_id.to_owned(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            kind,
            quantity,
            cost_usd,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prices_convert_vendor_units() {
        let t = PriceTable::defaults();
        // 1 minute of Deepgram nova-3 audio.
        let c = t.cost("deepgram", "nova-3", UsageKind::SttSeconds, 60.0);
        assert!((c - 0.0077).abs() < 1e-12, "{c}");
        // A million gpt-4o-mini completion tokens.
        let c = t.cost("openai", "gpt-4o-mini", UsageKind::LlmCompletionTokens, 1e6);
        assert!((c - 0.60).abs() < 1e-9, "{c}");
        assert_eq!(
            t.cost("nobody", "nothing", UsageKind::TtsCharacters, 10.0),
            0.0
        );
    }

    #[test]
    fn overrides_parse_and_reject_garbage() {
        let mut t = PriceTable::defaults();
        t.apply_overrides("groq/llama-3.1-8b-instant:llm_prompt_tokens=0.05,llm_completion_tokens=0.08; deepgram/nova-3:stt_seconds=0.0043")
            .unwrap();
        let c = t.cost(
            "groq",
            "llama-3.1-8b-instant",
            UsageKind::LlmPromptTokens,
            2e6,
        );
        assert!((c - 0.10).abs() < 1e-9);
        let c = t.cost("deepgram", "nova-3", UsageKind::SttSeconds, 120.0);
        assert!((c - 0.0086).abs() < 1e-12);
        for bad in [
            "openai",
            "openai/x",
            "openai/x:foo=1",
            "openai/x:tts_characters=abc",
            "x:tts_characters=1",
            "a/b:tts_characters=-1",
        ] {
            assert!(t.apply_overrides(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn meter_prices_and_fans_out() {
        let a = Arc::new(MemorySink::default());
        let b = Arc::new(MemorySink::default());
        let fan = FanOut(vec![a.clone(), b.clone()]);
        let meter = Meter::new(Arc::new(fan), Arc::new(PriceTable::defaults()));
        meter.record(
            "s1",
            "openai",
            "gpt-4o-mini",
            UsageKind::LlmPromptTokens,
            1000.0,
        );
        meter.record(
            "s1",
            "openai",
            "gpt-4o-mini",
            UsageKind::LlmPromptTokens,
            0.0,
        );
        assert_eq!(a.records(), b.records());
        let r = &a.records()[0];
        assert_eq!(a.records().len(), 1);
        assert_eq!((r.session_id.as_str(), r.quantity), ("s1", 1000.0));
        assert!((r.cost_usd - 0.00015).abs() < 1e-12);
    }
}
