//! Measures what the `deepgram` crate (0.14) does against duplex-testkit's Deepgram fake, to
//! decide whether duplex's live STT can use it (ARCHITECTURE.md, duplex-providers).
//!
//! Not a workspace member (it would add the crate to the lock file of the server). Run it
//! with the workspace's versions pinned:
//! `cp Cargo.lock crates/duplex-providers/probes/deepgram-crate/ &&
//!  cargo run --manifest-path crates/duplex-providers/probes/deepgram-crate/Cargo.toml`
//!
//! Measured on 2026-12-02 (deepgram 0.14.0):
//! 1. a `ws://` base URL is accepted;
//! 2. audio, `Finalize` and the `from_finalize: true` answer pass through;
//! 3. with `keep_alive()` on and the fake's inactivity window at 400 ms, the idle stream is
//!    closed after ~400 ms with 0 KeepAlives seen (the crate's timer is a fixed 3 s), and
//!    `receive()` returns `None`: the 1011 `NET-0001` close reason is lost;
//! 4. a bad key gives `WsError(Http(401 …))`, so the status is reachable.
use std::time::{Duration, Instant};

use deepgram::Deepgram;
use deepgram::common::options::{Encoding, Endpointing, Language, Model, Options};
use duplex_testkit::deepgram::DeepgramFake;

fn loud() -> Vec<u8> {
    (0..320)
        .flat_map(|i| (if i % 2 == 0 { 8000i16 } else { -8000 }).to_le_bytes())
        .collect()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let fake = DeepgramFake::start("k", &["what is the weather like in paris"]).await;
    // 1. ws:// base URL (the fakes' scheme).
    let dg = Deepgram::with_base_url_and_api_key(fake.base_url().as_str(), "k");
    println!(
        "1. with_base_url_and_api_key({}) -> ok={}",
        fake.base_url(),
        dg.is_ok()
    );
    let dg = dg.unwrap();
    let options = Options::builder()
        .model(Model::CustomId("nova-3".into()))
        .language(Language::Other("en".into()))
        .smart_format(true)
        .build();
    let open = || {
        dg.transcription()
            .stream_request_with_options(options.clone())
            .encoding(Encoding::Linear16)
            .sample_rate(16000)
            .channels(1)
            .interim_results(true)
            .endpointing(Endpointing::CustomDurationMs(300))
            .utterance_end_ms(1000)
            .vad_events(true)
            .keep_alive()
    };
    // 2. Finalize and raw messages on a speaking stream.
    fake.set_ms_per_word(60);
    let mut h = open().handle().await.expect("connect");
    for _ in 0..30 {
        h.send_data(loud()).await.unwrap();
    }
    h.finalize().await.unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_millis(500), h.receive()).await {
            Ok(Some(Ok(r))) => {
                let s = format!("{r:?}");
                println!("2. response: {}", &s[..s.len().min(160)]);
                if s.contains("from_finalize: true") {
                    break;
                }
            }
            other => {
                println!("2. {other:?}");
                break;
            }
        }
    }
    h.close_stream().await.unwrap();
    drop(h);
    // 3. KeepAlive interval: the crate's is fixed at 3 s. With the fake's inactivity window
    //    shortened to 400 ms (as duplex's test does, with keepalive_interval = 100 ms), does
    //    an idle stream survive 1 s?
    fake.set_timeout(Duration::from_millis(400));
    let mut idle = open().handle().await.expect("connect");
    let t0 = Instant::now();
    let got = tokio::time::timeout(Duration::from_millis(1500), idle.receive()).await;
    println!("3. idle stream after {:?}: {got:?}", t0.elapsed());
    let conns = fake.connections();
    let c = conns.last().unwrap();
    println!(
        "3. fake saw keepalives={} timed_out={}",
        c.keepalives, c.timed_out
    );
    // 4. A wrong key: is the HTTP status reachable?
    let bad = Deepgram::with_base_url_and_api_key(fake.base_url().as_str(), "wrong").unwrap();
    let r = bad
        .transcription()
        .stream_request_with_options(options.clone())
        .handle()
        .await;
    match r {
        Err(e) => println!(
            "4. wrong key -> Err({e}) debug={:?}",
            format!("{e:?}").chars().take(200).collect::<String>()
        ),
        Ok(_) => println!("4. wrong key -> connected?!"),
    }
}
