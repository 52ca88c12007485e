//! The result wire format sent to a request's reply queue.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::coupon::Coupon;
use super::money::Money;
use super::request::{InvalidRequest, Op, Request, RequestId, UserId};
use super::wallet::{Hold, Wallet};

/// Whether the request changed the wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Applied: the wallet changed as asked.
    Approved,
    /// Not applied: `reason` says why.
    Rejected,
}

impl Status {
    /// The wire name, `approved` or `rejected` (also the stored `status` column).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Approved => "approved",
            Status::Rejected => "rejected",
        }
    }
}

/// Why a request was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A withdrawal larger than the balance.
    InsufficientFunds,
    /// A withdrawal from a user who never deposited.
    NoWallet,
    /// A message that is not a valid request (`detail` says what is wrong); not stored.
    InvalidRequest,
    /// A known `request_id` with another body; nothing changed.
    Conflict,
    /// A capture or release of a hold this user does not have.
    UnknownHold,
    /// A capture or release of a hold already captured or released.
    HoldClosed,
    /// A capture or release of a hold that expired first.
    HoldExpired,
    /// A capture of more than the hold's amount.
    AmountExceedsHold,
    /// A withdrawal or hold over a limit in force (`detail` names it and what is left).
    LimitExceeded,
}

impl Reason {
    /// The wire name, e.g. `insufficient_funds`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InsufficientFunds => "insufficient_funds",
            Reason::NoWallet => "no_wallet",
            Reason::InvalidRequest => "invalid_request",
            Reason::Conflict => "conflict",
            Reason::UnknownHold => "unknown_hold",
            Reason::HoldClosed => "hold_closed",
            Reason::HoldExpired => "hold_expired",
            Reason::AmountExceedsHold => "amount_exceeds_hold",
            Reason::LimitExceeded => "limit_exceeded",
        }
    }
}

/// The result of one request, as published to its reply queue and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestResult {
    /// The request's id, when the message had a readable one.
    pub request_id: Option<RequestId>,
    /// The request's user, when readable.
    pub user_id: Option<UserId>,
    /// The request's operation, when readable.
    pub op: Option<Op>,
    /// The request's amount, when readable.
    pub amount: Option<Money>,
    /// Approved or rejected.
    pub status: Status,
    /// Why it was rejected; `None` when approved.
    pub reason: Option<Reason>,
    /// For an invalid request: what is wrong, at most `DETAIL_MAX_BYTES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Balance after the request, or the current balance of a rejected one.
    pub balance: Option<Money>,
    /// The sum of the wallet's active holds, beside `balance` (`None` when it is `None`).
    #[serde(default)]
    pub held: Option<Money>,
    /// `balance − held`: what a withdrawal or hold may take (`None` when `balance` is).
    #[serde(default)]
    pub available: Option<Money>,
    /// The hold of a hold, capture, release or expire (the hold's own `request_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<RequestId>,
    /// When that hold expires (or expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The coupon this deposit granted, if its amount reached a tier.
    pub coupon: Option<Coupon>,
    /// True when this is a stored result sent again for a repeated request.
    pub replayed: bool,
    /// When the request was applied (the original time for a replay).
    pub processed_at: DateTime<Utc>,
}

impl RequestResult {
    /// An approved request with the wallet after it.
    pub fn approved(request: &Request, wallet: Wallet, coupon: Option<Coupon>, now: DateTime<Utc>) -> Self {
        Self::for_request(request, Status::Approved, None, Some(wallet), coupon, now)
    }

    /// A rejected valid request, with the wallet as it is, when there is one.
    pub fn rejected(request: &Request, reason: Reason, wallet: Option<Wallet>, now: DateTime<Utc>) -> Self {
        let mut result = Self::for_request(request, Status::Rejected, Some(reason), wallet, None, now);
        result.detail = match reason {
            Reason::Conflict => Some("request_id was already used with a different user_id, op or amount".into()),
            _ => None,
        };
        result
    }

    /// The result published when `hold` expired, with the wallet after it.
    pub fn expired(hold: &Hold, wallet: Wallet, now: DateTime<Utc>) -> Self {
        let mut result = RequestResult {
            request_id: None,
            user_id: Some(hold.user_id.clone()),
            op: Some(Op::Expire),
            amount: Some(hold.amount),
            status: Status::Approved,
            reason: None,
            detail: None,
            balance: None,
            held: None,
            available: None,
            hold_id: Some(hold.hold_id.clone()),
            expires_at: Some(hold.expires_at),
            coupon: None,
            replayed: false,
            processed_at: now,
        };
        result.set_wallet(Some(wallet));
        result
    }

    /// Sets the wallet figures: `balance`, `held` and `available` together.
    pub fn set_wallet(&mut self, wallet: Option<Wallet>) {
        self.balance = wallet.map(|w| w.balance);
        self.held = wallet.map(|w| w.held);
        self.available = wallet.map(|w| w.available());
    }

    /// A result stored before holds existed has no `held`: there were no holds then, so
    /// `held` was 0 and `available` the balance.
    pub fn with_hold_figures(mut self) -> Self {
        if self.held.is_none() {
            if let Some(balance) = self.balance {
                self.held = Some(Money::ZERO);
                self.available = Some(balance);
            }
        }
        self
    }

    /// The rejection of a message that is not a valid request.
    pub fn invalid(invalid: &InvalidRequest, now: DateTime<Utc>) -> Self {
        RequestResult {
            request_id: invalid.request_id.clone(),
            user_id: invalid.user_id.clone(),
            op: invalid.op,
            amount: invalid.amount,
            status: Status::Rejected,
            reason: Some(Reason::InvalidRequest),
            detail: Some(invalid.detail.clone()),
            balance: None,
            held: None,
            available: None,
            hold_id: None,
            expires_at: None,
            coupon: None,
            replayed: false,
            processed_at: now,
        }
    }

    fn for_request(
        request: &Request,
        status: Status,
        reason: Option<Reason>,
        wallet: Option<Wallet>,
        coupon: Option<Coupon>,
        now: DateTime<Utc>,
    ) -> Self {
        let mut result = RequestResult {
            request_id: Some(request.request_id.clone()),
            user_id: Some(request.user_id.clone()),
            op: Some(request.op()),
            amount: request.amount(),
            status,
            reason,
            detail: None,
            balance: None,
            held: None,
            available: None,
            hold_id: request.command.hold_id().cloned(),
            expires_at: None,
            coupon,
            replayed: false,
            processed_at: now,
        };
        result.set_wallet(wallet);
        result
    }

    /// The JSON body published to the reply queue.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data (strings, enums, timestamps) into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_the_serde_names() {
        for status in [Status::Approved, Status::Rejected] {
            assert_eq!(serde_json::to_value(status).ok(), Some(serde_json::Value::from(status.as_str())));
        }
        for reason in [
            Reason::InsufficientFunds,
            Reason::NoWallet,
            Reason::InvalidRequest,
            Reason::Conflict,
            Reason::UnknownHold,
            Reason::HoldClosed,
            Reason::HoldExpired,
            Reason::AmountExceedsHold,
            Reason::LimitExceeded,
        ] {
            assert_eq!(serde_json::to_value(reason).ok(), Some(serde_json::Value::from(reason.as_str())));
        }
    }
}
