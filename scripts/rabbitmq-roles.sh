#!/usr/bin/env bash
# Create (or update) the least-privilege RabbitMQ users of a walletq deployment with
# rabbitmqctl, in one vhost and one namespace. Idempotent: run it again to reset the
# permissions or rotate a password. See docs/SECURITY.md for why each pattern is what it is.
#
#   WALLETQ_PRODUCER_PASSWORD=... WALLETQ_WORKER_PASSWORD=... WALLETQ_GATEWAY_PASSWORD=... \
#     scripts/rabbitmq-roles.sh [--vhost /] [--namespace walletq] \
#       [--producer walletq-producer] [--worker walletq-worker] [--gateway walletq-gateway] \
#       [--no-replies] [--bounds]
#
#   --no-replies  the producer publishes only (no reply queue of its own): it may then
#                 configure and read nothing at all.
#   --bounds      also apply the queue-length policies of docs/LIMITS.md to the namespace.
#   The gateway (walletq gateway) publishes requests and reads its own server-named reply
#   queue, nothing else.
#
# Passwords are read from the environment and handed to rabbitmqctl on standard input, so
# they never appear in a process list or in this script's output. A role whose password
# variable is empty or unset is skipped.
set -euo pipefail

vhost=/
namespace=walletq
producer=walletq-producer
worker=walletq-worker
gateway=walletq-gateway
replies=yes
bounds=no
while [ $# -gt 0 ]; do
	case "$1" in
	--vhost) vhost=$2; shift 2 ;;
	--namespace) namespace=$2; shift 2 ;;
	--producer) producer=$2; shift 2 ;;
	--worker) worker=$2; shift 2 ;;
	--gateway) gateway=$2; shift 2 ;;
	--no-replies) replies=no; shift ;;
	--bounds) bounds=yes; shift ;;
	-h | --help) sed -n '2,20p' "$0"; exit 0 ;;
	*) echo "rabbitmq-roles: unknown argument $1" >&2; exit 2 ;;
	esac
done
if ! [[ "$namespace" =~ ^[a-z0-9_-]{1,48}$ ]]; then
	echo "rabbitmq-roles: namespace must be 1-48 characters of [a-z0-9_-]" >&2
	exit 2
fi
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
ctl() { rabbitmqctl --quiet "$@"; }

# The namespace has no regex metacharacters (checked above); dots are escaped.
ns="$namespace"

# user NAME PASSWORD: create it, or set its password when it exists; no tags.
user() {
	local name=$1 password=$2
	if ctl list_users --no-table-headers | cut -f1 | grep -qxF "$name"; then
		printf '%s\n' "$password" | ctl change_password "$name" >/dev/null
	else
		printf '%s\n' "$password" | ctl add_user "$name" >/dev/null
	fi
	ctl set_user_tags "$name" >/dev/null
}

# set_permissions NAME CONFIGURE WRITE READ
permissions() {
	ctl set_permissions -p "$vhost" "$1" "$2" "$3" "$4" >/dev/null
	echo "rabbitmq-roles: $1 on vhost $vhost: configure '$2' write '$3' read '$4'"
}

if [ -n "${WALLETQ_PRODUCER_PASSWORD:-}" ]; then
	user "$producer" "$WALLETQ_PRODUCER_PASSWORD"
	if [ "$replies" = yes ]; then
		# Its own server-named (amq.gen-…) or walletq.reply.… queues: declare and read them.
		reply="^(amq\\.gen-.*|${ns}\\.reply\\..*)\$"
		permissions "$producer" "$reply" "^${ns}\\.requests\$" "$reply"
	else
		permissions "$producer" '^$' "^${ns}\\.requests\$" '^$'
	fi
fi

if [ -n "${WALLETQ_WORKER_PASSWORD:-}" ]; then
	user "$worker" "$WALLETQ_WORKER_PASSWORD"
	# configure: declare the exchanges and queues of the topology, and the claims on the
	#            queues it consumes (exclusive `<queue>.owner` queues, declared and deleted);
	# write: bind queues (write on the queue), forward from the ingress queue to the
	#        partitions and publish results to each request's reply_to, both through the
	#        default exchange (amq.default);
	# read: bind to the exchanges (read on the exchange), consume the ingress queue (the
	#       router) and the partitions.
	permissions "$worker" \
		"^${ns}\\.(requests(\\.[0-9]+)?|ingress|dead|results|(ingress|requests\\.[0-9]+)\\.owner)\$" \
		"^(${ns}\\.(ingress|requests\\.[0-9]+|dead|results)|amq\\.default)\$" \
		"^${ns}\\.(requests(\\.[0-9]+)?|ingress|dead)\$"
fi

if [ -n "${WALLETQ_GATEWAY_PASSWORD:-}" ]; then
	user "$gateway" "$WALLETQ_GATEWAY_PASSWORD"
	# Its one exclusive, server-named reply queue (amq.gen-…) and the requests exchange.
	permissions "$gateway" '^amq\.gen-.*$' "^${ns}\\.requests\$" '^amq\.gen-.*$'
fi

if [ "$bounds" = yes ]; then
	# The ingress queue refuses new publishes when full (the producer's confirm is a nack):
	# nothing already accepted is dropped. Its dead-lettering (a message no client can decode,
	# past its delivery limit) is at-least-once, which needs reject-publish. Partition queues get no limit: a nack between two
	# forwards of one user's requests could reorder them. Results and dead letters keep the
	# newest.
	ctl set_policy -p "$vhost" --apply-to queues --priority 10 "${ns}-ingress" \
		"^${ns}\\.ingress\$" \
		'{"max-length":1000000,"max-length-bytes":1073741824,"overflow":"reject-publish","dead-letter-strategy":"at-least-once"}' >/dev/null
	ctl set_policy -p "$vhost" --apply-to queues --priority 10 "${ns}-results" \
		"^${ns}\\.(results|dead)\$" \
		'{"max-length":1000000,"max-length-bytes":1073741824,"overflow":"drop-head"}' >/dev/null
	echo "rabbitmq-roles: bounds policies set for ${ns}.ingress, ${ns}.results and ${ns}.dead"
fi
