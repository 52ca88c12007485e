#!/usr/bin/env bash
# The seed's load test, through the HTTP gateway: a wallet of 300.00, then
# `ab -c100 -n500` withdrawals of 1.00. Asserts exactly 300 approved, 200
# rejected, balance 0.00 and no failed HTTP request, and prints ab's figures
# beside the seed's (500 requests: 9 s with a Redis lock, 86 s with a MySQL lock
# table).
#
# Runs a release worker and gateway in a fresh namespace and database on the
# local services (scripts/services-up.sh), and removes them on exit. Installs
# ApacheBench (apache2-utils) and curl with apt-get when missing.
#   scripts/seed-ab.sh            # ab -c100 -n500
#   CONCURRENCY=50 REQUESTS=1000 scripts/seed-ab.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONCURRENCY="${CONCURRENCY:-100}"
REQUESTS="${REQUESTS:-500}"
DEPOSIT="300.00"
WITHDRAWAL="1.00"
EXPECTED_APPROVED=300 # DEPOSIT / WITHDRAWAL
RESULT_TIMEOUT_S="${RESULT_TIMEOUT_S:-120}"

log() { printf 'seed-ab: %s\n' "$*"; }
die() {
	printf 'seed-ab: FAILED: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -- "$@"; fi; }

# --- Tools ---------------------------------------------------------------------
missing=()
have ab || missing+=(apache2-utils)
have curl || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
	log "installing ${missing[*]}"
	apt=(env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get -qq)
	as_root "${apt[@]}" update || die "apt-get update failed"
	as_root "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi

scripts/services-up.sh >/dev/null
log "building the release binary"
cargo build --release --locked --quiet
WALLETQ="$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")/release/walletq"

# --- A fresh namespace, database and RabbitMQ virtual host ----------------------
work=$(mktemp -d)
pids=()
namespace="ab$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
base_db="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/walletq}"
export DATABASE_URL="${base_db%/*}/walletq_${namespace}"
# A RabbitMQ virtual host of its own, deleted with everything in it on exit.
base_amqp="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
amqp_user="${base_amqp#amqp://}"
amqp_user="${amqp_user%%:*}"
export AMQP_URL="${base_amqp%/*}/$namespace"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export WALLETQ_NAMESPACE="$namespace"
export WALLETQ_PARTITIONS=4
export WALLETQ_LOG_FORMAT=json
export WALLETQ_JWT_SECRET="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"

cleanup() {
	local status=$?
	for pid in "${pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	psql -X -q "${base_db%/*}/postgres" -c "DROP DATABASE IF EXISTS \"walletq_${namespace}\" WITH (FORCE)" \
		>/dev/null 2>&1 || true
	as_root rabbitmqctl -q delete_vhost "$namespace" >/dev/null 2>&1 || true
	redis-cli -u "$REDIS_URL" --scan --pattern "$namespace:*" 2>/dev/null |
		xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
	[ "$status" -eq 0 ] || log "logs kept in $work"
	[ "$status" -ne 0 ] || rm -rf "$work"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
as_root rabbitmqctl -q add_vhost "$namespace" >/dev/null
as_root rabbitmqctl -q set_permissions -p "$namespace" "$amqp_user" '.*' '.*' '.*' >/dev/null

log "namespace $namespace, database walletq_$namespace"
"$WALLETQ" worker >"$work/worker.log" 2>&1 &
pids+=($!)
"$WALLETQ" gateway --listen 127.0.0.1:0 >"$work/gateway.log" 2>&1 &
pids+=($!)

# The gateway logs the port it got.
deadline=$((SECONDS + 60))
address=""
until [ -n "$address" ]; do
	address=$(grep -o '"address":"[^"]*"' "$work/gateway.log" 2>/dev/null | head -n1 | cut -d'"' -f4 || true)
	kill -0 "${pids[1]}" 2>/dev/null || die "the gateway exited: $(tail -n5 "$work/gateway.log")"
	[ "$SECONDS" -lt "$deadline" ] || die "the gateway did not start listening"
	[ -n "$address" ] || sleep 0.2
done
base="http://$address"
# Ready once the worker has declared the topology and the broker and database answer.
until curl -fs -o /dev/null "$base/readyz"; do
	kill -0 "${pids[0]}" 2>/dev/null || die "the worker exited: $(tail -n5 "$work/worker.log")"
	[ "$SECONDS" -lt "$deadline" ] || die "the gateway is not ready: $(curl -sS "$base/readyz")"
	sleep 0.2
done
log "gateway at $base"

user="seed-ab"
token=$("$WALLETQ" token --user "$user" --ttl 1h)
auth="Authorization: Bearer $token"

# --- The wallet of 300.00 --------------------------------------------------------
deposit=$(curl -fsS -X POST "$base/v1/deposits" -H "$auth" -H 'Content-Type: application/json' \
	-H 'Prefer: wait=30' -H "Idempotency-Key: seed-deposit" -d "{\"amount\":\"$DEPOSIT\"}")
case "$deposit" in
*'"status":"approved"'*'"balance":"300.00"'*) log "deposited $DEPOSIT" ;;
*) die "the deposit was not approved: $deposit" ;;
esac

# --- ab -c100 -n500 withdrawals of 1.00 (each without Idempotency-Key: a fresh id) --
printf '{"amount":"%s"}' "$WITHDRAWAL" >"$work/withdrawal.json"
log "ab -c$CONCURRENCY -n$REQUESTS POST /v1/withdrawals"
started_ms=$(date +%s%3N)
ab -q -c "$CONCURRENCY" -n "$REQUESTS" -p "$work/withdrawal.json" -T application/json -H "$auth" \
	"$base/v1/withdrawals" >"$work/ab.txt" 2>&1 || die "ab failed: $(tail -n5 "$work/ab.txt")"

failed=$(awk -F: '/^Failed requests/ {gsub(/ /, "", $2); print $2}' "$work/ab.txt")
complete=$(awk -F: '/^Complete requests/ {gsub(/ /, "", $2); print $2}' "$work/ab.txt")
rps=$(awk '/^Requests per second/ {print $4}' "$work/ab.txt")
taken=$(awk '/^Time taken for tests/ {print $5}' "$work/ab.txt")
[ "$complete" = "$REQUESTS" ] || die "ab completed $complete of $REQUESTS requests"
[ "$failed" = "0" ] || die "ab reports $failed failed requests: $(cat "$work/ab.txt")"
! grep -q '^Non-2xx responses' "$work/ab.txt" || die "ab saw non-2xx responses: $(grep '^Non-2xx' "$work/ab.txt")"

# --- Every withdrawal processed: exactly 300 approved, balance 0.00 -----------------
sql() { psql -X -q -t -A "$DATABASE_URL" -c "$1"; }
deadline=$((SECONDS + RESULT_TIMEOUT_S))
while :; do
	stored=$(sql "SELECT count(*) FROM requests WHERE user_id = '$user' AND op = 'withdraw'")
	[ "$stored" -lt "$REQUESTS" ] || break
	[ "$SECONDS" -lt "$deadline" ] || die "only $stored of $REQUESTS withdrawals stored after ${RESULT_TIMEOUT_S}s"
	sleep 0.1
done
processed_ms=$(($(date +%s%3N) - started_ms))
approved=$(sql "SELECT count(*) FROM requests WHERE user_id = '$user' AND op = 'withdraw' AND status = 'approved'")
insufficient=$(sql "SELECT count(*) FROM requests WHERE user_id = '$user' AND op = 'withdraw' AND reason = 'insufficient_funds'")
wallet=$(curl -fsS "$base/v1/wallet" -H "$auth")
[ "$approved" = "$EXPECTED_APPROVED" ] || die "$approved withdrawals approved, expected $EXPECTED_APPROVED"
[ "$insufficient" = "$((REQUESTS - EXPECTED_APPROVED))" ] || die "$insufficient rejected for insufficient funds"
case "$wallet" in
*'"balance":"0.00"'*) ;;
*) die "the balance is not 0.00: $wallet" ;;
esac

processed_s=$(awk -v ms="$processed_ms" 'BEGIN {printf "%.2f", ms / 1000}')
end_to_end_rps=$(awk -v n="$REQUESTS" -v ms="$processed_ms" 'BEGIN {printf "%.1f", n * 1000 / ms}')
cat <<EOF

seed-ab: PASSED: $REQUESTS withdrawals of $WITHDRAWAL from $DEPOSIT at concurrency $CONCURRENCY:
         $approved approved, $insufficient insufficient_funds, balance 0.00, ab: 0 failed, all 2xx.

                                        requests  time (s)  requests/s
  walletq gateway, accepted (ab)        $(printf '%8s  %8s  %10s' "$REQUESTS" "$taken" "$rps")
  walletq gateway, all results stored   $(printf '%8s  %8s  %10s' "$REQUESTS" "$processed_s" "$end_to_end_rps")
  seed, Redis lock                      $(printf '%8s  %8s  %10s' 500 9 55.6)
  seed, MySQL lock table                $(printf '%8s  %8s  %10s' 500 86 5.8)
EOF
