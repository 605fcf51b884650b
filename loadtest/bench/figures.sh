#!/bin/sh
# The figures of the README's load-test section, on this machine: the
# server pinned to CPU 0 with one media worker and one DSP thread, the load
# tool pinned to CPU 1 with one thread, so "one server core" is literal and
# the tool does not compete with the server.
#
#   cargo build --release -p fleetcall -p fleetcall-loadtest
#   loadtest/bench/figures.sh [OUT_DIR] [REPEATS]        # default target/loadtest-figures, 3
#   sudo loadtest/bench/figures.sh OUT_DIR REPEATS janus  # also Janus side by side (root: netns)
#
# Every run writes OUT_DIR/<name>-<n>.json (the tool's --json report) and
# OUT_DIR/<name>-<n>.txt (its table); a run's exit code is kept in the .txt.
set -u

OUT=${1:-target/loadtest-figures}
REPEATS=${2:-3}
WITH_JANUS=${3:-}
BIN=target/release/fleetcall
LT=target/release/fleetcall-loadtest
mkdir -p "$OUT"

# One server core, one tool core.
SERVER="--spawn $BIN --server-cpus 0 --server-arg=--workers --server-arg=1 --server-arg=--audio-threads --server-arg=1"
TOOL="taskset -c 1 $LT --threads 1 --quiet"

run() {
    name=$1
    shift
    i=1
    while [ "$i" -le "$REPEATS" ]; do
        echo "== $name #$i: $*" >&2
        $TOOL "$@" --out "$OUT/$name-$i.json" > "$OUT/$name-$i.txt" 2>&1
        echo "exit $?" >> "$OUT/$name-$i.txt"
        i=$((i + 1))
    done
}

# Forwarding: rooms of 5 with 1 talker, rooms of 20 with 3 talkers (default
# server: 3 audio slots), at the most load the tool drives on one core.
run fwd-5x1 $SERVER --rooms 150 --per-room 5 --talkers 1 --duration 40 --ramp 100/s
run fwd-20x3 $SERVER --rooms 30 --per-room 20 --talkers 3 --duration 40 --ramp 100/s
# The moderate load of an on-premise site: 20 rooms of 5.
run fwd-moderate $SERVER --rooms 20 --per-room 5 --talkers 1 --duration 40 --ramp 100/s
# The same with suppression on for every talker (and every other publisher).
run sup-5x1 $SERVER --rooms 20 --per-room 5 --talkers 1 --duration 40 --ramp 100/s --suppression on
run sup-20x3 $SERVER --rooms 5 --per-room 20 --talkers 3 --duration 40 --ramp 100/s --suppression on
# Join to first audio: talkers send every frame (no DTX pause to wait out).
run join-5x1 $SERVER --rooms 100 --per-room 5 --talkers 1 --duration 20 --ramp 50/s --dtx off
# The same rooms joined the way browsers join: tokens, named rooms, the control protocol over WebSocket.
run join-ws-5x1 $SERVER --rooms 100 --per-room 5 --talkers 1 --duration 20 --ramp 50/s --dtx off --control ws
# Issue 7: rooms of 50 with 3 talkers (WebSocket path: a QUIC group holds 32), slots vs all-to-all.
run slots-50x3 $SERVER --rooms 2 --per-room 50 --talkers 3 --duration 40 --ramp 100/s
run all-50x3 $SERVER --server-arg=--audio-slots --server-arg=0 --rooms 2 --per-room 50 --talkers 3 --duration 40 --ramp 100/s
# Issue 3: idle devices, re-registration after a restart, 1:1 call latencies.
REPEATS=1 run idle-10k $SERVER --data-dir "$OUT/idle-data" --idle 10000 --ramp 500/s --duration 60
REPEATS=1 run restart-1k $SERVER --data-dir "$OUT/idle-data" --idle 1000 --ramp 500/s --duration 40 --fault server-restart@10 --fleet-backoff
# Talkers send every frame: a DTX pause would add up to 400 ms to answer-to-first-audio.
REPEATS=1 run calls $SERVER --calls-per-sec 10 --call-secs 5 --answer-after 0.5 --duration 60 --ramp 100/s --dtx off

if [ "$WITH_JANUS" = janus ]; then
    # Janus pinned like the server; fleetcall all-to-all (as the VideoRoom forwards) and with its default slots.
    JANUS_CPUS=0 loadtest/bench/janus.sh start
    JANUS="--janus http://10.200.0.2:8088/janus --janus-pid $(cat /tmp/fleetcall-janus/janus.pid) --compare"
    run janus-5x1 $JANUS $SERVER --server-arg=--audio-slots --server-arg=0 --rooms 40 --per-room 5 --talkers 1 --duration 30 --ramp 50/s
    run janus-5x1-slots $JANUS $SERVER --rooms 40 --per-room 5 --talkers 1 --duration 30 --ramp 50/s
    run janus-20x3 $JANUS $SERVER --server-arg=--audio-slots --server-arg=0 --rooms 5 --per-room 20 --talkers 3 --duration 30 --ramp 50/s
    loadtest/bench/janus.sh stop
fi
echo "reports in $OUT" >&2
