#!/usr/bin/env bash
# Node loss on a 3-node RabbitMQ cluster: starts a throwaway cluster beside the system node
# (scripts/rabbitmq-cluster.sh: own node names, ports and data directories), runs the ignored
# test node_loss::cluster_node_loss_loses_nothing_and_every_partition_is_served_again against
# it (3 workers and a producer given the 3 addresses; the node leading the most partition
# queues SIGKILLed, restarted, then another killed), and stops the cluster on exit.
# PostgreSQL and Redis are the local services, brought up by scripts/services-up.sh. Needs root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ctl="$PWD/scripts/rabbitmq-cluster.sh"

[ "$(id -u)" -eq 0 ] || exec sudo -E -- bash "${BASH_SOURCE[0]}" "$@"
# The local services the test also uses (idempotent: only probes when they are up).
scripts/services-up.sh
trap '"$ctl" down' EXIT
"$ctl" up
AMQP_URL="$("$ctl" url)" WALLETQ_CLUSTER_CTL="$ctl" \
	cargo test --quiet --locked --test api -- --ignored --exact \
	node_loss::cluster_node_loss_loses_nothing_and_every_partition_is_served_again
echo "cluster-check: passed"
