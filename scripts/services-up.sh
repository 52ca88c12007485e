#!/usr/bin/env bash
# Make sure the services walletq needs are installed and answering on loopback
# (Debian 12): PostgreSQL 127.0.0.1:5432 (user postgres, trust auth over TCP),
# Redis 127.0.0.1:6379 and RabbitMQ 127.0.0.1:5672 (guest/guest). walletq needs
# no RabbitMQ plugin (scripts/consistent-hash-restart.py does: see its docstring).
#
# Idempotent: when everything is already up it only runs cheap probes.
# Needs root (re-runs itself under sudo otherwise); apt-get is used only when
# something is missing. Timeouts (seconds) can be overridden with
# PG_TIMEOUT, REDIS_TIMEOUT and RABBITMQ_TIMEOUT; PG_CLUSTER / PG_PORT select
# another Debian cluster (defaults: main / 5432), e.g. to test this script.
set -euo pipefail

PG_PORT="${PG_PORT:-5432}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_TIMEOUT="${PG_TIMEOUT:-60}"
REDIS_PORT=6379
REDIS_TIMEOUT="${REDIS_TIMEOUT:-20}"
AMQP_PORT=5672
RABBITMQ_TIMEOUT="${RABBITMQ_TIMEOUT:-60}"

# Debian puts the service tools in sbin, which a plain `su` PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '%s\n' "$*"; }
die() {
	printf 'services-up: ERROR: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# --- Rust toolchain: checked as the calling user (rustup installs per user);
# skipped once we have re-run ourselves under sudo.
if [ -z "${SUDO_USER:-}" ] && ! have cargo; then
	die "cargo not found. Install Rust with rustup (https://rustup.rs), then re-run."
fi

# --- Root is needed to install packages and to start/configure the services.
if [ "$(id -u)" -ne 0 ]; then
	have sudo || die "must be run as root (sudo not available)"
	exec sudo -- bash "${BASH_SOURCE[0]}" "$@"
fi

# --- Cheap probes -----------------------------------------------------------
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 2>/dev/null; }
redis_up() { [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
rabbit_node_alive() { timeout 20 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }
rabbit_up() {
	tcp_open 127.0.0.1 "$AMQP_PORT" &&
		timeout 20 rabbitmq-diagnostics -q check_running >/dev/null 2>&1
}

# wait_for NAME TIMEOUT_S PROBE...: poll PROBE until it succeeds or time is up.
wait_for() {
	local name=$1 timeout_s=$2 deadline
	shift 2
	deadline=$((SECONDS + timeout_s))
	until "$@"; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			die "$name: still unreachable after ${timeout_s}s${WAIT_HINT:+ ($WAIT_HINT)}"
		fi
		sleep 0.5
	done
}

# --- Install whatever is missing, with a single apt-get update ---------------
pg_bin_version() {
	# Newest PostgreSQL server version installed (e.g. "15"), or nothing.
	local d v=""
	for d in /usr/lib/postgresql/*/bin/postgres; do
		[ -x "$d" ] || continue
		d=${d#/usr/lib/postgresql/}
		d=${d%%/*}
		if [ -z "$v" ] || [ "$(printf '%s\n%s\n' "$v" "$d" | sort -V | tail -n1)" = "$d" ]; then v=$d; fi
	done
	printf '%s' "$v"
}

missing=()
{ have pg_ctlcluster && have pg_isready && have psql && [ -n "$(pg_bin_version)" ]; } ||
	missing+=(postgresql postgresql-client)
{ have redis-server && have redis-cli; } || missing+=(redis-server)
{ have rabbitmq-server && have rabbitmq-diagnostics; } ||
	missing+=(rabbitmq-server)
have pkg-config || missing+=(pkg-config)
# scripts/tls-check.sh: throwaway certificates, readiness probes.
have openssl || missing+=(openssl)
have curl || missing+=(curl)
have cc || missing+=(build-essential)

if [ "${#missing[@]}" -gt 0 ]; then
	have apt-get || die "missing packages (${missing[*]}) and no apt-get to install them"
	log "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq || die "apt-get update failed"
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi

# --- PostgreSQL ---------------------------------------------------------------
# Version of the cluster to use: the newest one that already has $PG_CLUSTER,
# else the newest installed server version (a cluster is created for it).
pg_cluster_version() {
	local d v=""
	for d in /etc/postgresql/*/"$PG_CLUSTER"; do
		[ -d "$d" ] || continue
		d=${d#/etc/postgresql/}
		d=${d%%/*}
		if [ -z "$v" ] || [ "$(printf '%s\n%s\n' "$v" "$d" | sort -V | tail -n1)" = "$d" ]; then v=$d; fi
	done
	[ -n "$v" ] || v=$(pg_bin_version)
	printf '%s' "$v"
}

# psql as the postgres OS user over the local socket (peer auth).
pg_local_psql() {
	(cd / && runuser -u postgres -- psql -X -q -t -A -p "$PG_PORT" "$@")
}
pg_tcp_check() {
	PGCONNECT_TIMEOUT=5 psql -X -w -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc 'select 1' 2>&1
}

if ! pg_up; then
	ver=$(pg_cluster_version)
	[ -n "$ver" ] || die "postgres: no server version found under /usr/lib/postgresql"
	if [ ! -d "/etc/postgresql/$ver/$PG_CLUSTER" ]; then
		log "postgres: creating cluster $ver/$PG_CLUSTER"
		pg_createcluster "$ver" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
	fi
	# `status` exits 0 when running (then it is only still starting up).
	if ! pg_ctlcluster "$ver" "$PG_CLUSTER" status >/dev/null 2>&1; then
		log "postgres: starting cluster $ver/$PG_CLUSTER"
		pg_ctlcluster --skip-systemctl-redirect "$ver" "$PG_CLUSTER" start ||
			die "postgres: pg_ctlcluster $ver $PG_CLUSTER start failed"
	fi
	WAIT_HINT="see /var/log/postgresql/postgresql-$ver-$PG_CLUSTER.log" \
		wait_for postgres "$PG_TIMEOUT" pg_up
fi

# Passwordless TCP login as postgres: fresh installs use scram for host lines,
# so put trust lines for loopback at the top of pg_hba.conf and reload.
if ! out=$(pg_tcp_check); then
	case "$out" in
	*password* | *authentication* | *pg_hba*) ;;
	*) die "postgres: cannot connect to 127.0.0.1:$PG_PORT as postgres: $out" ;;
	esac
	hba=$(pg_local_psql -c 'show hba_file') || die "postgres: cannot locate pg_hba.conf"
	[ -f "$hba" ] || die "postgres: pg_hba.conf not found at '$hba'"
	log "postgres: allowing passwordless loopback TCP in $hba"
	tmp=$(mktemp)
	{
		echo '# Added by walletq scripts/services-up.sh: passwordless loopback TCP.'
		echo 'host all all 127.0.0.1/32 trust'
		echo 'host all all ::1/128 trust'
		cat "$hba"
	} >"$tmp"
	cat "$tmp" >"$hba" # keeps the file's owner and mode
	rm -f "$tmp"
	pg_local_psql -c 'select pg_reload_conf()' >/dev/null || die "postgres: reload failed"
	pg_trust_ok() { pg_tcp_check >/dev/null; }
	WAIT_HINT="TCP login as postgres without password still refused" \
		wait_for postgres 10 pg_trust_ok
fi
log "postgres: up (127.0.0.1:$PG_PORT)"

# --- Redis --------------------------------------------------------------------
if ! redis_up; then
	log "redis: starting"
	redis_dir=/var/lib/redis
	[ -d "$redis_dir" ] || redis_dir=/tmp
	redis_log=/var/log/redis/walletq.log
	[ -d /var/log/redis ] || redis_log=/tmp/walletq-redis.log
	redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
		--save "" --appendonly no --dir "$redis_dir" --logfile "$redis_log" ||
		die "redis: redis-server failed to start (see $redis_log)"
	WAIT_HINT="see $redis_log" wait_for redis "$REDIS_TIMEOUT" redis_up
fi
log "redis: up (127.0.0.1:$REDIS_PORT)"

# --- RabbitMQ -----------------------------------------------------------------
if ! rabbit_up; then
	# A node that answers ping is only still booting: don't start a second one.
	if ! rabbit_node_alive; then
		log "rabbitmq: starting"
		# Keep loopback-only when nobody has configured the broker yet.
		if [ ! -e /etc/rabbitmq/rabbitmq.conf ] && [ -d /etc/rabbitmq ]; then
			echo "listeners.tcp.local = 127.0.0.1:$AMQP_PORT" >/etc/rabbitmq/rabbitmq.conf
		fi
		rabbit_log=/var/log/rabbitmq/walletq-start.log
		[ -d /var/log/rabbitmq ] || rabbit_log=/tmp/walletq-rabbitmq-start.log
		# Detached node: don't leave it holding our stdout/stderr open.
		rabbitmq-server -detached </dev/null >>"$rabbit_log" 2>&1 ||
			die "rabbitmq: rabbitmq-server -detached failed (see $rabbit_log)"
	fi
	WAIT_HINT="see /var/log/rabbitmq/" wait_for rabbitmq "$RABBITMQ_TIMEOUT" rabbit_up
fi
log "rabbitmq: up (127.0.0.1:$AMQP_PORT)"
