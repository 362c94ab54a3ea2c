//! `Stripe-Signature` verification: pure functions over the raw body, the header, the secret
//! and `now` (no clock read here).
//!
//! The header is `t=TIMESTAMP,v1=SIG[,v1=SIG2…]`: Stripe signs `"{t}.{raw body}"` with
//! HMAC-SHA256 under the endpoint's secret and sends one `v1` per active secret (several while
//! a secret is being rolled). `v0` and unknown schemes are ignored. A request is genuine when
//! any `v1` matches (compared in constant time) and `t` is within [`TOLERANCE_SECS`] of `now`,
//! which bounds replays of a captured request.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Largest accepted distance between the signed timestamp and `now`: Stripe's own default.
pub const TOLERANCE_SECS: i64 = 300;

/// The endpoint's signing secret (`whsec_…`). Its `Debug` does not print it.
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// `None` for an empty secret: an empty key would make every signature trivially forgeable.
    pub fn new(secret: impl Into<String>) -> Option<WebhookSecret> {
        let s = secret.into();
        (!s.trim().is_empty()).then(|| WebhookSecret(s.trim().to_owned()))
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("missing Stripe-Signature header")]
    MissingHeader,
    /// The header is not `t=…,v1=…`.
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    /// The header carries no `v1` signature (only other schemes).
    #[error("no v1 signature in Stripe-Signature header")]
    NoV1Signature,
    /// No `v1` signature matches the body under the configured secret.
    #[error("no signature matches the payload (wrong secret or modified body)")]
    Mismatch,
    /// The signed timestamp is too far from now (a replayed or delayed request).
    #[error("timestamp {age_secs} s away from now, tolerance is {TOLERANCE_SECS} s")]
    OutsideTolerance { age_secs: i64 },
}

fn mac(secret: &WebhookSecret, timestamp: &str, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// Verifies a `Stripe-Signature` header against the raw body. Returns the signed timestamp.
pub fn verify(
    header: Option<&str>,
    payload: &[u8],
    secret: &WebhookSecret,
    now_unix: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::MissingHeader)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    let mut saw_v1 = false;
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed("expected key=value pairs"))?;
        match key {
            "t" if timestamp.replace(value).is_some() => {
                return Err(SignatureError::Malformed("more than one timestamp"));
            }
            "t" => {}
            // A value that is not hex cannot match; it must not hide a valid sibling.
            "v1" => {
                saw_v1 = true;
                signatures.extend(decode_hex(value));
            }
            _ => {} // v0 (test-mode legacy) and future schemes
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed("no timestamp"))?;
    let t: i64 = timestamp
        .parse()
        .map_err(|_| SignatureError::Malformed("timestamp is not a number"))?;
    if !saw_v1 {
        return Err(SignatureError::NoV1Signature);
    }
    let expected = mac(secret, timestamp, payload);
    // `verify_slice` compares in constant time.
    let matched = signatures
        .iter()
        .any(|sig| expected.clone().verify_slice(sig).is_ok());
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    // Saturating: a signed timestamp near i64's ends must not overflow (a panic in debug, and
    // in release a wrapped age that could pass the check).
    let age_secs = now_unix.saturating_sub(t);
    if age_secs.unsigned_abs() > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::OutsideTolerance { age_secs });
    }
    Ok(t)
}

/// The `Stripe-Signature` header Stripe would send for `payload` at `timestamp`: for tests,
/// and for tools that replay recorded events against a server.
pub fn sign(payload: &[u8], secret: &WebhookSecret, timestamp: i64) -> String {
    let t = timestamp.to_string();
    let sig = mac(secret, &t, payload).finalize().into_bytes();
    format!("t={t},v1={}", encode_hex(&sig))
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with Python's hmac module:
    //   python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec_test_secret",
    //     b"1700000000." + b"{\"id\":\"evt_test\",\"object\":\"event\"}", hashlib.sha256).hexdigest())'
    // and the same with key b"whsec_old_secret".
    const PAYLOAD: &[u8] = br#"{"id":"evt_test","object":"event"}"#;
    const T: i64 = 1_700_000_000;
    const SIG_TEST: &str = "8042376f6ca064adbe037642a718227dfd59047137eb49497a54c49eb0cfb724";
    const SIG_OLD: &str = "a1dd24cd166a5ec1b320e88ebfc7df18408a2dc13ab12ccf1d9e392d099b1dc1";

    fn secret() -> WebhookSecret {
        WebhookSecret::new("whsec_test_secret").unwrap()
    }

    fn check(header: &str, now: i64) -> Result<i64, SignatureError> {
        verify(Some(header), PAYLOAD, &secret(), now)
    }

    #[test]
    fn known_vector_verifies_and_sign_reproduces_it() {
        assert_eq!(check(&format!("t={T},v1={SIG_TEST}"), T), Ok(T));
        assert_eq!(sign(PAYLOAD, &secret(), T), format!("t={T},v1={SIG_TEST}"));
    }

    #[test]
    fn rotation_any_v1_may_match_and_other_schemes_are_ignored() {
        let h = format!("t={T},v1={SIG_OLD},v1={SIG_TEST},v0=deadbeef");
        assert_eq!(check(&h, T + 10), Ok(T));
        let h = format!("t={T}, v1={SIG_TEST}, v1={SIG_OLD}");
        assert_eq!(check(&h, T), Ok(T), "spaces after commas are tolerated");
        let h = format!("t={T},v1=not-hex,v1={SIG_TEST}");
        assert_eq!(
            check(&h, T),
            Ok(T),
            "a garbled sibling does not hide a valid one"
        );
        // Under the old secret, only the old signature matches.
        let old = WebhookSecret::new("whsec_old_secret").unwrap();
        let h = format!("t={T},v1={SIG_TEST},v1={SIG_OLD}");
        assert_eq!(verify(Some(&h), PAYLOAD, &old, T), Ok(T));
        assert_eq!(
            verify(Some(&format!("t={T},v1={SIG_TEST}")), PAYLOAD, &old, T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn tampering_and_wrong_inputs_are_refused() {
        let good = format!("t={T},v1={SIG_TEST}");
        assert_eq!(
            verify(
                Some(&good),
                br#"{"id":"evt_test","object":"Event"}"#,
                &secret(),
                T
            ),
            Err(SignatureError::Mismatch),
            "modified body"
        );
        assert_eq!(
            check(&format!("t={},v1={SIG_TEST}", T + 1), T),
            Err(SignatureError::Mismatch),
            "the timestamp is signed too"
        );
        let mut flipped = SIG_TEST.to_owned();
        flipped.replace_range(0..1, "9");
        assert_eq!(
            check(&format!("t={T},v1={flipped}"), T),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(None, PAYLOAD, &secret(), T),
            Err(SignatureError::MissingHeader)
        );
        assert_eq!(
            check(&format!("t={T},v0={SIG_TEST}"), T),
            Err(SignatureError::NoV1Signature)
        );
        assert!(matches!(
            check(&format!("v1={SIG_TEST}"), T),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            check("garbage", T),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            check(&format!("t=soon,v1={SIG_TEST}"), T),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            check(&format!("t={T},t={T},v1={SIG_TEST}"), T),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn tolerance_is_300_seconds_both_ways() {
        let good = format!("t={T},v1={SIG_TEST}");
        assert_eq!(check(&good, T + 300), Ok(T));
        assert_eq!(check(&good, T - 300), Ok(T));
        assert_eq!(
            check(&good, T + 301),
            Err(SignatureError::OutsideTolerance { age_secs: 301 })
        );
        assert_eq!(
            check(&good, T - 301),
            Err(SignatureError::OutsideTolerance { age_secs: -301 })
        );
    }

    #[test]
    fn secrets_are_never_empty_or_printed() {
        assert!(WebhookSecret::new("  ").is_none());
        assert!(!format!("{:?}", secret()).contains("whsec"));
    }

    #[test]
    fn hex_round_trip() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(decode_hex(&encode_hex(&bytes)).unwrap(), bytes);
        assert_eq!(decode_hex("ABff"), Some(vec![0xab, 0xff]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: any header, any body, any timestamp: one of the documented
    //! [`SignatureError`]s or a verified timestamp, never a panic.

    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_750_000_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_header_is_refused_cleanly(
            header in "((t|v1|v0|x)=[0-9a-f]{0,70}|[^,]{0,20}|,| )*",
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let secret = WebhookSecret::new("whsec_test").unwrap();
            let r = verify(Some(&header), &body, &secret, NOW);
            prop_assert!(r.is_err(), "a guessed header verified: {header}");
        }

        #[test]
        fn any_signed_timestamp_is_judged_without_overflow(
            t in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), (NOW - 400)..(NOW + 400)],
            now in prop_oneof![any::<i64>(), Just(i64::MIN), Just(NOW)],
        ) {
            let secret = WebhookSecret::new("whsec_test").unwrap();
            let header = sign(b"{}", &secret, t);
            match verify(Some(&header), b"{}", &secret, now) {
                Ok(got) => prop_assert_eq!(got, t),
                Err(SignatureError::OutsideTolerance { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
