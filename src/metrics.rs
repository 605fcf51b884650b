//! `/metrics`: every part's series, plus process and build info, gathered at
//! scrape time. The media plane owns its metric names; the control plane's
//! are in [`control`] (its crate exposes plain stats and knows no
//! Prometheus); this module assembles them.

use prometheus::core::Collector;
use prometheus::proto::{LabelPair, MetricFamily};
use prometheus::{Encoder, TextEncoder};

use fleetcall_media::metrics::Family;
use fleetcall_media::SfuHandle;
use fleetcall_signaling::service::ControlPlane;

mod control;
mod transport;

/// The transports' shared counters (QUIC and the HTTP port).
#[derive(Debug, Clone, Default)]
pub struct Transports {
    pub quic: std::sync::Arc<fleetcall_signaling::limits::TransportStats>,
    pub http: std::sync::Arc<fleetcall_signaling::limits::TransportStats>,
}

/// What a scrape reads from.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub sfu: SfuHandle,
    pub control: ControlPlane,
    /// Added to every series: lets one Prometheus tell sites apart.
    pub site: String,
    /// Per-room participant counts: one series per live room (off by default:
    /// a fleet with thousands of short calls makes thousands of series).
    pub room_labels: bool,
    /// Refusals and open sockets of the transports.
    pub transports: Transports,
}

impl Scrape {
    /// The Prometheus text exposition.
    pub async fn render(&self) -> anyhow::Result<String> {
        let mut families = self.sfu.metric_families().await?;
        let (stats, gauges) = self.control.observe().await?;
        families.extend(control::families(&stats, &gauges));
        families.extend(transport::families(&self.transports));
        if self.room_labels {
            let mut rooms = Family::gauge("fleetcall_room_participants", "Participants per room (enabled by metrics.room_labels).");
            for (room, size) in self.sfu.room_sizes().await? {
                rooms = rooms.value(&[("room", &room.0)], size as f64);
            }
            families.push(rooms.build());
        }
        families.extend(process_families());
        families.push(
            Family::gauge("fleetcall_build_info", "Build of the running server; the value is always 1.")
                .value(&[("version", env!("CARGO_PKG_VERSION")), ("git_revision", env!("FLEETCALL_GIT_REVISION"))], 1.0)
                .build(),
        );
        families.retain(|f| !f.get_metric().is_empty());
        for family in &mut families {
            for metric in family.mut_metric() {
                let mut site = LabelPair::default();
                site.set_name("site".into());
                site.set_value(self.site.clone());
                let mut labels = metric.take_label();
                labels.push(site);
                metric.set_label(labels);
            }
        }
        let mut text = Vec::new();
        TextEncoder::new().encode(&families, &mut text)?;
        Ok(String::from_utf8(text)?)
    }
}

/// CPU seconds, resident memory, open file descriptors (from /proc).
fn process_families() -> Vec<MetricFamily> {
    prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, "fleetcall").collect()
}
