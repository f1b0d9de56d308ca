//! SIGTERM and SIGINT: when to stop, and a record of what arrived.
//!
//! Each signal is recorded, in this order: for SIGTERM, a `SIGTERM <unix ms>` line appended
//! (and fsynced) to `DEMO_SIGTERM_FILE` if it is set; one line on stdout; an entry in the
//! [`SignalLog`] behind `/debug/signals`. Then SIGINT stops the backend, and so does
//! SIGTERM unless `DEMO_IGNORE_SIGTERM=1`, in which case the backend keeps running until it
//! is killed: that is how tests check that an orchestrator escalates to SIGKILL.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};

/// How the backend reacts to SIGTERM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SignalConfig {
    /// `DEMO_SIGTERM_FILE`: where each SIGTERM appends `SIGTERM <unix ms>\n`.
    pub(crate) sigterm_file: Option<PathBuf>,
    /// `DEMO_IGNORE_SIGTERM=1`: record SIGTERM, then keep running.
    pub(crate) ignore_sigterm: bool,
}

impl SignalConfig {
    /// Reads `DEMO_SIGTERM_FILE` (ignored if empty) and `DEMO_IGNORE_SIGTERM` (only `1`
    /// counts) from the process environment.
    pub(crate) fn from_process() -> SignalConfig {
        SignalConfig {
            sigterm_file: std::env::var_os("DEMO_SIGTERM_FILE")
                .filter(|path| !path.is_empty())
                .map(PathBuf::from),
            ignore_sigterm: std::env::var("DEMO_IGNORE_SIGTERM").is_ok_and(|v| v.trim() == "1"),
        }
    }
}

/// One signal received, as `/debug/signals` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedSignal {
    /// `"SIGTERM"` or `"SIGINT"`.
    pub signal: String,
    /// When it was handled, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// True if the backend kept running (`DEMO_IGNORE_SIGTERM=1`).
    pub ignored: bool,
}

/// The signals received so far, shared by the watcher and the handlers.
#[derive(Clone, Debug, Default)]
pub(crate) struct SignalLog(Arc<Mutex<Vec<ReceivedSignal>>>);

impl SignalLog {
    fn record(&self, signal: ReceivedSignal) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(signal);
    }

    /// The signals received so far, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<ReceivedSignal> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The signals handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Term,
    Int,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers now (so a signal that arrives before the
/// future is first polled is not lost) and returns a future that records every signal
/// and resolves when the backend should stop.
pub(crate) fn watch(config: SignalConfig, log: SignalLog) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        loop {
            let signal = tokio::select! {
                Some(()) = sigterm.recv() => Signal::Term,
                Some(()) = sigint.recv() => Signal::Int,
                else => return,
            };
            if handle(signal, &config, &log, crate::now_millis(), &mut std::io::stdout()) {
                return;
            }
        }
    })
}

/// Records `signal`, received at `unix_ms`, printing a line to `stdout`; returns true if
/// the backend should stop.
fn handle(signal: Signal, config: &SignalConfig, log: &SignalLog, unix_ms: u64, stdout: &mut dyn Write) -> bool {
    // The file first: a test reads it after the process is gone, however it ended.
    if let (Signal::Term, Some(path)) = (signal, &config.sigterm_file) {
        if let Err(err) = append_synced(path, &format!("SIGTERM {unix_ms}\n")) {
            tracing::warn!(path = %path.display(), %err, "cannot record SIGTERM in DEMO_SIGTERM_FILE");
        }
    }
    let ignored = signal == Signal::Term && config.ignore_sigterm;
    let action = if ignored {
        "ignoring it (DEMO_IGNORE_SIGTERM=1)"
    } else {
        "shutting down"
    };
    let name = signal.name();
    // Not `println!`: it panics if stdout is gone.
    let _ = writeln!(stdout, "demo backend: {name} received at unix ms {unix_ms}; {action}");
    log.record(ReceivedSignal {
        signal: name.to_owned(),
        unix_ms,
        ignored,
    });
    tracing::info!(signal = name, ignored, "signal received");
    !ignored
}

/// Appends `line` to the file at `path` (creating it) and waits until it is on disk.
pub(crate) fn append_synced(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_is_recorded_then_stops_or_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("signals.txt");
        let log = SignalLog::default();
        let stop = SignalConfig {
            sigterm_file: Some(file.clone()),
            ignore_sigterm: false,
        };
        let mut stdout = Vec::new();
        assert!(handle(Signal::Term, &stop, &log, 1000, &mut stdout));
        let ignore = SignalConfig {
            ignore_sigterm: true,
            ..stop.clone()
        };
        assert!(!handle(Signal::Term, &ignore, &log, 2000, &mut stdout));
        // SIGINT stops even when SIGTERM is ignored, and is not written to the file.
        assert!(handle(Signal::Int, &ignore, &log, 3000, &mut stdout));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "SIGTERM 1000\nSIGTERM 2000\n");
        assert_eq!(
            String::from_utf8(stdout).unwrap(),
            "demo backend: SIGTERM received at unix ms 1000; shutting down\n\
             demo backend: SIGTERM received at unix ms 2000; ignoring it (DEMO_IGNORE_SIGTERM=1)\n\
             demo backend: SIGINT received at unix ms 3000; shutting down\n"
        );
        let seen: Vec<_> = log
            .snapshot()
            .into_iter()
            .map(|s| (s.signal, s.unix_ms, s.ignored))
            .collect();
        assert_eq!(
            seen,
            [
                ("SIGTERM".to_owned(), 1000, false),
                ("SIGTERM".to_owned(), 2000, true),
                ("SIGINT".to_owned(), 3000, false),
            ]
        );
    }

    #[test]
    fn an_unwritable_file_does_not_prevent_stopping() {
        let config = SignalConfig {
            sigterm_file: Some(PathBuf::from("/nonexistent-dir/signals.txt")),
            ignore_sigterm: false,
        };
        let log = SignalLog::default();
        assert!(handle(Signal::Term, &config, &log, 1, &mut std::io::sink()));
        assert_eq!(log.snapshot().len(), 1);
    }
}
