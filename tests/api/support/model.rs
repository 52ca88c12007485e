//! The oracle: the rules written again in integer cents ([`SequentialModel`]), the check of a
//! result against it, and deterministic workloads ([`Lcg`], [`mixed_requests`], [`request`]).

use std::collections::HashMap;

use walletq::domain::{Command, Money, Op, Request, RequestId, RequestResult, Status, UserId};

/// A valid request.
pub(crate) fn request(id: impl AsRef<str>, user: &str, op: Op, amount_cents: i64) -> Request {
    let amount = Money::from_cents(amount_cents).expect("amount");
    let command = match op {
        Op::Deposit => Command::Deposit { amount },
        Op::Withdraw => Command::Withdraw { amount },
        Op::Hold => Command::Hold { amount, timeout_s: walletq::domain::HOLD_TIMEOUT_DEFAULT_S },
        other => panic!("{} names a hold: build it with Command", other.as_str()),
    };
    Request::new(RequestId::parse(id.as_ref()).expect("request id"), UserId::parse(user).expect("user id"), command)
}

/// A request of any command.
pub(crate) fn command(id: impl AsRef<str>, user: &str, command: Command) -> Request {
    Request::new(RequestId::parse(id.as_ref()).expect("request id"), UserId::parse(user).expect("user id"), command)
}

/// `cents` as money.
pub(crate) fn cents(cents: i64) -> Money {
    Money::from_cents(cents).expect("amount")
}

/// The rules, written again independently and in integer cents, as the oracle.
#[derive(Default)]
pub(crate) struct SequentialModel {
    balances: HashMap<String, i64>,
}

impl SequentialModel {
    /// Applies one request; returns (status, reason, balance after in cents).
    pub(crate) fn apply(&mut self, request: &Request) -> (Status, Option<&'static str>, Option<i64>) {
        let user = request.user_id.as_str().to_owned();
        let amount = request.amount().map_or(0, Money::cents);
        match (request.op(), self.balances.get(&user).copied()) {
            (Op::Deposit, balance) => {
                let after = balance.unwrap_or(0) + amount;
                self.balances.insert(user, after);
                (Status::Approved, None, Some(after))
            }
            (Op::Withdraw, None) => (Status::Rejected, Some("no_wallet"), None),
            (Op::Withdraw, Some(balance)) if balance < amount => {
                (Status::Rejected, Some("insufficient_funds"), Some(balance))
            }
            (Op::Withdraw, Some(balance)) => {
                self.balances.insert(user, balance - amount);
                (Status::Approved, None, Some(balance - amount))
            }
            (op, _) => panic!("the sequential model knows no {}", op.as_str()),
        }
    }

    pub(crate) fn balance(&self, user: &str) -> Option<i64> {
        self.balances.get(user).copied()
    }
}

/// Checks a result against the model's verdict.
pub(crate) fn assert_matches_model(result: &RequestResult, expected: (Status, Option<&'static str>, Option<i64>)) {
    let (status, reason, balance) = expected;
    assert_eq!(result.status, status, "status of {:?}", result.request_id);
    assert_eq!(result.reason.map(|r| r.as_str()), reason, "reason of {:?}", result.request_id);
    assert_eq!(result.balance.map(Money::cents), balance, "balance of {:?}", result.request_id);
}

/// A tiny deterministic generator (tests must be reproducible).
pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub(crate) fn next_below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

/// `count` deterministic requests over `users` users named `<prefix>-<n>`: deposits with
/// probability `deposits_per_10` in 10, amounts 0.01 to `max_cents` cents.
pub(crate) fn mixed_requests(
    prefix: &str,
    count: usize,
    users: u64,
    deposits_per_10: u64,
    max_cents: u64,
    seed: u64,
) -> Vec<Request> {
    let mut rng = Lcg(seed);
    (0..count)
        .map(|i| {
            let user = format!("{prefix}-{}", rng.next_below(users));
            let op = if rng.next_below(10) < deposits_per_10 { Op::Deposit } else { Op::Withdraw };
            request(format!("{prefix}-{i}"), &user, op, 1 + rng.next_below(max_cents) as i64)
        })
        .collect()
}
