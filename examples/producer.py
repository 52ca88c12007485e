#!/usr/bin/env python3
"""Publish one walletq request and wait for its result (Python, pika).

The same steps any producer takes (see docs/PROTOCOL.md):

1. publish to the exchange `<namespace>.requests` with routing key = user_id,
   persistent, content type application/json, message_id = request_id,
   a reply_to queue and a correlation_id, on a channel with publisher confirms;
2. read the result from the reply queue, matched by correlation_id.

    apt-get install python3-pika     # Debian; or: pip install pika (in a virtualenv)
    python3 examples/producer.py --user alice --op deposit --amount 300
    python3 examples/producer.py --user alice --op withdraw --amount 12.34 --request-id order-42
    python3 examples/producer.py --user alice --op hold --amount 40 --timeout-s 600 --request-id payout-7:hold
    python3 examples/producer.py --user alice --op capture --hold-id payout-7:hold --amount 25 --request-id payout-7:capture
    python3 examples/producer.py --user alice --op release --hold-id payout-7:hold --request-id payout-7:release

Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f) and
WALLETQ_NAMESPACE (default walletq), as for the walletq binary.
Exit code, as for `walletq deposit --wait`: 0 approved, 1 error, 2 usage error,
3 rejected, 4 no result in time.
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError


def request_body(parser: argparse.ArgumentParser, args: argparse.Namespace, request_id: str) -> dict:
    """The request's JSON fields: each op takes exactly its own (docs/PROTOCOL.md)."""
    body = {"request_id": request_id, "user_id": args.user, "op": args.op}
    if args.op in ("withdraw", "deposit", "hold"):
        if args.amount is None:
            parser.error(f"--op {args.op} needs --amount")
        body["amount"] = args.amount
    elif args.amount is not None:
        if args.op == "release":
            parser.error("--op release takes no --amount (it gives the whole hold back)")
        body["amount"] = args.amount  # a capture of part of the hold
    if args.op in ("capture", "release"):
        if args.hold_id is None:
            parser.error(f"--op {args.op} needs --hold-id")
        body["hold_id"] = args.hold_id
    elif args.hold_id is not None:
        parser.error(f"--op {args.op} takes no --hold-id")
    if args.timeout_s is not None:
        if args.op != "hold":
            parser.error("only --op hold takes --timeout-s")
        body["timeout_s"] = args.timeout_s
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--user", required=True, help="user_id: 1-64 characters of [A-Za-z0-9._:-]")
    parser.add_argument("--op", required=True, choices=["withdraw", "deposit", "hold", "capture", "release"])
    # Money is text: sent as a JSON string, never through float.
    parser.add_argument("--amount", help="plain decimal text, e.g. 12.34 (a capture without it takes the whole hold)")
    parser.add_argument("--hold-id", help="capture, release: the hold, i.e. the request id of its hold request")
    parser.add_argument("--timeout-s", type=int, help="hold: seconds until it expires, 1-604800 (default 900)")
    parser.add_argument("--request-id", help="idempotency key, and a hold's id (default: a fresh UUID)")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the result")
    args = parser.parse_args()

    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    namespace = os.environ.get("WALLETQ_NAMESPACE", "walletq")
    request_id = args.request_id or str(uuid.uuid4())
    body = json.dumps(request_body(parser, args, request_id))
    correlation_id = str(uuid.uuid4())

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now returns only once the broker has the message
        # A private reply queue: deleted when this connection closes.
        reply_to = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue

        published_ms = time.time_ns() // 1_000_000
        properties = pika.BasicProperties(
            delivery_mode=2,  # persistent
            content_type="application/json",
            message_id=request_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
            timestamp=published_ms // 1000,  # whole seconds, as AMQP 0-9-1 defines it
            headers={"x-published-ms": published_ms},  # Unix ms (a 64-bit int): end-to-end latency metric
        )
        try:
            channel.basic_publish(
                exchange=f"{namespace}.requests",
                routing_key=args.user,  # the partition key: one user, one queue, one order
                body=body.encode(),
                properties=properties,
                mandatory=True,  # fail loudly when no partition queue is bound
            )
        except ChannelClosedByBroker as error:
            print(f"producer: the broker refused the publish ({error}); has a worker declared the topology?",
                  file=sys.stderr)
            return 1
        except (NackError, UnroutableError) as error:
            print(f"producer: request {request_id} was not accepted by the broker: {error!r}", file=sys.stderr)
            return 1

        deadline = time.monotonic() + args.wait
        for _method, props, reply in channel.consume(reply_to, auto_ack=True, inactivity_timeout=0.25):
            # A hold's expiry result also comes here later (correlation_id = the hold's id).
            if reply is not None and props.correlation_id == correlation_id:
                result = json.loads(reply)
                print(json.dumps(result, indent=2))
                return 0 if result["status"] == "approved" else 3
            if time.monotonic() >= deadline:
                print(f"producer: no result for request {request_id} within {args.wait}s; it may still be applied",
                      file=sys.stderr)
                return 4
        return 1
    finally:
        if connection.is_open:
            connection.close()


if __name__ == "__main__":
    sys.exit(main())
