//! A wallet's figures and its holds (two-phase withdrawals).

use chrono::{DateTime, Utc};

use super::money::Money;
use super::request::{RequestId, UserId};

/// A wallet's money: what is in it, and how much of that its active holds reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wallet {
    /// The money in the wallet.
    pub balance: Money,
    /// The sum of its active holds; never above `balance`.
    pub held: Money,
}

impl Wallet {
    /// A wallet holding `balance` and no holds.
    pub fn with_balance(balance: Money) -> Self {
        Wallet { balance, held: Money::ZERO }
    }

    /// What a withdrawal or a hold may take: `balance − held`, never negative.
    pub fn available(&self) -> Money {
        debug_assert!(self.held <= self.balance, "held {} above balance {}", self.held, self.balance);
        self.balance.checked_sub(self.held).unwrap_or(Money::ZERO)
    }
}

/// Where a hold is in its life. Only an active hold counts in `held`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldState {
    /// Reserving its amount until it is captured, released or expires.
    Active,
    /// Taken out of the wallet (all or part; the rest was released).
    Captured,
    /// Given back whole.
    Released,
    /// Reached its `expires_at` while active: given back whole.
    Expired,
}

impl HoldState {
    /// The stored name, e.g. `active`.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Active => "active",
            HoldState::Captured => "captured",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }

    /// Parses the stored name.
    pub fn parse(text: &str) -> Option<HoldState> {
        [HoldState::Active, HoldState::Captured, HoldState::Released, HoldState::Expired]
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

/// A hold: money reserved by an approved `hold` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The hold's id: the `request_id` of the `hold` request that placed it.
    pub hold_id: RequestId,
    /// The wallet's owner; only this user may capture or release it.
    pub user_id: UserId,
    /// The money reserved.
    pub amount: Money,
    /// Where the hold is in its life.
    pub state: HoldState,
    /// What a capture took (`Some` exactly when `state` is `Captured`).
    pub captured: Option<Money>,
    /// When it expires if still active: the time it was applied plus its `timeout_s`.
    pub expires_at: DateTime<Utc>,
    /// When it was applied: its usage of the limits was counted then, and is given back there.
    pub placed_at: DateTime<Utc>,
    /// Where its expiry result goes (the `reply_to` of the hold request); `None`: the
    /// results queue.
    pub reply_to: Option<String>,
}

impl Hold {
    /// True when the hold is active and `now` has reached its `expires_at`.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.state == HoldState::Active && self.expires_at <= now
    }
}
