#!/usr/bin/env bash
# Proves walletq talks TLS to all three services with a custom CA, and refuses a server
# whose certificate doesn't verify. Starts its OWN throwaway TLS-only instances on other
# ports (the shared services on 5432/6379/5672 are not touched):
#   Redis       rediss://localhost:$TLS_REDIS_PORT        (plain port disabled)
#   PostgreSQL  localhost:$TLS_PG_PORT, ssl=on, hostssl only (plain connections rejected)
#   RabbitMQ    amqps://localhost:$TLS_AMQP_PORT, a second node (no plain listener)
# with a throwaway CA, then runs the walletq binary against them:
#   - worker with --ca-file: /readyz answers 200 (all three connected over TLS), and a
#     deposit published over amqps gets its result;
#   - migrate with sslmode=require (encrypted, unverified) works through the URL alone;
#   - trusting another CA (or only the system roots), every client refuses the servers.
# Everything it started is stopped and removed on exit. Needs root (PostgreSQL runs as the
# postgres user), openssl, redis-server, PostgreSQL server binaries and rabbitmq-server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

TLS_REDIS_PORT="${TLS_REDIS_PORT:-56379}"
TLS_PG_PORT="${TLS_PG_PORT:-55432}"
TLS_AMQP_PORT="${TLS_AMQP_PORT:-56671}"
TLS_AMQP_DIST_PORT="${TLS_AMQP_DIST_PORT:-25699}"
METRICS_PORT="${TLS_METRICS_PORT:-59100}"
STARTUP_TIMEOUT_S="${TLS_STARTUP_TIMEOUT_S:-90}"

log() { printf 'tls-check: %s\n' "$*"; }
fail() {
	printf 'tls-check: FAILED: %s\n' "$*" >&2
	exit 1
}

work=$(mktemp -d /tmp/walletq-tls.XXXXXX)
chmod 755 "$work"
rabbit_node="walletq-tls-$$@localhost"
redis_pid="" pg_data="" rabbit_pid="" worker_pid=""
cleanup() {
	set +e
	[ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
	[ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
	if [ -n "$pg_data" ]; then
		runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$pg_data" -m immediate -w stop >/dev/null 2>&1
	fi
	if [ -n "$rabbit_pid" ]; then
		rabbit_ctl stop >/dev/null 2>&1 || kill "$rabbit_pid" 2>/dev/null
		wait "$rabbit_pid" 2>/dev/null
	fi
	rm -rf "$work"
}
trap cleanup EXIT

wait_until() { # wait_until SECONDS WHAT COMMAND...
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || fail "$what did not come up in time"
		sleep 0.5
	done
}

# --- certificates ---------------------------------------------------------------
# ca: trusted by walletq; rogue: another CA, whose certificate the client must not accept.
make_ca() { # make_ca NAME
	openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=walletq test $1" \
		-keyout "$work/$1.key" -out "$work/$1.pem" 2>/dev/null
}
make_ca ca
make_ca rogue
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
	-keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
	-days 2 -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null
chmod 644 "$work"/*.pem "$work"/*.key
log "certificates: server for localhost signed by a throwaway CA; a second, rogue CA"

# --- Redis, TLS only -------------------------------------------------------------
redis-server --port 0 --tls-port "$TLS_REDIS_PORT" --bind 127.0.0.1 \
	--tls-cert-file "$work/server.pem" --tls-key-file "$work/server.key" \
	--tls-ca-cert-file "$work/ca.pem" --tls-auth-clients no \
	--save "" --appendonly no --dir "$work" --logfile "$work/redis.log" &
redis_pid=$!
wait_until 20 "redis (TLS)" redis-cli --tls --cacert "$work/ca.pem" -h localhost -p "$TLS_REDIS_PORT" ping

# --- PostgreSQL, a temporary cluster with ssl=on and hostssl only -----------------
PG_BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")
[ -x "$PG_BIN/initdb" ] || fail "no PostgreSQL server binaries under /usr/lib/postgresql"
pg_data="$work/pg"
install -d -o postgres -m 700 "$pg_data"
install -o postgres -m 600 "$work/server.key" "$work/pg-server.key"
runuser -u postgres -- "$PG_BIN/initdb" -D "$pg_data" -U postgres -A trust >/dev/null
cat >"$pg_data/pg_hba.conf" <<EOF
local   all all              trust
hostssl all all 127.0.0.1/32 trust
hostssl all all ::1/128      trust
hostnossl all all 0.0.0.0/0  reject
hostnossl all all ::/0       reject
EOF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$pg_data" -l "$pg_data/server.log" -w -o \
	"-p $TLS_PG_PORT -k $pg_data -c listen_addresses=localhost -c ssl=on -c ssl_cert_file=$work/server.pem -c ssl_key_file=$work/pg-server.key" \
	start >/dev/null || { cat "$pg_data/server.log" >&2; fail "postgres (TLS) did not start"; }
if psql "postgresql://postgres@localhost:$TLS_PG_PORT/postgres?sslmode=disable" -c 'select 1' >/dev/null 2>&1; then
	fail "postgres accepted a plaintext connection"
fi

# --- RabbitMQ: a second node, TLS listener only ----------------------------------
rabbit_ctl() { rabbitmqctl -n "$rabbit_node" "$@"; }
mkdir -p "$work/rabbit"
cat >"$work/rabbit/rabbitmq.conf" <<EOF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$TLS_AMQP_PORT
ssl_options.cacertfile = $work/ca.pem
ssl_options.certfile = $work/server.pem
ssl_options.keyfile = $work/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
EOF
echo '[rabbitmq_consistent_hash_exchange].' >"$work/rabbit/enabled_plugins"
# Our own env file: the system one names the shared node.
printf 'ERL_EPMD_ADDRESS=127.0.0.1\n' >"$work/rabbit/rabbitmq-env.conf"
# rabbitmq-server drops root for the rabbitmq user: it must own its directory.
if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$work/rabbit"; fi
RABBITMQ_CONF_ENV_FILE="$work/rabbit/rabbitmq-env.conf" \
	RABBITMQ_NODENAME="$rabbit_node" \
	RABBITMQ_NODE_PORT="$TLS_AMQP_PORT" \
	RABBITMQ_DIST_PORT="$TLS_AMQP_DIST_PORT" \
	RABBITMQ_CONFIG_FILE="$work/rabbit/rabbitmq.conf" \
	RABBITMQ_ENABLED_PLUGINS_FILE="$work/rabbit/enabled_plugins" \
	RABBITMQ_MNESIA_BASE="$work/rabbit/mnesia" \
	RABBITMQ_LOG_BASE="$work/rabbit/log" \
	RABBITMQ_PLUGINS_EXPAND_DIR="$work/rabbit/plugins-expand" \
	RABBITMQ_PID_FILE="$work/rabbit/pid" \
	rabbitmq-server >"$work/rabbit/stdout.log" 2>&1 &
rabbit_pid=$!
rabbit_ready() {
	kill -0 "$rabbit_pid" 2>/dev/null || { tail -20 "$work/rabbit/stdout.log" >&2; fail "the TLS RabbitMQ node exited"; }
	timeout 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$TLS_AMQP_PORT" 2>/dev/null
}
started=$SECONDS
wait_until "$STARTUP_TIMEOUT_S" "rabbitmq (TLS node)" rabbit_ready
log "services up: redis :$TLS_REDIS_PORT, postgres :$TLS_PG_PORT, rabbitmq :$TLS_AMQP_PORT (node up in $((SECONDS - started))s), TLS only"

# --- walletq against them ---------------------------------------------------------
cargo build --quiet --locked --bin walletq
walletq="${CARGO_TARGET_DIR:-target}/debug/walletq"
export RUST_LOG=warn WALLETQ_NAMESPACE=tlscheck
DB="postgres://postgres@localhost:$TLS_PG_PORT/walletq"
AMQPS="amqps://guest:guest@localhost:$TLS_AMQP_PORT/%2f"
REDISS="rediss://localhost:$TLS_REDIS_PORT"

# sslmode=require: encrypted without verification, configured by the URL alone.
"$walletq" migrate --database-url "$DB?sslmode=require" >/dev/null || fail "migrate with sslmode=require"
log "ok: postgres sslmode=require (URL only)"

# Verified TLS to all three with --ca-file: the worker becomes ready, a deposit gets its result.
"$walletq" worker --database-url "$DB?sslmode=verify-full" --amqp-url "$AMQPS" --redis-url "$REDISS" \
	--ca-file "$work/ca.pem" --partitions 2 --metrics-addr "127.0.0.1:$METRICS_PORT" 2>"$work/worker.log" &
worker_pid=$!
ready() { curl -fsS "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null; }
wait_until 60 "the worker's /readyz over TLS" ready || { cat "$work/worker.log" >&2; exit 1; }
log "ok: worker ready over TLS to postgres (verify-full), redis (rediss) and rabbitmq (amqps) with --ca-file"
WALLETQ_CA_FILE="$work/ca.pem" "$walletq" deposit --amqp-url "$AMQPS" --user tls-alice --amount 12.34 --wait 30 \
	>"$work/deposit.json" || { cat "$work/deposit.json" "$work/worker.log" >&2; fail "deposit over amqps"; }
grep -q '"approved"' "$work/deposit.json" || fail "deposit over amqps was not approved: $(cat "$work/deposit.json")"
log "ok: a deposit over amqps was approved (CA from WALLETQ_CA_FILE)"
kill -TERM "$worker_pid"
wait "$worker_pid" || fail "the worker did not stop cleanly"
worker_pid=""

# Refusals: the servers' certificate is from a CA the client does not trust.
refuses() { # refuses WHAT COMMAND...: the command must fail on the certificate
	local what=$1 out
	shift
	if out=$("$@" 2>&1); then fail "$what accepted a certificate from an untrusted CA"; fi
	grep -qiE 'certificate|UnknownIssuer|invalid peer|tls|handshake' <<<"$out" ||
		fail "$what failed, but not on the certificate: $out"
	log "ok: $what refused: $(tr '\n' ' ' <<<"$out" | grep -oE 'invalid peer certificate: [A-Za-z]+' | head -n1)"
}
refuses "postgres verify-full with another CA" \
	"$walletq" migrate --database-url "$DB?sslmode=verify-full" --ca-file "$work/rogue.pem"
refuses "postgres verify-full with system roots only" \
	"$walletq" migrate --database-url "$DB?sslmode=verify-full"
refuses "redis with another CA" \
	"$walletq" status --redis-url "$REDISS" --amqp-url "$AMQPS" --ca-file "$work/rogue.pem"
refuses "redis with system roots only" \
	"$walletq" status --redis-url "$REDISS" --amqp-url "$AMQPS"
refuses "rabbitmq with another CA" \
	"$walletq" deposit --amqp-url "$AMQPS" --user tls-bob --amount 1 --ca-file "$work/rogue.pem"
refuses "rabbitmq with system roots only" \
	"$walletq" deposit --amqp-url "$AMQPS" --user tls-bob --amount 1
log "passed"
