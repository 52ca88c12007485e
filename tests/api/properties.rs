//! Property tests of the ledger: random sequences of deposits, withdrawals, holds, captures,
//! releases, replays, conflicts and malformed messages for a handful of users, cut into
//! random batches and applied through the real `Ledger::apply_batch` in PostgreSQL
//! (malformed ones stop at `decode_request`, as in the worker), compared after every batch
//! with a pure model written here independently, in integer cents. The audit must stay clean.
//!
//! Holds expire on the database's clock. The test moves that clock for its own users: a
//! step `AdvanceClock` shifts the `expires_at` of every active hold of the case's users back
//! by whole minutes, and the model moves its own time forward as much. Timeouts are whole
//! minutes too, so the few seconds a case really lasts never decide an expiry: the model
//! knows which holds are due before each batch (a batch expires its users' due holds first,
//! a `Sweep` step expires one user's, as the partition's sweeper does), and predicts each
//! expiry's stored result.
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
    Command, CouponKind, HOLD_TIMEOUT_DEFAULT_S, HOLD_TIMEOUT_MAX_S, HoldState, Money, Op, Reason, Request, RequestId,
    RequestResult, Status, UserId, decode_request,
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
/// The largest amount a request may name, in cents.
const AMOUNT_MAX_CENTS: i64 = 100_000_000_000;
/// The unit of hold timeouts and clock moves: far longer than a case really lasts.
const MINUTE_S: u32 = 60;

#[derive(Debug, Clone, Copy)]
enum Change {
    Amount,
    Op,
    User,
    /// A hold's `timeout_s` (the amount, for the other ops).
    Timeout,
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
    ZeroTimeout,
    TimeoutPastMaximum,
    CaptureWithoutHold,
    ReleaseWithAmount,
    WithdrawWithHold,
    ExpireOp,
}

/// Which hold a capture or release names.
#[derive(Debug, Clone, Copy)]
enum HoldRef {
    /// An earlier hold request (approved or not), sent by its own user.
    Own,
    /// An earlier hold request, sent by another user.
    OtherUser,
    /// An id that was never a hold.
    Unknown,
}

/// How much a capture takes of the hold it names.
#[derive(Debug, Clone, Copy)]
enum Take {
    /// No amount: the whole hold.
    Whole,
    /// The hold's amount, named.
    Exact,
    /// This percentage of it (at least a cent).
    Part(u8),
    /// A cent more than the hold.
    Over,
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
    /// A hold for `timeout` seconds; `None`: sent without `timeout_s` (the default).
    Hold {
        user: usize,
        cents: i64,
        timeout: Option<u32>,
    },
    Capture {
        of: Index,
        target: HoldRef,
        take: Take,
    },
    Release {
        of: Index,
        target: HoldRef,
    },
    /// The database's clock, for the case's holds, moves this many minutes forward.
    AdvanceClock {
        minutes: u32,
    },
    /// The sweeper's batch: no request, the user's due holds expire.
    Sweep {
        user: usize,
    },
    /// An earlier fresh request again: same id, same body (written by hand, fields in
    /// another order, amounts as JSON numbers with a trailing zero, a default `timeout_s`
    /// left out, when `reformat`: still the same body).
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

fn hold_step() -> impl Strategy<Value = Step> {
    let timeout = prop_oneof![
        6 => (1u32..=10).prop_map(|m| Some(m * MINUTE_S)),
        1 => Just(None),
        1 => Just(Some(HOLD_TIMEOUT_MAX_S)),
    ];
    // Mostly small: a hold needs available money, and captures need approved holds.
    let cents = prop_oneof![6 => 1i64..=5_000, 1 => amount_cents()];
    (0..USERS, cents, timeout).prop_map(|(user, cents, timeout)| Step::Hold { user, cents, timeout })
}

fn close_step() -> impl Strategy<Value = Step> {
    let target = prop_oneof![8 => Just(HoldRef::Own), 1 => Just(HoldRef::OtherUser), 1 => Just(HoldRef::Unknown)];
    let take = prop_oneof![
        3 => Just(Take::Whole),
        2 => Just(Take::Exact),
        3 => (1u8..=99).prop_map(Take::Part),
        1 => Just(Take::Over),
    ];
    prop_oneof![
        3 => (any::<Index>(), target.clone(), take).prop_map(|(of, target, take)| Step::Capture { of, target, take }),
        2 => (any::<Index>(), target).prop_map(|(of, target)| Step::Release { of, target }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let user = 0..USERS;
    let change = prop_oneof![Just(Change::Amount), Just(Change::Op), Just(Change::User), Just(Change::Timeout)];
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
        Malformed::ZeroTimeout,
        Malformed::TimeoutPastMaximum,
        Malformed::CaptureWithoutHold,
        Malformed::ReleaseWithAmount,
        Malformed::WithdrawWithHold,
        Malformed::ExpireOp,
    ]);
    prop_oneof![
        5 => (user.clone(), amount_cents()).prop_map(|(user, cents)| Step::Deposit { user, cents }),
        4 => (user.clone(), amount_cents()).prop_map(|(user, cents)| Step::Withdraw { user, cents }),
        4 => hold_step(),
        5 => close_step(),
        2 => prop_oneof![4 => 1u32..=10, 1 => Just(15)].prop_map(|minutes| Step::AdvanceClock { minutes }),
        1 => user.clone().prop_map(|user| Step::Sweep { user }),
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

/// What a case does, in order: messages (cut into batches) and, between batches, moves of
/// the clock and sweeps.
enum Item {
    Message(Message),
    /// Seconds the clock moves forward.
    AdvanceClock(u32),
    /// The user whose due holds a request-less batch expires.
    Sweep(String),
}

/// Turns steps into items; replays, conflicts, captures and releases point at earlier requests.
struct Builder {
    case: u64,
    /// The valid requests sent for the first time, for replays and conflicts.
    fresh: Vec<Request>,
    /// Every hold request sent (approved or not), with its user's number.
    holds: Vec<(RequestId, usize)>,
}

fn items(case: u64, steps: &[Step]) -> Vec<Item> {
    let mut builder = Builder { case, fresh: Vec::new(), holds: Vec::new() };
    let mut out = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let id = format!("p{case}-r{n}");
        let item = match *step {
            Step::AdvanceClock { minutes } => Item::AdvanceClock(minutes * MINUTE_S),
            Step::Sweep { user } => Item::Sweep(builder.user_id(user)),
            Step::Replay { .. } | Step::Conflict { .. } if builder.fresh.is_empty() => continue,
            Step::Replay { of, reformat } => {
                let original = of.get(&builder.fresh).clone();
                let body = if reformat { reformatted(&original) } else { original.to_json() };
                Item::Message(Message { body, request: Some(original), malformed_id: None })
            }
            Step::Conflict { of, change } => {
                let other = builder.conflicting(of.get(&builder.fresh), change);
                Item::Message(Message { body: other.to_json(), request: Some(other), malformed_id: None })
            }
            Step::Malformed { kind, user } => {
                let body = malformed(kind, &id, &builder.user_id(user));
                Item::Message(Message { body: body.into_bytes(), request: None, malformed_id: Some(id) })
            }
            _ => Item::Message(builder.fresh_message(id, step)),
        };
        out.push(item);
    }
    out
}

impl Builder {
    fn user_id(&self, n: usize) -> String {
        format!("p{}-u{n}", self.case)
    }

    /// A request sent for the first time: a deposit, withdrawal, hold, capture or release.
    fn fresh_message(&mut self, id: String, step: &Step) -> Message {
        let request = |id: &str, user: String, command| crate::support::model::command(id, &user, command);
        let (request, body) = match *step {
            Step::Deposit { user, cents } => {
                let r = request(&id, self.user_id(user), Command::Deposit { amount: money(cents) });
                (r.clone(), r.to_json())
            }
            Step::Withdraw { user, cents } => {
                let r = request(&id, self.user_id(user), Command::Withdraw { amount: money(cents) });
                (r.clone(), r.to_json())
            }
            Step::Hold { user, cents, timeout } => {
                let timeout_s = timeout.unwrap_or(HOLD_TIMEOUT_DEFAULT_S);
                let r = request(&id, self.user_id(user), Command::Hold { amount: money(cents), timeout_s });
                let body = match timeout {
                    Some(_) => r.to_json(),
                    None => format!(
                        r#"{{"request_id":"{id}","user_id":"{}","op":"hold","amount":"{}"}}"#,
                        r.user_id,
                        money(cents)
                    )
                    .into_bytes(),
                };
                self.holds.push((r.request_id.clone(), user));
                (r, body)
            }
            Step::Capture { of, target, take } => {
                let (hold_id, user, hold_cents) = self.named_hold(of, target);
                let amount = match take {
                    Take::Whole => None,
                    Take::Exact => Some(hold_cents),
                    Take::Part(percent) => Some((hold_cents * i64::from(percent) / 100).max(1)),
                    Take::Over => Some((hold_cents + 1).min(AMOUNT_MAX_CENTS)),
                };
                let r = request(&id, self.user_id(user), Command::Capture { hold_id, amount: amount.map(money) });
                (r.clone(), r.to_json())
            }
            Step::Release { of, target } => {
                let (hold_id, user, _) = self.named_hold(of, target);
                let r = request(&id, self.user_id(user), Command::Release { hold_id });
                (r.clone(), r.to_json())
            }
            _ => unreachable!("not a fresh request: {step:?}"),
        };
        self.fresh.push(request.clone());
        Message { body, request: Some(request), malformed_id: None }
    }

    /// The hold a capture or release names, the user who sends it and the hold's amount in
    /// cents (a unknown hold's is made up).
    fn named_hold(&self, of: Index, target: HoldRef) -> (RequestId, usize, i64) {
        let unknown = (RequestId::parse(&format!("p{}-nohold", self.case)).expect("id"), of.index(USERS), 500);
        if self.holds.is_empty() || matches!(target, HoldRef::Unknown) {
            return unknown;
        }
        let (hold_id, owner) = of.get(&self.holds).clone();
        let cents =
            self.fresh.iter().find(|r| r.request_id == hold_id).and_then(|r| r.amount()).map_or(500, Money::cents);
        let user = if matches!(target, HoldRef::OtherUser) { (owner + 1) % USERS } else { owner };
        (hold_id, user, cents)
    }

    /// `original`'s id with another body.
    fn conflicting(&self, original: &Request, change: Change) -> Request {
        let mut other = original.clone();
        let changed = |cents: i64| money(if cents == 1 { 2 } else { cents - 1 });
        other.command = match (change, &original.command) {
            (Change::User, _) => {
                let same = original.user_id.as_str() == self.user_id(0);
                other.user_id = UserId::parse(&self.user_id(if same { 1 } else { 0 })).expect("user id");
                original.command.clone()
            }
            (Change::Op, Command::Deposit { amount }) => Command::Withdraw { amount: *amount },
            (Change::Op, Command::Withdraw { amount } | Command::Hold { amount, .. }) => {
                Command::Deposit { amount: *amount }
            }
            (Change::Op, Command::Capture { hold_id, .. }) => Command::Release { hold_id: hold_id.clone() },
            (Change::Op, Command::Release { hold_id }) => Command::Capture { hold_id: hold_id.clone(), amount: None },
            (Change::Timeout, Command::Hold { amount, timeout_s }) => {
                let timeout_s =
                    if *timeout_s < HOLD_TIMEOUT_MAX_S { timeout_s + MINUTE_S } else { timeout_s - MINUTE_S };
                Command::Hold { amount: *amount, timeout_s }
            }
            (_, Command::Deposit { amount }) => Command::Deposit { amount: changed(amount.cents()) },
            (_, Command::Withdraw { amount }) => Command::Withdraw { amount: changed(amount.cents()) },
            (_, Command::Hold { amount, timeout_s }) => {
                Command::Hold { amount: changed(amount.cents()), timeout_s: *timeout_s }
            }
            (_, Command::Capture { hold_id, amount }) => {
                let amount = Some(amount.map_or(money(1), |a| changed(a.cents())));
                Command::Capture { hold_id: hold_id.clone(), amount }
            }
            (_, Command::Release { hold_id }) => {
                Command::Release { hold_id: RequestId::parse(&format!("{hold_id}x")).expect("id") }
            }
        };
        other
    }
}

/// The same body as `request`'s, written otherwise: fields in another order, amounts as JSON
/// numbers with a trailing zero, a hold's default `timeout_s` left out.
fn reformatted(request: &Request) -> Vec<u8> {
    let number = |amount: Money| format!("{}.{:02}0", amount.cents() / 100, amount.cents() % 100);
    let mut fields = Vec::new();
    match &request.command {
        Command::Withdraw { amount } | Command::Deposit { amount } => {
            fields.push(format!(r#""amount":{}"#, number(*amount)))
        }
        Command::Hold { amount, timeout_s } => {
            fields.push(format!(r#""amount":{}"#, number(*amount)));
            if *timeout_s != HOLD_TIMEOUT_DEFAULT_S {
                fields.push(format!(r#""timeout_s":{timeout_s}"#));
            }
        }
        Command::Capture { hold_id, amount } => {
            fields.extend(amount.map(|a| format!(r#""amount":{}"#, number(a))));
            fields.push(format!(r#""hold_id":"{hold_id}""#));
        }
        Command::Release { hold_id } => fields.push(format!(r#""hold_id":"{hold_id}""#)),
    }
    fields.push(format!(r#""op":"{}""#, request.op().as_str()));
    fields.push(format!(r#""user_id":"{}""#, request.user_id));
    fields.push(format!(r#""request_id":"{}""#, request.request_id));
    format!("{{{}}}", fields.join(",")).into_bytes()
}

/// A body `decode_request` must refuse.
fn malformed(kind: Malformed, id: &str, user: &str) -> String {
    let with = |op: &str, rest: &str| format!(r#"{{"request_id":"{id}","user_id":"{user}","op":"{op}"{rest}}}"#);
    let with_amount = |amount: &str| with("withdraw", &format!(r#","amount":{amount}"#));
    match kind {
        Malformed::ZeroAmount => with_amount("\"0.00\""),
        Malformed::ThreeDecimals => with_amount("\"1.005\""),
        Malformed::NegativeAmount => with_amount("\"-5\""),
        Malformed::OverMaximum => with_amount("\"1000000000.01\""),
        Malformed::FloatNotation => with_amount("1e2"),
        Malformed::BadOp => with("steal", r#","amount":"1""#),
        Malformed::MissingAmount => with("deposit", ""),
        Malformed::UnknownField => with_amount("\"1\",\"admin\":true"),
        Malformed::DuplicateField => with_amount("\"1\",\"amount\":\"2\""),
        Malformed::BadUserId => {
            format!(r#"{{"request_id":"{id}","user_id":"{user} x","op":"deposit","amount":"1"}}"#)
        }
        Malformed::NotJson => format!("deposit {id} 1"),
        Malformed::ZeroTimeout => with("hold", r#","amount":"1","timeout_s":0"#),
        Malformed::TimeoutPastMaximum => {
            with("hold", &format!(r#","amount":"1","timeout_s":{}"#, HOLD_TIMEOUT_MAX_S + 1))
        }
        Malformed::CaptureWithoutHold => with("capture", r#","amount":"1""#),
        Malformed::ReleaseWithAmount => with("release", &format!(r#","hold_id":"{id}","amount":"1""#)),
        Malformed::WithdrawWithHold => with("withdraw", &format!(r#","hold_id":"{id}","amount":"1""#)),
        Malformed::ExpireOp => with("expire", &format!(r#","hold_id":"{id}","amount":"1""#)),
    }
}

fn money(cents: i64) -> Money {
    Money::from_cents(cents).expect("amount")
}

/// A hold as the model sees it.
#[derive(Debug, Clone)]
struct ModelHold {
    user: String,
    cents: i64,
    state: HoldState,
    /// What a capture took.
    captured: Option<i64>,
    /// Its `expires_at` as stored: moved back with the clock while it is active.
    expires_at: DateTime<Utc>,
    /// Seconds of model time left until it is due (due at 0 or below).
    left_s: i64,
    /// The capture or release that closed it.
    closed_by: Option<String>,
    /// The time of the batch that closed it, when the test saw it (a batch of replays only,
    /// or a sweep, returns no time).
    closed_at: Option<DateTime<Utc>>,
    /// Its expiry result (with the time of the batch that expired it, or `closed_at` unknown).
    expiry: Option<RequestResult>,
}

/// The rules written again, in integer cents, with the results the ledger returned first.
#[derive(Default)]
struct Model {
    /// Balance and held, per user with a wallet.
    wallets: HashMap<String, (i64, i64)>,
    /// The approved holds, by id.
    holds: HashMap<String, ModelHold>,
    stored: HashMap<String, (Request, RequestResult)>,
    /// Users' own limits. A case lasts seconds of real time and its clock moves only the
    /// holds, so all of a case's usage is inside the 24-hour window.
    limits: HashMap<String, CaseLimits>,
    /// (cents, count) counted against the daily limits, per user.
    usage: HashMap<String, (i64, i64)>,
}

/// The limits the first user of every case has of its own, in cents (and a count).
#[derive(Debug, Clone, Copy)]
struct CaseLimits {
    per_withdrawal: i64,
    daily_amount: i64,
    daily_count: i64,
}

const CASE_LIMITS: CaseLimits = CaseLimits { per_withdrawal: 15_000, daily_amount: 40_000, daily_count: 6 };

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

/// The result of `request` with these figures (coupon, expiry and detail left empty).
fn outcome(
    request: &Request,
    status: Status,
    reason: Option<Reason>,
    wallet: Option<(i64, i64)>,
    now: DateTime<Utc>,
) -> RequestResult {
    RequestResult {
        request_id: Some(request.request_id.clone()),
        user_id: Some(request.user_id.clone()),
        op: Some(request.op()),
        amount: request.amount(),
        status,
        reason,
        detail: None,
        balance: wallet.map(|(balance, _)| money(balance)),
        held: wallet.map(|(_, held)| money(held)),
        available: wallet.map(|(balance, held)| money(balance - held)),
        hold_id: request.command.hold_id().cloned(),
        expires_at: None,
        coupon: None,
        replayed: false,
        processed_at: now,
    }
}

impl Model {
    /// Which limit refuses a withdrawal or hold of `cents` by `user`, by the name its
    /// `detail` starts with (largest first, then count, then amount, as documented).
    fn refusing_limit(&self, user: &str, cents: i64) -> Option<&'static str> {
        let limits = self.limits.get(user)?;
        let (used, count) = self.usage.get(user).copied().unwrap_or((0, 0));
        if cents > limits.per_withdrawal {
            Some("per_withdrawal")
        } else if count + 1 > limits.daily_count {
            Some("daily_count")
        } else if used + cents > limits.daily_amount {
            Some("daily_amount")
        } else {
            None
        }
    }

    /// Counts (negative: gives back) usage of the daily limits.
    fn use_limits(&mut self, user: &str, cents: i64, count: i64) {
        let usage = self.usage.entry(user.to_owned()).or_default();
        usage.0 += cents;
        usage.1 += count;
    }

    /// Moves the model's clock `seconds` forward, as the test moved the stored `expires_at`
    /// of every active hold back.
    fn advance(&mut self, seconds: u32) {
        for hold in self.holds.values_mut().filter(|h| h.state == HoldState::Active) {
            hold.expires_at -= chrono::Duration::seconds(i64::from(seconds));
            hold.left_s -= i64::from(seconds);
        }
    }

    /// Expires the due holds of `users` (a batch's first step), soonest `expires_at` first,
    /// at `now` when the test knows the batch's time.
    fn expire_due(&mut self, users: &[String], now: Option<DateTime<Utc>>) {
        let mut due: Vec<(DateTime<Utc>, String)> = self
            .holds
            .iter()
            .filter(|(_, h)| h.state == HoldState::Active && h.left_s <= 0 && users.contains(&h.user))
            .map(|(id, h)| (h.expires_at, id.clone()))
            .collect();
        due.sort();
        for (_, id) in due {
            let hold = self.holds.get_mut(&id).expect("a due hold");
            let wallet = self.wallets.get_mut(&hold.user).expect("a hold's wallet");
            wallet.1 -= hold.cents;
            let usage = self.usage.entry(hold.user.clone()).or_default();
            (usage.0, usage.1) = (usage.0 - hold.cents, usage.1 - 1);
            let (balance, held) = *wallet;
            hold.state = HoldState::Expired;
            hold.closed_at = now;
            hold.expiry = Some(RequestResult {
                request_id: None,
                user_id: Some(UserId::parse(&hold.user).expect("user id")),
                op: Some(Op::Expire),
                amount: Some(money(hold.cents)),
                status: Status::Approved,
                reason: None,
                detail: None,
                balance: Some(money(balance)),
                held: Some(money(held)),
                available: Some(money(balance - held)),
                hold_id: Some(RequestId::parse(&id).expect("hold id")),
                expires_at: Some(hold.expires_at),
                coupon: None,
                replayed: false,
                processed_at: now.unwrap_or_default(),
            });
        }
    }

    /// Checks the ledger's result for `request`, applied at `now`, against the model, then
    /// updates the model.
    fn check(&mut self, request: &Request, result: &RequestResult, now: DateTime<Utc>) -> Result<(), TestCaseError> {
        let id = request.request_id.as_str().to_owned();
        let wallet = self.wallets.get(request.user_id.as_str()).copied();
        if let Some((original, stored)) = self.stored.get(&id) {
            let expected = if original.same_body(request) {
                RequestResult { replayed: true, ..stored.clone() }
            } else {
                prop_assert!(result.detail.is_some(), "a conflict says why: {:?}", result);
                RequestResult {
                    detail: result.detail.clone(),
                    ..outcome(request, Status::Rejected, Some(Reason::Conflict), wallet, now)
                }
            };
            prop_assert_eq!(result, &expected, "replay or conflict on {}", id);
            return Ok(());
        }
        let mut expected = self.apply(request, now);
        if let (Some(Reason::LimitExceeded), Some(limit)) = (expected.reason, expected.detail.take()) {
            let detail = result.detail.clone().unwrap_or_default();
            prop_assert!(detail.starts_with(&limit), "{} refused by {}: {:?}", id, limit, result);
            LIMIT_REFUSALS.fetch_add(1, Ordering::Relaxed);
            expected.detail = result.detail.clone();
        }
        let kinds = (result.coupon.as_ref().map(|c| c.kind), expected.coupon.as_ref().map(|c| c.kind));
        prop_assert_eq!(kinds.0, kinds.1, "coupon of {}", id);
        expected.coupon.clone_from(&result.coupon);
        prop_assert_eq!(result, &expected, "result of {}", id);
        self.stored.insert(id, (request.clone(), result.clone()));
        Ok(())
    }

    /// The result the rules give a new request at `now`; the model is updated.
    fn apply(&mut self, request: &Request, now: DateTime<Utc>) -> RequestResult {
        let user = request.user_id.as_str().to_owned();
        let wallet = self.wallets.get(&user).copied();
        let cents = request.amount().map_or(0, Money::cents);
        let rejected = |reason, wallet| outcome(request, Status::Rejected, Some(reason), wallet, now);
        match (&request.command, wallet) {
            (Command::Deposit { .. }, _) => {
                let (balance, held) = wallet.unwrap_or((0, 0));
                self.wallets.insert(user, (balance + cents, held));
                let mut result = outcome(request, Status::Approved, None, Some((balance + cents, held)), now);
                result.coupon = coupon_for(cents).map(|kind| walletq::domain::Coupon { code: String::new(), kind });
                result
            }
            (Command::Withdraw { .. } | Command::Hold { .. }, None) => rejected(Reason::NoWallet, None),
            (Command::Withdraw { .. } | Command::Hold { .. }, Some(_))
                if self.refusing_limit(&user, cents).is_some() =>
            {
                // The detail is checked by its start, the refusing limit's name (kept here).
                let limit = self.refusing_limit(&user, cents).map(str::to_owned);
                RequestResult { detail: limit, ..rejected(Reason::LimitExceeded, wallet) }
            }
            (Command::Withdraw { .. } | Command::Hold { .. }, Some((balance, held))) if balance - held < cents => {
                rejected(Reason::InsufficientFunds, wallet)
            }
            (Command::Withdraw { .. }, Some((balance, held))) => {
                self.use_limits(&user, cents, 1);
                self.wallets.insert(user, (balance - cents, held));
                outcome(request, Status::Approved, None, Some((balance - cents, held)), now)
            }
            (Command::Hold { timeout_s, .. }, Some((balance, held))) => {
                self.use_limits(&user, cents, 1);
                self.wallets.insert(user.clone(), (balance, held + cents));
                let expires_at = now + chrono::Duration::seconds(i64::from(*timeout_s));
                let hold = ModelHold {
                    user,
                    cents,
                    state: HoldState::Active,
                    captured: None,
                    expires_at,
                    left_s: i64::from(*timeout_s),
                    closed_by: None,
                    closed_at: None,
                    expiry: None,
                };
                self.holds.insert(request.request_id.as_str().to_owned(), hold);
                let mut result = outcome(request, Status::Approved, None, Some((balance, held + cents)), now);
                result.hold_id = Some(request.request_id.clone());
                result.expires_at = Some(expires_at);
                result
            }
            (Command::Capture { hold_id, .. } | Command::Release { hold_id }, _) => {
                self.close(request, hold_id.as_str(), wallet, now)
            }
        }
    }

    /// A capture or release of `hold_id`.
    fn close(
        &mut self,
        request: &Request,
        hold_id: &str,
        wallet: Option<(i64, i64)>,
        now: DateTime<Utc>,
    ) -> RequestResult {
        let rejected = |reason, expires_at| RequestResult {
            expires_at,
            ..outcome(request, Status::Rejected, Some(reason), wallet, now)
        };
        let hold = self.holds.get_mut(hold_id).filter(|h| h.user == request.user_id.as_str());
        let (Some(hold), Some((balance, held))) = (hold, wallet) else { return rejected(Reason::UnknownHold, None) };
        let expires_at = Some(hold.expires_at);
        match hold.state {
            HoldState::Active => {}
            HoldState::Captured | HoldState::Released => return rejected(Reason::HoldClosed, expires_at),
            HoldState::Expired => return rejected(Reason::HoldExpired, expires_at),
        }
        let capture = request.op() == Op::Capture;
        let taken = if capture { request.amount().map_or(hold.cents, Money::cents) } else { 0 };
        if taken > hold.cents {
            return rejected(Reason::AmountExceedsHold, expires_at);
        }
        hold.state = if capture { HoldState::Captured } else { HoldState::Released };
        hold.captured = capture.then_some(taken);
        hold.closed_by = Some(request.request_id.as_str().to_owned());
        hold.closed_at = Some(now);
        let after = (balance - taken, held - hold.cents);
        let amount = money(if capture { taken } else { hold.cents });
        let freed = (hold.cents - taken, if capture { 0 } else { 1 });
        self.wallets.insert(request.user_id.as_str().to_owned(), after);
        self.use_limits(request.user_id.as_str(), -freed.0, -freed.1);
        RequestResult { amount: Some(amount), expires_at, ..outcome(request, Status::Approved, None, Some(after), now) }
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
/// Requests the model expected a limit to refuse, over every case: the run must meet some.
static LIMIT_REFUSALS: AtomicU64 = AtomicU64::new(0);

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
    async fn apply(&self, requests: &[Request], users: &[String]) -> Result<Vec<RequestResult>, LedgerError> {
        let fence = self.fences.fetch_add(1, Ordering::Relaxed);
        let fences: Vec<(UserId, i64)> = users.iter().map(|u| (UserId::parse(u).expect("user id"), fence)).collect();
        let results = match self.committer {
            // The sweeper's request-less batches go straight to the ledger, as in the worker.
            Some(committer) if !requests.is_empty() => committer.apply_batch(requests, &fences).await,
            _ => self.ledger.apply_batch(requests, &fences).await,
        };
        // Every result that is not a replay carries its transaction's time.
        if let Some(fresh) = results.as_ref().ok().and_then(|r| r.iter().find(|r| !r.replayed)) {
            let mut transactions = self.transactions.lock().expect("not poisoned");
            *transactions.entry(fresh.processed_at).or_default() += 1;
        }
        results
    }

    /// Moves the database's clock `seconds` forward for the active holds of `users`.
    async fn advance_clock(&self, users: &[String], seconds: u32) -> Result<(), TestCaseError> {
        sqlx::query(
            "UPDATE holds SET expires_at = expires_at - $2::integer * interval '1 second'
             WHERE user_id = ANY($1) AND state = 'active'",
        )
        .bind(users)
        .bind(i32::try_from(seconds).expect("seconds"))
        .execute(self.ledger.pool())
        .await
        .map_err(|e| TestCaseError::fail(format!("moving the clock: {e}")))?;
        Ok(())
    }
}

/// A failure of the case, from any error.
fn fail(error: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{error:#}"))
}

async fn run_case(target: &Target<'_>, steps: &[Step], cuts: &[usize]) -> Result<(), TestCaseError> {
    // A shrunk case runs again: new ids every time.
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    let items = items(case, steps);
    let users: Vec<String> = (0..USERS).map(|n| format!("p{case}-u{n}")).collect();
    let mut model = Model::default();
    // The first user has limits of its own; the others have none (the ledger has no defaults).
    let change = walletq::ledger::limits::LimitChange {
        per_withdrawal: Some(money(CASE_LIMITS.per_withdrawal)),
        daily_amount: Some(money(CASE_LIMITS.daily_amount)),
        daily_count: u32::try_from(CASE_LIMITS.daily_count).ok(),
    };
    let first = UserId::parse(&users[0]).ok_or_else(|| fail("user id"))?;
    target.ledger.set_limits(&first, change, Some("property test")).await.map_err(fail)?;
    model.limits.insert(users[0].clone(), CASE_LIMITS);
    let mut rest: &[Item] = &items;
    let mut cut = cuts.iter().cycle();
    while let Some(first) = rest.first() {
        match first {
            Item::AdvanceClock(seconds) => {
                target.advance_clock(&users, *seconds).await?;
                model.advance(*seconds);
                rest = &rest[1..];
                continue;
            }
            Item::Sweep(user) => {
                let results = target.apply(&[], std::slice::from_ref(user)).await.map_err(fail)?;
                prop_assert!(results.is_empty());
                model.expire_due(std::slice::from_ref(user), None);
                rest = &rest[1..];
            }
            Item::Message(_) => {
                let size = (*cut.next().unwrap_or(&1)).min(rest.len());
                let messages = rest[..size].iter().take_while(|i| matches!(i, Item::Message(_))).count();
                let batch: Vec<&Message> = rest[..messages]
                    .iter()
                    .filter_map(|i| if let Item::Message(m) = i { Some(m) } else { None })
                    .collect();
                rest = &rest[messages..];
                if !apply_batch(target, &mut model, &batch).await? {
                    continue;
                }
            }
        }
        // The database agrees with the model after every batch.
        check_wallets(target.ledger, &model, &users).await?;
        check_holds(target.ledger, &model, &users).await?;
    }
    check_stored(target.ledger, &model, &items).await
}

/// Decodes a batch as the worker does, applies its valid requests and checks every result
/// against the model. False when no message of it was valid (nothing was applied).
async fn apply_batch(target: &Target<'_>, model: &mut Model, batch: &[&Message]) -> Result<bool, TestCaseError> {
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
        return Ok(false);
    }
    let mut batch_users: Vec<String> = valid.iter().map(|r| r.user_id.as_str().to_owned()).collect();
    batch_users.sort();
    batch_users.dedup();
    let results = target.apply(&valid, &batch_users).await.map_err(fail)?;
    prop_assert_eq!(results.len(), valid.len());

    // The batch's time: that of every result that is not a replay.
    let times: Vec<DateTime<Utc>> = results.iter().filter(|r| !r.replayed).map(|r| r.processed_at).collect();
    prop_assert!(times.windows(2).all(|w| w[0] == w[1]), "one time per batch: {:?}", times);
    let now = times.first().copied();
    model.expire_due(&batch_users, now);
    for (request, result) in valid.iter().zip(&results) {
        // A replay's time is its original one, which the model has stored.
        model.check(request, result, now.unwrap_or(result.processed_at))?;
    }
    Ok(true)
}

/// Every wallet of the case (balance, held, available, coupons) is the model's: two
/// queries for all the case's users, to keep a case as fast as it was before holds.
async fn check_wallets(ledger: &Ledger, model: &Model, users: &[String]) -> Result<(), TestCaseError> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, (balance * 100)::bigint, (held * 100)::bigint, ((balance - held) * 100)::bigint
         FROM wallets WHERE user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(ledger.pool())
    .await
    .map_err(fail)?;
    let mut figures: HashMap<String, (i64, i64, i64)> =
        rows.into_iter().map(|(user, balance, held, available)| (user, (balance, held, available))).collect();
    let coupons: Vec<(String, String)> = sqlx::query_as("SELECT user_id, kind FROM coupons WHERE user_id = ANY($1)")
        .bind(users)
        .fetch_all(ledger.pool())
        .await
        .map_err(fail)?;
    for user in users {
        let expected = model.wallets.get(user).map(|&(balance, held)| (balance, held, balance - held));
        prop_assert_eq!(figures.remove(user), expected, "balance, held and available of {}", user);
        let mut kinds: Vec<&str> = coupons.iter().filter(|(u, _)| u == user).map(|(_, kind)| kind.as_str()).collect();
        kinds.sort_unstable();
        let expected: Vec<&str> = model.coupons_of(user).iter().map(|k| k.as_str()).collect();
        prop_assert_eq!(kinds, expected, "coupons of {}", user);
    }
    Ok(())
}

/// Every stored hold of the case is the model's: state, amount, capture, `expires_at`, who
/// closed it and when, and its expiry result.
async fn check_holds(ledger: &Ledger, model: &Model, users: &[String]) -> Result<(), TestCaseError> {
    type Row = (
        String,
        String,
        String,
        i64,
        Option<i64>,
        DateTime<Utc>,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<String>,
    );
    // By index only (the tests' databases run with sequential scans off): the model's
    // holds by id, and any active hold of the case's users (one the model does not know
    // would be among them, or would have a stored request the final count finds).
    let ids: Vec<&str> = model.holds.keys().map(String::as_str).collect();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT hold_id, user_id, state, (amount * 100)::bigint, (captured * 100)::bigint, expires_at, closed_by,
                closed_at, expiry_result::text
         FROM holds WHERE hold_id = ANY($2)
         UNION
         SELECT hold_id, user_id, state, (amount * 100)::bigint, (captured * 100)::bigint, expires_at, closed_by,
                closed_at, expiry_result::text
         FROM holds WHERE user_id = ANY($1) AND state = 'active'",
    )
    .bind(users)
    .bind(&ids)
    .fetch_all(ledger.pool())
    .await
    .map_err(fail)?;
    prop_assert_eq!(rows.len(), model.holds.len(), "holds stored");
    for (id, user, state, cents, captured, expires_at, closed_by, closed_at, expiry) in rows {
        let Some(hold) = model.holds.get(&id) else { return Err(fail(format!("hold {id} is not the model's"))) };
        prop_assert_eq!(
            (user.as_str(), state.as_str(), cents, captured, expires_at, closed_by.as_deref()),
            (
                hold.user.as_str(),
                hold.state.as_str(),
                hold.cents,
                hold.captured,
                hold.expires_at,
                hold.closed_by.as_deref()
            ),
            "hold {}",
            id
        );
        prop_assert_eq!(closed_at.is_some(), hold.state != HoldState::Active, "closed_at of {}", id);
        if hold.closed_at.is_some() {
            prop_assert_eq!(closed_at, hold.closed_at, "closed_at of {}", id);
        }
        let expiry: Option<RequestResult> = expiry.map(|e| serde_json::from_str(&e)).transpose().map_err(fail)?;
        // The expiry's time is its batch's: `closed_at`.
        let expected = hold.expiry.clone().map(|e| RequestResult { processed_at: closed_at.unwrap_or_default(), ..e });
        prop_assert_eq!(expiry, expected, "expiry result of {}", id);
    }
    Ok(())
}

/// At the end of a case: every first result is stored as sent, malformed messages left
/// nothing behind, nothing else of the case is stored, and the audit is clean.
async fn check_stored(ledger: &Ledger, model: &Model, items: &[Item]) -> Result<(), TestCaseError> {
    for (id, (_, result)) in &model.stored {
        let stored = ledger.stored_result(&RequestId::parse(id).expect("request id")).await.map_err(fail)?;
        prop_assert_eq!(stored.as_ref(), Some(result), "stored result of {}", id);
    }
    let malformed =
        items.iter().filter_map(|i| if let Item::Message(m) = i { m.malformed_id.as_deref() } else { None });
    for id in malformed {
        let stored = ledger.stored_result(&RequestId::parse(id).expect("request id")).await;
        prop_assert!(matches!(stored, Ok(None)), "malformed {} was stored", id);
    }
    // Every id the case sent (by index: the ledger's connections run with sequential scans
    // off, and a scan for a prefix would cost a JIT compilation per case).
    let sent: Vec<&str> = items
        .iter()
        .filter_map(|i| if let Item::Message(m) = i { Some(m) } else { None })
        .filter_map(|m| m.request.as_ref().map(|r| r.request_id.as_str()).or(m.malformed_id.as_deref()))
        .collect();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE request_id = ANY($1)")
        .bind(&sent)
        .fetch_one(ledger.pool())
        .await
        .map_err(fail)?;
    prop_assert_eq!(count, model.stored.len() as i64);

    let audit = walletq::ledger::audit::audit(ledger.pool()).await.map_err(fail)?;
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
    let refusals = LIMIT_REFUSALS.load(Ordering::Relaxed);
    assert!(refusals > 0, "no case ran into a limit");
    eprintln!("properties: {refusals} requests refused by a limit, as the model predicted");
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
