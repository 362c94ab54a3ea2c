//! Kill switches at run time: the environment's [`Switches`] overridden by
//! `DUPLEX_SWITCHES_FILE`, re-read every [`RELOAD_INTERVAL`] and published on a `watch`
//! channel that sessions read (and feed to their meter as `MeterInput::Switches`).
//!
//! A file that is missing or invalid keeps the last good switches and is logged: a typo in an
//! emergency edit must not silently turn a switch back on.

use std::path::PathBuf;
use std::time::Duration;

use duplex_metering::Switches;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the file is read: fast enough for an operator flipping a switch in an incident,
/// slow enough to be free (one small file read).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Starts publishing the switches; with a file, spawns the reload task (ends on `shutdown`).
pub fn watch_switches(
    base: Switches,
    file: Option<PathBuf>,
    shutdown: CancellationToken,
) -> watch::Receiver<Switches> {
    let initial = file
        .as_ref()
        .and_then(|f| read(&base, f))
        .unwrap_or_else(|| base.clone());
    let (tx, rx) = watch::channel(initial);
    if let Some(file) = file {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Some(s) = read(&base, &file) {
                    tx.send_if_modified(|cur| {
                        if *cur == s {
                            return false;
                        }
                        tracing::warn!(switches = ?s, "kill switches changed");
                        *cur = s;
                        true
                    });
                }
            }
        });
    }
    rx
}

fn read(base: &Switches, file: &PathBuf) -> Option<Switches> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No file: the environment's switches apply.
            return Some(base.clone());
        }
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "cannot read DUPLEX_SWITCHES_FILE; keeping the current switches");
            return None;
        }
    };
    match base.with_file(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "invalid DUPLEX_SWITCHES_FILE; keeping the current switches");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn file_changes_are_published_and_bad_files_ignored() {
        let dir = std::env::temp_dir().join(format!("duplex-switches-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("switches");
        std::fs::write(&file, "AI_GENERATION_ENABLED=false\n").unwrap();
        let stop = CancellationToken::new();
        let mut rx = watch_switches(Switches::default(), Some(file.clone()), stop.clone());
        assert!(!rx.borrow_and_update().ai_generation_enabled);
        std::fs::write(&file, "AI_GENERATION_ENABLED=true\nMAX_DAILY_SPEND_USD=3\n").unwrap();
        tokio::time::timeout(RELOAD_INTERVAL * 3, rx.changed())
            .await
            .expect("reloaded in time")
            .unwrap();
        assert_eq!(
            rx.borrow_and_update().max_daily_spend_micros,
            Some(3_000_000)
        );
        std::fs::write(&file, "AI_GENERATION_ENABLED=perhaps\n").unwrap();
        tokio::time::sleep(RELOAD_INTERVAL * 3).await;
        assert!(!rx.has_changed().unwrap(), "a bad file changes nothing");
        assert!(rx.borrow().ai_generation_enabled);
        std::fs::remove_file(&file).unwrap();
        tokio::time::timeout(RELOAD_INTERVAL * 3, rx.changed())
            .await
            .expect("reloaded in time")
            .unwrap();
        assert_eq!(
            *rx.borrow(),
            Switches::default(),
            "no file: the environment"
        );
        stop.cancel();
    }
}
