//! The result wire format sent to a request's reply queue.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::coupon::Coupon;
use super::money::Money;
use super::request::{InvalidRequest, Op, Request, RequestId, UserId};

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
}

impl Reason {
    /// The wire name, e.g. `insufficient_funds`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InsufficientFunds => "insufficient_funds",
            Reason::NoWallet => "no_wallet",
            Reason::InvalidRequest => "invalid_request",
            Reason::Conflict => "conflict",
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
    /// The coupon this deposit granted, if its amount reached a tier.
    pub coupon: Option<Coupon>,
    /// True when this is a stored result sent again for a repeated request.
    pub replayed: bool,
    /// When the request was applied (the original time for a replay).
    pub processed_at: DateTime<Utc>,
}

impl RequestResult {
    /// An approved request with the wallet's new balance.
    pub fn approved(request: &Request, balance: Money, coupon: Option<Coupon>, now: DateTime<Utc>) -> Self {
        Self::for_request(request, Status::Approved, None, Some(balance), coupon, now)
    }

    /// A rejected valid request, with the wallet's current balance when it has one.
    pub fn rejected(request: &Request, reason: Reason, balance: Option<Money>, now: DateTime<Utc>) -> Self {
        let mut result = Self::for_request(request, Status::Rejected, Some(reason), balance, None, now);
        result.detail = match reason {
            Reason::Conflict => Some("request_id was already used with a different user_id, op or amount".into()),
            _ => None,
        };
        result
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
            coupon: None,
            replayed: false,
            processed_at: now,
        }
    }

    fn for_request(
        request: &Request,
        status: Status,
        reason: Option<Reason>,
        balance: Option<Money>,
        coupon: Option<Coupon>,
        now: DateTime<Utc>,
    ) -> Self {
        RequestResult {
            request_id: Some(request.request_id.clone()),
            user_id: Some(request.user_id.clone()),
            op: Some(request.op),
            amount: Some(request.amount),
            status,
            reason,
            detail: None,
            balance,
            coupon,
            replayed: false,
            processed_at: now,
        }
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
        for reason in [Reason::InsufficientFunds, Reason::NoWallet, Reason::InvalidRequest, Reason::Conflict] {
            assert_eq!(serde_json::to_value(reason).ok(), Some(serde_json::Value::from(reason.as_str())));
        }
    }
}
