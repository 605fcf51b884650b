#!/usr/bin/env python3
"""Writes the fleetcall Grafana dashboards (dashboards/*.json).

The JSON files are what Grafana loads and what tests/prometheus.rs checks; this
script is their source, so panels share one layout, one datasource variable and
one site filter. Edit it and run `python3 dashboards/generate.py` (standard
library only), then `cargo test --test prometheus`.

Every query filters on `site=~"$site"` (written SITE below) and uses the
`$datasource` variable; `$__rate_interval` ([RI]) follows the datasource's scrape
interval (`timeInterval` in provisioning/datasources/prometheus.yml).
"""

import json
import pathlib

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SITE = 'site=~"$site"'
RI = "$__rate_interval"

# Seconds in a 20 ms audio frame: the DSP budget per frame and per stream.
FRAME_BUDGET = 0.02
# Config::detection_bound with the default 2 s heartbeat: 4 intervals.
DETECTION_BOUND = 8


def expr(text):
    return text.replace("SITE", SITE).replace("[RI]", f"[{RI}]")


def target(text, legend="", instant=False, fmt=None):
    t = {"datasource": DATASOURCE, "editorMode": "code", "expr": expr(text), "legendFormat": legend, "range": not instant, "instant": instant}
    if fmt:
        t["format"] = fmt
    return t


def quantiles(metric, qs=(0.5, 0.95, 0.99), by="", extra=""):
    """histogram_quantile targets for `metric` (a histogram base name)."""
    sel = f"{{SITE{',' + extra if extra else ''}}}"
    group = f"{by}, le" if by else "le"
    out = []
    for q in qs:
        legend = f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append(target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{sel}[RI])))", legend))
    return out


def thresholds(*steps):
    """steps: (value, color) after the base green."""
    out = [{"color": "green", "value": None}]
    out += [{"color": color, "value": value} for value, color in steps]
    return {"mode": "absolute", "steps": out}


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels = []
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def row(self, title, description):
        self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"id": self._id(), "type": "row", "title": title, "description": description, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _panel(self, kind, title, description, targets, w, h, defaults, options):
        for i, t in enumerate(targets):
            t["refId"] = chr(ord("A") + i)
        self.panels.append(
            {
                "id": self._id(),
                "type": kind,
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "gridPos": self._place(w, h),
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options,
                "targets": targets,
            }
        )

    def stat(self, title, description, targets, unit="short", steps=(), w=4, h=4, decimals=None):
        defaults = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": thresholds(*steps)}
        if decimals is not None:
            defaults["decimals"] = decimals
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
        self._panel("stat", title, description, targets, w, h, defaults, options)

    def series(self, title, description, targets, unit="short", w=12, h=8, stack=False, limit=None, minimum=0):
        custom = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 25 if stack else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if limit is not None else "off"},
        }
        defaults = {"unit": unit, "color": {"mode": "palette-classic"}, "custom": custom, "thresholds": thresholds(*([(limit, "red")] if limit is not None else []))}
        if minimum is not None:
            defaults["min"] = minimum
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}}
        self._panel("timeseries", title, description, targets, w, h, defaults, options)

    def heatmap(self, title, description, metric, unit, extra="", w=12, h=8):
        sel = f"{{SITE{',' + extra if extra else ''}}}"
        targets = [target(f"sum by (le) (increase({metric}_bucket{sel}[RI]))", "{{le}}", fmt="heatmap")]
        options = {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64, "fill": "dark-orange", "reverse": False},
            "rowsFrame": {"layout": "auto"},
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "tooltip": {"mode": "single", "yHistogram": False},
            "legend": {"show": True},
            "filterValues": {"le": 1e-9},
        }
        self._panel("heatmap", title, description, targets, w, h, {"custom": {"scaleDistribution": {"type": "linear"}}}, options)

    def table(self, title, description, targets, w=12, h=6):
        options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}}
        self._panel("table", title, description, targets, w, h, {"custom": {"align": "auto"}}, options)
        self.panels[-1]["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True}}}]

    def json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["fleetcall"],
            "editable": True,
            "graphTooltip": 1,
            "refresh": "30s",
            "schemaVersion": 39,
            "version": 1,
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"title": "fleetcall", "type": "dashboards", "tags": ["fleetcall"], "asDropdown": True, "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False, "tooltip": "", "url": ""}],
            "templating": {
                "list": [
                    {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "", "skipUrlSync": False},
                    {
                        "name": "site",
                        "label": "Site",
                        "description": "The --metrics-site of the servers to show (every fleetcall series carries it).",
                        "type": "query",
                        "datasource": DATASOURCE,
                        "definition": "label_values(fleetcall_build_info, site)",
                        "query": {"query": "label_values(fleetcall_build_info, site)", "refId": "site"},
                        "current": {},
                        "hide": 0,
                        "includeAll": True,
                        "allValue": ".*",
                        "multi": True,
                        "options": [],
                        "refresh": 2,
                        "regex": "",
                        "skipUrlSync": False,
                        "sort": 1,
                    },
                ]
            },
            "panels": self.panels,
        }


def fleet():
    b = Board("fleetcall-fleet", "fleetcall / Fleet reachability", "Can the server reach every device now, and is the control plane healthy? Devices by reachability, flapping, heartbeats, sessions, closed connections, and the server processes.")
    b.row("Now", "Headline numbers for the selected sites, latest value.")
    b.stat("Devices online", "Devices whose control stream moves messages now (their last heartbeat was acked). Healthy: the number of devices that should be powered on; a drop means devices lost their control connection.", [target("sum(fleetcall_devices{SITE,reachability=\"online\"})")], steps=())
    b.stat("Devices degraded", "Devices that missed 2 heartbeats in a row but are not yet declared unreachable. Healthy: 0, or 1-2 for a few seconds while a device roams between access points.", [target("sum(fleetcall_devices{SITE,reachability=\"degraded\"})")], steps=((1, "yellow"), (5, "red")))
    b.stat("Devices unreachable", "Known devices the server cannot reach: control connection lost or heartbeats missed 3 times. Healthy: only the devices known to be switched off; a rise means a ward, floor or network segment is cut off.", [target("sum(fleetcall_devices{SITE,reachability=\"unreachable\"})")], steps=((1, "yellow"), (10, "red")))
    b.stat("Control connections", "Open device control connections (QUIC and WebSocket). Healthy: online + degraded devices; more than that means duplicate connections per device.", [target("sum(fleetcall_control_connections{SITE})")])
    b.stat("Detached sessions", "Sessions waiting for their device to resume (connection lost, within the resume grace). Healthy: 0, briefly a few during reconnects; stuck high means devices never come back.", [target("sum(fleetcall_sessions{SITE,state=\"detached\"})")], steps=((1, "yellow"), (20, "red")))
    b.stat("Sessions resumed (range)", "Share of reconnects that resumed their session (calls and media kept) rather than rejoining from scratch, over the dashboard's time range. Healthy: above 90 %; low means the resume grace is too short or the server restarted.", [target("sum(increase(fleetcall_sessions_total{SITE,outcome=\"resumed\"}[$__range])) / sum(increase(fleetcall_sessions_total{SITE,outcome=~\"resumed|rejoined\"}[$__range]))")], unit="percentunit", steps=())
    b.row("Reachability", "Devices by reachability and how often it changes.")
    b.series("Devices by reachability", "Known devices, stacked by reachability. Healthy: a flat online band; degraded and unreachable thin. A step up in unreachable is an outage somewhere in the fleet.", [target("sum by (reachability) (fleetcall_devices{SITE})", "{{reachability}}")], stack=True)
    b.series("Reachability changes", "Devices changing reachability, per minute, by from -> to. Healthy: near 0 outside shift changes; online -> degraded -> online repeating is flapping (a device whose control stream keeps stalling); unreachable -> online also counts every device's first hello.", [target("sum by (from, to) (rate(fleetcall_reachability_changes_total{SITE}[RI])) * 60", "{{from}} -> {{to}}")], unit="short")
    b.series("Flapping: online lost per 15 min", "Times a device lost the online state (to degraded or unreachable) in the last 15 minutes; the FleetcallDevicesFlapping alert uses the same number. Losses, not returns, are counted because a device's first hello also counts as unreachable -> online. Healthy: 0-2 outside shift changes; a sustained level means devices keep losing and regaining their control stream (Wi-Fi roaming, power saving, an overloaded access point).", [target("sum(increase(fleetcall_reachability_changes_total{SITE,from=\"online\"}[15m]))", "online lost")], limit=10)
    b.series("Unreachable share", "Unreachable devices as a share of all known devices. Healthy: the share of devices that are normally switched off (often under 5 %); the FleetcallDevicesUnreachable alert fires above 10 %.", [target("sum(fleetcall_devices{SITE,reachability=\"unreachable\"}) / sum(fleetcall_devices{SITE})", "unreachable")], unit="percentunit", limit=0.1)
    b.row("Heartbeats", "The application heartbeat in both directions proves messages move, not just that the path is up.")
    b.series("Heartbeats per second", "Server heartbeats sent, acks received, heartbeats received from devices, and missed intervals. Healthy: sent = acked = connected devices / heartbeat interval; missed close to 0.", [target("sum by (event) (rate(fleetcall_heartbeats_total{SITE}[RI]))", "{{event}}")], unit="ops")
    b.series("Missed heartbeat ratio", "Missed heartbeat intervals as a share of heartbeats sent. Healthy: below 0.1 %; above 5 % (FleetcallHeartbeatsMissed) devices are about to turn degraded.", [target("sum(rate(fleetcall_heartbeats_total{SITE,event=\"missed\"}[RI])) / sum(rate(fleetcall_heartbeats_total{SITE,event=\"sent\"}[RI]))", "missed / sent")], unit="percentunit", limit=0.05)
    b.series("Heartbeat RTT", "Round-trip time of server heartbeats through the control stream (the same path as call events), quantiles over all devices. Healthy: p99 under 50 ms on a LAN; hundreds of ms mean queued control messages or a congested link, the precursor of missed heartbeats.", quantiles("fleetcall_heartbeat_rtt_seconds"), unit="s")
    b.series("Heartbeat RTT (mean)", "Mean heartbeat round-trip time. Healthy: a few ms on a LAN, steady; a slow climb means the control plane (or the network) is getting congested.", [target("sum(rate(fleetcall_heartbeat_rtt_seconds_sum{SITE}[RI])) / sum(rate(fleetcall_heartbeat_rtt_seconds_count{SITE}[RI]))", "mean")], unit="s")
    b.row("Sessions and connections", "Reconnects, resumes and why connections end.")
    b.series("Session outcomes per minute", "created: fresh hello; resumed: came back within the resume grace (calls kept); rejoined: resume refused because the server no longer knew the session; swept: never came back; replaced: the device opened a new session over an old one. Healthy: resumed far above rejoined; swept and replaced near 0.", [target("sum by (outcome) (rate(fleetcall_sessions_total{SITE}[RI])) * 60", "{{outcome}}")])
    b.series("Connections closed by reason per minute", "Control connections the server closed. Healthy: near 0. heartbeat_timeout = devices lost; not_reading = devices whose stream was open but not reading (the stalled-but-alive failure); protocol_error, too_many_errors, frame_too_large = client bugs or version skew; replaced = reconnect races.", [target("sum by (reason) (rate(fleetcall_connections_closed_total{SITE}[RI])) * 60", "{{reason}}")])
    b.series("Retries and stale notices", "Requests answered from the idempotency cache (device retries) and SFU notices for participations the controller no longer knows. Healthy: duplicates rise only with lossy links; stale notices stay near 0 (each one is a race the server absorbed).", [target("sum(rate(fleetcall_duplicate_requests_total{SITE}[RI])) * 60", "duplicate requests / min"), target("sum(rate(fleetcall_stale_sfu_notices_total{SITE}[RI])) * 60", "stale SFU notices / min")])
    b.series("Detached sessions", "Sessions waiting for a resume, over time. Healthy: spikes that fall back to 0 within the resume grace (10 s by default); a plateau means sessions are not swept.", [target("sum by (state) (fleetcall_sessions{SITE})", "{{state}}")], stack=True)
    b.row("Servers", "The fleetcall processes behind the selected sites.")
    b.table("Versions", "The build every server runs. Healthy: one row per server, all on the same version and git revision after a rollout.", [target("max by (site, instance, version, git_revision) (fleetcall_build_info{SITE})", instant=True, fmt="table")])
    b.series("Uptime", "Seconds since each server process started. Healthy: grows steadily; a drop to 0 is a restart (FleetcallRestarting fires on repeated ones).", [target("time() - fleetcall_process_start_time_seconds{SITE}", "{{instance}}")], unit="s")
    b.series("CPU", "CPU cores used by each server process (media, DSP and control plane together). Healthy: well below the machine's cores; the audio dashboard shows the DSP share.", [target("rate(fleetcall_process_cpu_seconds_total{SITE}[RI])", "{{instance}}")], unit="short")
    b.series("Memory", "Resident memory of each server process. Healthy: flat at a steady fleet size (about 36 KB per idle connected device plus media buffers); a slow climb with a steady fleet is a leak.", [target("fleetcall_process_resident_memory_bytes{SITE}", "{{instance}}")], unit="bytes")
    b.series("File descriptors", "Open file descriptors as a share of the limit. Healthy: far below 80 % (FleetcallFileDescriptorsNearLimit); each WebSocket device holds one.", [target("fleetcall_process_open_fds{SITE} / fleetcall_process_max_fds{SITE}", "{{instance}}")], unit="percentunit", limit=0.8)
    b.series("Threads", "Threads of each server process. Healthy: constant (tokio workers, one media worker per core, DSP threads); growth means threads are leaking.", [target("fleetcall_process_threads{SITE}", "{{instance}}")])
    return b


def calls():
    b = Board("fleetcall-calls", "fleetcall / Calls", "Calls from invite to end: phases, transitions, why calls end, ring-to-answer, convergence after faults, join-to-first-audio and protocol errors.")
    b.row("Now", "Calls in each phase now, call rate, failed share and answer time.")
    b.stat("Unanswered (inviting + ringing)", "1:1 calls waiting for the callee: inviting (not yet alerting) and ringing. Healthy: a few at most; each must leave within the ring timeout (30 s by default).", [target("sum(fleetcall_calls{SITE,phase=~\"inviting|ringing\"})")])
    b.stat("Connecting", "Calls answered whose media is being set up. Healthy: 0-2; a call normally connects within a second or two.", [target("sum(fleetcall_calls{SITE,phase=\"connecting\"})")])
    b.stat("Active calls", "Calls with media flowing.", [target("sum(fleetcall_calls{SITE,phase=\"active\"})")])
    b.stat("Calls per minute", "Calls created per minute (1:1 and group). Healthy: the site's usual pattern; a fall to 0 during working hours means devices cannot place calls.", [target("sum(rate(fleetcall_calls_created_total{SITE}[RI])) * 60")], decimals=1)
    b.stat("Failed calls (range)", "Calls that ended by a fault (connection_lost, setup_timeout, media_failed) as a share of all ended calls over the dashboard's range. Healthy: below 1 %; FleetcallCallsFailing fires above 10 %.", [target("sum(increase(fleetcall_call_transitions_total{SITE,to=\"ended\",reason=~\"connection_lost|setup_timeout|media_failed\"}[$__range])) / sum(increase(fleetcall_call_transitions_total{SITE,to=\"ended\"}[$__range]))")], unit="percentunit", steps=((0.01, "yellow"), (0.1, "red")))
    b.stat("Ring to answer p50", "Median time from invitation to answer over the dashboard's range. Healthy: a few seconds: people pick up; it is human time, not server time.", [target("histogram_quantile(0.5, sum by (le) (increase(fleetcall_ring_to_answer_seconds_bucket{SITE}[$__range])))")], unit="s")
    b.row("Phases and transitions", "Where calls are and how they move.")
    b.series("Calls by phase", "Calls in each phase (ended calls are remembered for 2 minutes). Healthy: active follows the working day; inviting, ringing and connecting stay small and never plateau.", [target("sum by (phase) (fleetcall_calls{SITE})", "{{phase}}")])
    b.series("Calls created per minute", "New calls by kind (direct 1:1 and group). Healthy: the site's usual daily pattern.", [target("sum by (kind) (rate(fleetcall_calls_created_total{SITE}[RI])) * 60", "{{kind}}")])
    b.series("Phase transitions per minute", "Call phase transitions other than the end (from=unspecified is creation). Healthy: inviting -> ringing close to unspecified -> inviting (callees alert), ringing -> connecting -> active for answered calls.", [target("sum by (from, to) (rate(fleetcall_call_transitions_total{SITE,to!=\"ended\"}[RI])) * 60", "{{from}} -> {{to}}")])
    b.series("Calls ended by reason per minute", "Why calls end. Healthy: hangup, declined, cancelled dominate; ring_timeout and unavailable are people and powered-off devices; connection_lost, setup_timeout and media_failed are faults and stay near 0.", [target("sum by (reason) (rate(fleetcall_call_transitions_total{SITE,to=\"ended\"}[RI])) * 60", "{{reason}}")])
    b.series("Failed call share", "Faulted ends (connection_lost, setup_timeout, media_failed) over all ends. Healthy: below 1 %; the FleetcallCallsFailing alert fires above 10 %.", [target("sum(rate(fleetcall_call_transitions_total{SITE,to=\"ended\",reason=~\"connection_lost|setup_timeout|media_failed\"}[RI])) / sum(rate(fleetcall_call_transitions_total{SITE,to=\"ended\"}[RI]))", "failed / ended")], unit="percentunit", limit=0.1)
    b.series("Group participants removed per minute", "Members removed from group calls that went on, by reason. Healthy: left dominates; connection_lost and media_failed near 0.", [target("sum by (reason) (rate(fleetcall_group_participants_removed_total{SITE}[RI])) * 60", "{{reason}}")])
    b.row("Latency", "How long setup and recovery take.")
    b.series("Ring to answer", "From invitation to answer, quantiles. Healthy: seconds (human reaction); p95 close to the ring timeout means calls are mostly missed.", quantiles("fleetcall_ring_to_answer_seconds", (0.5, 0.95)), unit="s")
    b.series("Convergence after a fault", f"From a fault (last proof of life of a lost session, or the start of a setup step that timed out) until the call or participant reached its terminal state, quantiles. Healthy: p95 below the detection bound ({DETECTION_BOUND} s = 4 heartbeat intervals at the default 2 s; red line). Setup timeouts (up to 15 s) and connected calls whose device never resumes (detection + 10 s resume grace) are slower by design; above 20 s something did not converge when a timer said it should.", quantiles("fleetcall_convergence_seconds", (0.5, 0.95, 0.99)), unit="s", limit=DETECTION_BOUND)
    b.series("Faults converged per minute", "Calls and participants that reached their terminal state after a fault. Healthy: near 0; a spike is a network or device incident, and every one of them should appear here (nothing left stale).", [target("sum(rate(fleetcall_convergence_seconds_count{SITE}[RI])) * 60", "converged / min")])
    b.series("Join to first audio", "From a participant joining the SFU to the first audio packet sent to it, quantiles. Healthy: p95 under 500 ms on a LAN (ICE-lite + DTLS + first RTP); seconds mean slow DTLS or a blocked media port.", quantiles("fleetcall_join_to_first_audio_seconds", (0.5, 0.95)), unit="s", limit=1)
    b.row("Protocol errors", "Error replies the server sends to devices, by code.")
    b.series("Protocol errors per minute by code", "Error replies sent to devices, by code. Healthy: near 0. unknown_call, call_ended, invalid_state come from normal races in small numbers; malformed_frame, unknown_message, unsupported_version mean a client bug or a version mismatch after a rollout; overloaded means the server sheds load.", [target("sum by (code) (rate(fleetcall_protocol_errors_total{SITE}[RI])) * 60", "{{code}}")])
    b.series("Protocol errors per call created", "Error replies per call created, a scale-free view. Healthy: below 0.05; FleetcallProtocolErrors fires on an absolute rate.", [target("sum(rate(fleetcall_protocol_errors_total{SITE}[RI])) / sum(rate(fleetcall_calls_created_total{SITE}[RI]))", "errors per call")])
    return b


def media():
    b = Board("fleetcall-media", "fleetcall / Media transport", "The SFU: rooms, participants, tracks and forwarding entries; packets and bytes; drops; RTCP loss, jitter and RTT; NACK and keyframe requests; participants removed by reason (ICE/DTLS failures).")
    b.row("Now", "What the SFU holds now: rooms, participants, tracks, forwarding entries.")
    b.stat("Rooms", "Rooms with at least one participant.", [target("sum(fleetcall_rooms{SITE})")])
    b.stat("Participants", "Participants in all rooms.", [target("sum(fleetcall_participants{SITE})")])
    b.stat("Tracks", "Published tracks. Healthy: about one per participant (microphone) plus cameras.", [target("sum(fleetcall_tracks{SITE})")])
    b.stat("Forwarding entries", "Publisher track -> subscriber entries. Healthy: sum over rooms of tracks x (room size - 1); 0 whenever there are no participants.", [target("sum(fleetcall_forwarding_entries{SITE})")])
    b.stat("Entries beyond bound", "Forwarding entries above tracks x (participants - 1), the most the current participants can need, plus audio slots held while there is no participant: media mappings left behind for someone who is gone. Healthy: 0 always (FleetcallForwardingEntriesLeaked).", [target("sum(clamp_min(fleetcall_forwarding_entries{SITE} - fleetcall_tracks{SITE} * clamp_min(fleetcall_participants{SITE} - 1, 0), 0) + fleetcall_audio_slots{SITE} * (fleetcall_participants{SITE} == bool 0))")], steps=((1, "red"),))
    b.stat("ICE/DTLS failures (range)", "Participants removed for ice_timeout (media silent or ICE lost past the grace) or closed (DTLS/peer connection closed) as a share of all removals over the dashboard's range. Healthy: below 5 %.", [target("sum(increase(fleetcall_participants_removed_total{SITE,reason=~\"ice_timeout|closed\"}[$__range])) / sum(increase(fleetcall_participants_removed_total{SITE}[$__range]))")], unit="percentunit", steps=((0.05, "yellow"), (0.2, "red")))
    b.row("Rooms and forwarding", "SFU state over time, and the largest rooms.")
    b.series("Rooms, participants, tracks", "SFU state over time. Healthy: participants ~ tracks; everything returns to 0 when calls end.", [target("sum(fleetcall_rooms{SITE})", "rooms"), target("sum(fleetcall_participants{SITE})", "participants"), target("sum(fleetcall_tracks{SITE})", "tracks")])
    b.series("Forwarding entries", "Forwarding entries and the most the current participants can need (tracks x (participants - 1)). Healthy: entries at or under the bound, 0 with no participants.", [target("sum(fleetcall_forwarding_entries{SITE})", "entries"), target("sum(fleetcall_tracks{SITE} * clamp_min(fleetcall_participants{SITE} - 1, 0))", "bound")])
    b.series("Largest rooms", "Participants in the 10 largest rooms. Needs --metrics-room-labels true (off by default: one series per live room). Healthy: below --max-room-size; per-packet cost grows with room size.", [target("topk(10, fleetcall_room_participants{SITE})", "{{room}}")])
    b.row("Speaker selection", "Rooms that forward audio by active-speaker selection into a fixed number of audio slots per listener.")
    b.series("Slot rooms, slots and speakers", "Rooms in slot mode, audio slot m-lines of all listeners, and tracks speaking now. Healthy: slots = listeners in slot rooms x slots per listener; speaking tracks a few per active room (one per conversation).", [target("sum(fleetcall_slot_rooms{SITE})", "slot rooms"), target("sum(fleetcall_audio_slots{SITE})", "audio slots"), target("sum(fleetcall_speaking_tracks{SITE})", "speaking tracks")])
    b.series("Selection: packets forwarded and suppressed", "Audio packets in slot rooms forwarded (from a selected speaker) or suppressed by the selection, per second. Healthy: suppressed grows with room size (everyone who is not talking); forwarded ~ 50 per selected speaker per listener slot.", [target("sum by (outcome) (rate(fleetcall_audio_selection_packets_total{SITE}[RI]))", "{{outcome}}")], unit="pps")
    b.series("Speaker changes and slot switches per minute", "Changes of a room's selected speakers, and listener slots handed to another speaker. Healthy: a few per minute per active room (turn-taking); many per second means the selection flaps between noisy tracks.", [target("sum(rate(fleetcall_speaker_changes_total{SITE}[RI])) * 60", "speaker changes"), target("sum(rate(fleetcall_audio_slot_switches_total{SITE}[RI])) * 60", "slot switches")])
    b.heatmap("Speakers per room", "Tracks speaking in a room, observed at every change of its speakers. Healthy: mostly 1 (one person talks), some 2 (interruptions); many at once means background noise is taken for speech.", "fleetcall_room_speakers", "short")
    b.row("Traffic", "Datagrams and bytes through the media ports.")
    b.series("Packets per second", "Media datagrams (RTP, RTCP, STUN, DTLS) in and out, and RTP written to subscribers. Healthy: out ~ forwarded; forwarded ~ in x (room size - 1) for audio (50 packets/s per talker).", [target("sum by (direction) (rate(fleetcall_media_packets_total{SITE}[RI]))", "{{direction}}"), target("sum(rate(fleetcall_rtp_forwarded_total{SITE}[RI]))", "rtp forwarded")], unit="pps")
    b.series("Bitrate", "Media bits per second in and out. Healthy: about 40-60 kbit/s per Opus stream; compare with the LAN uplink of the server.", [target("sum by (direction) (rate(fleetcall_media_bytes_total{SITE}[RI])) * 8", "{{direction}}")], unit="bps")
    b.series("Drops per second by reason", "Datagrams the SFU dropped. Healthy: 0 except a trickle of unknown_source (stale senders after a leave, scanners); malformed or rejected in volume mean an attack or a broken client; unroutable means packets for a track nobody can receive.", [target("sum by (reason) (rate(fleetcall_media_dropped_total{SITE}[RI]))", "{{reason}}")], unit="pps")
    b.series("Drop ratio", "Dropped datagrams as a share of datagrams in. Healthy: below 0.1 %; FleetcallMediaDrops fires above 1 %.", [target("sum(rate(fleetcall_media_dropped_total{SITE}[RI])) / sum(rate(fleetcall_media_packets_total{SITE,direction=\"in\"}[RI]))", "dropped / in")], unit="percentunit", limit=0.01)
    b.series("Media socket calls per forwarded packet", "recvmmsg + sendmmsg calls on the media ports per RTP packet written to a subscriber, and datagrams the kernel did not take. Healthy: well below 1 under load (a receive batch and its fan-out share each call); near 1 or above at light load, where a wake-up carries one packet. Unsent above 0: the send buffer overflowed (a worker past its limit) or a destination was refused.", [target("sum by (direction) (rate(fleetcall_media_socket_calls_total{SITE}[RI])) / scalar(sum(rate(fleetcall_rtp_forwarded_total{SITE}[RI])))", "{{direction}} calls / packet"), target("sum(rate(fleetcall_media_datagrams_unsent_total{SITE}[RI]))", "unsent per second")])
    b.row("Quality reported by participants (RTCP)", "What participants' receiver reports say about the media the SFU sends them.")
    b.series("Loss (RTCP)", "Loss fraction in participants' receiver reports, quantiles. Healthy: p95 below 1 % on wired LAN, below 3 % on Wi-Fi; FleetcallMediaLossHigh fires at p95 above 5 %.", quantiles("fleetcall_rtcp_loss_ratio", (0.5, 0.95)), unit="percentunit", limit=0.05)
    b.series("Jitter (RTCP)", "Interarrival jitter in receiver reports, quantiles. Healthy: p95 under 20 ms; FleetcallMediaJitterHigh fires above 30 ms (audible once it exceeds the jitter buffer).", quantiles("fleetcall_rtcp_jitter_seconds", (0.5, 0.95)), unit="s", limit=0.03)
    b.series("RTT (RTCP)", "Round-trip time to participants from RTCP, quantiles. Healthy: p95 under 50 ms on a LAN; above 250 ms conversation suffers.", quantiles("fleetcall_rtt_seconds", (0.5, 0.95)), unit="s", limit=0.25)
    b.series("NACK and keyframe requests", "NACKs participants sent about forwarded media, and keyframe requests (PLI/FIR) received from and sent to participants, per second. Healthy: NACKs ~ loss x forwarded packets; keyframe requests ~ 0 for audio-only calls, a few per minute per video track.", [target("sum(rate(fleetcall_rtcp_nacks_received_total{SITE}[RI]))", "nacks received"), target("sum by (direction) (rate(fleetcall_rtcp_keyframe_requests_total{SITE}[RI]))", "keyframe requests {{direction}}")], unit="ops")
    b.series("NACKs per 1000 forwarded packets", "NACKs relative to forwarded RTP. Healthy: below 10 (1 % loss); growth means the path to subscribers is losing packets.", [target("1000 * sum(rate(fleetcall_rtcp_nacks_received_total{SITE}[RI])) / sum(rate(fleetcall_rtp_forwarded_total{SITE}[RI]))", "nacks / 1000 packets")])
    b.row("Removals", "Why participants leave the SFU (ICE and DTLS failures among them).")
    b.series("Participants removed per minute by reason", "requested: polite leave; signaling_closed: the signaling socket closed; ice_timeout: media silent or ICE lost past the grace (ICE failure); closed: DTLS or the peer connection closed (DTLS failure); negotiation_failed: an SDP exchange failed; shutdown: server stopping. Healthy: requested and signaling_closed dominate; ice_timeout, closed, negotiation_failed near 0.", [target("sum by (reason) (rate(fleetcall_participants_removed_total{SITE}[RI])) * 60", "{{reason}}")])
    b.series("ICE/DTLS failure share", "ice_timeout + closed removals over all removals. Healthy: below 5 %; FleetcallIceDtlsFailures fires above 20 % (firewall, NAT or certificate problems).", [target("sum(rate(fleetcall_participants_removed_total{SITE,reason=~\"ice_timeout|closed\"}[RI])) / sum(rate(fleetcall_participants_removed_total{SITE}[RI]))", "ICE/DTLS failures / removals")], unit="percentunit", limit=0.2)
    return b


def audio():
    b = Board("fleetcall-audio", "fleetcall / Audio quality", "Server-side noise suppression: streams denoised, input level and noise floor, SNR before and after, attenuation, speech probability, concealment and decode errors, DSP time per 20 ms frame and CPU.")
    b.row("Now", "Audio pipelines now: streams, concealment, frame time, DSP CPU, SNR gain.")
    b.stat("Streams denoised", "Audio tracks going through noise suppression now.", [target("sum(fleetcall_audio_streams{SITE,suppression=\"on\"})")])
    b.stat("Streams not denoised", "Audio tracks in a DSP pipeline with suppression off (by room or device policy).", [target("sum(fleetcall_audio_streams{SITE,suppression=\"off\"})")])
    b.stat("Concealed share", "Packets concealed (synthesised for a lost packet) over packets processed, latest. Healthy: below 1 %.", [target("sum(rate(fleetcall_audio_packets_total{SITE,outcome=\"concealed\"}[RI])) / sum(rate(fleetcall_audio_packets_total{SITE,outcome=\"processed\"}[RI]))")], unit="percentunit", steps=((0.01, "yellow"), (0.05, "red")))
    b.stat("Frame time p99", "99th percentile DSP time per 20 ms frame (decode + denoise + encode). Healthy: under 1 ms; the budget is 20 ms, and above 10 ms (FleetcallSuppressionCpuSaturated) frames start to queue.", [target("histogram_quantile(0.99, sum by (le) (rate(fleetcall_audio_processing_seconds_bucket{SITE}[RI])))")], unit="s", steps=((0.005, "yellow"), (0.01, "red")))
    b.stat("DSP cores busy", "CPU seconds per second spent in the DSP pipelines. Healthy: well below --audio-threads (default: one per core).", [target("sum(rate(fleetcall_audio_processing_seconds_sum{SITE}[RI]))")], decimals=2)
    b.stat("Median SNR gain", "Median SNR after suppression minus median SNR before. Healthy: +10 dB or more in noisy rooms; around 0 means the suppressor is not doing anything (or rooms are quiet).", [target("histogram_quantile(0.5, sum by (le) (rate(fleetcall_audio_snr_db_bucket{SITE,stage=\"after\"}[RI]))) - histogram_quantile(0.5, sum by (le) (rate(fleetcall_audio_snr_db_bucket{SITE,stage=\"before\"}[RI])))")], unit="dB")
    b.row("Streams and packets", "What goes through the DSP pipelines, and how loss is handled.")
    b.series("Audio streams", "Audio tracks in a DSP pipeline, by whether suppression is on. Healthy: follows participants; suppression on for every room that asked for it.", [target("sum by (suppression) (fleetcall_audio_streams{SITE})", "suppression {{suppression}}")], stack=True)
    b.series("Audio packets per second by outcome", "processed: decoded and re-encoded; lost: gaps in the sequence; fec_recovered: rebuilt from in-band FEC; concealed: synthesised by the decoder for a loss. Healthy: processed ~ 50 per stream per second; the others tiny.", [target("sum by (outcome) (rate(fleetcall_audio_packets_total{SITE}[RI]))", "{{outcome}}")], unit="pps")
    b.series("Loss handling share", "Lost, FEC-recovered and concealed packets as a share of processed. Healthy: below 1 %; above 5 % (FleetcallAudioConcealment) listeners hear artefacts.", [target("sum by (outcome) (rate(fleetcall_audio_packets_total{SITE,outcome=~\"lost|fec_recovered|concealed\"}[RI])) / ignoring(outcome) group_left sum(rate(fleetcall_audio_packets_total{SITE,outcome=\"processed\"}[RI]))", "{{outcome}}")], unit="percentunit", limit=0.05)
    b.series("Decode errors per second", "Undecodable audio packets (concealed, the stream goes on). Healthy: 0; anything else is a broken or mismatched encoder on some device.", [target("sum(rate(fleetcall_audio_decode_errors_total{SITE}[RI]))", "decode errors")], unit="ops")
    b.row("Levels", "What the microphones hear, sampled once a second per track.")
    b.heatmap("Input level distribution", "Input RMS level of processed tracks. Healthy: speech between -40 and -10 dBFS; mass below -60 dBFS is silence or far-away talkers; at -3 dBFS and above, microphones clip.", "fleetcall_audio_input_level_dbfs", "suffix: dBFS")
    b.series("Input level quantiles", "Input RMS level, quantiles. Healthy: p50 between -50 (pauses) and -20 dBFS; p90 under -6 dBFS (no clipping).", quantiles("fleetcall_audio_input_level_dbfs", (0.1, 0.5, 0.9)), unit="suffix: dBFS", minimum=None)
    b.heatmap("Noise floor distribution", "Input noise floor of processed tracks. Healthy: below -60 dBFS in quiet rooms, -50 to -40 dBFS in busy wards; above -35 dBFS speech is hard to separate (FleetcallNoiseFloorHigh).", "fleetcall_audio_noise_floor_dbfs", "suffix: dBFS")
    b.series("Noise floor quantiles", "Input noise floor, quantiles. Healthy: p90 below -40 dBFS; FleetcallNoiseFloorHigh fires at p90 above -35 dBFS.", quantiles("fleetcall_audio_noise_floor_dbfs", (0.5, 0.9)), unit="suffix: dBFS", limit=-35, minimum=None)
    b.row("Suppression", "What the noise suppressor does: SNR, attenuation, speech probability.")
    b.series("SNR before and after suppression", "Estimated speech-to-noise ratio before and after suppression, medians. Healthy: after well above before (10 dB or more in noisy rooms); after below 10 dB means speech is still buried.", quantiles("fleetcall_audio_snr_db", (0.5,), by="stage"), unit="dB", minimum=None)
    b.series("Attenuation", "Attenuation the suppressor applied, quantiles. Healthy: 5-20 dB in noisy rooms, near 0 in quiet ones; p90 above 30 dB with a low speech probability is expected in silence, with speech it means quiet talkers are being cut.", quantiles("fleetcall_audio_attenuation_db", (0.5, 0.9)), unit="dB")
    b.heatmap("Speech probability distribution", "RNNoise voice-activity probability per track. Healthy: two clusters, near 0 (pauses) and near 1 (speech); a smear in the middle means the suppressor is unsure (very noisy or very quiet inputs).", "fleetcall_audio_speech_probability", "percentunit")
    b.series("Speech probability", "RNNoise speech probability, quantiles. Healthy: p50 follows how much people talk; p90 near 1 during calls.", quantiles("fleetcall_audio_speech_probability", (0.5, 0.9)), unit="percentunit")
    b.row("DSP cost", "Time per 20 ms frame and CPU of the suppression pipeline.")
    b.series("Processing time per 20 ms frame", "DSP time per packet (Opus decode + RNNoise + Opus encode), quantiles, against the 20 ms frame budget (red). Healthy: p99 under 1 ms (about 0.3-0.7 ms on this kind of machine); above 10 ms the DSP threads are saturated and audio falls behind.", quantiles("fleetcall_audio_processing_seconds"), unit="s", limit=FRAME_BUDGET)
    b.series("Mean processing time per frame", "Mean DSP time per packet, and as a share of the 20 ms budget. Healthy: a share under 5 %: one DSP thread then handles 20 streams or more.", [target("sum(rate(fleetcall_audio_processing_seconds_sum{SITE}[RI])) / sum(rate(fleetcall_audio_processing_seconds_count{SITE}[RI]))", "mean per frame")], unit="s")
    b.series("DSP CPU", "Cores busy in the DSP pipelines (CPU seconds per second), and all CPU of the process. Healthy: DSP well below --audio-threads; DSP close to the thread count means saturation.", [target("sum(rate(fleetcall_audio_processing_seconds_sum{SITE}[RI]))", "DSP"), target("sum(rate(fleetcall_process_cpu_seconds_total{SITE}[RI]))", "whole process")])
    b.series("DSP share of process CPU", "DSP time over all CPU time of the server. Healthy: it depends on how many streams are denoised; a jump at constant streams means the DSP got slower (CPU contention, a costlier codec mode).", [target("sum(rate(fleetcall_audio_processing_seconds_sum{SITE}[RI])) / sum(rate(fleetcall_process_cpu_seconds_total{SITE}[RI]))", "DSP / process")], unit="percentunit")
    return b


def main():
    here = pathlib.Path(__file__).resolve().parent
    for name, board in [("fleet", fleet()), ("calls", calls()), ("media", media()), ("audio", audio())]:
        path = here / f"{name}.json"
        path.write_text(json.dumps(board.json(), indent=2) + "\n")
        print(f"wrote {path.relative_to(here.parent)}: {len(board.panels)} panels")


if __name__ == "__main__":
    main()
