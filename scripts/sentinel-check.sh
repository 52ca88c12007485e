#!/usr/bin/env bash
# Redis failover under load: starts a throwaway Redis master, one replica and three Sentinels
# beside the system Redis (scripts/redis-sentinel.sh: own ports and directory), runs the
# ignored test node_loss::sentinel_failover_loses_nothing_and_stale_fences_are_refused with
# REDIS_URL=redis+sentinel://… (the master SIGKILLed under load, a replica promoted, the old
# master brought back as a replica), and stops them on exit. PostgreSQL and RabbitMQ are the
# local services, brought up by scripts/services-up.sh. Needs root (apt-get when redis-server is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ctl="$PWD/scripts/redis-sentinel.sh"

[ "$(id -u)" -eq 0 ] || exec sudo -E -- bash "${BASH_SOURCE[0]}" "$@"
# The local services the test also uses (idempotent: only probes when they are up).
scripts/services-up.sh
trap '"$ctl" down' EXIT
"$ctl" up
REDIS_URL="$("$ctl" url)" WALLETQ_SENTINEL_CTL="$ctl" \
	cargo test --quiet --locked --test api -- --ignored --exact \
	node_loss::sentinel_failover_loses_nothing_and_stale_fences_are_refused
echo "sentinel-check: passed"
