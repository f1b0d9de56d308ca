//! The `plane` binary: every server role and the operator/developer CLI in one program.
//!
//! This file only parses flags, installs logging (to stderr, filtered by `RUST_LOG`),
//! builds the tokio runtime and maps the outcome to an exit code: 0 on success, 1 on
//! any error (printed as `error: …`), 2 for usage errors (clap's convention).
//!
//! * `cli`: the flags and the client commands (`connect`, `status`, …).
//! * `roles`: the server roles (`controller`, `drone`, `drone-watchdog`, `proxy`, `dev`).
//! * `plane_demo` (its own crate): the bundled demo backend (`demo-backend`).

mod cli;
mod roles;

use clap::Parser as _;
use std::process::ExitCode;
use std::time::Duration;

/// How long the runtime waits for leftover blocking work when the program ends.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    install_panic_hook();
    // Exits with 2 on usage errors, 0 for --help and --version.
    let cli = cli::Cli::parse();
    init_tracing(cli.default_log_filter());

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(cli));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::debug!(error = ?err, "command failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default_filter`.
fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A panic is a bug: say so in one line instead of the default report.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown cause");
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error (a bug in plane): {message}{location}");
    }));
}
