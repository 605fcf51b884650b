#!/usr/bin/env python3
"""Medians over the repeats of loadtest/bench/figures.sh: one line per scenario.

    python3 loadtest/bench/summarize.py [OUT_DIR]     # default target/loadtest-figures

Reads OUT_DIR/<name>-<n>.json (fleetcall-loadtest --json reports) and, for
the Janus runs, the side-by-side table at the end of <name>-<n>.txt.
"""
import glob
import json
import os
import re
import statistics
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "target/loadtest-figures"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def runs():
    by_name = {}
    for path in sorted(glob.glob(os.path.join(OUT, "*.json"))):
        name = re.sub(r"-\d+\.json$", "", os.path.basename(path))
        with open(path) as f:
            by_name.setdefault(name, []).append(json.load(f))
    return by_name


def latency(report, key, field):
    return (report["latency"].get(key) or {}).get(field)


def main():
    print(f"{'scenario':<16}{'n':>3}{'µs/pkt':>9}{'streams/core':>14}{'talker str/core':>17}"
          f"{'cpu %':>7}{'loss %':>8}{'e2e p99':>9}{'join p99':>10}{'tool %':>8}")
    for name, reports in runs().items():
        if name.startswith("janus"):
            continue
        r = [x["resources"] for x in reports]
        m = [x["media"] for x in reports]
        loss = median([x["loss"] * 100 if x["streams"] else None for x in m])
        print(f"{name:<16}{len(reports):>3}"
              f"{fmt(median([x['server_cpu_us_per_packet'] for x in r])):>9}"
              f"{fmt(median([x['streams_per_core'] for x in r]), 0):>14}"
              f"{fmt(median([x['talker_streams_per_core'] for x in r]), 0):>17}"
              f"{fmt(median([x['server_cpu_pct'] for x in r])):>7}"
              f"{fmt(loss, 3):>8}"
              f"{fmt(median([latency(x, 'audio_e2e', 'p99_ms') for x in reports])):>9}"
              f"{fmt(median([latency(x, 'join_to_first_audio', 'p99_ms') for x in reports])):>10}"
              f"{fmt(median([x['tool_cpu_pct'] for x in r])):>8}")
        for x in reports:
            extra = []
            for key in ("register", "invite_to_ringing", "answer_to_first_audio", "reregister_after_restart"):
                if latency(x, key, "count"):
                    extra.append(f"{key} p50 {latency(x, key, 'p50_ms')} p99 {latency(x, key, 'p99_ms')} ms")
            if x["resources"].get("server_kb_per_device"):
                extra.append(f"{x['resources']['server_kb_per_device']} KB and "
                             f"{x['resources']['server_us_per_device_second']} µs/s per idle device")
            if extra and not name.startswith(("fwd", "sup", "join", "slots", "all")):
                print("    " + "; ".join(extra))
    # Where a forwarded packet's cost goes (medians; `-` where not measured).
    print(f"\n{'scenario':<22}{'fwd pkt/s':>10}{'user µs':>9}{'sys µs':>8}{'sockcalls':>10}"
          f"{'switches':>9}{'wakeups/s':>10}{'wakeups':>8}   (per forwarded packet)")
    for name, reports in runs().items():
        r = [x["resources"] for x in reports]
        if not any(x.get("server_user_us_per_packet") for x in r):
            continue
        rate = median([x["server_forwarded_packets"] / x["measured_s"]
                       if x.get("server_forwarded_packets") and x.get("measured_s") else None for x in r])
        print(f"{name:<22}{fmt(rate, 0):>10}"
              f"{fmt(median([x.get('server_user_us_per_packet') for x in r]), 2):>9}"
              f"{fmt(median([x.get('server_sys_us_per_packet') for x in r]), 2):>8}"
              f"{fmt(median([x.get('media_syscalls_per_packet') for x in r]), 3):>10}"
              f"{fmt(median([x.get('server_switches_per_packet') for x in r]), 3):>9}"
              f"{fmt(median([x.get('worker_wakeups_per_s') for x in r]), 0):>10}"
              f"{fmt(median([x.get('worker_wakeups_per_packet') for x in r]), 3):>8}")
    # Janus: the side-by-side table of each --compare run.
    for path in sorted(glob.glob(os.path.join(OUT, "janus*.txt"))):
        with open(path) as f:
            text = f.read()
        rows = [line for line in text.splitlines()
                if line.startswith(("server CPU per delivered", "continuous streams", "talker-stream loss", "server CPU, %"))]
        if rows:
            print(os.path.basename(path))
            for row in rows:
                print("    " + row)


if __name__ == "__main__":
    main()
