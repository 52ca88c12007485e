//! Property tests of the ledger: random sequences of deposits, withdrawals, replays,
//! conflicts and malformed messages for a handful of users, cut into random batches and
//! applied through the real `Ledger::apply_batch` in PostgreSQL (malformed ones stop at
//! `decode_request`, as in the worker), compared after every batch with a pure model
//! written here independently, in integer cents. The audit must stay clean.
//!
//! A second test runs several such sequences at once, each on its own users, through one
//! `GroupCommitter` (one transaction in flight), as a worker's partitions do: each sequence
//! hands over one batch at a time, the committer merges the batches that wait together, and
//! every sequence is checked against its own model.
//!
//! One database per test; every case uses fresh user and request ids. The run is
//! deterministic (fixed RNG seed); `PROPTEST_CASES` changes the number of cases.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};

use futures_util::future::join_all;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRng, TestRunner};
use walletq::domain::{
    CouponKind, Money, Op, Reason, Request, RequestId, RequestResult, Status, UserId, decode_request,
};
use walletq::ledger::group::GroupCommitter;
use walletq::ledger::{Ledger, LedgerError};

use crate::support::{CleanupOnDrop, drop_database, isolated_services};

/// Users per case.
const USERS: usize = 3;
/// Default number of cases (each a fresh set of users); well under a second each.
const CASES_DEFAULT: u32 = 64;
/// Most sequences run at once through the group committer, in one case of the second test.
const CONCURRENT_SEQUENCES_MAX: usize = 4;

#[derive(Debug, Clone, Copy)]
enum Change {
    Amount,
    Op,
    User,
}

#[derive(Debug, Clone, Copy)]
enum Malformed {
    ZeroAmount,
    ThreeDecimals,
    NegativeAmount,
    OverMaximum,
    FloatNotation,
    BadOp,
    MissingAmount,
    UnknownField,
    DuplicateField,
    BadUserId,
    NotJson,
}

#[derive(Debug, Clone)]
enum Step {
    Deposit {
        user: usize,
        cents: i64,
    },
    Withdraw {
        user: usize,
        cents: i64,
    },
    /// An earlier fresh request again: same id, same body (amount written as a JSON
    /// number with a trailing zero when `reformat`, which is still the same value).
    Replay {
        of: Index,
        reformat: bool,
    },
    /// An earlier fresh request's id with a different body.
    Conflict {
        of: Index,
        change: Change,
    },
    Malformed {
        kind: Malformed,
        user: usize,
    },
}

fn amount_cents() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 1i64..=20_000,
        3 => 9_000i64..=60_000,
        1 => prop::sample::select(vec![1i64, 9_999, 10_000, 29_999, 30_000, 49_999, 50_000, 100_000_000_000]),
        1 => 1i64..=100_000_000_000,
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let user = 0..USERS;
    let change = prop_oneof![Just(Change::Amount), Just(Change::Op), Just(Change::User)];
    let malformed = prop::sample::select(vec![
        Malformed::ZeroAmount,
        Malformed::ThreeDecimals,
        Malformed::NegativeAmount,
        Malformed::OverMaximum,
        Malformed::FloatNotation,
        Malformed::BadOp,
        Malformed::MissingAmount,
        Malformed::UnknownField,
        Malformed::DuplicateField,
        Malformed::BadUserId,
        Malformed::NotJson,
    ]);
    prop_oneof![
        5 => (user.clone(), amount_cents()).prop_map(|(user, cents)| Step::Deposit { user, cents }),
        6 => (user.clone(), amount_cents()).prop_map(|(user, cents)| Step::Withdraw { user, cents }),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(of, reformat)| Step::Replay { of, reformat }),
        2 => (any::<Index>(), change).prop_map(|(of, change)| Step::Conflict { of, change }),
        2 => (malformed, user).prop_map(|(kind, user)| Step::Malformed { kind, user }),
    ]
}

/// Steps, and the sizes of the batches they are cut into (repeated as needed).
fn scenario() -> impl Strategy<Value = (Vec<Step>, Vec<usize>)> {
    (prop::collection::vec(step(), 1..48), prop::collection::vec(1usize..=8, 1..8))
}

/// One message as a producer would send it, and the request it must decode to.
struct Message {
    body: Vec<u8>,
    request: Option<Request>,
    /// The request id of a malformed message, which must never be stored.
    malformed_id: Option<String>,
}

/// Turns steps into message bodies; replays and conflicts point at earlier fresh requests.
fn messages(case: u64, steps: &[Step]) -> Vec<Message> {
    let user_id = |n: usize| format!("p{case}-u{n}");
    let request = |id: String, user: String, op: Op, cents: i64| crate::support::model::request(id, &user, op, cents);
    let mut fresh: Vec<Request> = Vec::new();
    let mut out = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let id = format!("p{case}-r{n}");
        let message = match *step {
            Step::Deposit { user, cents } | Step::Withdraw { user, cents } => {
                let op = if matches!(step, Step::Deposit { .. }) { Op::Deposit } else { Op::Withdraw };
                let request = request(id, user_id(user), op, cents);
                fresh.push(request.clone());
                Message { body: request.to_json(), request: Some(request), malformed_id: None }
            }
            Step::Replay { .. } | Step::Conflict { .. } if fresh.is_empty() => continue,
            Step::Replay { of, reformat } => {
                let original = of.get(&fresh).clone();
                let body = if reformat {
                    let cents = cents_of(&original);
                    format!(
                        r#"{{"amount":{}.{:02}0,"op":"{}","user_id":"{}","request_id":"{}"}}"#,
                        cents / 100,
                        cents % 100,
                        original.op().as_str(),
                        original.user_id,
                        original.request_id
                    )
                    .into_bytes()
                } else {
                    original.to_json()
                };
                Message { body, request: Some(original), malformed_id: None }
            }
            Step::Conflict { of, change } => {
                let original = of.get(&fresh);
                let mut other = original.clone();
                match change {
                    Change::Amount => {
                        let cents = cents_of(original);
                        let changed = if cents == 1 { 2 } else { cents - 1 };
                        other = request(id_of(original), original.user_id.to_string(), original.op(), changed);
                    }
                    Change::Op => {
                        let op = if original.op() == Op::Deposit { Op::Withdraw } else { Op::Deposit };
                        other = request(id_of(original), original.user_id.to_string(), op, cents_of(original));
                    }
                    Change::User => {
                        let same = original.user_id.as_str() == user_id(0);
                        other.user_id = UserId::parse(&user_id(if same { 1 } else { 0 })).expect("user id");
                    }
                }
                Message { body: other.to_json(), request: Some(other), malformed_id: None }
            }
            Step::Malformed { kind, user } => {
                let user = user_id(user);
                let with_amount = |amount: &str| {
                    format!(r#"{{"request_id":"{id}","user_id":"{user}","op":"withdraw","amount":{amount}}}"#)
                };
                let body = match kind {
                    Malformed::ZeroAmount => with_amount("\"0.00\""),
                    Malformed::ThreeDecimals => with_amount("\"1.005\""),
                    Malformed::NegativeAmount => with_amount("\"-5\""),
                    Malformed::OverMaximum => with_amount("\"1000000000.01\""),
                    Malformed::FloatNotation => with_amount("1e2"),
                    Malformed::BadOp => {
                        format!(r#"{{"request_id":"{id}","user_id":"{user}","op":"steal","amount":"1"}}"#)
                    }
                    Malformed::MissingAmount => format!(r#"{{"request_id":"{id}","user_id":"{user}","op":"deposit"}}"#),
                    Malformed::UnknownField => with_amount("\"1\",\"admin\":true"),
                    Malformed::DuplicateField => with_amount("\"1\",\"amount\":\"2\""),
                    Malformed::BadUserId => {
                        format!(r#"{{"request_id":"{id}","user_id":"{user} x","op":"deposit","amount":"1"}}"#)
                    }
                    Malformed::NotJson => format!("deposit {id} 1"),
                };
                Message { body: body.into_bytes(), request: None, malformed_id: Some(id) }
            }
        };
        out.push(message);
    }
    out
}

/// The amount of a money request, in cents.
fn cents_of(request: &Request) -> i64 {
    request.amount().map_or(0, Money::cents)
}

/// The request id, as text.
fn id_of(request: &Request) -> String {
    request.request_id.as_str().to_owned()
}

/// The rules written again, in integer cents, with the results the ledger returned first.
#[derive(Default)]
struct Model {
    balances: HashMap<String, i64>,
    stored: HashMap<String, (Request, RequestResult)>,
}

fn coupon_for(cents: i64) -> Option<CouponKind> {
    if cents >= 50_000 {
        Some(CouponKind::Lifetime20Off)
    } else if cents >= 30_000 {
        Some(CouponKind::Spend300Save50)
    } else if cents >= 10_000 {
        Some(CouponKind::RedPacket10)
    } else {
        None
    }
}

impl Model {
    /// Checks the ledger's result for `request` against the model, then updates the model.
    fn check(&mut self, request: &Request, result: &RequestResult) -> Result<(), TestCaseError> {
        let id = request.request_id.as_str().to_owned();
        let user = request.user_id.as_str().to_owned();
        let balance = self.balances.get(&user).copied();
        prop_assert_eq!(result.request_id.as_ref(), Some(&request.request_id));

        if let Some((original, stored)) = self.stored.get(&id) {
            let same_body = original.same_body(request);
            if same_body {
                let expected = RequestResult { replayed: true, ..stored.clone() };
                prop_assert_eq!(result, &expected, "replay of {}", id);
            } else {
                prop_assert_eq!(result.status, Status::Rejected, "conflict on {}", id);
                prop_assert_eq!(result.reason, Some(Reason::Conflict), "conflict on {}", id);
                prop_assert_eq!(result.balance.map(Money::cents), balance, "balance in the conflict on {}", id);
                prop_assert_eq!(result.amount, request.amount());
                prop_assert!(!result.replayed && result.coupon.is_none());
            }
            return Ok(());
        }

        let cents = cents_of(request);
        let (status, reason, after, coupon) = match (request.op(), balance) {
            (Op::Deposit, balance) => {
                let after = balance.unwrap_or(0) + cents;
                self.balances.insert(user.clone(), after);
                (Status::Approved, None, Some(after), coupon_for(cents))
            }
            (Op::Withdraw, None) => (Status::Rejected, Some(Reason::NoWallet), None, None),
            (Op::Withdraw, Some(balance)) if balance < cents => {
                (Status::Rejected, Some(Reason::InsufficientFunds), Some(balance), None)
            }
            (Op::Withdraw, Some(balance)) => {
                self.balances.insert(user.clone(), balance - cents);
                (Status::Approved, None, Some(balance - cents), None)
            }
            (op, _) => panic!("the model knows no {}", op.as_str()),
        };
        prop_assert_eq!(result.status, status, "status of {}", id);
        prop_assert_eq!(result.reason, reason, "reason of {}", id);
        prop_assert_eq!(result.balance.map(Money::cents), after, "balance after {}", id);
        prop_assert_eq!(result.coupon.as_ref().map(|c| c.kind), coupon, "coupon of {}", id);
        prop_assert!(!result.replayed, "{} is not a replay", id);
        prop_assert_eq!(
            (result.user_id.as_ref(), result.op, result.amount),
            (Some(&request.user_id), Some(request.op()), request.amount())
        );
        self.stored.insert(id, (request.clone(), result.clone()));
        Ok(())
    }

    /// Coupon kinds granted to `user`, sorted.
    fn coupons_of(&self, user: &str) -> Vec<CouponKind> {
        let mut kinds: Vec<CouponKind> = self
            .stored
            .values()
            .filter(|(request, _)| request.user_id.as_str() == user)
            .filter_map(|(_, result)| result.coupon.as_ref().map(|c| c.kind))
            .collect();
        kinds.sort_by_key(|k| k.as_str());
        kinds
    }
}

static CASE: AtomicU64 = AtomicU64::new(0);

/// Where a case's batches go, and what it reads the database with.
struct Target<'a> {
    /// The ledger under test, and what the checks read the database with.
    ledger: &'a Ledger,
    /// Through this committer (merged with other cases' batches), or straight to the ledger.
    committer: Option<&'a GroupCommitter>,
    /// The next fencing token (shared by every case of a test, so it only grows).
    fences: &'a AtomicI64,
    /// Batches applied per transaction (told apart by the `processed_at` of their new
    /// results), to check that the committer merged some.
    transactions: &'a Mutex<HashMap<DateTime<Utc>, usize>>,
}

impl Target<'_> {
    async fn apply(&self, requests: &[Request], fences: &[(UserId, i64)]) -> Result<Vec<RequestResult>, LedgerError> {
        let results = match self.committer {
            Some(committer) => committer.apply_batch(requests, fences).await,
            None => self.ledger.apply_batch(requests, fences).await,
        };
        // Every result that is not a replay carries its transaction's time.
        if let Some(fresh) = results.as_ref().ok().and_then(|r| r.iter().find(|r| !r.replayed)) {
            let mut transactions = self.transactions.lock().expect("not poisoned");
            *transactions.entry(fresh.processed_at).or_default() += 1;
        }
        results
    }
}

async fn run_case(target: &Target<'_>, steps: &[Step], cuts: &[usize]) -> Result<(), TestCaseError> {
    let ledger = target.ledger;
    // A shrunk case runs again: new ids every time.
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    let messages = messages(case, steps);
    let users: Vec<String> = (0..USERS).map(|n| format!("p{case}-u{n}")).collect();
    let mut model = Model::default();
    let mut rest: &[Message] = &messages;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let size = (*cut.next().unwrap_or(&1)).min(rest.len());
        let (batch, tail) = rest.split_at(size);
        rest = tail;

        // Decode as the worker does; only valid requests reach the ledger.
        let mut valid = Vec::new();
        for message in batch {
            match (decode_request(&message.body), &message.request) {
                (Ok(decoded), Some(expected)) => {
                    prop_assert_eq!(&decoded, expected);
                    valid.push(decoded);
                }
                (Err(invalid), None) => prop_assert!(!invalid.detail.is_empty()),
                (decoded, expected) => {
                    return Err(TestCaseError::fail(format!("decoded {decoded:?}, expected {expected:?}")));
                }
            }
        }
        if valid.is_empty() {
            continue;
        }
        let fence = target.fences.fetch_add(1, Ordering::Relaxed);
        let mut batch_users: Vec<UserId> = valid.iter().map(|r| r.user_id.clone()).collect();
        batch_users.sort();
        batch_users.dedup();
        let batch_fences: Vec<(UserId, i64)> = batch_users.into_iter().map(|u| (u, fence)).collect();
        let results =
            target.apply(&valid, &batch_fences).await.map_err(|e| TestCaseError::fail(format!("apply_batch: {e}")))?;
        prop_assert_eq!(results.len(), valid.len());
        for (request, result) in valid.iter().zip(&results) {
            model.check(request, result)?;
        }

        // The database agrees with the model after every batch.
        for user in &users {
            let wallet = ledger
                .wallet(&UserId::parse(user).expect("user id"))
                .await
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            prop_assert_eq!(wallet.as_ref().map(|w| w.balance.cents()), model.balances.get(user).copied(), "{}", user);
            let mut kinds: Vec<CouponKind> =
                wallet.map(|w| w.coupons.iter().map(|c| c.kind).collect()).unwrap_or_default();
            kinds.sort_by_key(|k| k.as_str());
            prop_assert_eq!(kinds, model.coupons_of(user), "coupons of {}", user);
        }
    }

    check_stored(ledger, case, &model, &messages).await
}

/// At the end of a case: every first result is stored as sent, malformed messages left
/// nothing behind, nothing else of the case is stored, and the audit is clean.
async fn check_stored(ledger: &Ledger, case: u64, model: &Model, messages: &[Message]) -> Result<(), TestCaseError> {
    for (id, (_, result)) in &model.stored {
        let stored = ledger
            .stored_result(&RequestId::parse(id).expect("request id"))
            .await
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        prop_assert_eq!(stored.as_ref(), Some(result), "stored result of {}", id);
    }
    for id in messages.iter().filter_map(|m| m.malformed_id.as_deref()) {
        let stored = ledger.stored_result(&RequestId::parse(id).expect("request id")).await;
        prop_assert!(matches!(stored, Ok(None)), "malformed {} was stored", id);
    }
    let prefix = format!("p{case}-%");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE request_id LIKE $1")
        .bind(&prefix)
        .fetch_one(ledger.pool())
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(count, model.stored.len() as i64);

    let audit =
        walletq::ledger::audit::audit(ledger.pool()).await.map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    prop_assert!(audit.is_clean(), "audit: {:?}", audit.checks);
    Ok(())
}

#[test]
fn ledger_matches_the_model_for_random_sequences() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let ledger =
        runtime.block_on(Ledger::connect(&services.database_url, 2, None)).expect("PostgreSQL must be reachable");
    let (fences, transactions) = (AtomicI64::new(1), Mutex::default());
    let target = Target { ledger: &ledger, committer: None, fences: &fences, transactions: &transactions };

    let outcome = runner().run(&scenario(), |(steps, cuts)| runtime.block_on(run_case(&target, &steps, &cuts)));

    runtime.block_on(async {
        ledger.pool().close().await;
        drop_database(&services.namespace).await;
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

#[test]
fn group_committer_matches_the_model_for_concurrent_sequences_on_disjoint_users() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let ledger =
        runtime.block_on(Ledger::connect(&services.database_url, 2, None)).expect("PostgreSQL must be reachable");
    let committer = {
        let _entered = runtime.enter();
        GroupCommitter::spawn(ledger.clone(), 1)
    };
    let (fences, transactions) = (AtomicI64::new(1), Mutex::default());
    let target = Target { ledger: &ledger, committer: Some(&committer), fences: &fences, transactions: &transactions };
    let sequences = prop::collection::vec(scenario(), 2..=CONCURRENT_SEQUENCES_MAX);

    let outcome = runner().run(&sequences, |sequences| {
        runtime.block_on(async {
            let cases = sequences.iter().map(|(steps, cuts)| run_case(&target, steps, cuts));
            join_all(cases).await.into_iter().collect::<Result<Vec<()>, _>>().map(drop)
        })
    });

    runtime.block_on(async {
        drop(committer);
        ledger.pool().close().await;
        drop_database(&services.namespace).await;
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let transactions = transactions.into_inner().expect("not poisoned");
    let merged = transactions.values().filter(|batches| **batches > 1).count();
    assert!(merged > 0, "the committer merged no batches in {} transactions", transactions.len());
}

/// The runner both tests use: `PROPTEST_CASES` cases, a fixed seed, no persistence.
fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(CASES_DEFAULT);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 256, ..Config::default() };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}
