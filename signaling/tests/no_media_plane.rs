//! The control plane, and the device SDK in it, build without the media
//! plane: the controller speaks to the SFU in messages, and only the
//! `fleetcall` binary's bridge knows both sides. `cargo tree` keeps it so.

use std::process::Command;

/// Crates that would bring the media plane (and its libopus, str0m and
/// DTLS) into every device that only needs the control protocol.
const MEDIA: &[&str] =
    &["fleetcall-sfu", "fleetcall-media", "fleetcall-peer", "fleetcall-dsp", "str0m", "audiopus", "nnnoiseless"];

#[test]
fn signaling_depends_on_no_media_crate() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", "fleetcall-signaling", "-e", "normal", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|line| line.starts_with("quinn ")), "not a dependency tree:\n{tree}");
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        assert!(!MEDIA.contains(&name), "fleetcall-signaling depends on {line}:\n{tree}");
    }
}
