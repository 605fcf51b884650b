//! `fleetcall device run`: the reference device agent lives in
//! `fleetcall-agent`; this is its wiring into the binary's CLI.

pub use fleetcall_agent::RunArgs;

/// Runs the agent until Ctrl-C, SIGTERM or `--duration`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    Ok(fleetcall_agent::run(args).await?)
}
