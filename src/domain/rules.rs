//! The wallet rules, applied to a batch in order as a pure function of the
//! current state. The ledger loads the state, calls [`plan_batch`] and writes the plan.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::coupon::{Coupon, CouponKind};
use super::limits::{Limits, Usage};
use super::money::Money;
use super::outcome::{Reason, RequestResult, Status};
use super::request::{Command, Request, RequestId, UserId};
use super::wallet::{Hold, HoldState, Wallet};

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

/// What the batch starts from: the wallets of its users, the known requests of its ids, and
/// the holds it may touch.
#[derive(Debug, Clone, Default)]
pub struct LedgerState {
    /// The wallets that exist, for the batch's users.
    pub wallets: HashMap<UserId, Wallet>,
    /// Requests already processed, for the batch's request ids.
    pub known: HashMap<RequestId, StoredRequest>,
    /// The holds its captures and releases name, and its users' active holds that are due.
    /// An active hold that is not due and not named can be left out: only `held` counts it.
    pub holds: HashMap<RequestId, Hold>,
    /// The limits in force for the batch's users (the defaults where a user has none of its own).
    pub limits: HashMap<UserId, Limits>,
    /// What left the batch's users' wallets in the current 24-hour window.
    pub usage: HashMap<UserId, Usage>,
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
    /// The limits that were in force for an approved withdrawal or hold, when there were
    /// any (stored with it, for the audit).
    pub limits: Option<Limits>,
}

/// A change to a user's limit usage, recorded in the bucket of `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageChange {
    /// Whose usage.
    pub user_id: UserId,
    /// When the usage happened: now for an approval, the hold's placement for a give-back.
    pub at: DateTime<Utc>,
    /// Cents added (negative: given back).
    pub amount_cents: i64,
    /// Withdrawals and holds added (negative: given back).
    pub count: i64,
}

/// One append-only ledger line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Signed change in cents: negative for a withdrawal or a capture.
    pub delta_cents: i64,
    /// The wallet's balance after this entry, for the audit's running check.
    pub balance_after: Money,
}

/// A hold the batch placed or closed, in its final state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldWrite {
    /// The hold after the batch.
    pub hold: Hold,
    /// True when the batch placed it (insert); else it was active before (close it).
    pub placed: bool,
    /// The capture or release that closed it.
    pub closed_by: Option<RequestId>,
    /// The expiry result, when it expired: stored with the hold, then published.
    pub expiry: Option<RequestResult>,
}

/// Everything a batch changes, and the result of every request in input order.
#[derive(Debug, Clone, Default)]
pub struct BatchPlan {
    /// One result per request of the batch, in input order.
    pub results: Vec<RequestResult>,
    /// The requests seen for the first time: to store with their results.
    pub new_requests: Vec<NewRequest>,
    /// Final figures of the wallets created or changed, in first-touch order.
    pub wallets: Vec<(UserId, Wallet)>,
    /// The holds placed or closed, in first-touch order; expiries first.
    pub holds: Vec<HoldWrite>,
    /// The limit usage recorded and given back.
    pub usage: Vec<UsageChange>,
}

impl BatchPlan {
    /// True when the plan writes nothing.
    pub fn is_empty(&self) -> bool {
        self.new_requests.is_empty() && self.holds.is_empty() && self.usage.is_empty()
    }

    /// The expiry results to publish, with the reply_to of their holds.
    pub fn expiries(&self) -> impl Iterator<Item = (&RequestResult, Option<&str>)> {
        self.holds.iter().filter_map(|w| w.expiry.as_ref().map(|result| (result, w.hold.reply_to.as_deref())))
    }
}

/// Applies the rules to `requests` in order, at `now`.
///
/// First every due hold of the state expires (`now` has reached its `expires_at`): whatever
/// is applied at `now` comes after it. Then each request:
/// - a known request_id with the same body is replayed (its stored result, `replayed: true`);
///   with a different body it is rejected `conflict` and nothing is stored;
/// - a deposit creates the wallet when needed, credits it and grants its tier's coupon;
/// - a withdrawal or a hold from no wallet is rejected `no_wallet`; one over a limit in
///   force `limit_exceeded` (see [`super::limits`]); one larger than the available money
///   `insufficient_funds`; otherwise it debits, or reserves, and counts toward the limits;
/// - a capture or release names a hold of the same user (else `unknown_hold`) that is still
///   active (else `hold_closed` or `hold_expired`); a capture takes at most its amount
///   (else `amount_exceeds_hold`) and releases the rest. What a release, an expiry or the
///   rest of a partial capture frees is given back to the limits' usage.
///
/// A deposit that would push a balance past the supported range is rejected
/// `invalid_request` rather than overflowing, and stored like the other rejections.
///
/// Every outcome of a new request is stored, so all copies of a message get the same one.
/// Only a conflict is not stored; its status and reason do not depend on the wallet (the
/// balance it reports does).
pub fn plan_batch(
    requests: &[Request],
    state: LedgerState,
    now: DateTime<Utc>,
    new_coupon_code: impl FnMut() -> String,
) -> BatchPlan {
    let mut planner = Planner {
        state,
        now,
        plan: BatchPlan { results: Vec::with_capacity(requests.len()), ..BatchPlan::default() },
        touched: Vec::new(),
        hold_writes: HashMap::new(),
        new_coupon_code,
    };
    planner.expire_due();
    for request in requests {
        planner.apply(request);
    }
    let Planner { state, mut plan, touched, .. } = planner;
    plan.wallets = touched.into_iter().filter_map(|user| state.wallets.get(&user).map(|w| (user, *w))).collect();
    debug_assert_eq!(plan.results.len(), requests.len());
    plan
}

/// The state of a batch while its requests are applied one by one.
struct Planner<F> {
    state: LedgerState,
    now: DateTime<Utc>,
    plan: BatchPlan,
    /// The wallets created or changed, in first-touch order.
    touched: Vec<UserId>,
    /// Where each hold written so far is in `plan.holds`.
    hold_writes: HashMap<RequestId, usize>,
    new_coupon_code: F,
}

/// What applying one request produced: its result, and its ledger entry when it moved money.
type Applied = (RequestResult, Option<LedgerEntry>);

impl<F: FnMut() -> String> Planner<F> {
    /// Expires every due hold of the batch's users (those whose wallet the state has),
    /// oldest `expires_at` first. A due hold of another user, loaded because a capture or
    /// release names it, is not this batch's to expire: its wallet is neither read nor
    /// locked; the request naming it is refused `unknown_hold` anyway.
    fn expire_due(&mut self) {
        let wallets = &self.state.wallets;
        let mut due: Vec<Hold> = self
            .state
            .holds
            .values()
            .filter(|h| h.is_due(self.now) && wallets.contains_key(&h.user_id))
            .cloned()
            .collect();
        due.sort_by(|a, b| (a.expires_at, &a.hold_id).cmp(&(b.expires_at, &b.hold_id)));
        for mut hold in due {
            let Some(wallet) = self.state.wallets.get(&hold.user_id).copied() else { continue };
            let wallet = Wallet { held: wallet.held.checked_sub(hold.amount).unwrap_or(Money::ZERO), ..wallet };
            self.set_wallet(&hold.user_id, wallet);
            self.use_limits(&hold.user_id, hold.placed_at, -hold.amount.cents(), -1);
            hold.state = HoldState::Expired;
            let result = RequestResult::expired(&hold, wallet, self.now);
            self.state.holds.insert(hold.hold_id.clone(), hold.clone());
            self.write_hold(hold, false, None, Some(result));
        }
    }

    fn apply(&mut self, request: &Request) {
        let wallet = self.state.wallets.get(&request.user_id).copied();
        if let Some(stored) = self.state.known.get(&request.request_id) {
            let result = if stored.request.same_body(request) {
                RequestResult { replayed: true, ..stored.result.clone() }
            } else {
                RequestResult::rejected(request, Reason::Conflict, wallet, self.now)
            };
            self.plan.results.push(result);
            return;
        }
        let (result, entry) = match &request.command {
            Command::Withdraw { amount } => self.withdraw(request, *amount, wallet),
            Command::Deposit { amount } => self.deposit(request, *amount, wallet),
            Command::Hold { amount, timeout_s } => self.hold(request, *amount, *timeout_s, wallet),
            Command::Capture { hold_id, amount } => self.close(request, hold_id, *amount, wallet),
            Command::Release { hold_id } => self.close(request, hold_id, None, wallet),
        };
        let stored = StoredRequest { request: request.clone(), result: result.clone() };
        self.state.known.insert(request.request_id.clone(), stored);
        self.plan.results.push(result.clone());
        let limited = matches!(request.command, Command::Withdraw { .. } | Command::Hold { .. })
            && result.status == Status::Approved;
        let limits = self.limits_of(&request.user_id).filter(|l| limited && !l.is_none());
        self.plan.new_requests.push(NewRequest { request: request.clone(), result, entry, limits });
    }

    fn withdraw(&mut self, request: &Request, amount: Money, wallet: Option<Wallet>) -> Applied {
        let Some(wallet) = wallet else {
            return (RequestResult::rejected(request, Reason::NoWallet, None, self.now), None);
        };
        if let Some(refused) = self.over_limit(request, amount, wallet) {
            return refused;
        }
        if wallet.available() < amount {
            return (RequestResult::rejected(request, Reason::InsufficientFunds, Some(wallet), self.now), None);
        }
        let after = Wallet { balance: wallet.balance.checked_sub(amount).unwrap_or(Money::ZERO), ..wallet };
        self.set_wallet(&request.user_id, after);
        self.use_limits(&request.user_id, self.now, amount.cents(), 1);
        let entry = LedgerEntry { delta_cents: -amount.cents(), balance_after: after.balance };
        (RequestResult::approved(request, after, None, self.now), Some(entry))
    }

    fn deposit(&mut self, request: &Request, amount: Money, wallet: Option<Wallet>) -> Applied {
        let before = wallet.unwrap_or(Wallet::with_balance(Money::ZERO));
        let Some(balance) = before.balance.checked_add(amount) else {
            // Stored like every outcome of a valid request: a copy of it (the router's
            // second forward, a resend) gets this refusal again, even once a withdrawal
            // has made room, so a request_id has one outcome.
            let mut result = RequestResult::rejected(request, Reason::InvalidRequest, wallet, self.now);
            result.detail = Some(DEPOSIT_PAST_MAX_BALANCE.into());
            return (result, None);
        };
        let after = Wallet { balance, ..before };
        self.set_wallet(&request.user_id, after);
        let coupon = CouponKind::for_deposit(amount).map(|kind| Coupon { code: (self.new_coupon_code)(), kind });
        let entry = LedgerEntry { delta_cents: amount.cents(), balance_after: balance };
        (RequestResult::approved(request, after, coupon, self.now), Some(entry))
    }

    fn hold(&mut self, request: &Request, amount: Money, timeout_s: u32, wallet: Option<Wallet>) -> Applied {
        let Some(wallet) = wallet else {
            return (RequestResult::rejected(request, Reason::NoWallet, None, self.now), None);
        };
        if let Some(refused) = self.over_limit(request, amount, wallet) {
            return refused;
        }
        if wallet.available() < amount {
            return (RequestResult::rejected(request, Reason::InsufficientFunds, Some(wallet), self.now), None);
        }
        let after = Wallet { held: wallet.held.checked_add(amount).unwrap_or(wallet.balance), ..wallet };
        self.set_wallet(&request.user_id, after);
        self.use_limits(&request.user_id, self.now, amount.cents(), 1);
        let hold = Hold {
            hold_id: request.request_id.clone(),
            user_id: request.user_id.clone(),
            amount,
            state: HoldState::Active,
            captured: None,
            expires_at: self.now + chrono::Duration::seconds(i64::from(timeout_s)),
            placed_at: self.now,
            reply_to: request.reply_to.clone(),
        };
        let mut result = RequestResult::approved(request, after, None, self.now);
        result.hold_id = Some(hold.hold_id.clone());
        result.expires_at = Some(hold.expires_at);
        self.state.holds.insert(hold.hold_id.clone(), hold.clone());
        self.write_hold(hold, true, None, None);
        (result, None)
    }

    /// A capture (`Some` amount, or the whole hold when the request names none) or a release.
    fn close(
        &mut self,
        request: &Request,
        hold_id: &RequestId,
        amount: Option<Money>,
        wallet: Option<Wallet>,
    ) -> Applied {
        let hold = self.state.holds.get(hold_id).filter(|h| h.user_id == request.user_id).cloned();
        let reject = |reason, expires_at| {
            let mut result = RequestResult::rejected(request, reason, wallet, self.now);
            result.expires_at = expires_at;
            (result, None)
        };
        let (Some(mut hold), Some(wallet)) = (hold, wallet) else { return reject(Reason::UnknownHold, None) };
        match hold.state {
            HoldState::Active => {}
            HoldState::Captured | HoldState::Released => return reject(Reason::HoldClosed, Some(hold.expires_at)),
            HoldState::Expired => return reject(Reason::HoldExpired, Some(hold.expires_at)),
        }
        let capture = matches!(request.command, Command::Capture { .. });
        let taken = if capture { amount.unwrap_or(hold.amount) } else { Money::ZERO };
        if taken > hold.amount {
            return reject(Reason::AmountExceedsHold, Some(hold.expires_at));
        }
        let after = Wallet {
            balance: wallet.balance.checked_sub(taken).unwrap_or(Money::ZERO),
            held: wallet.held.checked_sub(hold.amount).unwrap_or(Money::ZERO),
        };
        self.set_wallet(&request.user_id, after);
        let freed = hold.amount.cents() - taken.cents();
        self.use_limits(&request.user_id, hold.placed_at, -freed, if capture { 0 } else { -1 });
        hold.state = if capture { HoldState::Captured } else { HoldState::Released };
        hold.captured = capture.then_some(taken);
        let mut result = RequestResult::approved(request, after, None, self.now);
        result.amount = Some(if capture { taken } else { hold.amount });
        result.expires_at = Some(hold.expires_at);
        self.state.holds.insert(hold.hold_id.clone(), hold.clone());
        self.write_hold(hold, false, Some(request.request_id.clone()), None);
        let entry = capture.then(|| LedgerEntry { delta_cents: -taken.cents(), balance_after: after.balance });
        (result, entry)
    }

    fn limits_of(&self, user: &UserId) -> Option<Limits> {
        self.state.limits.get(user).copied()
    }

    /// The `limit_exceeded` rejection of a withdrawal or hold of `amount`, if a limit refuses it.
    fn over_limit(&self, request: &Request, amount: Money, wallet: Wallet) -> Option<Applied> {
        let limits = self.limits_of(&request.user_id)?;
        let usage = self.state.usage.get(&request.user_id).copied().unwrap_or_default();
        let detail = super::limits::refusal(&limits, &usage, amount)?;
        let mut result = RequestResult::rejected(request, Reason::LimitExceeded, Some(wallet), self.now);
        result.detail = Some(detail);
        Some((result, None))
    }

    /// Records usage (negative: gives it back) at `at`, when `at` is still in the window.
    fn use_limits(&mut self, user: &UserId, at: DateTime<Utc>, amount_cents: i64, count: i64) {
        if amount_cents == 0 && count == 0 {
            return;
        }
        let usage = self.state.usage.entry(user.clone()).or_default();
        if usage.record(at, amount_cents, count, self.now) {
            self.plan.usage.push(UsageChange { user_id: user.clone(), at, amount_cents, count });
        }
    }

    fn set_wallet(&mut self, user: &UserId, wallet: Wallet) {
        debug_assert!(wallet.held <= wallet.balance, "{user}: held {} above balance {}", wallet.held, wallet.balance);
        if !self.touched.contains(user) {
            self.touched.push(user.clone());
        }
        self.state.wallets.insert(user.clone(), wallet);
    }

    /// Records a hold's final state: a hold placed and closed in one batch is one insert.
    fn write_hold(&mut self, hold: Hold, placed: bool, closed_by: Option<RequestId>, expiry: Option<RequestResult>) {
        if let Some(write) = self.hold_writes.get(&hold.hold_id).and_then(|&i| self.plan.holds.get_mut(i)) {
            write.hold = hold;
            write.closed_by = closed_by;
            debug_assert!(expiry.is_none(), "a hold placed in this batch cannot expire in it");
            return;
        }
        self.hold_writes.insert(hold.hold_id.clone(), self.plan.holds.len());
        self.plan.holds.push(HoldWrite { hold, placed, closed_by, expiry });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::Op;

    fn money(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    fn command(op: Op, amount: &str) -> Command {
        let amount = money(amount);
        match op {
            Op::Deposit => Command::Deposit { amount },
            Op::Hold => Command::Hold { amount, timeout_s: 60 },
            _ => Command::Withdraw { amount },
        }
    }

    fn request(id: &str, user: &str, op: Op, amount: &str) -> Request {
        Request::new(RequestId::parse(id).unwrap(), UserId::parse(user).unwrap(), command(op, amount))
    }

    fn capture(id: &str, user: &str, hold: &str, amount: Option<&str>) -> Request {
        let command = Command::Capture { hold_id: RequestId::parse(hold).unwrap(), amount: amount.map(money) };
        Request::new(RequestId::parse(id).unwrap(), UserId::parse(user).unwrap(), command)
    }

    fn release(id: &str, user: &str, hold: &str) -> Request {
        let command = Command::Release { hold_id: RequestId::parse(hold).unwrap() };
        Request::new(RequestId::parse(id).unwrap(), UserId::parse(user).unwrap(), command)
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn plan_at(requests: &[Request], state: LedgerState, now: DateTime<Utc>) -> BatchPlan {
        let mut n = 0;
        plan_batch(requests, state, now, || {
            n += 1;
            format!("C{n}")
        })
    }

    fn plan(requests: &[Request], state: LedgerState) -> BatchPlan {
        plan_at(requests, state, Utc::now())
    }

    fn with_wallet(name: &str, balance: &str) -> LedgerState {
        let mut state = LedgerState::default();
        state.wallets.insert(user(name), Wallet::with_balance(money(balance)));
        state
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
        assert_eq!(plan.wallets, vec![(user("u"), Wallet::with_balance(Money::ZERO))]);
        let sum: i64 = plan.new_requests.iter().filter_map(|n| n.entry).map(|e| e.delta_cents).sum();
        assert_eq!(sum, 0);
        assert_eq!(plan.results[0].coupon.as_ref().map(|c| c.kind), Some(CouponKind::Spend300Save50));
    }

    #[test]
    fn a_deposit_past_the_supported_range_is_rejected_and_stored_without_an_entry() {
        let state = with_wallet("u", "9999999999999999.99");
        let plan = plan(&[request("d", "u", Op::Deposit, "1")], state);
        assert_eq!(plan.results[0].reason, Some(Reason::InvalidRequest));
        assert_eq!(plan.results[0].balance, Some(money("9999999999999999.99")));
        assert_eq!(plan.new_requests.len(), 1, "stored, like every other outcome of a valid request");
        assert_eq!(plan.new_requests[0].entry, None);
        assert!(plan.wallets.is_empty());
    }

    /// Defect 5 of issue 16: the router's duplicate forward of a deposit refused as past the
    /// largest balance, after a withdrawal made room, was approved (`replayed: false`), and a
    /// producer keeping the first result believed it was not applied.
    #[test]
    fn a_copy_of_a_deposit_refused_past_the_range_gets_the_same_refusal_after_a_withdrawal() {
        let huge = money("9999999999999999.99");
        let state = with_wallet("u", "9999999999999999.99");
        let deposit = request("d", "u", Op::Deposit, "1");
        let plan = plan(&[deposit.clone(), request("w", "u", Op::Withdraw, "5"), deposit], state);
        let (first, copy) = (&plan.results[0], &plan.results[2]);
        assert_eq!(copy.status, Status::Rejected, "{copy:?}");
        assert!(copy.replayed);
        assert_eq!(copy, &RequestResult { replayed: true, ..first.clone() }, "one outcome per request_id");
        let after = Wallet::with_balance(huge.checked_sub(money("5")).unwrap());
        assert_eq!(plan.wallets, vec![(user("u"), after)]);
    }

    #[test]
    fn withdrawal_without_wallet_is_rejected() {
        let plan = plan(&[request("w", "u", Op::Withdraw, "1")], LedgerState::default());
        assert_eq!(plan.results[0].reason, Some(Reason::NoWallet));
        assert_eq!(plan.results[0].balance, None);
        assert_eq!(plan.results[0].held, None);
        assert_eq!(plan.new_requests.len(), 1);
        assert!(plan.wallets.is_empty());
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

        let mut state = with_wallet("u", "5");
        let stored = &first.new_requests[0];
        state.known.insert(
            stored.request.request_id.clone(),
            StoredRequest { request: stored.request.clone(), result: stored.result.clone() },
        );
        let second = plan(&[request("d", "u", Op::Deposit, "6")], state);
        assert_eq!(second.results[0].reason, Some(Reason::Conflict));
        assert_eq!(second.results[0].balance, Money::parse("5").ok());
        assert_eq!(second.results[0].amount, Money::parse("6").ok());
        assert!(second.new_requests.is_empty());
        assert!(second.wallets.is_empty());
    }

    #[test]
    fn the_seed_race_with_holds_reserves_exactly_the_balance_and_captures_spend_it() {
        let mut requests: Vec<Request> = (0..500).map(|i| request(&format!("h{i}"), "u", Op::Hold, "1")).collect();
        requests.extend((0..300).map(|i| capture(&format!("c{i}"), "u", &format!("h{i}"), None)));
        let plan = plan(&requests, with_wallet("u", "300"));
        let approved = plan.results[..500].iter().filter(|r| r.status == Status::Approved).count();
        assert_eq!(approved, 300);
        assert!(plan.results[500..].iter().all(|r| r.status == Status::Approved));
        assert_eq!(plan.wallets, vec![(user("u"), Wallet::with_balance(Money::ZERO))]);
        let entries: Vec<_> = plan.new_requests.iter().filter_map(|n| n.entry).collect();
        assert_eq!(entries.len(), 300, "one ledger entry per capture, none per hold");
        assert!(plan.holds.iter().all(|w| w.placed && w.hold.state == HoldState::Captured));
    }

    #[test]
    fn a_partial_capture_takes_part_and_releases_the_rest() {
        let plan = plan(
            &[request("h", "u", Op::Hold, "40"), capture("c", "u", "h", Some("15")), capture("c2", "u", "h", None)],
            with_wallet("u", "100"),
        );
        let captured = &plan.results[1];
        assert_eq!((captured.status, captured.amount), (Status::Approved, Some(money("15"))));
        assert_eq!(
            (captured.balance, captured.held, captured.available),
            (Some(money("85")), Some(Money::ZERO), Some(money("85")))
        );
        assert_eq!(plan.results[2].reason, Some(Reason::HoldClosed));
        assert_eq!(plan.holds[0].hold.captured, Some(money("15")));
    }

    #[test]
    fn holds_reject_what_they_must() {
        let mut state = with_wallet("u", "100");
        state.wallets.insert(user("v"), Wallet::with_balance(money("100")));
        let plan = plan(
            &[
                request("h", "u", Op::Hold, "60"),
                request("w", "u", Op::Withdraw, "50"),
                capture("c1", "u", "h", Some("60.01")),
                release("r-other", "v", "h"),
                release("r-none", "u", "nope"),
                release("r", "u", "h"),
                capture("c2", "u", "h", None),
                request("h2", "nobody", Op::Hold, "1"),
            ],
            state,
        );
        let reasons: Vec<_> = plan.results.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            vec![
                None,
                Some(Reason::InsufficientFunds),
                Some(Reason::AmountExceedsHold),
                Some(Reason::UnknownHold),
                Some(Reason::UnknownHold),
                None,
                Some(Reason::HoldClosed),
                Some(Reason::NoWallet),
            ]
        );
        assert_eq!(plan.results[1].available, Some(money("40")));
        assert_eq!(plan.results[5].available, Some(money("100")));
    }

    #[test]
    fn a_due_hold_expires_before_the_batch_and_its_capture_is_refused() {
        let placed_at = Utc::now();
        let first = plan_at(&[request("h", "u", Op::Hold, "30")], with_wallet("u", "100"), placed_at);
        let hold = first.holds[0].hold.clone();
        let mut state = LedgerState::default();
        state.wallets.insert(user("u"), first.wallets[0].1);
        state.holds.insert(hold.hold_id.clone(), hold.clone());

        let before = plan_at(
            &[capture("c", "u", "h", None)],
            state.clone(),
            hold.expires_at - chrono::Duration::microseconds(1),
        );
        assert_eq!(before.results[0].status, Status::Approved, "applied first, the capture wins");
        assert!(before.expiries().next().is_none());

        let after = plan_at(&[capture("c", "u", "h", None)], state, hold.expires_at);
        assert_eq!(after.results[0].reason, Some(Reason::HoldExpired), "expired first, the expiry wins");
        let expiries: Vec<_> = after.expiries().collect();
        assert_eq!(expiries.len(), 1);
        assert_eq!(expiries[0].0.op, Some(Op::Expire));
        assert_eq!(expiries[0].0.available, Some(money("100")));
        assert_eq!(after.wallets, vec![(user("u"), Wallet::with_balance(money("100")))]);
    }

    /// Found by the property test (`properties.rs`): a capture naming another user's due
    /// hold, in a batch without that user, tripped a debug assertion (a hold "of a user
    /// without a wallet"): the batch tried to expire a hold whose wallet it had not read.
    #[test]
    fn a_due_hold_of_another_user_named_by_a_capture_is_refused_and_not_expired() {
        let placed_at = Utc::now();
        let first = plan_at(&[request("h", "owner", Op::Hold, "30")], with_wallet("owner", "100"), placed_at);
        let hold = first.holds[0].hold.clone();
        let mut state = with_wallet("thief", "5");
        state.holds.insert(hold.hold_id.clone(), hold.clone());

        let plan = plan_at(&[capture("c", "thief", "h", None)], state, hold.expires_at);
        assert_eq!(plan.results[0].reason, Some(Reason::UnknownHold));
        assert!(plan.holds.is_empty(), "the owner's hold is left to the owner's batches: {:?}", plan.holds);
        assert!(plan.wallets.is_empty());
    }
}
