#!/usr/bin/env bash
# Quality benchmark of the fleetcall-dsp pipeline: installs the tools, builds the
# offline corpus (fixed seeds), runs every clip through the Rust CLI in each
# condition, scores PESQ-WB, STOI and DNSMOS, prints the tables and writes
# scores.csv and table.md into the work directory.
#
#   dsp/bench/quality/run.sh [WORK_DIR]      (default: target/quality)
#
# Needs root for apt-get when espeak-ng, flite or sox are missing. About 15
# minutes on a 2-core machine.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
work=${1:-$root/target/quality}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$work"

if ! command -v espeak-ng >/dev/null || ! command -v flite >/dev/null || ! command -v sox >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq espeak-ng flite sox
fi

venv=${VENV:-$work/venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r "$here/requirements.txt"

cargo build --release -p fleetcall-dsp --example quality
"$venv/bin/python" "$here/quality.py" all --work "$work" \
    --cli "$CARGO_TARGET_DIR/release/examples/quality" --jobs "$(nproc)"
