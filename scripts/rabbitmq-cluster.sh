#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster on this machine, beside the system node (which is not
# touched): own node names, AMQP and distribution ports, data and log directories; the
# system's Erlang cookie (the nodes run as the rabbitmq user, as the system node does).
#
#   scripts/rabbitmq-cluster.sh up          start the 3 nodes and join them into one cluster
#   scripts/rabbitmq-cluster.sh down        stop every node and remove the data directory
#   scripts/rabbitmq-cluster.sh kill N      SIGKILL node N (1-3): the beam process, no shutdown
#   scripts/rabbitmq-cluster.sh start N     start node N again; it rejoins the cluster
#   scripts/rabbitmq-cluster.sh leaders     "<queue> <node index>" for every quorum queue leader
#   scripts/rabbitmq-cluster.sh queues      every queue: leader, members online, depth, unacked,
#                                           consumers (diagnostics)
#   scripts/rabbitmq-cluster.sh cpu         CPU seconds the 3 nodes have used so far
#   scripts/rabbitmq-cluster.sh management-url [N]
#                                           node N's (default 1) management API, for
#                                           walletq status --management-url
#   scripts/rabbitmq-cluster.sh url         the comma-separated AMQP_URL of the 3 nodes
#
# Node N is walletq-cN@localhost, AMQP port $CLUSTER_AMQP_BASE+N, distribution port
# $CLUSTER_DIST_BASE+N, management API $CLUSTER_MANAGEMENT_BASE+N; everything lives under
# $CLUSTER_DIR. scripts/cluster-check.sh uses it (and the cluster test calls `kill`, `start`,
# `leaders`, `queues`, `cpu` and `management-url` through WALLETQ_CLUSTER_CTL).
# Needs root and rabbitmq-server (installed with apt-get when missing).
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

CLUSTER_DIR="${CLUSTER_DIR:-/tmp/walletq-rabbitmq-cluster}"
CLUSTER_AMQP_BASE="${CLUSTER_AMQP_BASE:-56720}"
CLUSTER_DIST_BASE="${CLUSTER_DIST_BASE:-25720}"
CLUSTER_MANAGEMENT_BASE="${CLUSTER_MANAGEMENT_BASE:-55720}"
STARTUP_TIMEOUT_S="${CLUSTER_STARTUP_TIMEOUT_S:-120}"
NODES=(1 2 3)

log() { printf 'rabbitmq-cluster: %s\n' "$*" >&2; }
fail() {
	printf 'rabbitmq-cluster: FAILED: %s\n' "$*" >&2
	exit 1
}

node_name() { printf 'walletq-c%s@localhost' "$1"; }
amqp_port() { printf '%s' $((CLUSTER_AMQP_BASE + $1)); }
# rabbitmqctl as the rabbitmq user, so it reads the same Erlang cookie as the nodes.
ctl() { # ctl N ARGS...
	local n=$1
	shift
	runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq rabbitmqctl -n "$(node_name "$n")" "$@"
}
ctl_within() { # ctl_within SECONDS N ARGS...
	local seconds=$1 n=$2
	shift 2
	timeout "$seconds" runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq rabbitmqctl -n "$(node_name "$n")" "$@"
}

ensure_installed() {
	command -v rabbitmq-server >/dev/null 2>&1 && return
	log "installing rabbitmq-server"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null ||
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null; }
}

# Starts node N in the background (as the rabbitmq user) with its own configuration.
start_node() {
	local n=$1 dir="$CLUSTER_DIR/c$1"
	mkdir -p "$dir"
	cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")
loopback_users = none
management.tcp.ip = 127.0.0.1
management.tcp.port = $((CLUSTER_MANAGEMENT_BASE + n))
EOF
	printf 'ERL_EPMD_ADDRESS=127.0.0.1\n' >"$dir/rabbitmq-env.conf"
	# The management API only for `walletq status --management-url` (queue leaders).
	printf '[rabbitmq_management].\n' >"$dir/enabled_plugins"
	chown -R rabbitmq: "$dir"
	(
		cd "$dir"
		exec runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
			RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
			RABBITMQ_NODENAME="$(node_name "$n")" \
			RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
			RABBITMQ_DIST_PORT=$((CLUSTER_DIST_BASE + n)) \
			RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
			RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
			RABBITMQ_MNESIA_BASE="$dir/mnesia" \
			RABBITMQ_LOG_BASE="$dir/log" \
			RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand" \
			RABBITMQ_PID_FILE="$dir/pid" \
			rabbitmq-server >>"$dir/stdout.log" 2>&1
	) &
}

await_node() {
	local n=$1 deadline=$((SECONDS + STARTUP_TIMEOUT_S))
	until ctl "$n" await_startup --timeout 5 >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || { tail -20 "$CLUSTER_DIR/c$n/stdout.log" >&2; fail "node $n did not start"; }
		sleep 1
	done
}

# The OS pid of node N's beam process (the pid file rabbitmq-server writes).
node_pid() { cat "$CLUSTER_DIR/c$1/pid" 2>/dev/null; }

cmd_up() {
	[ "$(id -u)" -eq 0 ] || fail "must run as root"
	ensure_installed
	id rabbitmq >/dev/null 2>&1 || fail "no rabbitmq user"
	[ -r /var/lib/rabbitmq/.erlang.cookie ] || fail "no Erlang cookie in /var/lib/rabbitmq"
	cmd_down # what an earlier run left behind
	mkdir -p "$CLUSTER_DIR"
	chmod 755 "$CLUSTER_DIR"
	local started=$SECONDS n
	for n in "${NODES[@]}"; do start_node "$n"; done
	for n in "${NODES[@]}"; do await_node "$n"; done
	for n in 2 3; do
		ctl "$n" stop_app >/dev/null
		ctl "$n" join_cluster "$(node_name 1)" >/dev/null
		ctl "$n" start_app >/dev/null
	done
	for n in "${NODES[@]}"; do await_node "$n"; done
	local running
	running=$(ctl 1 cluster_status --formatter json | grep -o 'walletq-c[0-9]@localhost' | sort -u | wc -l)
	[ "$running" -ge 3 ] || fail "the cluster has $running nodes, not 3"
	log "3 nodes up and clustered in $((SECONDS - started)) s: $(cmd_url)"
}

cmd_down() {
	local n pid
	for n in "${NODES[@]}"; do
		pid=$(node_pid "$n") || continue
		[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || continue
		ctl_within 30 "$n" stop >/dev/null 2>&1 || kill -9 "$pid" 2>/dev/null || true
	done
	# Anything left of our nodes (never the system node: matched by our node names).
	for n in "${NODES[@]}"; do
		pid=$(node_pid "$n") || continue
		[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
	done
	rm -rf "$CLUSTER_DIR"
}

cmd_kill() {
	local n=$1 pid
	pid=$(node_pid "$n") || fail "node $n has no pid file"
	kill -9 "$pid"
	log "node $n (pid $pid) SIGKILLed"
}

cmd_start() {
	start_node "$1"
	await_node "$1"
	log "node $1 back"
}

# Leaders of the quorum queues, asked of the first node that answers.
cmd_leaders() {
	local n out
	for n in "${NODES[@]}"; do
		if out=$(ctl_within 30 "$n" list_queues -q --no-table-headers name leader type 2>/dev/null); then
			awk '$3 == "quorum" { sub(/^walletq-c/, "", $2); sub(/@.*/, "", $2); print $1, $2 }' <<<"$out"
			return
		fi
	done
	fail "no node answered list_queues"
}

# Every queue with its leader, members online, depth, unacked and consumers (diagnostics).
cmd_queues() {
	local n
	for n in "${NODES[@]}"; do
		ctl_within 30 "$n" list_queues -q name leader online messages_ready messages_unacknowledged consumers 2>/dev/null && return
	done
	fail "no node answered list_queues"
}

# CPU seconds the 3 nodes have used so far (their beam processes).
cmd_cpu() {
	local n pid ticks=0
	for n in "${NODES[@]}"; do
		pid=$(node_pid "$n") || continue
		[ -r "/proc/$pid/stat" ] || continue
		ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
	done
	awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f\n", t / hz }'
}

cmd_management_url() {
	printf 'http://guest:guest@127.0.0.1:%s\n' $((CLUSTER_MANAGEMENT_BASE + ${1:-1}))
}

cmd_url() {
	local n urls=()
	for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
	(
		IFS=,
		printf '%s\n' "${urls[*]}"
	)
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
kill) cmd_kill "${2:?node 1-3}" ;;
start) cmd_start "${2:?node 1-3}" ;;
leaders) cmd_leaders ;;
queues) cmd_queues ;;
cpu) cmd_cpu ;;
url) cmd_url ;;
management-url) cmd_management_url "${2:-1}" ;;
*) fail "usage: $0 up|down|kill N|start N|leaders|url" ;;
esac
