#!/usr/bin/env python3
"""A payout service on walletq holds: withdrawals to a bank (Python, pika).

For each payout it holds the money, calls the bank, then captures the hold when the bank
paid, releases it when the bank refused, and lets it expire when the bank never answered
(see docs/PROTOCOL.md, "Holds"). The bank here is simulated: it pays, refuses or never
answers at random. Every request id is derived from the payout id
(`<payout>:hold`, `<payout>:capture`, `<payout>:release`), so running the same payouts
again (same --run) repeats them without moving money twice: walletq answers with the
stored results ("replayed": true).

    apt-get install python3-pika     # Debian; or: pip install pika (in a virtualenv)
    python3 examples/payout.py --user alice --fund 100 --payouts 8 --timeout-s 3

Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f) and
WALLETQ_NAMESPACE (default walletq), as for the walletq binary.
Exit code: 0 when every payout ended (paid, refunded, expired or refused by walletq),
1 when one did not (no result in time, an error) or the final figures do not add up,
2 usage error.
"""

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Optional

import pika
from pika.exceptions import AMQPError

CENT = Decimal("0.01")
# Seconds to wait for a request's result, and for an expiry past its expires_at.
RESULT_WAIT_S = 10.0
EXPIRY_GRACE_S = 10.0


class BankTimeout(Exception):
    """The bank did not answer: nobody knows whether it paid."""


class SimulatedBank:
    """Pays, refuses or never answers, at random (reproducible with a seed)."""

    def __init__(self, rng: random.Random, paid: float, refused: float):
        self.rng = rng
        self.paid = paid
        self.refused = refused

    def transfer(self, payout_id: str, amount: Decimal) -> bool:
        """True when the bank paid, False when it refused; BankTimeout when it never answers."""
        draw = self.rng.random()
        if draw < self.paid:
            return True
        if draw < self.paid + self.refused:
            return False
        raise BankTimeout(f"no answer from the bank for payout {payout_id} ({amount})")


class Walletq:
    """Publishes requests with confirms and collects their results from one reply queue."""

    def __init__(self, url: str, namespace: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.exchange = f"{namespace}.requests"
        # Results, and the expiry results of our holds, come to this private queue.
        self.reply_to = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        self.results: dict = {}  # (correlation_id, op) -> result
        self.channel.basic_consume(self.reply_to, self._on_result, auto_ack=True)

    def _on_result(self, _channel, _method, props, body) -> None:
        result = json.loads(body)  # amounts and balances are strings: read them as Decimal
        self.results[(props.correlation_id, result.get("op"))] = result

    def send(self, request: dict) -> None:
        """Publishes one request; returns once the broker confirmed it."""
        request_id = request["request_id"]
        self.channel.basic_publish(
            exchange=self.exchange,
            routing_key=request["user_id"],  # the partition key: one user, one order
            body=json.dumps(request).encode(),
            properties=pika.BasicProperties(
                delivery_mode=2,
                content_type="application/json",
                message_id=request_id,
                reply_to=self.reply_to,
                correlation_id=request_id,
            ),
            mandatory=True,
        )

    def wait_for(self, correlation_id: str, op: str, seconds: float) -> Optional[dict]:
        """The result of (correlation_id, op), once it came; None after `seconds`."""
        deadline = time.monotonic() + seconds
        while (correlation_id, op) not in self.results:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.connection.process_data_events(time_limit=min(left, 0.25))
        return self.results.pop((correlation_id, op))

    def call(self, request: dict) -> Optional[dict]:
        self.send(request)
        return self.wait_for(request["request_id"], request["op"], RESULT_WAIT_S)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@dataclass
class Payout:
    payout_id: str
    amount: Decimal
    outcome: str = "unfinished"
    detail: str = ""
    replayed: bool = False
    expires_by: float = 0.0  # monotonic deadline for its expiry result


def pay_out(walletq: Walletq, bank: SimulatedBank, user: str, payout: Payout, timeout_s: int, results: list):
    """Hold, call the bank, then capture or release (or leave the hold to expire)."""
    hold_id = f"{payout.payout_id}:hold"
    held = walletq.call({"request_id": hold_id, "user_id": user, "op": "hold",
                         "amount": str(payout.amount), "timeout_s": timeout_s})
    if held is None:
        payout.detail = "no result for the hold in time; run again with the same --run"
        return
    results.append(held)
    payout.replayed = held["replayed"]
    if held["status"] != "approved":
        payout.outcome, payout.detail = "refused", held["reason"]
        return
    try:
        paid = bank.transfer(payout.payout_id, payout.amount)
    except BankTimeout as error:
        # Nobody knows whether the money left: do nothing, the hold expires at expires_at and
        # the money is available again. (A real service reconciles with the bank before then.)
        payout.outcome, payout.detail = "expiring", str(error)
        payout.expires_by = time.monotonic() + timeout_s + EXPIRY_GRACE_S
        return
    step = "capture" if paid else "release"
    result = walletq.call({"request_id": f"{payout.payout_id}:{step}", "user_id": user, "op": step,
                           "hold_id": hold_id})
    if result is None:
        payout.detail = f"no result for the {step} in time; run again with the same --run"
        return
    results.append(result)
    if result["status"] == "approved":
        payout.outcome = "paid" if paid else "refunded"
    else:
        payout.detail = f"{step} refused: {result['reason']}"


def await_expiries(walletq: Walletq, payouts: list, results: list) -> None:
    """Waits for the expiry result of each payout left to expire."""
    for payout in payouts:
        if payout.outcome != "expiring":
            continue
        if payout.replayed:
            # Its expiry result was sent to the first run's reply queue, once.
            payout.outcome, payout.detail = "expired", "hold replayed: expired in an earlier run"
            continue
        left = max(payout.expires_by - time.monotonic(), 0.0)
        result = walletq.wait_for(f"{payout.payout_id}:hold", "expire", left)
        if result is None:
            payout.outcome, payout.detail = "unfinished", "no expiry result in time"
        else:
            payout.outcome = "expired"
            results.append(result)


def timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def application_order(result: dict) -> tuple:
    """Sorts results as walletq applied them. Results of one batch share `processed_at`: the
    batch expires its due holds first (by expires_at, then hold id), then applies its requests."""
    if result["op"] == "expire":
        return (timestamp(result["processed_at"]), 0, timestamp(result["expires_at"]), result["hold_id"])
    return (timestamp(result["processed_at"]), 1)


def summarize(payouts: list, results: list) -> bool:
    """Prints the summary; True when every payout ended and the figures add up."""
    counts = Counter(p.outcome for p in payouts)
    totals: dict = {}
    for payout in payouts:
        totals[payout.outcome] = totals.get(payout.outcome, Decimal("0.00")) + payout.amount
        note = f"  ({payout.detail})" if payout.detail else ""
        again = " [replayed]" if payout.replayed else ""
        print(f"{payout.payout_id:<28} {payout.amount:>9} {payout.outcome:<10}{again}{note}".rstrip())
    print()
    for outcome in ("paid", "refunded", "expired", "refused", "unfinished"):
        print(f"{outcome:<10} {counts.get(outcome, 0):>4} payouts  {totals.get(outcome, Decimal('0.00')):>10}")
    ok = counts.get("unfinished", 0) == 0
    if results and results[0]["balance"] is not None:
        # The first result (the deposit, or the first hold) shows the balance before any
        # payout; the one applied last shows the wallet after them.
        start = Decimal(results[0]["balance"])
        last = max(results, key=application_order)
        balance, held = Decimal(last["balance"]), Decimal(last["held"])
        replayed = any(p.replayed for p in payouts)
        when = "in the stored results (later expiries not included)" if replayed else "now"
        print(f"\nwallet {when}: balance {balance}, held {held}, available {Decimal(last['available'])}")
        if not replayed:
            expected = start - totals.get("paid", Decimal("0.00"))
            adds_up = balance == expected and held == Decimal("0.00")
            print(f"check: balance {balance} = {start} - paid {totals.get('paid', Decimal('0.00'))}"
                  f" and nothing held: {'yes' if adds_up else 'NO'}")
            ok = ok and adds_up
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--user", required=True, help="the wallet's owner")
    parser.add_argument("--payouts", type=int, default=8, help="how many payouts (default 8)")
    parser.add_argument("--fund", help="deposit this much first (plain decimal text), e.g. 100")
    parser.add_argument("--timeout-s", type=int, default=3,
                        help="hold timeout in seconds, 1-604800 (default 3, so unanswered payouts expire soon)")
    parser.add_argument("--run", help="payout ids are <run>-<n>: the same --run repeats the same payouts "
                                      "(default: a fresh id; request ids are global, so pick fresh ones)")
    parser.add_argument("--seed", type=int, help="seed of the amounts and the bank (default: from --run)")
    parser.add_argument("--paid", type=float, default=0.6, help="chance the bank pays (default 0.6)")
    parser.add_argument("--refused", type=float, default=0.25, help="chance it refuses (default 0.25; else no answer)")
    args = parser.parse_args()
    if not 1 <= args.timeout_s <= 604_800:
        parser.error("--timeout-s must be from 1 to 604800")
    if args.paid < 0 or args.refused < 0 or args.paid + args.refused > 1:
        parser.error("--paid and --refused are chances: at least 0, at most 1 together")

    run = args.run or f"po-{uuid.uuid4().hex[:10]}"
    rng = random.Random(args.seed if args.seed is not None else run)
    bank = SimulatedBank(rng, args.paid, args.refused)
    # Amounts from 1.00 to 30.00, exact: whole cents, never floats.
    payouts = [Payout(f"{run}-{n}", (Decimal(rng.randint(100, 3000)) * CENT)) for n in range(1, args.payouts + 1)]
    print(f"run {run}: {args.payouts} payouts for {args.user}, holds of {args.timeout_s} s")

    try:
        walletq = Walletq(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                          os.environ.get("WALLETQ_NAMESPACE", "walletq"))
    except AMQPError as error:
        print(f"payout: cannot connect to RabbitMQ: {error!r}", file=sys.stderr)
        return 1
    results: list = []
    try:
        if args.fund is not None:
            funded = walletq.call({"request_id": f"{run}:fund", "user_id": args.user, "op": "deposit",
                                   "amount": args.fund})
            if funded is None or funded["status"] != "approved":
                print(f"payout: the deposit was not approved: {funded}", file=sys.stderr)
                return 1
            results.append(funded)
        for payout in payouts:
            pay_out(walletq, bank, args.user, payout, args.timeout_s, results)
        await_expiries(walletq, payouts, results)
    except AMQPError as error:
        print(f"payout: RabbitMQ failed ({error!r}); run again with --run {run}: nothing is applied twice",
              file=sys.stderr)
        return 1
    finally:
        walletq.close()
    print()
    return 0 if summarize(payouts, results) else 1


if __name__ == "__main__":
    sys.exit(main())
