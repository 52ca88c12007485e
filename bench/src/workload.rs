//! What a bench run sends: opening balances and requests, generated deterministically
//! from a seed so every approach gets exactly the same work.

use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use walletq::domain::{Command, Money, Op, Request, RequestId, UserId};

/// The shape of the load.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Withdrawals of 1.00 spread uniformly over many funded users; none should be refused.
    Spread,
    /// Every request withdraws 1.00 from one wallet holding half of what is asked (the seed's race).
    Hot,
    /// Deposits (a third) and withdrawals (two thirds) of 1.00–20.00 over users holding 20.00 each.
    Mixed,
    /// Two-phase withdrawals of 1.00 over the `spread` users (funded as there): each payout
    /// is a hold, then its capture, published when the hold's approval arrives. `--requests`
    /// counts messages, so a run makes half as many withdrawals as `spread`.
    Payout,
}

/// Withdrawal amount of the `spread` and `hot` scenarios, in cents.
pub const UNIT_CENTS: i64 = 100;
/// Opening balance of each `spread` user, in cents: far more than it is asked for.
const SPREAD_OPENING_CENTS: i64 = 1_000_000;
/// Opening balance of each `mixed` user, in cents.
const MIXED_OPENING_CENTS: i64 = 2_000;
/// Range of `mixed` amounts, in cents.
const MIXED_AMOUNT_CENTS: std::ops::RangeInclusive<i64> = 100..=2_000;

impl Scenario {
    /// The number of users when `--users` is not given.
    pub fn default_users(self) -> u32 {
        match self {
            Scenario::Spread | Scenario::Payout => 10_000,
            Scenario::Hot => 1,
            Scenario::Mixed => 1_000,
        }
    }

    /// The wire name, e.g. `spread`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Spread => "spread",
            Scenario::Hot => "hot",
            Scenario::Mixed => "mixed",
            Scenario::Payout => "payout",
        }
    }
}

/// How long a payout's hold lasts, in seconds: far longer than the run, so only its
/// capture closes it.
pub const PAYOUT_HOLD_TIMEOUT_S: u32 = 600;

/// Opening balances and the requests, in submission order.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The shape of the load.
    pub scenario: Scenario,
    /// Every user the requests name, with the balance its wallet starts with.
    pub opening: Vec<(UserId, Money)>,
    /// The requests, in submission order.
    pub requests: Vec<Request>,
    /// `after[j] = Some(i)`: request `j` is not taken by the clients but published once
    /// request `i`'s result arrived approved (a payout's capture after its hold).
    pub after: Vec<Option<usize>>,
}

impl Workload {
    /// Withdrawals among the requests: withdraw and capture requests (a hold moves no money).
    pub fn withdrawals(&self) -> usize {
        self.requests.iter().filter(|r| matches!(r.command, Command::Withdraw { .. } | Command::Capture { .. })).count()
    }
}

/// Generates the workload of `scenario`: `users` wallets (ignored by `hot`) and `requests` requests.
pub fn generate(scenario: Scenario, users: u32, requests: u32, seed: u64) -> Workload {
    let users = if scenario == Scenario::Hot { 1 } else { users.max(1) };
    let opening_cents = match scenario {
        Scenario::Spread | Scenario::Payout => SPREAD_OPENING_CENTS,
        Scenario::Hot => i64::from(requests / 2) * UNIT_CENTS,
        Scenario::Mixed => MIXED_OPENING_CENTS,
    };
    let user_ids: Vec<UserId> = (0..users).map(user_id).collect();
    let opening = user_ids.iter().map(|u| (u.clone(), cents(opening_cents))).collect();
    if scenario == Scenario::Payout {
        return payouts(opening, &user_ids, requests, seed);
    }

    let mut rng = SmallRng::seed_from_u64(seed);
    let requests: Vec<Request> = (0..requests)
        .map(|i| {
            let user = user_ids[rng.random_range(0..user_ids.len())].clone();
            let (op, amount_cents) = match scenario {
                Scenario::Spread | Scenario::Hot | Scenario::Payout => (Op::Withdraw, UNIT_CENTS),
                Scenario::Mixed => {
                    let op = if rng.random_range(0..3) == 0 { Op::Deposit } else { Op::Withdraw };
                    (op, rng.random_range(MIXED_AMOUNT_CENTS))
                }
            };
            let amount = cents(amount_cents);
            let command = if op == Op::Deposit { Command::Deposit { amount } } else { Command::Withdraw { amount } };
            Request::new(request_id(i), user, command)
        })
        .collect();
    let after = vec![None; requests.len()];
    Workload { scenario, opening, requests, after }
}

/// `requests / 2` payouts of [`UNIT_CENTS`] (a hold, then its capture of the same amount) over
/// `user_ids`; an odd last request is a lone withdrawal.
fn payouts(opening: Vec<(UserId, Money)>, user_ids: &[UserId], requests: u32, seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let amount = cents(UNIT_CENTS);
    let mut out = Vec::with_capacity(requests as usize);
    let mut after = Vec::with_capacity(requests as usize);
    for i in (0..requests).step_by(2) {
        let user = user_ids[rng.random_range(0..user_ids.len())].clone();
        if i + 1 == requests {
            out.push(Request::new(request_id(i), user, Command::Withdraw { amount }));
            after.push(None);
            break;
        }
        let hold = Command::Hold { amount, timeout_s: PAYOUT_HOLD_TIMEOUT_S };
        out.push(Request::new(request_id(i), user.clone(), hold));
        after.push(None);
        let capture = Command::Capture { hold_id: request_id(i), amount: Some(amount) };
        out.push(Request::new(request_id(i + 1), user, capture));
        after.push(Some(i as usize));
    }
    Workload { scenario: Scenario::Payout, opening, requests: out, after }
}

/// The id of request `index`: also its correlation id, so a result leads back to its request.
pub fn request_id(index: u32) -> RequestId {
    RequestId::parse(&format!("b{index}")).unwrap_or_else(|| unreachable!("`b<digits>` is a valid id"))
}

/// The request index a result's correlation or request id names, if it is one of ours.
pub fn request_index(id: &str) -> Option<usize> {
    id.strip_prefix('b')?.parse().ok()
}

fn user_id(index: u32) -> UserId {
    UserId::parse(&format!("u{index}")).unwrap_or_else(|| unreachable!("`u<digits>` is a valid id"))
}

fn cents(value: i64) -> Money {
    Money::from_cents(value).unwrap_or(Money::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_funds_exactly_half_of_the_withdrawals() {
        let workload = generate(Scenario::Hot, 50, 500, 1);
        assert_eq!(workload.opening.len(), 1);
        assert_eq!(workload.opening[0].1.cents(), 250 * UNIT_CENTS);
        assert!(workload.requests.iter().all(|r| r.op() == Op::Withdraw && r.user_id == workload.opening[0].0));
    }

    #[test]
    fn spread_is_deterministic_and_covers_users() {
        let a = generate(Scenario::Spread, 100, 5_000, 7);
        let b = generate(Scenario::Spread, 100, 5_000, 7);
        assert_eq!(a.requests, b.requests);
        let touched: std::collections::HashSet<_> = a.requests.iter().map(|r| &r.user_id).collect();
        assert_eq!(touched.len(), 100);
        assert_ne!(a.requests, generate(Scenario::Spread, 100, 5_000, 8).requests);
    }

    #[test]
    fn mixed_has_both_ops_within_bounds() {
        let workload = generate(Scenario::Mixed, 10, 3_000, 3);
        let deposits = workload.requests.iter().filter(|r| r.op() == Op::Deposit).count();
        assert!((800..1_200).contains(&deposits), "{deposits} deposits");
        assert!(workload.requests.iter().all(|r| MIXED_AMOUNT_CENTS.contains(&r.amount().map_or(0, Money::cents))));
    }

    #[test]
    fn payout_captures_each_hold_after_it_for_the_same_user_and_amount() {
        let workload = generate(Scenario::Payout, 100, 1_001, 5);
        assert_eq!(workload.requests.len(), 1_001);
        assert_eq!(workload.withdrawals(), 501, "500 captures and the odd lone withdrawal");
        for (j, request) in workload.requests.iter().enumerate() {
            match (&request.command, workload.after[j]) {
                (Command::Capture { hold_id, amount }, Some(i)) => {
                    let hold = &workload.requests[i];
                    assert!(i < j && hold.request_id == *hold_id && hold.user_id == request.user_id);
                    assert_eq!((hold.op(), *amount, hold.amount()), (Op::Hold, Some(cents(UNIT_CENTS)), *amount));
                }
                (Command::Hold { .. } | Command::Withdraw { .. }, None) => {}
                other => panic!("request {j}: {other:?}"),
            }
        }
        assert_eq!(workload.opening.len(), 100);
    }

    #[test]
    fn ids_round_trip() {
        assert_eq!(request_index(request_id(42).as_str()), Some(42));
        assert_eq!(request_index("x42"), None);
    }
}
