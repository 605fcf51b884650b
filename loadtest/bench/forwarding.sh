#!/bin/sh
# The forwarding scenarios of the README's "Performance" section, for one
# or more server builds, interleaved (A B A B ...) so that a noisy machine
# affects every build alike. The server is pinned to CPU 0 with one media
# worker, the tool to CPU 1 with one thread, as in figures.sh.
#
#   cargo build --release -p fleetcall -p fleetcall-loadtest
#   loadtest/bench/forwarding.sh OUT_DIR REPEATS LABEL=SERVER_BINARY [LABEL=SERVER_BINARY ...]
#   python3 loadtest/bench/summarize.py OUT_DIR
#
# e.g. `loadtest/bench/forwarding.sh target/fwd 3 before=/tmp/fleetcall-old after=target/release/fleetcall`.
# Every run writes OUT_DIR/<scenario>-<label>-<n>.json and .txt.
set -u

OUT=$1
REPEATS=$2
shift 2
LT=${LT:-target/release/fleetcall-loadtest}
TOOL="taskset -c 1 $LT --threads 1 --quiet"
mkdir -p "$OUT"

scenario() {
    case $1 in
        # rooms of 5, 1 talker: the most load one tool core drives
        5x1) echo "--rooms 150 --per-room 5 --talkers 1" ;;
        # rooms of 20, 3 talkers (3 audio slots per listener, the default)
        20x3) echo "--rooms 30 --per-room 20 --talkers 3" ;;
        # the moderate load of an on-premise site: 20 rooms of 5
        moderate) echo "--rooms 20 --per-room 5 --talkers 1" ;;
    esac
}

i=1
while [ "$i" -le "$REPEATS" ]; do
    for s in 5x1 20x3 moderate; do
        for build in "$@"; do
            label=${build%%=*}
            bin=${build#*=}
            name="fwd-$s-$label"
            echo "== $name #$i" >&2
            # shellcheck disable=SC2046
            $TOOL --spawn "$bin" --server-cpus 0 --server-arg=--workers --server-arg=1 --server-arg=--audio-threads --server-arg=1 \
                $(scenario "$s") --duration 30 --ramp 100/s --out "$OUT/$name-$i.json" > "$OUT/$name-$i.txt" 2>&1
            echo "exit $?" >> "$OUT/$name-$i.txt"
        done
    done
    i=$((i + 1))
done
echo "reports in $OUT" >&2
