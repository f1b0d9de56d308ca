//! The server roles of the `plane` binary: `controller`, `drone`, `proxy` and `dev`.
//!
//! Owned by the core team; the CLI in `main.rs` only dispatches here.

use clap::Args;

/// Flags of `plane controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {}

/// Flags of `plane drone`.
#[derive(Debug, Args)]
pub struct DroneArgs {}

/// Flags of `plane proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {}

/// Flags of `plane dev`.
#[derive(Debug, Args)]
pub struct DevArgs {}

/// Runs `plane controller`.
pub async fn run_controller(_args: ControllerArgs) -> anyhow::Result<()> {
    anyhow::bail!("the controller role is being written")
}

/// Runs `plane drone`.
pub async fn run_drone(_args: DroneArgs) -> anyhow::Result<()> {
    anyhow::bail!("the drone role is being written")
}

/// Runs `plane proxy`.
pub async fn run_proxy(_args: ProxyArgs) -> anyhow::Result<()> {
    anyhow::bail!("the proxy role is being written")
}

/// Runs `plane dev`.
pub async fn run_dev(_args: DevArgs) -> anyhow::Result<()> {
    anyhow::bail!("the dev role is being written")
}
