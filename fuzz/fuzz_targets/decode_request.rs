//! Any bytes either decode to a request that keeps the wire contract, or are refused with
//! a reason; never a panic. The contract is checked again here, written independently of
//! the decoder (integer cents from the raw JSON text, ids by hand), in both directions:
//! what the decoder accepts must be valid, and what this oracle finds valid must be accepted.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use walletq::domain::{Command, Money, Request, RequestId, UserId, decode_request};

/// 1,000,000,000.00 in cents.
const CENTS_MAX: u128 = 100_000_000_000;
/// A refusal's reason is published and logged: it stays short whatever the input.
const DETAIL_MAX_BYTES: usize = 1024;

fuzz_target!(|body: &[u8]| {
    match decode_request(body) {
        Ok(request) => {
            assert_keeps_contract(&request);
            // Canonical JSON decodes back to the same request.
            let canonical = request.to_json();
            assert_eq!(decode_request(&canonical).as_ref(), Ok(&request), "canonical form of {request:?}");
            // And the fields are the ones in the body.
            match oracle(body) {
                Some(Ok(expected)) => assert_eq!(request, expected, "decoded fields differ from the body's"),
                Some(Err(why)) => panic!("decoder accepted what the oracle refuses ({why}): {request:?}"),
                None => panic!("decoder accepted a body the oracle cannot read as a JSON object: {request:?}"),
            }
        }
        Err(invalid) => {
            assert!(!invalid.detail.is_empty(), "a refusal without a reason");
            assert!(
                invalid.detail.len() <= DETAIL_MAX_BYTES,
                "a {}-byte reason for a {}-byte body",
                invalid.detail.len(),
                body.len()
            );
            if let Some(Ok(expected)) = oracle(body) {
                // Only a duplicated field (the oracle's map keeps the last) may explain it.
                assert!(
                    invalid.detail.contains("appears twice"),
                    "decoder refused a valid request {expected:?}: {}",
                    invalid.detail
                );
            }
        }
    }
});

fn assert_keeps_contract(request: &Request) {
    for id in [request.request_id.as_str(), request.user_id.as_str()] {
        assert!(valid_id(id), "id {id:?} breaks the contract");
    }
    if let Some(hold_id) = request.command.hold_id() {
        assert!(valid_id(hold_id.as_str()), "hold id {hold_id:?} breaks the contract");
    }
    if let Command::Hold { timeout_s, .. } = request.command {
        assert!((1..=604_800).contains(&timeout_s), "timeout_s {timeout_s} out of range");
    }
    let Some(amount) = request.amount() else { return };
    let cents = amount.cents();
    assert!(cents > 0 && cents as u128 <= CENTS_MAX, "amount {amount} out of range");
    let decimal = amount.as_decimal();
    assert_eq!(decimal.scale(), 2, "amount {amount} is not carried with 2 decimals");
    assert_eq!(decimal.mantissa(), i128::from(cents));
}

fn valid_id(id: &str) -> bool {
    let length = id.chars().count();
    (1..=64).contains(&length)
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == ':' || c == '-')
}

/// The request a body describes by the contract, read without the decoder: `None` when it
/// is not a JSON object at all, `Err` with the broken rule otherwise.
fn oracle(body: &[u8]) -> Option<Result<Request, String>> {
    let text = std::str::from_utf8(body).ok()?;
    if body.len() > 64 * 1024 {
        return Some(Err("too large".into()));
    }
    let fields: HashMap<String, Box<RawValue>> = serde_json::from_str(text).ok()?;
    Some(fields_to_request(&fields))
}

fn fields_to_request(fields: &HashMap<String, Box<RawValue>>) -> Result<Request, String> {
    let string = |name: &str| -> Result<String, String> {
        let raw = fields.get(name).ok_or(format!("no {name}"))?;
        serde_json::from_str::<String>(raw.get()).map_err(|_| format!("{name} is not a string"))
    };
    let request_id = string("request_id")?;
    let user_id = string("user_id")?;
    let op = string("op")?;
    // Each op's own fields, and no other.
    let own: &[&str] = match op.as_str() {
        "withdraw" | "deposit" => &["amount"],
        "hold" => &["amount", "timeout_s"],
        "capture" => &["hold_id", "amount"],
        "release" => &["hold_id"],
        other => return Err(format!("op {other:?}")),
    };
    if let Some(key) =
        fields.keys().find(|k| !["request_id", "user_id", "op"].contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(format!("field {key:?} with op {op:?}"));
    }
    let amount = || -> Result<Option<Money>, String> {
        let Some(raw) = fields.get("amount") else { return Ok(None) };
        let text = serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned());
        let cents = cents_of(&text).ok_or(format!("amount {text:?}"))?;
        Ok(Some(Money::from_cents(cents as i64).expect("Money::from_cents refuses a valid amount")))
    };
    let hold_id = || -> Result<RequestId, String> {
        let id = string("hold_id")?;
        if !valid_id(&id) {
            return Err("bad hold id".into());
        }
        Ok(RequestId::parse(&id).expect("RequestId::parse refuses a valid id"))
    };
    let command = match op.as_str() {
        "withdraw" => Command::Withdraw { amount: amount()?.ok_or("no amount")? },
        "deposit" => Command::Deposit { amount: amount()?.ok_or("no amount")? },
        "hold" => Command::Hold { amount: amount()?.ok_or("no amount")?, timeout_s: timeout(fields.get("timeout_s"))? },
        "capture" => Command::Capture { hold_id: hold_id()?, amount: amount()? },
        _ => Command::Release { hold_id: hold_id()? },
    };
    if !valid_id(&request_id) || !valid_id(&user_id) {
        return Err("bad id".into());
    }
    // Valid by the oracle: the domain types must accept every part.
    Ok(Request::new(
        RequestId::parse(&request_id).expect("RequestId::parse refuses a valid id"),
        UserId::parse(&user_id).expect("UserId::parse refuses a valid id"),
        command,
    ))
}

/// A hold's `timeout_s`: absent is 900; else a JSON integer (digits only) from 1 to 604800.
fn timeout(raw: Option<&Box<RawValue>>) -> Result<u32, String> {
    let Some(raw) = raw else { return Ok(900) };
    let text = raw.get();
    let seconds = text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse::<u32>().ok()).flatten();
    seconds.filter(|s| (1..=604_800).contains(s)).ok_or(format!("timeout_s {text:?}"))
}

/// Plain decimal text (digits, optionally a point and digits) to cents, when it is an
/// amount the contract allows: `0 < amount <= 1000000000.00`, at most two decimals once
/// trailing zeros are dropped.
fn cents_of(text: &str) -> Option<u128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || (text.contains('.') && fraction.is_empty()) {
        return None;
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 2 {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    if whole.len() > 12 {
        return None;
    }
    let mut cents: u128 = 0;
    for b in whole.bytes() {
        cents = cents * 10 + u128::from(b - b'0');
    }
    let mut fraction_cents: u128 = 0;
    for (i, b) in fraction.bytes().enumerate() {
        fraction_cents += u128::from(b - b'0') * if i == 0 { 10 } else { 1 };
    }
    let cents = cents * 100 + fraction_cents;
    (cents > 0 && cents <= CENTS_MAX).then_some(cents)
}
