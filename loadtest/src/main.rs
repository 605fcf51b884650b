//! fleetcall-loadtest: drives simulated rooms of simulated devices through the
//! real protocols (control plane + WebRTC) and reports latency, loss, convergence
//! and leaks in one report.
//!
//! Not implemented yet: the scenarios arrive with the load-test issue.

fn main() {
    eprintln!("fleetcall-loadtest: no scenarios are implemented yet");
    std::process::exit(2);
}
