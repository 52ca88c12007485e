//! Pure types and rules: no I/O, no broker, cache or database.

pub mod assignment;
pub mod coupon;
pub mod forwarding;
pub mod limits;
pub mod money;
pub mod outcome;
pub mod partitioning;
pub mod request;
pub mod rules;
pub mod wallet;

pub use coupon::{Coupon, CouponKind};
pub use forwarding::{Admission, ForwardStamp};
pub use limits::{Limits, Usage};
pub use money::{Money, MoneyError};
pub use outcome::{Reason, RequestResult, Status};
pub use request::{
    Command, HOLD_TIMEOUT_DEFAULT_S, HOLD_TIMEOUT_MAX_S, InvalidRequest, Op, Request, RequestId, UserId,
    decode_request, parse_json_amount,
};
pub use rules::{BatchPlan, HoldWrite, LedgerState, StoredRequest, UsageChange, plan_batch};
pub use wallet::{Hold, HoldState, Wallet};
