#!/usr/bin/env python3
"""Shows why walletq does not partition with RabbitMQ's x-consistent-hash exchange.

Binds 16 queues to an x-consistent-hash exchange, routes one message for each of 200
users, restarts the broker application (rabbitmqctl stop_app / start_app), routes again
and counts the users whose queue changed. On RabbitMQ 3.10.8 (2026-11-28): 188 and 200 of 200 in two runs
moved, so a user's older requests (still queued) and newer ones end up in different
partition queues and can be applied out of order. walletq routes with its own fixed
function instead (src/domain/partitioning.rs, src/worker/router.rs).

Needs: pika (pip install pika), rabbitmqctl, and the plugin rabbitmq_consistent_hash_exchange,
which walletq itself no longer needs, so scripts/services-up.sh does not enable it. Enable it
first (it stays enabled across restarts; disable it again afterwards if you like):

    rabbitmq-plugins enable rabbitmq_consistent_hash_exchange
    python3 scripts/consistent-hash-restart.py
    rabbitmq-plugins disable rabbitmq_consistent_hash_exchange

Restarts the local broker: do not run it beside other tests.
"""
import subprocess

import pika

URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
EXCHANGE, QUEUES, USERS = "chx-restart-check", 16, 200


def channel():
    return pika.BlockingConnection(pika.URLParameters(URL)).channel()


def route():
    ch = channel()
    ch.exchange_declare(EXCHANGE, "x-consistent-hash", durable=True)
    for i in range(QUEUES):
        ch.queue_declare(f"{EXCHANGE}.{i}", durable=True)
        ch.queue_bind(f"{EXCHANGE}.{i}", EXCHANGE, "20")
        ch.queue_purge(f"{EXCHANGE}.{i}")
    ch.confirm_delivery()
    for u in range(USERS):
        ch.basic_publish(EXCHANGE, f"user-{u}", f"user-{u}".encode())
    placement = {}
    for i in range(QUEUES):
        while True:
            method, _, body = ch.basic_get(f"{EXCHANGE}.{i}", auto_ack=True)
            if method is None:
                break
            placement[body.decode()] = i
    ch.connection.close()
    return placement


before = route()
for step in (["stop_app"], ["start_app"], ["await_startup"]):
    subprocess.run(["rabbitmqctl", *step], check=True, capture_output=True)
after = route()
moved = sum(1 for user, queue in before.items() if after.get(user) != queue)
print(f"{moved} of {len(before)} users moved to another queue after a broker restart")
ch = channel()
for i in range(QUEUES):
    ch.queue_delete(f"{EXCHANGE}.{i}")
ch.exchange_delete(EXCHANGE)
