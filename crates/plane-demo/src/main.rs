//! `plane-demo-backend`: the demo backend as a program of its own, without the rest of
//! Plane, so that it builds quickly as a static binary for the Docker test image.
//!
//! It logs to stderr at the level in `RUST_LOG` (`error`, `warn`, `info`, `debug` or
//! `trace`; default `info`), runs [`plane_demo::run`], and exits 0 after a graceful stop,
//! or 1 with `error: …` on stderr if it cannot start. See the `plane_demo` docs for the
//! routes and the environment variables.

use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::filter::LevelFilter;

/// How long the runtime waits for leftover blocking work when the program ends.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|level| level.trim().parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(plane_demo::run());
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
