#!/usr/bin/env bash
# A throwaway Redis master, one replica and three Sentinels on this machine, beside the
# system Redis (which is not touched): own ports and directory, no persistence.
#
#   scripts/redis-sentinel.sh up              start master, replica and Sentinels; wait until all agree
#   scripts/redis-sentinel.sh down            stop them all and remove the directory
#   scripts/redis-sentinel.sh kill-master     SIGKILL the server the Sentinels name as master; prints its port
#   scripts/redis-sentinel.sh start PORT      start the server of PORT again (empty); the
#                                             Sentinels make it a replica
#   scripts/redis-sentinel.sh master          the port of the current master, as the Sentinels say
#   scripts/redis-sentinel.sh cpu             CPU seconds the two Redis servers have used so far
#   scripts/redis-sentinel.sh url             the REDIS_URL: redis+sentinel://127.0.0.1:S1,…/$SENTINEL_SERVICE
#
# Servers on $SENTINEL_REDIS_BASE+0 (first master) and +1 (first replica), Sentinels on
# $SENTINEL_BASE+0..2, quorum 2, down-after 3000 ms (with 1000, a loaded 2-core machine once
# let the Sentinels fail the freshly promoted master over to the restarted, empty old one).
# scripts/sentinel-check.sh uses it (and the Sentinel test calls `kill-master`, `master`,
# `start` and `cpu` through WALLETQ_SENTINEL_CTL).
# Needs redis-server (installed with apt-get when missing); Sentinel is `redis-server --sentinel`.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SENTINEL_DIR="${SENTINEL_DIR:-/tmp/walletq-redis-sentinel}"
SENTINEL_REDIS_BASE="${SENTINEL_REDIS_BASE:-56380}"
SENTINEL_BASE="${SENTINEL_BASE:-56390}"
SENTINEL_SERVICE="${SENTINEL_SERVICE:-walletq}"
SENTINEL_DOWN_AFTER_MS="${SENTINEL_DOWN_AFTER_MS:-3000}"
SERVERS=("$SENTINEL_REDIS_BASE" $((SENTINEL_REDIS_BASE + 1)))
SENTINELS=("$SENTINEL_BASE" $((SENTINEL_BASE + 1)) $((SENTINEL_BASE + 2)))

log() { printf 'redis-sentinel: %s\n' "$*" >&2; }
fail() {
	printf 'redis-sentinel: FAILED: %s\n' "$*" >&2
	exit 1
}
cli() { timeout 5 redis-cli -h 127.0.0.1 -p "$@"; }

ensure_installed() {
	command -v redis-server >/dev/null 2>&1 && return
	log "installing redis-server"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null ||
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; }
}

wait_until() { # wait_until SECONDS WHAT COMMAND...
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || fail "$what did not happen in time"
		sleep 0.2
	done
}

# start_server PORT [replicaof-port]
start_server() {
	local port=$1 conf="$SENTINEL_DIR/redis-$1.conf"
	{
		printf 'port %s\nbind 127.0.0.1\ndir %s\nsave ""\nappendonly no\n' "$port" "$SENTINEL_DIR"
		printf 'pidfile %s/redis-%s.pid\nlogfile %s/redis-%s.log\ndaemonize yes\n' "$SENTINEL_DIR" "$port" "$SENTINEL_DIR" "$port"
		[ -n "${2:-}" ] && printf 'replicaof 127.0.0.1 %s\n' "$2"
	} >"$conf"
	redis-server "$conf"
	wait_until 20 "redis on $port answering" cli "$port" ping
}

start_sentinel() {
	local port=$1 conf="$SENTINEL_DIR/sentinel-$1.conf"
	cat >"$conf" <<EOF
port $port
bind 127.0.0.1
dir $SENTINEL_DIR
daemonize yes
pidfile $SENTINEL_DIR/sentinel-$port.pid
logfile $SENTINEL_DIR/sentinel-$port.log
sentinel monitor $SENTINEL_SERVICE 127.0.0.1 ${SERVERS[0]} 2
sentinel down-after-milliseconds $SENTINEL_SERVICE $SENTINEL_DOWN_AFTER_MS
sentinel failover-timeout $SENTINEL_SERVICE 10000
sentinel parallel-syncs $SENTINEL_SERVICE 1
EOF
	redis-server "$conf" --sentinel
}

cmd_master() {
	local port reply
	for port in "${SENTINELS[@]}"; do
		if reply=$(cli "$port" sentinel get-master-addr-by-name "$SENTINEL_SERVICE" 2>/dev/null) && [ -n "$reply" ]; then
			sed -n 2p <<<"$reply"
			return
		fi
	done
	fail "no Sentinel answered"
}

# Every Sentinel knows the replica and the two other Sentinels.
settled() {
	local port
	for port in "${SENTINELS[@]}"; do
		[ "$(cli "$port" sentinel master "$SENTINEL_SERVICE" | grep -A1 -x 'num-slaves' | tail -n1)" = 1 ] || return 1
		[ "$(cli "$port" sentinel master "$SENTINEL_SERVICE" | grep -A1 -x 'num-other-sentinels' | tail -n1)" = 2 ] || return 1
	done
}

cmd_up() {
	ensure_installed
	cmd_down # what an earlier run left behind

	mkdir -p "$SENTINEL_DIR"
	local started=$SECONDS port
	start_server "${SERVERS[0]}"
	start_server "${SERVERS[1]}" "${SERVERS[0]}"
	for port in "${SENTINELS[@]}"; do start_sentinel "$port"; done
	wait_until 60 "the Sentinels agreeing on 1 replica and 3 Sentinels" settled
	log "master :${SERVERS[0]}, replica :${SERVERS[1]}, Sentinels :${SENTINELS[*]} up in $((SECONDS - started)) s: $(cmd_url)"
}

cmd_down() {
	local pidfile pid
	for pidfile in "$SENTINEL_DIR"/*.pid; do
		[ -e "$pidfile" ] || continue
		pid=$(cat "$pidfile" 2>/dev/null) || continue
		[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
	done
	rm -rf "$SENTINEL_DIR"
}

cmd_kill_master() {
	local port pid
	port=$(cmd_master)
	pid=$(cat "$SENTINEL_DIR/redis-$port.pid") || fail "no pid file for the master on $port"
	kill -9 "$pid"
	rm -f "$SENTINEL_DIR/redis-$port.pid"
	log "master on $port (pid $pid) SIGKILLed"
	printf '%s\n' "$port"
}

cmd_start() {
	# Started as a master of nothing, empty; the Sentinels turn it into a replica of the
	# current master within a few seconds.
	start_server "$1"
	log "redis on $1 back"
}

# CPU seconds the two Redis servers (not the Sentinels) have used so far.
cmd_cpu() {
	local port pid ticks=0
	for port in "${SERVERS[@]}"; do
		pid=$(cat "$SENTINEL_DIR/redis-$port.pid" 2>/dev/null) || continue
		[ -r "/proc/$pid/stat" ] || continue
		ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
	done
	awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f\n", t / hz }'
}

cmd_url() {
	local port hosts=()
	for port in "${SENTINELS[@]}"; do hosts+=("127.0.0.1:$port"); done
	(
		IFS=,
		printf 'redis+sentinel://%s/%s\n' "${hosts[*]}" "$SENTINEL_SERVICE"
	)
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
kill-master) cmd_kill_master ;;
start) cmd_start "${2:?port}" ;;
master) cmd_master ;;
cpu) cmd_cpu ;;
url) cmd_url ;;
*) fail "usage: $0 up|down|kill-master|start PORT|master|url" ;;
esac
