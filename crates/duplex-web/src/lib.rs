//! The browser voice client, served by the duplex server itself: plain HTML, CSS, ES modules
//! and AudioWorklet processors from `assets/`, embedded in the binary at compile time (no
//! build step, no Node at run time). This crate owns the files and what a response for one of
//! them must say (content type, validator, security headers); the server's `http` module only
//! maps URL paths to [`lookup`] and writes the response. It does no IO.
//!
//! Caching: the URLs carry no content hash (there is no build step to add one), so every
//! response is `Cache-Control: no-cache` with a strong `ETag`: a browser revalidates each
//! file with `If-None-Match` and gets `304 Not Modified` until a new server version changes
//! the bytes, so a deploy is seen at the next page load and an unchanged page costs a few
//! hundred bytes.
//!
//! Security: [`CONTENT_SECURITY_POLICY`] allows scripts, styles and worklets only from the
//! server's own origin (no inline script or style anywhere in `assets/`), WebSocket and fetch
//! only to the own origin or a `ws:`/`wss:` server the user typed into the settings, no
//! framing. [`SECURITY_HEADERS`] go on every response of this crate.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The file name under `assets/`.
    pub name: &'static str,
    /// `Content-Type` header value.
    pub content_type: &'static str,
    /// The file's bytes.
    pub body: &'static [u8],
}

impl Asset {
    /// A strong validator of the body: quoted hex of its SHA-256, first 16 bytes. Computed once
    /// per process (the bodies never change while it runs).
    pub fn etag(&self) -> &'static str {
        static TAGS: OnceLock<Vec<String>> = OnceLock::new();
        let tags = TAGS.get_or_init(|| {
            ASSETS
                .iter()
                .map(|a| {
                    let digest = Sha256::digest(a.body);
                    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                    format!("\"{hex}\"")
                })
                .collect()
        });
        let i = ASSETS
            .iter()
            .position(|a| std::ptr::eq(a, self))
            .expect("every Asset is an element of ASSETS");
        &tags[i]
    }

    /// Whether an `If-None-Match` header value names this body (a list, `*`, or weak tags).
    pub fn matches(&self, if_none_match: &str) -> bool {
        let tag = self.etag();
        if_none_match
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == tag)
    }
}

const JS: &str = "text/javascript; charset=utf-8";

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../assets/", $name)),
        }
    };
}

/// Every file of the client. `index.html` is the page; the rest are what it loads.
pub static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("protocol.js", JS),
    asset!("microphone.js", JS),
    asset!("player.js", JS),
    asset!("resampler.js", JS),
    asset!("capture-worklet.js", JS),
    asset!("playback-worklet.js", JS),
    asset!("favicon.svg", "image/svg+xml"),
];

/// The file for a name under `assets/`, if there is one. Names are matched exactly: no
/// directories, no normalisation, so no path can reach anything but the embedded table.
pub fn lookup(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The page itself.
pub fn index() -> &'static Asset {
    lookup("index.html").expect("index.html is embedded")
}

/// The policy of every response. `connect-src` names `ws:`/`wss:` besides `'self'` because
/// the settings let a user point the page at another duplex server; scripts (modules and
/// AudioWorklet processors alike), styles and images only ever come from this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; media-src 'self'; connect-src 'self' ws: wss:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Headers of every response for an asset, besides type, length and validator.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    // The page asks for the microphone; nothing embedded may, and nothing else is used.
    (
        "permissions-policy",
        "microphone=(self), camera=(), geolocation=(), payment=()",
    ),
    ("cross-origin-opener-policy", "same-origin"),
    ("cache-control", "no-cache"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_assets_is_served_and_every_served_file_exists() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let mut served: Vec<String> = ASSETS.iter().map(|a| a.name.to_owned()).collect();
        served.sort();
        assert_eq!(on_disk, served);
    }

    #[test]
    fn etags_differ_per_file_and_match_themselves() {
        let tags: std::collections::HashSet<_> = ASSETS.iter().map(|a| a.etag()).collect();
        assert_eq!(tags.len(), ASSETS.len());
        let app = lookup("app.js").unwrap();
        assert!(app.matches(app.etag()));
        assert!(app.matches(&format!("\"x\", W/{}", app.etag())));
        assert!(app.matches("*"));
        assert!(!app.matches(lookup("player.js").unwrap().etag()));
    }

    #[test]
    fn lookup_takes_names_not_paths() {
        assert!(lookup("app.js").is_some());
        for bad in ["../Cargo.toml", "/app.js", "assets/app.js", "", "APP.JS"] {
            assert!(lookup(bad).is_none(), "{bad}");
        }
    }

    /// The policy forbids inline code; an inline handler or `<script>` body would silently do
    /// nothing in the browser.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = std::str::from_utf8(index().body).unwrap();
        for bad in ["<style", " style=", "onclick=", "onload=", "javascript:"] {
            assert!(!html.contains(bad), "index.html contains {bad:?}");
        }
        for script in html.split("<script").skip(1) {
            let tag = &script[..script.find('>').unwrap()];
            assert!(tag.contains("src="), "inline <script{tag}>");
            let after = &script[script.find('>').unwrap() + 1..];
            assert!(after.starts_with("</script>"), "script with a body");
        }
    }
}
