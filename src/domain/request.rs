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

/// What a request does to a wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Take money out of the wallet, never below zero.
    Withdraw,
    /// Put money in, creating the wallet when needed.
    Deposit,
}

impl Op {
    /// The wire name, `withdraw` or `deposit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Withdraw => "withdraw",
            Op::Deposit => "deposit",
        }
    }

    /// Parses the wire name.
    pub fn parse(text: &str) -> Option<Op> {
        match text {
            "withdraw" => Some(Op::Withdraw),
            "deposit" => Some(Op::Deposit),
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
    /// What to do with the amount.
    pub op: Op,
    /// How much, in exact cents.
    pub amount: Money,
}

impl Request {
    /// "The same body": same user, op and amount value.
    pub fn same_body(&self, other: &Request) -> bool {
        self.user_id == other.user_id && self.op == other.op && self.amount == other.amount
    }

    /// The canonical JSON body of this request.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::json!({
            "request_id": self.request_id,
            "user_id": self.user_id,
            "op": self.op,
            "amount": self.amount,
        })
        .to_string()
        .into_bytes()
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

const FIELD_NAMES: [&str; 4] = ["request_id", "user_id", "op", "amount"];

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

    let mut raw: [Option<&RawValue>; 4] = [None; 4];
    let mut problems: Vec<String> = Vec::new();
    for (key, value) in &fields {
        match FIELD_NAMES.iter().position(|name| name == key) {
            Some(i) if raw[i].is_some() => problems.push(format!("field `{key}` appears twice")),
            Some(i) => raw[i] = Some(value),
            None => problems.push(format!("unknown field `{}`", truncate(key))),
        }
    }
    let [raw_request_id, raw_user_id, raw_op, raw_amount] = raw;

    let mut invalid = InvalidRequest::bare(String::new());
    invalid.request_id = id_field(raw_request_id, "request_id", RequestId::parse, &mut problems);
    invalid.user_id = id_field(raw_user_id, "user_id", UserId::parse, &mut problems);
    invalid.op = op_field(raw_op, &mut problems);
    invalid.amount = amount_field(raw_amount, &mut problems);

    match (problems.is_empty(), &invalid) {
        (
            true,
            InvalidRequest {
                request_id: Some(request_id),
                user_id: Some(user_id),
                op: Some(op),
                amount: Some(amount),
                ..
            },
        ) => Ok(Request { request_id: request_id.clone(), user_id: user_id.clone(), op: *op, amount: *amount }),
        _ => {
            invalid.detail = describe(&problems);
            Err(invalid)
        }
    }
}

/// The `op` field, or `None` with its problem noted.
fn op_field(raw: Option<&RawValue>, problems: &mut Vec<String>) -> Option<Op> {
    match raw.map(as_json_string) {
        None => {
            problems.push("missing field `op`".into());
            None
        }
        Some(Some(text)) => Op::parse(&text).or_else(|| {
            problems.push(format!("`op` must be \"withdraw\" or \"deposit\", got {:?}", truncate(&text)));
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
        assert_eq!(a.amount.cents(), 1234);
        assert_eq!(a.op, Op::Withdraw);
        let b = decode(r#"{"request_id":"r-2","user_id":"u.1","op":"deposit","amount":0.1}"#).unwrap();
        assert_eq!(b.amount.cents(), 10);
        let c = decode(r#"{"amount":1.000,"op":"deposit","user_id":"u_1","request_id":"r-3"}"#).unwrap();
        assert_eq!(c.amount.cents(), 100);
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
    fn canonical_json_decodes_to_itself() {
        let request = decode(r#"{"request_id":"r","user_id":"u","op":"deposit","amount":"5"}"#).unwrap();
        assert_eq!(decode_request(&request.to_json()), Ok(request));
    }
}
