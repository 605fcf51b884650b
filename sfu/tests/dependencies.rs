//! The core stays sans-IO by construction, not by care: its own dependencies
//! are str0m, the DSP crate, thiserror and tracing, and nothing it pulls in
//! is an async runtime or a metrics library.
//!
//! serde cannot be checked the same way: str0m (and nnnoiseless, under the
//! DSP crate) depend on it themselves. What is checked is that this crate
//! does not.

use std::process::Command;

/// `cargo tree` of this crate's normal dependencies, one package per line.
fn tree(depth: Option<u32>) -> Vec<String> {
    let mut command = Command::new(env!("CARGO"));
    command.args(["tree", "--offline", "-p", "fleetcall-sfu", "-e", "normal", "--prefix", "none", "--format", "{p}"]);
    if let Some(depth) = depth {
        command.args(["--depth", &depth.to_string()]);
    }
    let output = command.current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("cargo runs");
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("cargo tree prints UTF-8");
    text.lines().filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect()
}

#[test]
fn the_core_depends_on_no_runtime_metrics_or_serialization() {
    let mut direct = tree(Some(1));
    direct.sort();
    direct.dedup();
    assert_eq!(direct, ["fleetcall-dsp", "fleetcall-sfu", "str0m", "thiserror", "tracing"], "the core's own dependencies");

    let all = tree(None);
    for banned in ["tokio", "prometheus", "quinn-udp", "mio", "serde_json"] {
        assert!(!all.iter().any(|p| p == banned), "{banned} is among the core's dependencies: {all:?}");
    }
}
