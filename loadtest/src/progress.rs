//! The live view: a progress bar over the run's timeline with the figures
//! that tell whether the load holds (devices up, packet rates, server CPU).
//! Drawn on stderr, hidden when stderr is not a terminal or with `--quiet`.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::outcome::Live;
use crate::server::ProcSample;

/// The counters at the previous refresh: when, sent, received, server,
/// tool, forwarded.
type Snapshot = (
    Instant,
    u64,
    u64,
    Option<ProcSample>,
    Option<ProcSample>,
    Option<u64>,
);

/// The bar and what it needs to compute rates.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    t0: Instant,
    ramp_end: Instant,
    devices: usize,
    last: Option<Snapshot>,
}

impl Progress {
    /// A bar from `t0` to `end`; hidden unless `visible`.
    pub fn new(
        visible: bool,
        t0: Instant,
        ramp_end: Instant,
        end: Instant,
        devices: usize,
    ) -> Self {
        let total = end.saturating_duration_since(t0).as_secs().max(1);
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if visible {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            // A fixed template: it parses.
            ProgressStyle::with_template("{prefix:>9} [{bar:24}] {pos:>4}/{len}s {msg}")
                .expect("progress template")
                .progress_chars("=> "),
        );
        bar.set_prefix("ramp");
        Progress {
            bar,
            t0,
            ramp_end,
            devices,
            last: None,
        }
    }

    /// Refreshes the figures.
    pub fn update(
        &mut self,
        now: Instant,
        live: &Live,
        server: Option<ProcSample>,
        tool: Option<ProcSample>,
        forwarded: Option<u64>,
    ) {
        self.bar
            .set_position(now.saturating_duration_since(self.t0).as_secs());
        if now >= self.ramp_end {
            self.bar.set_prefix("load");
        }
        let sent = Live::get(&live.sent);
        let received = Live::get(&live.received);
        let mut rates = String::new();
        if let Some((at, s0, r0, server0, tool0, fwd0)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
            rates = format!(
                " | tx {:.0}/s rx {:.0}/s",
                (sent - s0) as f64 / dt,
                (received - r0) as f64 / dt
            );
            if let (Some(a), Some(b)) = (server0, server) {
                rates += &format!(
                    " | server {:.0}% {:.0} MB",
                    100.0 * (b.cpu_secs - a.cpu_secs) / dt,
                    b.rss_bytes as f64 / 1e6
                );
            }
            if let (Some(a), Some(b)) = (fwd0, forwarded)
                && b > a
            {
                rates += &format!(" fwd {:.0}/s", (b - a) as f64 / dt);
            }
            if let (Some(a), Some(b)) = (tool0, tool) {
                rates += &format!(" | tool {:.0}%", 100.0 * (b.cpu_secs - a.cpu_secs) / dt);
            }
        }
        // Keep the previous forwarded count until a newer one arrives (it is sampled less often).
        let fwd = forwarded.or(self.last.and_then(|l| l.5));
        if self
            .last
            .is_none_or(|l| now.saturating_duration_since(l.0).as_secs_f64() >= 1.0)
        {
            self.last = Some((now, sent, received, server, tool, fwd));
        }
        self.bar.set_message(format!(
            "devices {}/{} media {} calls {} fail {}{rates}",
            Live::get(&live.registered),
            self.devices,
            Live::get(&live.media_up),
            Live::get(&live.calls),
            Live::get(&live.failures),
        ));
    }

    /// A new phase (leaving, leak check).
    pub fn phase(&self, name: &str) {
        self.bar.set_prefix(name.to_owned());
    }

    /// A line above the bar.
    pub fn note(&self, line: &str) {
        self.bar.println(line);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
