//! Pure types and rules: no I/O, no broker, cache or database.

pub mod assignment;
pub mod coupon;
pub mod money;
pub mod outcome;
pub mod partitioning;
pub mod request;
pub mod rules;

pub use coupon::{Coupon, CouponKind};
pub use money::{Money, MoneyError};
pub use outcome::{Reason, RequestResult, Status};
pub use request::{InvalidRequest, Op, Request, RequestId, UserId, decode_request, parse_json_amount};
pub use rules::{BatchPlan, LedgerState, StoredRequest, plan_batch};
