//! Wire codecs: 16-bit little-endian PCM and G.711 mu-law, to and from `i16` samples.
//!
//! Both directions append to a caller-owned `Vec`, so a caller that keeps its buffers between
//! frames never allocates in steady state. mu-law is table-driven in both directions; the tables
//! are computed at compile time from the reference algorithm (Sun Microsystems' public-domain
//! `g711.c`, the same one Python's `audioop` and most telephony stacks use).

/// Decodes little-endian 16-bit PCM, appending to `out`.
///
/// A trailing odd byte is ignored; callers that must reject it check the length first
/// (`FrontEnd::push` returns `AudioError::OddLength`).
pub fn decode_pcm16(bytes: &[u8], out: &mut Vec<i16>) {
    out.reserve(bytes.len() / 2);
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|pair| i16::from_le_bytes([pair[0], pair[1]])),
    );
}

/// Encodes samples as little-endian 16-bit PCM, appending to `out`.
pub fn encode_pcm16(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len() * 2);
    for sample in samples {
        out.extend_from_slice(&sample.to_le_bytes());
    }
}

/// Decodes G.711 mu-law, one byte per sample, appending to `out`.
pub fn decode_mulaw(bytes: &[u8], out: &mut Vec<i16>) {
    out.reserve(bytes.len());
    out.extend(bytes.iter().map(|&code| MULAW_DECODE[code as usize]));
}

/// Encodes samples as G.711 mu-law, one byte per sample, appending to `out`.
pub fn encode_mulaw(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len());
    out.extend(samples.iter().map(|&sample| mulaw_encode_sample(sample)));
}

/// Encodes one sample. mu-law works on 14-bit magnitudes, so the two low bits never matter and
/// the table is indexed by the top 14 bits of the sample (as an unsigned index).
#[inline]
fn mulaw_encode_sample(sample: i16) -> u8 {
    MULAW_ENCODE[((sample >> 2) as u16 & 0x3FFF) as usize]
}

/// The G.711 bias added to a magnitude before finding its segment (0x84 = 132 on 16-bit scale).
const BIAS: i32 = 0x84;
/// Largest 14-bit magnitude that still fits the top segment once the bias is added.
const CLIP: i32 = 8159;
/// Upper bound (inclusive) of each of the 8 mu-law segments on the biased 14-bit scale.
const SEG_END: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];

static MULAW_DECODE: [i16; 256] = build_decode_table();
/// 2^14 entries: one per possible 14-bit sample value (16 KiB, fits in L1/L2 comfortably).
static MULAW_ENCODE: [u8; 16384] = build_encode_table();

const fn decode_reference(code: u8) -> i16 {
    let u = !code;
    let mut t = (((u & 0x0F) as i32) << 3) + BIAS;
    t <<= ((u & 0x70) >> 4) as i32;
    if u & 0x80 != 0 {
        (BIAS - t) as i16
    } else {
        (t - BIAS) as i16
    }
}

/// The reference encoder on a 14-bit signed value (`sample >> 2`).
const fn encode_reference_14(mut pcm: i32) -> u8 {
    let mask: u8 = if pcm < 0 {
        pcm = -pcm;
        0x7F
    } else {
        0xFF
    };
    if pcm > CLIP {
        pcm = CLIP;
    }
    // BIAS is on the 16-bit scale; on the 14-bit scale it is BIAS >> 2 = 33.
    pcm += BIAS >> 2;
    let mut seg = 0;
    while seg < 8 && pcm > SEG_END[seg] {
        seg += 1;
    }
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let uval = ((seg as i32) << 4) | ((pcm >> (seg + 1)) & 0x0F);
    (uval as u8) ^ mask
}

const fn build_decode_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_reference(code as u8);
        code += 1;
    }
    table
}

const fn build_encode_table() -> [u8; 16384] {
    let mut table = [0u8; 16384];
    let mut index = 0;
    while index < 16384 {
        // Undo the unsigned indexing: indices >= 8192 are negative 14-bit values.
        let value = if index >= 8192 {
            index as i32 - 16384
        } else {
            index as i32
        };
        table[index] = encode_reference_14(value);
        index += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values produced by Python's `audioop.lin2ulaw` / `ulaw2lin` (Sun g711.c).
    const ENCODE_KNOWN: &[(i16, u8)] = &[
        (0, 0xFF),
        (1, 0xFF),
        (-1, 0x7E),
        (3, 0xFF),
        (-3, 0x7E),
        (4, 0xFE),
        (-4, 0x7E),
        (31, 0xFB),
        (-32, 0x7B),
        (100, 0xF2),
        (-100, 0x72),
        (1000, 0xCE),
        (-1000, 0x4E),
        (8000, 0xA0),
        (-8000, 0x20),
        (32124, 0x80),
        (32767, 0x80),
        (-32124, 0x00),
        (-32768, 0x00),
    ];
    const DECODE_KNOWN: &[(u8, i16)] = &[
        (0x00, -32124),
        (0x01, -31100),
        (0x0F, -16764),
        (0x10, -15996),
        (0x55, -716),
        (0x7E, -8),
        (0x7F, 0),
        (0x80, 32124),
        (0x81, 31100),
        (0xAA, 5372),
        (0xFE, 8),
        (0xFF, 0),
    ];

    #[test]
    fn mulaw_matches_reference_values() {
        let (samples, codes): (Vec<i16>, Vec<u8>) = ENCODE_KNOWN.iter().copied().unzip();
        let mut encoded = Vec::new();
        encode_mulaw(&samples, &mut encoded);
        assert_eq!(encoded, codes);

        let (codes, samples): (Vec<u8>, Vec<i16>) = DECODE_KNOWN.iter().copied().unzip();
        let mut decoded = Vec::new();
        decode_mulaw(&codes, &mut decoded);
        assert_eq!(decoded, samples);
    }

    #[test]
    fn mulaw_code_round_trip() {
        let codes: Vec<u8> = (0..=255).collect();
        let mut decoded = Vec::new();
        decode_mulaw(&codes, &mut decoded);
        let mut encoded = Vec::new();
        encode_mulaw(&decoded, &mut encoded);
        for (code, back) in codes.iter().zip(&encoded) {
            // 0x7F is "negative zero": it decodes to 0, which encodes as positive zero 0xFF.
            let expected = if *code == 0x7F { 0xFF } else { *code };
            assert_eq!(*back, expected, "code {code:#04x}");
        }
    }

    #[test]
    fn mulaw_sample_round_trip_error_is_bounded() {
        let samples: Vec<i16> = (i16::MIN..=i16::MAX).step_by(7).collect();
        let mut encoded = Vec::new();
        encode_mulaw(&samples, &mut encoded);
        let mut decoded = Vec::new();
        decode_mulaw(&encoded, &mut decoded);
        for (s, d) in samples.iter().zip(&decoded) {
            let (s, d) = (*s as i32, *d as i32);
            // Half a quantisation step: it doubles per segment and stays under |s| / 16 (8 in
            // the two lowest segments); plus 4 because negative samples are floored, not
            // truncated, when dropped to 14 bits; plus clipping above 32124 (the largest code).
            let allowed = (s.abs() / 16).max(8) + 4 + (s.abs() - 32124).max(0);
            assert!((s - d).abs() <= allowed, "{s} -> {d}");
        }
    }

    #[test]
    fn pcm16_round_trip_is_exact_and_little_endian() {
        let samples = [0i16, 1, -1, 0x1234, i16::MIN, i16::MAX];
        let mut bytes = Vec::new();
        encode_pcm16(&samples, &mut bytes);
        assert_eq!(&bytes[6..8], &[0x34, 0x12]);
        let mut back = vec![42];
        decode_pcm16(&bytes, &mut back);
        assert_eq!(back[0], 42, "decode appends");
        assert_eq!(&back[1..], &samples);
    }
}
