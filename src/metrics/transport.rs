//! The transports' Prometheus series, read at scrape time from their shared
//! counters (the transports know no Prometheus).

use std::sync::atomic::Ordering;

use fleetcall_media::metrics::Family;
use fleetcall_signaling::limits::{Refusal, Transport, TransportStats};
use prometheus::proto::MetricFamily;

use super::Transports;

/// Every transport series; every reason has a series from the start.
pub fn families(transports: &Transports) -> Vec<MetricFamily> {
    let both = [(Transport::Quic, &*transports.quic), (Transport::Http, &*transports.http)];
    let mut refused = Family::counter(
        "fleetcall_transport_refused_total",
        "Sockets a transport refused or closed before the controller heard of them, by reason.",
    );
    let mut open = Family::gauge("fleetcall_transport_connections", "Sockets open now, by transport (QUIC: handshakes included).");
    for (transport, stats) in both {
        for &reason in reasons(transport) {
            refused = refused.value(&[("transport", transport.as_str()), ("reason", reason.as_str())], stats.refusals(reason) as f64);
        }
        open = open.value(&[("transport", transport.as_str())], stats.connections.load(Ordering::Relaxed) as f64);
    }
    let quic: &TransportStats = &transports.quic;
    vec![
        refused.build(),
        open.build(),
        Family::counter("fleetcall_quic_retries_total", "QUIC Retry packets sent: address validation under handshake load or at an address's limit.")
            .value(&[], quic.retries.load(Ordering::Relaxed) as f64)
            .build(),
        Family::gauge("fleetcall_quic_handshakes", "QUIC handshakes in progress.").value(&[], quic.handshakes.load(Ordering::Relaxed) as f64).build(),
    ]
}

/// The reasons a transport can give.
fn reasons(transport: Transport) -> &'static [Refusal] {
    match transport {
        Transport::Quic => &[Refusal::PerAddress, Refusal::Capacity, Refusal::HandshakeTimeout, Refusal::StreamTimeout],
        Transport::Http => &[Refusal::PerAddress, Refusal::RequestTimeout],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_follow_the_counters() {
        let transports = Transports::default();
        transports.http.refused(Refusal::RequestTimeout);
        transports.quic.retries.fetch_add(3, Ordering::Relaxed);
        let mut text = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families(&transports), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("fleetcall_transport_refused_total{transport=\"http\",reason=\"request_timeout\"} 1\n"), "{text}");
        assert!(text.contains("fleetcall_transport_refused_total{transport=\"quic\",reason=\"per_address\"} 0\n"), "{text}");
        assert!(text.contains("fleetcall_quic_retries_total 3\n"), "{text}");
        assert!(text.contains("fleetcall_transport_connections{transport=\"quic\"} 0\n"), "{text}");
    }
}
