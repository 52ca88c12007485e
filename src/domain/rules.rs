//! The wallet rules, applied to a batch in order as a pure function of the
//! current state. The ledger loads the state, calls [`plan_batch`] and writes the plan.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::coupon::{Coupon, CouponKind};
use super::money::Money;
use super::outcome::{Reason, RequestResult};
use super::request::{Op, Request, RequestId, UserId};

/// The `detail` of a deposit refused because the balance would pass its largest value.
const DEPOSIT_PAST_MAX_BALANCE: &str = "deposit would exceed the largest supported balance";

/// A request that was already processed, with its stored result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    /// The request as first stored.
    pub request: Request,
    /// The result first sent, which every replay repeats.
    pub result: RequestResult,
}

/// What the batch starts from: the wallets of its users and the known requests of its ids.
#[derive(Debug, Clone, Default)]
pub struct LedgerState {
    /// Balances of the wallets that exist, for the batch's users.
    pub balances: HashMap<UserId, Money>,
    /// Requests already processed, for the batch's request ids.
    pub known: HashMap<RequestId, StoredRequest>,
}

/// A request processed for the first time: it is stored with its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    /// The request to store.
    pub request: Request,
    /// Its result, stored with it and published.
    pub result: RequestResult,
    /// The change to the balance and the balance after it, when it moved money.
    pub entry: Option<LedgerEntry>,
}

/// One append-only ledger line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Signed change in cents: negative for a withdrawal.
    pub delta_cents: i64,
    /// The wallet's balance after this entry, for the audit's running check.
    pub balance_after: Money,
}

/// Everything a batch changes, and the result of every request in input order.
#[derive(Debug, Clone, Default)]
pub struct BatchPlan {
    /// One result per request of the batch, in input order.
    pub results: Vec<RequestResult>,
    /// The requests seen for the first time: to store with their results.
    pub new_requests: Vec<NewRequest>,
    /// Final balances of the wallets created or changed, in first-touch order.
    pub balances: Vec<(UserId, Money)>,
}

/// Applies the rules to `requests` in order.
///
/// - a known request_id with the same body is replayed (its stored result, `replayed: true`);
///   with a different body it is rejected `conflict` and nothing is stored;
/// - a deposit creates the wallet when needed, credits it and grants its tier's coupon;
/// - a withdrawal from no wallet is rejected `no_wallet`; one larger than the balance
///   `insufficient_funds`; otherwise it debits.
///
/// A deposit that would push a balance past the supported range is rejected
/// `invalid_request` rather than overflowing, and stored like the other rejections.
///
/// Every outcome of a new request is stored, so all copies of a message get the same one.
/// Only a conflict is not stored; its status and reason do not depend on the wallet (the
/// balance it reports does).
pub fn plan_batch(
    requests: &[Request],
    mut state: LedgerState,
    now: DateTime<Utc>,
    mut new_coupon_code: impl FnMut() -> String,
) -> BatchPlan {
    let mut plan = BatchPlan { results: Vec::with_capacity(requests.len()), ..BatchPlan::default() };
    let mut touched: Vec<UserId> = Vec::new();

    for request in requests {
        let balance = state.balances.get(&request.user_id).copied();
        if let Some(stored) = state.known.get(&request.request_id) {
            let result = if stored.request.same_body(request) {
                RequestResult { replayed: true, ..stored.result.clone() }
            } else {
                RequestResult::rejected(request, Reason::Conflict, balance, now)
            };
            plan.results.push(result);
            continue;
        }

        let (result, entry) = match (request.op, balance) {
            (Op::Withdraw, None) => (RequestResult::rejected(request, Reason::NoWallet, None, now), None),
            (Op::Withdraw, Some(balance)) => match balance.checked_sub(request.amount) {
                None => (RequestResult::rejected(request, Reason::InsufficientFunds, Some(balance), now), None),
                Some(after) => (
                    RequestResult::approved(request, after, None, now),
                    Some(LedgerEntry { delta_cents: -request.amount.cents(), balance_after: after }),
                ),
            },
            (Op::Deposit, balance) => match balance.unwrap_or(Money::ZERO).checked_add(request.amount) {
                None => {
                    // Stored like every outcome of a valid request: a copy of it (the router's
                    // second forward, a resend) gets this refusal again, even once a withdrawal
                    // has made room, so a request_id has one outcome.
                    let mut result = RequestResult::rejected(request, Reason::InvalidRequest, balance, now);
                    result.detail = Some(DEPOSIT_PAST_MAX_BALANCE.into());
                    (result, None)
                }
                Some(after) => {
                    let coupon =
                        CouponKind::for_deposit(request.amount).map(|kind| Coupon { code: new_coupon_code(), kind });
                    (
                        RequestResult::approved(request, after, coupon, now),
                        Some(LedgerEntry { delta_cents: request.amount.cents(), balance_after: after }),
                    )
                }
            },
        };

        if let Some(entry) = entry {
            if !touched.contains(&request.user_id) {
                touched.push(request.user_id.clone());
            }
            state.balances.insert(request.user_id.clone(), entry.balance_after);
        }
        state
            .known
            .insert(request.request_id.clone(), StoredRequest { request: request.clone(), result: result.clone() });
        plan.results.push(result.clone());
        plan.new_requests.push(NewRequest { request: request.clone(), result, entry });
    }

    plan.balances =
        touched.into_iter().filter_map(|user| state.balances.get(&user).map(|balance| (user, *balance))).collect();
    debug_assert_eq!(plan.results.len(), requests.len());
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::outcome::Status;

    fn request(id: &str, user: &str, op: Op, amount: &str) -> Request {
        Request {
            request_id: RequestId::parse(id).unwrap(),
            user_id: UserId::parse(user).unwrap(),
            op,
            amount: Money::parse_amount(amount).unwrap(),
        }
    }

    fn plan(requests: &[Request], state: LedgerState) -> BatchPlan {
        let mut n = 0;
        plan_batch(requests, state, Utc::now(), || {
            n += 1;
            format!("C{n}")
        })
    }

    #[test]
    fn the_seed_race_approves_exactly_the_balance() {
        let mut requests = vec![request("d", "u", Op::Deposit, "300")];
        requests.extend((0..500).map(|i| request(&format!("w{i}"), "u", Op::Withdraw, "1")));
        let plan = plan(&requests, LedgerState::default());
        let approved: Vec<_> = plan.results[1..].iter().map(|r| r.status == Status::Approved).collect();
        assert!(approved[..300].iter().all(|a| *a));
        assert!(approved[300..].iter().all(|a| !*a));
        assert_eq!(plan.results[500].reason, Some(Reason::InsufficientFunds));
        assert_eq!(plan.balances, vec![(UserId::parse("u").unwrap(), Money::ZERO)]);
        let sum: i64 = plan.new_requests.iter().filter_map(|n| n.entry).map(|e| e.delta_cents).sum();
        assert_eq!(sum, 0);
        assert_eq!(plan.results[0].coupon.as_ref().map(|c| c.kind), Some(CouponKind::Spend300Save50));
    }

    #[test]
    fn a_deposit_past_the_supported_range_is_rejected_and_stored_without_an_entry() {
        let mut state = LedgerState::default();
        let huge = Money::parse("9999999999999999.99").unwrap();
        state.balances.insert(UserId::parse("u").unwrap(), huge);
        let plan = plan(&[request("d", "u", Op::Deposit, "1")], state);
        assert_eq!(plan.results[0].reason, Some(Reason::InvalidRequest));
        assert_eq!(plan.results[0].balance, Some(huge));
        assert_eq!(plan.new_requests.len(), 1, "stored, like every other outcome of a valid request");
        assert_eq!(plan.new_requests[0].entry, None);
        assert!(plan.balances.is_empty());
    }

    /// Defect 5 of issue 16: the router's duplicate forward of a deposit refused as past the
    /// largest balance, after a withdrawal made room, was approved (`replayed: false`), and a
    /// producer keeping the first result believed it was not applied.
    #[test]
    fn a_copy_of_a_deposit_refused_past_the_range_gets_the_same_refusal_after_a_withdrawal() {
        let mut state = LedgerState::default();
        let huge = Money::parse("9999999999999999.99").unwrap();
        state.balances.insert(UserId::parse("u").unwrap(), huge);
        let deposit = request("d", "u", Op::Deposit, "1");
        let plan = plan(&[deposit.clone(), request("w", "u", Op::Withdraw, "5"), deposit], state);
        let (first, copy) = (&plan.results[0], &plan.results[2]);
        assert_eq!(copy.status, Status::Rejected, "{copy:?}");
        assert!(copy.replayed);
        assert_eq!(copy, &RequestResult { replayed: true, ..first.clone() }, "one outcome per request_id");
        assert_eq!(
            plan.balances,
            vec![(UserId::parse("u").unwrap(), huge.checked_sub(Money::parse("5").unwrap()).unwrap())]
        );
    }

    #[test]
    fn withdrawal_without_wallet_is_rejected() {
        let plan = plan(&[request("w", "u", Op::Withdraw, "1")], LedgerState::default());
        assert_eq!(plan.results[0].reason, Some(Reason::NoWallet));
        assert_eq!(plan.results[0].balance, None);
        assert_eq!(plan.new_requests.len(), 1);
        assert!(plan.balances.is_empty());
    }

    #[test]
    fn replays_and_conflicts_within_and_across_batches() {
        let first = plan(
            &[request("d", "u", Op::Deposit, "5"), request("d", "u", Op::Deposit, "5.00")],
            LedgerState::default(),
        );
        assert!(!first.results[0].replayed);
        assert!(first.results[1].replayed);
        assert_eq!(first.results[1].processed_at, first.results[0].processed_at);
        assert_eq!(first.new_requests.len(), 1);

        let mut state = LedgerState::default();
        let stored = &first.new_requests[0];
        state.known.insert(
            stored.request.request_id.clone(),
            StoredRequest { request: stored.request.clone(), result: stored.result.clone() },
        );
        state.balances.insert(UserId::parse("u").unwrap(), Money::parse("5").unwrap());
        let second = plan(&[request("d", "u", Op::Deposit, "6")], state);
        assert_eq!(second.results[0].reason, Some(Reason::Conflict));
        assert_eq!(second.results[0].balance, Money::parse("5").ok());
        assert_eq!(second.results[0].amount, Money::parse("6").ok());
        assert!(second.new_requests.is_empty());
        assert!(second.balances.is_empty());
    }
}
