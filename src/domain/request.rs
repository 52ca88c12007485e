//! The request wire format: decoding and validation of producer messages.

use std::fmt::{self, Write};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::money::{Money, MoneyError};

/// Largest message body accepted, in bytes.
pub const MESSAGE_MAX_BYTES: usize = 64 * 1024;
/// Longest request or user id, in characters.
pub const ID_MAX_CHARS: usize = 64;
/// Longest rejection reason, in bytes: it is published and logged, whatever the input.
pub const DETAIL_MAX_BYTES: usize = 1024;
/// Problems named in a rejection reason; the rest are only counted.
const LISTED_PROBLEMS_MAX: usize = 8;
/// Characters of input echoed in one problem.
const ECHOED_MAX_CHARS: usize = 40;

fn is_valid_id(text: &str) -> bool {
    (1..=ID_MAX_CHARS).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates 1–64 characters of `[A-Za-z0-9._:-]`.
            pub fn parse(text: &str) -> Option<Self> {
                is_valid_id(text).then(|| Self(text.to_owned()))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(&text).ok_or_else(|| serde::de::Error::custom("invalid id"))
            }
        }
    };
}

id_type!(
    /// Idempotency key of a request: applied at most once, forever.
    RequestId
);
id_type!(
    /// Owner of a wallet; also the partition routing key.
    UserId
);

/// What a request does to a wallet (and, for `expire`, what walletq did to a hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Take money out of the wallet, never below what is available.
    Withdraw,
    /// Put money in, creating the wallet when needed.
    Deposit,
    /// Reserve money: it stays in the wallet but is no longer available.
    Hold,
    /// Take a hold's money (all or part) out of the wallet; the rest is released.
    Capture,
    /// Give a hold's money back to what is available.
    Release,
    /// A hold that reached its `expires_at`: only in results, never accepted from producers.
    Expire,
}

impl Op {
    /// Every operation a producer may send, in wire order.
    pub const REQUESTED: [Op; 5] = [Op::Withdraw, Op::Deposit, Op::Hold, Op::Capture, Op::Release];

    /// The wire name, e.g. `withdraw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Withdraw => "withdraw",
            Op::Deposit => "deposit",
            Op::Hold => "hold",
            Op::Capture => "capture",
            Op::Release => "release",
            Op::Expire => "expire",
        }
    }

    /// Parses the wire name of an operation a producer may send (`expire` is not one).
    pub fn parse(text: &str) -> Option<Op> {
        Op::REQUESTED.into_iter().find(|op| op.as_str() == text)
    }
}

/// Default `timeout_s` of a hold: 15 minutes.
pub const HOLD_TIMEOUT_DEFAULT_S: u32 = 900;
/// Longest `timeout_s` of a hold: 7 days.
pub const HOLD_TIMEOUT_MAX_S: u32 = 604_800;

/// What a request asks, with the fields its `op` takes (and only those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Take `amount` out of the wallet.
    Withdraw {
        /// How much, in exact cents.
        amount: Money,
    },
    /// Put `amount` in.
    Deposit {
        /// How much, in exact cents.
        amount: Money,
    },
    /// Reserve `amount` for `timeout_s` seconds; the hold's id is the request's id.
    Hold {
        /// How much to reserve.
        amount: Money,
        /// Seconds until the hold expires, 1 to [`HOLD_TIMEOUT_MAX_S`].
        timeout_s: u32,
    },
    /// Take `amount` (the whole hold when `None`) of hold `hold_id`; the rest is released.
    Capture {
        /// The hold: the `request_id` of its `hold` request.
        hold_id: RequestId,
        /// How much to take, at most the hold's amount; `None` takes all of it.
        amount: Option<Money>,
    },
    /// Give hold `hold_id` back.
    Release {
        /// The hold: the `request_id` of its `hold` request.
        hold_id: RequestId,
    },
}

impl Command {
    /// The operation's wire name.
    pub fn op(&self) -> Op {
        match self {
            Command::Withdraw { .. } => Op::Withdraw,
            Command::Deposit { .. } => Op::Deposit,
            Command::Hold { .. } => Op::Hold,
            Command::Capture { .. } => Op::Capture,
            Command::Release { .. } => Op::Release,
        }
    }

    /// The amount the request names, if any.
    pub fn amount(&self) -> Option<Money> {
        match self {
            Command::Withdraw { amount } | Command::Deposit { amount } | Command::Hold { amount, .. } => Some(*amount),
            Command::Capture { amount, .. } => *amount,
            Command::Release { .. } => None,
        }
    }

    /// The hold a capture or release names.
    pub fn hold_id(&self) -> Option<&RequestId> {
        match self {
            Command::Capture { hold_id, .. } | Command::Release { hold_id } => Some(hold_id),
            _ => None,
        }
    }
}

/// A valid request, as a producer sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Idempotency key: a request id is applied at most once, forever.
    pub request_id: RequestId,
    /// The wallet's owner; also the routing key and the partition.
    pub user_id: UserId,
    /// What to do, with the fields of its op.
    pub command: Command,
    /// Where later news of this request goes (a hold's expiry): the message's `reply_to`
    /// as the worker accepted it. Not part of the body; `None` means the results queue.
    pub reply_to: Option<String>,
}

impl Request {
    /// A request with no `reply_to` of its own.
    pub fn new(request_id: RequestId, user_id: UserId, command: Command) -> Self {
        Request { request_id, user_id, command, reply_to: None }
    }

    /// The operation's wire name.
    pub fn op(&self) -> Op {
        self.command.op()
    }

    /// The amount the request names, if any.
    pub fn amount(&self) -> Option<Money> {
        self.command.amount()
    }

    /// "The same body": same user, op and field values (a hold sent without `timeout_s`
    /// is the same as one with the default).
    pub fn same_body(&self, other: &Request) -> bool {
        self.user_id == other.user_id && self.command == other.command
    }

    /// The canonical JSON body of this request.
    pub fn to_json(&self) -> Vec<u8> {
        let mut body = serde_json::json!({
            "request_id": self.request_id,
            "user_id": self.user_id,
            "op": self.op(),
        });
        match &self.command {
            Command::Withdraw { amount } | Command::Deposit { amount } => body["amount"] = serde_json::json!(amount),
            Command::Hold { amount, timeout_s } => {
                body["amount"] = serde_json::json!(amount);
                body["timeout_s"] = serde_json::json!(timeout_s);
            }
            Command::Capture { hold_id, amount } => {
                body["hold_id"] = serde_json::json!(hold_id);
                if let Some(amount) = amount {
                    body["amount"] = serde_json::json!(amount);
                }
            }
            Command::Release { hold_id } => body["hold_id"] = serde_json::json!(hold_id),
        }
        body.to_string().into_bytes()
    }
}

/// A message that is not a valid request, with what is known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest {
    /// Human-readable reason, for the `detail` of the rejection.
    pub detail: String,
    /// The id, when the message had a valid one (so the result can name it).
    pub request_id: Option<RequestId>,
    /// The user, when valid.
    pub user_id: Option<UserId>,
    /// The operation, when valid.
    pub op: Option<Op>,
    /// The amount, when valid.
    pub amount: Option<Money>,
}

impl InvalidRequest {
    fn bare(detail: impl Into<String>) -> Self {
        InvalidRequest { detail: detail.into(), request_id: None, user_id: None, op: None, amount: None }
    }
}

/// The fields of a JSON object in order, duplicates kept (so they can be refused).
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

const FIELD_NAMES: [&str; 6] = ["request_id", "user_id", "op", "amount", "hold_id", "timeout_s"];

/// Decodes and validates a message body. Never panics, whatever the bytes.
pub fn decode_request(body: &[u8]) -> Result<Request, InvalidRequest> {
    if body.len() > MESSAGE_MAX_BYTES {
        return Err(InvalidRequest::bare(format!(
            "message is {} bytes, over the {MESSAGE_MAX_BYTES}-byte limit",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body).map_err(|_| InvalidRequest::bare("body is not UTF-8 text"))?;
    let Fields(fields) = serde_json::from_str::<Fields>(text).map_err(|e| {
        // A data error quotes the offending value (possibly the whole body): keep it short.
        let reason = match e.classify() {
            serde_json::error::Category::Data => truncate(&e.to_string()),
            _ => e.to_string(),
        };
        InvalidRequest::bare(bounded(format!("body is not a JSON object of the request fields: {reason}")))
    })?;

    let mut raw: [Option<&RawValue>; 6] = [None; 6];
    let mut problems: Vec<String> = Vec::new();
    for (key, value) in &fields {
        match FIELD_NAMES.iter().position(|name| name == key) {
            Some(i) if raw[i].is_some() => problems.push(format!("field `{key}` appears twice")),
            Some(i) => raw[i] = Some(value),
            None => problems.push(format!("unknown field `{}`", truncate(key))),
        }
    }
    let [raw_request_id, raw_user_id, raw_op, raw_amount, raw_hold_id, raw_timeout_s] = raw;

    let mut invalid = InvalidRequest::bare(String::new());
    invalid.request_id = id_field(raw_request_id, "request_id", RequestId::parse, &mut problems);
    invalid.user_id = id_field(raw_user_id, "user_id", UserId::parse, &mut problems);
    invalid.op = op_field(raw_op, &mut problems);
    let fields = OpFields { amount: raw_amount, hold_id: raw_hold_id, timeout_s: raw_timeout_s };
    let command = invalid.op.and_then(|op| command_fields(op, &fields, &mut invalid, &mut problems));

    match (problems.is_empty(), &invalid, command) {
        (true, InvalidRequest { request_id: Some(request_id), user_id: Some(user_id), .. }, Some(command)) => {
            Ok(Request::new(request_id.clone(), user_id.clone(), command))
        }
        _ => {
            invalid.detail = describe(&problems);
            Err(invalid)
        }
    }
}

/// The raw fields whose presence depends on the op.
struct OpFields<'a> {
    amount: Option<&'a RawValue>,
    hold_id: Option<&'a RawValue>,
    timeout_s: Option<&'a RawValue>,
}

/// The command of `op` from its fields: each op takes its own set; a field of another op
/// is a problem, like an unknown one. Notes the amount in `invalid` when it is valid.
fn command_fields(
    op: Op,
    fields: &OpFields,
    invalid: &mut InvalidRequest,
    problems: &mut Vec<String>,
) -> Option<Command> {
    let (amount_rule, takes_hold_id, takes_timeout) = match op {
        Op::Withdraw | Op::Deposit => (Presence::Required, false, false),
        Op::Hold => (Presence::Required, false, true),
        Op::Capture => (Presence::Optional, true, false),
        Op::Release | Op::Expire => (Presence::Refused, true, false),
    };
    let misplaced = |name: &str, problems: &mut Vec<String>| {
        problems.push(format!("field `{name}` is not allowed with op \"{}\"", op.as_str()));
    };
    let amount = match (amount_rule, fields.amount) {
        (Presence::Refused, Some(_)) => {
            misplaced("amount", problems);
            None
        }
        (Presence::Required, raw) => amount_field(raw, problems).map(Some),
        (_, None) => Some(None),
        (_, raw) => amount_field(raw, problems).map(Some),
    };
    invalid.amount = amount.flatten();
    let hold_id = match (takes_hold_id, fields.hold_id) {
        (true, raw) => id_field(raw, "hold_id", RequestId::parse, problems),
        (false, Some(_)) => {
            misplaced("hold_id", problems);
            None
        }
        (false, None) => None,
    };
    let timeout_s = match (takes_timeout, fields.timeout_s) {
        (true, None) => Some(HOLD_TIMEOUT_DEFAULT_S),
        (true, Some(raw)) => timeout_field(raw, problems),
        (false, Some(_)) => {
            misplaced("timeout_s", problems);
            None
        }
        (false, None) => None,
    };
    match op {
        Op::Withdraw => Some(Command::Withdraw { amount: amount.flatten()? }),
        Op::Deposit => Some(Command::Deposit { amount: amount.flatten()? }),
        Op::Hold => Some(Command::Hold { amount: amount.flatten()?, timeout_s: timeout_s? }),
        Op::Capture => Some(Command::Capture { hold_id: hold_id?, amount: amount? }),
        Op::Release => Some(Command::Release { hold_id: hold_id? }),
        Op::Expire => None,
    }
}

/// Whether an op takes a field.
#[derive(Clone, Copy)]
enum Presence {
    Required,
    Optional,
    Refused,
}

/// `timeout_s`: a JSON integer from 1 to [`HOLD_TIMEOUT_MAX_S`].
fn timeout_field(raw: &RawValue, problems: &mut Vec<String>) -> Option<u32> {
    let parsed = raw.get().parse::<u32>().ok().filter(|s| (1..=HOLD_TIMEOUT_MAX_S).contains(s));
    if parsed.is_none() {
        problems.push(format!(
            "`timeout_s` must be an integer from 1 to {HOLD_TIMEOUT_MAX_S} (seconds), got {}",
            truncate(raw.get())
        ));
    }
    parsed
}

/// The `op` field, or `None` with its problem noted.
fn op_field(raw: Option<&RawValue>, problems: &mut Vec<String>) -> Option<Op> {
    match raw.map(as_json_string) {
        None => {
            problems.push("missing field `op`".into());
            None
        }
        Some(Some(text)) => Op::parse(&text).or_else(|| {
            let names: Vec<&str> = Op::REQUESTED.iter().map(|op| op.as_str()).collect();
            problems.push(format!("`op` must be one of {}, got {:?}", names.join(", "), truncate(&text)));
            None
        }),
        Some(None) => {
            problems.push("`op` must be a string".into());
            None
        }
    }
}

/// The `amount` field, or `None` with its problem noted.
fn amount_field(raw: Option<&RawValue>, problems: &mut Vec<String>) -> Option<Money> {
    match raw {
        None => {
            problems.push("missing field `amount`".into());
            None
        }
        Some(raw) => {
            parse_json_amount(raw).map_err(|e| problems.push(format!("`amount` {e}, got {}", truncate(raw.get())))).ok()
        }
    }
}

/// Parses a JSON amount exactly: a string (`"12.34"`) or the source text of a number
/// (`12.34`, never through `f64`), then [`Money::parse_amount`].
pub fn parse_json_amount(raw: &RawValue) -> Result<Money, MoneyError> {
    let text = as_json_string(raw).unwrap_or_else(|| raw.get().to_owned());
    Money::parse_amount(&text)
}

fn id_field<T>(
    raw: Option<&RawValue>,
    name: &str,
    parse: fn(&str) -> Option<T>,
    problems: &mut Vec<String>,
) -> Option<T> {
    let Some(raw) = raw else {
        problems.push(format!("missing field `{name}`"));
        return None;
    };
    let parsed = as_json_string(raw).and_then(|text| parse(&text));
    if parsed.is_none() {
        problems.push(format!("`{name}` must be a string of 1-{ID_MAX_CHARS} characters of [A-Za-z0-9._:-]"));
    }
    parsed
}

/// The value of a JSON string, or `None` when the raw value is not a string.
fn as_json_string(raw: &RawValue) -> Option<String> {
    if raw.get().starts_with('"') { serde_json::from_str::<String>(raw.get()).ok() } else { None }
}

/// Keeps echoed input short in error details.
pub(crate) fn truncate(text: &str) -> String {
    match text.char_indices().nth(ECHOED_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The first problems, joined, with a count of the others; at most [`DETAIL_MAX_BYTES`].
fn describe(problems: &[String]) -> String {
    let mut detail = problems.iter().take(LISTED_PROBLEMS_MAX).map(String::as_str).collect::<Vec<_>>().join("; ");
    if let Some(more) = problems.len().checked_sub(LISTED_PROBLEMS_MAX).filter(|&n| n > 0) {
        let _ = write!(detail, "; and {more} more problem(s)");
    }
    bounded(detail)
}

/// Cuts `text` to at most [`DETAIL_MAX_BYTES`], on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > DETAIL_MAX_BYTES {
        let mut cut = DETAIL_MAX_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<Request, InvalidRequest> {
        decode_request(text.as_bytes())
    }

    #[test]
    fn decodes_string_and_number_amounts_exactly() {
        let a = decode(r#"{"request_id":"r-1","user_id":"u:1","op":"withdraw","amount":"12.34"}"#).unwrap();
        assert_eq!(a.amount().map(Money::cents), Some(1234));
        assert_eq!(a.op(), Op::Withdraw);
        let b = decode(r#"{"request_id":"r-2","user_id":"u.1","op":"deposit","amount":0.1}"#).unwrap();
        assert_eq!(b.amount().map(Money::cents), Some(10));
        let c = decode(r#"{"amount":1.000,"op":"deposit","user_id":"u_1","request_id":"r-3"}"#).unwrap();
        assert_eq!(c.amount().map(Money::cents), Some(100));
    }

    #[test]
    fn rejects_bad_amounts_with_a_reason() {
        for (amount, needle) in [
            ("1.0000000000000001", "more than 2 decimal places"),
            ("\"1.001\"", "more than 2 decimal places"),
            ("-5", "plain decimal"),
            ("1e3", "plain decimal"),
            ("\"\"", "plain decimal"),
            ("0", "greater than 0"),
            ("1000000000.01", "at most 1000000000.00"),
            ("true", "plain decimal"),
            ("null", "plain decimal"),
            ("[1]", "plain decimal"),
        ] {
            let body = format!(r#"{{"request_id":"r","user_id":"u","op":"withdraw","amount":{amount}}}"#);
            let err = decode(&body).unwrap_err();
            assert!(err.detail.contains(needle), "{amount}: {}", err.detail);
            assert_eq!(err.request_id.as_ref().map(RequestId::as_str), Some("r"));
            assert_eq!(err.amount, None);
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let long_id = "x".repeat(65);
        for (body, needle) in [
            ("not json", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            ("{}", "missing field `request_id`"),
            (r#"{"request_id":"r","user_id":"u","op":"withdraw"}"#, "missing field `amount`"),
            (r#"{"request_id":"r","user_id":"u","op":"steal","amount":"1"}"#, "`op` must be"),
            (r#"{"request_id":"r","user_id":"u","op":"withdraw","amount":"1","x":1}"#, "unknown field `x`"),
            (r#"{"request_id":"r","user_id":"u","op":"withdraw","amount":"1","amount":"2"}"#, "appears twice"),
            (r#"{"request_id":"a b","user_id":"u","op":"withdraw","amount":"1"}"#, "`request_id` must be"),
            (r#"{"request_id":5,"user_id":"u","op":"withdraw","amount":"1"}"#, "`request_id` must be"),
        ] {
            let err = decode(body).unwrap_err();
            assert!(err.detail.contains(needle), "{body}: {}", err.detail);
        }
        let body = format!(r#"{{"request_id":"{long_id}","user_id":"u","op":"withdraw","amount":"1"}}"#);
        assert!(decode(&body).unwrap_err().detail.contains("request_id"));
        assert!(decode_request(&[0xff, 0xfe]).unwrap_err().detail.contains("UTF-8"));
        let huge = vec![b' '; MESSAGE_MAX_BYTES + 1];
        assert!(decode_request(&huge).unwrap_err().detail.contains("limit"));
    }

    #[test]
    fn rejection_reasons_stay_short_whatever_the_input() {
        // Found by the fuzzer: serde's error quoted a whole JSON string body in the reason.
        let quoted = format!("\"{}\"", "x".repeat(MESSAGE_MAX_BYTES - 2));
        let err = decode(&quoted).unwrap_err();
        assert!(err.detail.len() <= DETAIL_MAX_BYTES, "{} bytes", err.detail.len());
        assert!(err.detail.starts_with("body is not a JSON object"), "{}", err.detail);
        // Thousands of unknown fields: the first few are named, the others counted.
        let fields: Vec<String> = (0..1_500).map(|i| format!("\"field-{i}-{}\":1", "é".repeat(10))).collect();
        let err = decode(&format!("{{{}}}", fields.join(","))).unwrap_err();
        assert!(err.detail.len() <= DETAIL_MAX_BYTES, "{} bytes", err.detail.len());
        assert!(err.detail.contains("more problem(s)"), "{}", err.detail);
        let long = bounded("ü".repeat(DETAIL_MAX_BYTES));
        assert!(long.len() <= DETAIL_MAX_BYTES && long.ends_with('…'));
    }

    #[test]
    fn each_op_takes_its_own_fields() {
        let hold = decode(r#"{"request_id":"h","user_id":"u","op":"hold","amount":"5"}"#).unwrap();
        assert_eq!(hold.command, Command::Hold { amount: Money::from_cents(500).unwrap(), timeout_s: 900 });
        let capture = decode(r#"{"request_id":"c","user_id":"u","op":"capture","hold_id":"h"}"#).unwrap();
        assert_eq!(capture.command, Command::Capture { hold_id: RequestId::parse("h").unwrap(), amount: None });
        let release = decode(r#"{"request_id":"r","user_id":"u","op":"release","hold_id":"h"}"#).unwrap();
        assert_eq!(release.command.hold_id().map(RequestId::as_str), Some("h"));
        for (body, needle) in [
            (
                r#"{"request_id":"r","user_id":"u","op":"withdraw","amount":"1","hold_id":"h"}"#,
                "`hold_id` is not allowed",
            ),
            (
                r#"{"request_id":"r","user_id":"u","op":"withdraw","amount":"1","timeout_s":5}"#,
                "`timeout_s` is not allowed",
            ),
            (
                r#"{"request_id":"r","user_id":"u","op":"release","hold_id":"h","amount":"1"}"#,
                "`amount` is not allowed",
            ),
            (r#"{"request_id":"r","user_id":"u","op":"capture"}"#, "missing field `hold_id`"),
            (r#"{"request_id":"r","user_id":"u","op":"hold","amount":"1","timeout_s":0}"#, "`timeout_s` must be"),
            (r#"{"request_id":"r","user_id":"u","op":"hold","amount":"1","timeout_s":604801}"#, "`timeout_s` must be"),
            (r#"{"request_id":"r","user_id":"u","op":"hold","amount":"1","timeout_s":"9"}"#, "`timeout_s` must be"),
            (r#"{"request_id":"r","user_id":"u","op":"hold","amount":"1","timeout_s":1.5}"#, "`timeout_s` must be"),
            (r#"{"request_id":"r","user_id":"u","op":"hold"}"#, "missing field `amount`"),
            (r#"{"request_id":"r","user_id":"u","op":"expire","hold_id":"h"}"#, "`op` must be"),
        ] {
            let err = decode(body).unwrap_err();
            assert!(err.detail.contains(needle), "{body}: {}", err.detail);
        }
    }

    #[test]
    fn canonical_json_of_every_op_decodes_to_itself() {
        for body in [
            r#"{"request_id":"h","user_id":"u","op":"hold","amount":"5","timeout_s":30}"#,
            r#"{"request_id":"c","user_id":"u","op":"capture","hold_id":"h","amount":"2"}"#,
            r#"{"request_id":"c","user_id":"u","op":"capture","hold_id":"h"}"#,
            r#"{"request_id":"r","user_id":"u","op":"release","hold_id":"h"}"#,
        ] {
            let request = decode(body).unwrap();
            assert_eq!(decode_request(&request.to_json()), Ok(request));
        }
    }

    #[test]
    fn canonical_json_decodes_to_itself() {
        let request = decode(r#"{"request_id":"r","user_id":"u","op":"deposit","amount":"5"}"#).unwrap();
        assert_eq!(decode_request(&request.to_json()), Ok(request));
    }
}
