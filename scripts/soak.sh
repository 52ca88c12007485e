#!/usr/bin/env bash
# Soak: one `walletq worker` under a steady load for SOAK_SECONDS (default 600), its
# resident memory sampled every SOAK_SAMPLE_SECONDS (default 10). Prints the samples and
# the peak RSS of the first and of the last minute; docs/LIMITS.md records a run.
#
#   scripts/soak.sh                       # 10 minutes at 200 requests/s
#   SOAK_SECONDS=60 SOAK_RATE=500 scripts/soak.sh
#
# The load (Python, pika): deposits and withdrawals over SOAK_USERS users, with 5 %
# replays of an earlier request and 1 % malformed bodies, published with confirms at a
# fixed rate to the worker's own namespace; its results are consumed from a reply queue.
# Everything stays on loopback, is bounded in time, and is removed at the end (namespace,
# database, Redis keys). Needs the local services (scripts/services-up.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_TOTAL="${SOAK_SECONDS:-600}"
SAMPLE_S="${SOAK_SAMPLE_SECONDS:-10}"
RATE="${SOAK_RATE:-200}"
USERS="${SOAK_USERS:-1000}"
OUT="${SOAK_OUT:-/tmp/walletq-soak}"
METRICS_PORT="${SOAK_METRICS_PORT:-59200}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/walletq}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"

ns="soak$(date +%s)"
db_url="${DATABASE_URL%/*}/walletq_$ns"
mkdir -p "$OUT"
log() { printf 'soak: %s\n' "$*"; }

python3 -c 'import pika' 2>/dev/null || python3 -m pip install --quiet pika
if [ -z "${WALLETQ_BIN:-}" ]; then
	cargo build --quiet --locked --release --bin walletq
	WALLETQ_BIN="${CARGO_TARGET_DIR:-target}/release/walletq"
fi

worker_pid="" load_pid=""
cleanup() {
	set +e
	[ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null
	[ -n "$worker_pid" ] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
	python3 - "$ns" <<'EOF'
import os, sys, pika
ns = sys.argv[1]
connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
channel = connection.channel()
for queue in [f"{ns}.requests.{i}" for i in range(4)] + [f"{ns}.dead", f"{ns}.results"]:
    channel.queue_delete(queue)
for exchange in [f"{ns}.requests", f"{ns}.dead"]:
    channel.exchange_delete(exchange)
connection.close()
EOF
	redis-cli -u "$REDIS_URL" --scan --pattern "$ns:*" | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null
	psql -X -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS \"walletq_$ns\" WITH (FORCE)" >/dev/null
}
trap cleanup EXIT

RUST_LOG=warn WALLETQ_NAMESPACE="$ns" WALLETQ_PARTITIONS=4 "$WALLETQ_BIN" worker \
	--database-url "$db_url" --metrics-addr "127.0.0.1:$METRICS_PORT" 2>"$OUT/worker.log" &
worker_pid=$!
for _ in $(seq 1 120); do
	curl -fsS "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1 && break
	kill -0 "$worker_pid" || { cat "$OUT/worker.log" >&2; exit 1; }
	sleep 0.5
done
log "worker $worker_pid ready in namespace $ns; load: $RATE requests/s for ${SECONDS_TOTAL}s over $USERS users"

python3 - "$ns" "$RATE" "$SECONDS_TOTAL" "$USERS" >"$OUT/load.log" 2>&1 <<'EOF' &
import os, random, sys, time, pika
ns, rate, duration, users = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
random.seed(1)
connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
channel = connection.channel()
channel.confirm_delivery()
reply = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
received = 0
def on_result(ch, method, properties, body):
    global received
    received += 1
channel.basic_consume(reply, on_result, auto_ack=True)
sent, sent_bodies, start = 0, [], time.monotonic()
while time.monotonic() - start < duration:
    due = start + sent / rate
    pause = due - time.monotonic()
    if pause > 0:
        connection.process_data_events(time_limit=pause)
    roll = random.random()
    user = f"u{random.randrange(users)}"
    if roll < 0.01:
        body, key = b'{"request_id":"bad","amount":"-1"}', user
    elif roll < 0.06 and sent_bodies:
        body, key = random.choice(sent_bodies)
    else:
        op = "deposit" if random.random() < 0.5 else "withdraw"
        cents = random.randrange(1, 60000)
        body = ('{"request_id":"%s-%d","user_id":"%s","op":"%s","amount":"%d.%02d"}'
                % (ns, sent, user, op, cents // 100, cents % 100)).encode()
        key = user
        sent_bodies.append((body, key))
        if len(sent_bodies) > 10000:
            sent_bodies.pop(0)
    channel.basic_publish(f"{ns}.requests", key, body,
                          pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                               reply_to=reply, correlation_id=str(sent)))
    sent += 1
    if sent % int(rate * 60) == 0:
        print(f"{time.monotonic() - start:.0f}s sent {sent} results {received}", flush=True)
deadline = time.monotonic() + 30
while received < sent and time.monotonic() < deadline:
    connection.process_data_events(time_limit=0.5)
print(f"done: sent {sent} results {received} in {time.monotonic() - start:.0f}s", flush=True)
connection.close()
EOF
load_pid=$!

echo "elapsed_s,rss_kb,hwm_kb" >"$OUT/rss.csv"
started=$SECONDS
while kill -0 "$load_pid" 2>/dev/null; do
	rss=$(awk '/^VmRSS/ {print $2}' "/proc/$worker_pid/status")
	hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$worker_pid/status")
	echo "$((SECONDS - started)),$rss,$hwm" | tee -a "$OUT/rss.csv"
	sleep "$SAMPLE_S"
done
wait "$load_pid" || { cat "$OUT/load.log" >&2; exit 1; }
load_pid=""
cat "$OUT/load.log"

audit=$("$WALLETQ_BIN" audit --database-url "$db_url" | tail -n1)
first=$(awk -F, 'NR > 1 && $1 <= 60 {if ($2 > m) m = $2} END {print m}' "$OUT/rss.csv")
last=$(awk -F, -v end=$((SECONDS - started)) 'NR > 1 && $1 >= end - 70 {if ($2 > m) m = $2} END {print m}' "$OUT/rss.csv")
hwm=$(tail -n1 "$OUT/rss.csv" | cut -d, -f3)
log "peak RSS, first minute: ${first} kB; last minute: ${last} kB; VmHWM at the end: ${hwm} kB"
log "$audit; samples in $OUT/rss.csv"
