//! The oracle: the rules written again in integer cents ([`SequentialModel`]), the check of a
//! result against it, and deterministic workloads ([`Lcg`], [`mixed_requests`], [`request`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

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
///
/// Holds expire on the database's clock, which a test does not control: [`Self::apply_at`]
/// takes the time the request was applied (its stored `processed_at`) and first expires the
/// user's holds due by then, as the batch that applied it did (or a sweep before it: the
/// figures are the same). [`Self::apply`] knows no time: its holds never expire.
#[derive(Default)]
pub(crate) struct SequentialModel {
    balances: HashMap<String, i64>,
    /// The sum of the active holds, per user with a wallet.
    held: HashMap<String, i64>,
    /// The approved holds by id.
    holds: HashMap<String, ModelHold>,
    /// Users' own limits, in cents: (per withdrawal, daily amount, daily count).
    limits: HashMap<String, ModelLimits>,
    /// What counts against the daily limits, per user: (cents, count). A test runs well
    /// within 24 hours, so everything since its start is in the window.
    usage: HashMap<String, (i64, i64)>,
}

/// A user's limits as the model sees them: (per withdrawal, daily amount) in cents, and the
/// daily count.
#[derive(Clone, Copy, Default)]
pub(crate) struct ModelLimits {
    pub(crate) per_withdrawal: Option<i64>,
    pub(crate) daily_amount: Option<i64>,
    pub(crate) daily_count: Option<i64>,
}

/// A hold as the sequential model sees it.
struct ModelHold {
    user: String,
    cents: i64,
    /// `None` while active; else how it was closed.
    closed: Option<Closed>,
    /// When it expires, when the model knows the time.
    expires_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// Captured or released.
    ByRequest,
    Expired,
}

/// The model's verdict: (status, reason, balance after in cents).
pub(crate) type Verdict = (Status, Option<&'static str>, Option<i64>);

impl SequentialModel {
    /// Gives `user` its own limits (the test sets the same in the ledger).
    pub(crate) fn set_limits(&mut self, user: &str, limits: ModelLimits) {
        self.limits.insert(user.to_owned(), limits);
    }

    /// True when a limit of `user` refuses a withdrawal or hold of `cents`.
    fn over_limit(&self, user: &str, cents: i64) -> bool {
        let Some(limits) = self.limits.get(user) else { return false };
        let (used, count) = self.usage.get(user).copied().unwrap_or((0, 0));
        limits.per_withdrawal.is_some_and(|max| cents > max)
            || limits.daily_count.is_some_and(|max| count + 1 > max)
            || limits.daily_amount.is_some_and(|max| used + cents > max)
    }

    /// Counts (negative: gives back) usage of the daily limits.
    fn use_limits(&mut self, user: &str, cents: i64, count: i64) {
        let usage = self.usage.entry(user.to_owned()).or_default();
        usage.0 += cents;
        usage.1 += count;
    }

    /// Applies one request, with no clock (holds never expire).
    pub(crate) fn apply(&mut self, request: &Request) -> Verdict {
        self.apply_at(request, None)
    }

    /// Applies one request applied at `at` (when known), after expiring the user's holds due
    /// by then.
    pub(crate) fn apply_at(&mut self, request: &Request, at: Option<DateTime<Utc>>) -> Verdict {
        let user = request.user_id.as_str().to_owned();
        if let Some(at) = at {
            self.expire_due(&user, at);
        }
        let amount = request.amount().map_or(0, Money::cents);
        let available = self.balances.get(&user).map(|b| b - self.held_of(&user));
        match (&request.command, self.balances.get(&user).copied()) {
            (Command::Deposit { .. }, balance) => {
                let after = balance.unwrap_or(0) + amount;
                self.balances.insert(user, after);
                (Status::Approved, None, Some(after))
            }
            (Command::Withdraw { .. } | Command::Hold { .. }, None) => (Status::Rejected, Some("no_wallet"), None),
            (Command::Withdraw { .. } | Command::Hold { .. }, Some(balance)) if self.over_limit(&user, amount) => {
                (Status::Rejected, Some("limit_exceeded"), Some(balance))
            }
            (Command::Withdraw { .. } | Command::Hold { .. }, Some(balance)) if available < Some(amount) => {
                (Status::Rejected, Some("insufficient_funds"), Some(balance))
            }
            (Command::Withdraw { .. }, Some(balance)) => {
                self.use_limits(&user, amount, 1);
                self.balances.insert(user, balance - amount);
                (Status::Approved, None, Some(balance - amount))
            }
            (Command::Hold { timeout_s, .. }, Some(balance)) => {
                self.use_limits(&user, amount, 1);
                *self.held.entry(user.clone()).or_default() += amount;
                let expires_at = at.map(|at| at + chrono::Duration::seconds(i64::from(*timeout_s)));
                let hold = ModelHold { user, cents: amount, closed: None, expires_at };
                self.holds.insert(request.request_id.as_str().to_owned(), hold);
                (Status::Approved, None, Some(balance))
            }
            (Command::Capture { hold_id, .. } | Command::Release { hold_id }, balance) => {
                self.close(request, hold_id.as_str(), balance)
            }
        }
    }

    fn close(&mut self, request: &Request, hold_id: &str, balance: Option<i64>) -> Verdict {
        let user = request.user_id.as_str();
        let (Some(hold), Some(balance)) = (self.holds.get_mut(hold_id).filter(|h| h.user == user), balance) else {
            return (Status::Rejected, Some("unknown_hold"), balance);
        };
        match hold.closed {
            None => {}
            Some(Closed::ByRequest) => return (Status::Rejected, Some("hold_closed"), Some(balance)),
            Some(Closed::Expired) => return (Status::Rejected, Some("hold_expired"), Some(balance)),
        }
        let taken = match request.command {
            Command::Capture { amount, .. } => amount.map_or(hold.cents, Money::cents),
            _ => 0,
        };
        if taken > hold.cents {
            return (Status::Rejected, Some("amount_exceeds_hold"), Some(balance));
        }
        hold.closed = Some(Closed::ByRequest);
        // A release gives the whole hold back, amount and count; a capture the rest of it.
        let release = matches!(request.command, Command::Release { .. });
        let freed = hold.cents - taken;
        *self.held.entry(user.to_owned()).or_default() -= hold.cents;
        self.use_limits(user, -freed, if release { -1 } else { 0 });
        self.balances.insert(user.to_owned(), balance - taken);
        (Status::Approved, None, Some(balance - taken))
    }

    /// Expires the active holds of `user` due at `at`.
    fn expire_due(&mut self, user: &str, at: DateTime<Utc>) {
        let (mut expired, mut count) = (0, 0);
        for hold in self.holds.values_mut().filter(|h| h.user == user && h.closed.is_none()) {
            if hold.expires_at.is_some_and(|e| e <= at) {
                hold.closed = Some(Closed::Expired);
                expired += hold.cents;
                count += 1;
            }
        }
        *self.held.entry(user.to_owned()).or_default() -= expired;
        self.use_limits(user, -expired, -count);
    }

    pub(crate) fn balance(&self, user: &str) -> Option<i64> {
        self.balances.get(user).copied()
    }

    /// The sum of the user's active holds, as the model knows it.
    pub(crate) fn held_of(&self, user: &str) -> i64 {
        self.held.get(user).copied().unwrap_or(0)
    }

    /// When the hold `hold_id` expires, as the model computed it.
    pub(crate) fn expires_at(&self, hold_id: &str) -> Option<DateTime<Utc>> {
        self.holds.get(hold_id).and_then(|h| h.expires_at)
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

/// `items` cut in order into windows of at most `max` in which no user appears twice, each
/// with the index of its first item. A producer that sends a window, awaits its confirms and
/// re-sends from the first unconfirmed one then never has two unconfirmed requests of one
/// user: the contract PROTOCOL.md sets for producers that re-send ("Publishing in order").
pub(crate) fn user_windows<T>(items: &[T], max: usize, user: impl Fn(&T) -> &str) -> Vec<(usize, &[T])> {
    let mut windows = Vec::new();
    let (mut start, mut users) = (0, std::collections::HashSet::new());
    for (index, item) in items.iter().enumerate() {
        if index - start == max || !users.insert(user(item)) {
            windows.push((start, &items[start..index]));
            (start, users) = (index, std::collections::HashSet::from([user(item)]));
        }
    }
    if start < items.len() {
        windows.push((start, &items[start..]));
    }
    windows
}
