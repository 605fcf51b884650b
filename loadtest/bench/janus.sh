#!/bin/sh
# Debian's Janus (1.1.2) VideoRoom as a peer-comparison target for
# fleetcall-loadtest, started with a generated configuration inside a
# network namespace.
#
# Janus 1.1.2 ignores loopback interfaces when it gathers ICE candidates, so
# it runs in its own namespace behind a veth pair: the host side is
# 10.200.0.1 (the load tool binds its media sockets there), Janus listens on
# 10.200.0.2 (HTTP API on port 8088). Needs root (ip netns).
#
#   loadtest/bench/janus.sh start      # prints the URL and the pid
#   loadtest/bench/janus.sh stop
#
# Environment: JANUS_DIR (config, log, pid; default /tmp/fleetcall-janus),
# JANUS_CPUS (a taskset list to pin Janus, e.g. 0), JANUS_DEBUG (log level,
# default 4, Janus' own default).
set -eu

NS=fcjanus
HOST_IF=fc-janus-h
NS_IF=fc-janus-n
HOST_IP=10.200.0.1
JANUS_IP=10.200.0.2
DIR=${JANUS_DIR:-/tmp/fleetcall-janus}
URL="http://$JANUS_IP:8088/janus"

stop() {
    if [ -f "$DIR/janus.pid" ]; then
        kill "$(cat "$DIR/janus.pid")" 2>/dev/null || true
        rm -f "$DIR/janus.pid"
    fi
    ip link del "$HOST_IF" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
}

configure() {
    mkdir -p "$DIR"
    lib=$(dirname "$(find /usr/lib -path '*janus/plugins/libjanus_videoroom.so' | head -n 1)")
    lib=$(dirname "$lib")
    # Only the VideoRoom plugin and the HTTP transport load.
    plugins_off=$(ls "$lib/plugins" | grep -v '^libjanus_videoroom\.so$' | tr '\n' ',' | sed 's/,$//')
    transports_off=$(ls "$lib/transports" | grep -v '^libjanus_http\.so$' | tr '\n' ',' | sed 's/,$//')
    events_off=$(ls "$lib/events" 2>/dev/null | tr '\n' ',' | sed 's/,$//')
    loggers_off=$(ls "$lib/loggers" 2>/dev/null | tr '\n' ',' | sed 's/,$//')
    cat > "$DIR/janus.jcfg" <<CFG
general: {
	configs_folder = "$DIR"
	plugins_folder = "$lib/plugins"
	transports_folder = "$lib/transports"
	events_folder = "$lib/events"
	loggers_folder = "$lib/loggers"
	debug_level = ${JANUS_DEBUG:-4}
	session_timeout = 120
}
media: {
	rtp_port_range = "20000-60000"
}
nat: {
	ice_ignore_list = "vmnet"
}
plugins: {
	disable = "$plugins_off"
}
transports: {
	disable = "$transports_off"
}
events: {
	disable = "$events_off"
}
loggers: {
	disable = "$loggers_off"
}
CFG
    cat > "$DIR/janus.transport.http.jcfg" <<CFG
general: {
	json = "plain"
	base_path = "/janus"
	http = true
	port = 8088
	https = false
}
admin: {
	admin_http = false
}
CFG
    # No preconfigured rooms: the load tool creates its own.
    cat > "$DIR/janus.plugin.videoroom.jcfg" <<CFG
general: {
}
CFG
}

start() {
    command -v janus >/dev/null || apt-get install -y janus
    stop
    configure
    ip netns add "$NS"
    ip link add "$HOST_IF" type veth peer name "$NS_IF"
    ip link set "$NS_IF" netns "$NS"
    ip addr add "$HOST_IP/24" dev "$HOST_IF"
    ip link set "$HOST_IF" up
    ip netns exec "$NS" ip addr add "$JANUS_IP/24" dev "$NS_IF"
    ip netns exec "$NS" ip link set "$NS_IF" up
    ip netns exec "$NS" ip link set lo up
    pin=""
    if [ -n "${JANUS_CPUS:-}" ]; then pin="taskset -c $JANUS_CPUS"; fi
    ip netns exec "$NS" $pin janus -C "$DIR/janus.jcfg" -F "$DIR" -o -L "$DIR/janus.log" -b -p "$DIR/janus.pid" >/dev/null 2>&1
    i=0
    until curl -fs "$URL/info" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            echo "janus did not answer on $URL; see $DIR/janus.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "janus $URL pid $(cat "$DIR/janus.pid") (devices bind $HOST_IP)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
