//! Janus VideoRoom as a peer comparison target.

use crate::report::Report;
use crate::run::RunOptions;
use crate::scenario::Scenario;

/// Runs the audio-room scenario against Janus' VideoRoom.
pub async fn run(_scenario: &Scenario, _url: &str, _pid: Option<u32>, _options: &RunOptions) -> anyhow::Result<Report> {
    anyhow::bail!("the Janus mode is not implemented yet")
}

/// Janus and fleetcall side by side.
pub fn compare(_janus: &Report, _fleetcall: &Report) -> String {
    String::new()
}
