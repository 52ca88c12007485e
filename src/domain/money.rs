//! Exact money: a non-negative amount with exactly two decimal places.
//!
//! Parsed from text only (never through `f64`), so `"0.1"` is exactly one tenth.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Decimal places every amount and balance carries.
pub const MONEY_SCALE: u32 = 2;
/// Largest amount one request may move: 1,000,000,000.00, in cents.
pub const AMOUNT_MAX_CENTS: i64 = 100_000_000_000;
/// Longest integer part accepted anywhere (balances included), in digits.
const INTEGER_DIGITS_MAX: usize = 16;
/// Largest balance a wallet may hold: 9999999999999999.99 (16 integer digits), in cents.
pub const BALANCE_MAX_CENTS: i64 = 999_999_999_999_999_999;

/// A non-negative quantity of money with exactly two decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

/// Why a text is not an acceptable amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not digits with an optional `.` and decimals (signs, exponents, spaces).
    #[error("must be plain decimal notation (digits, an optional point and fraction; no sign, exponent or spaces)")]
    NotPlainDecimal,
    /// More than 2 decimal places: cents are the smallest unit.
    #[error("has more than 2 decimal places")]
    TooManyDecimals,
    /// Zero or less: an amount moves money.
    #[error("must be greater than 0")]
    NotPositive,
    /// Above the largest amount one request may move.
    #[error("must be at most 1000000000.00")]
    OverMaximum,
}

impl Money {
    /// Zero, as `0.00`.
    pub const ZERO: Money = Money(Decimal::from_parts(0, 0, 0, false, MONEY_SCALE));

    /// Money from a whole number of cents (`1234` is `12.34`).
    pub fn from_cents(cents: i64) -> Option<Money> {
        (cents >= 0).then(|| Money(Decimal::new(cents, MONEY_SCALE)))
    }

    /// Parses a non-negative amount in plain decimal notation, at most two decimals
    /// once trailing zeros are dropped (`"1.000"` is `1.00`).
    pub fn parse(text: &str) -> Result<Money, MoneyError> {
        let (integer, fraction) = match text.split_once('.') {
            Some((integer, fraction)) => (integer, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if integer.is_empty() || !all_digits(integer) {
            return Err(MoneyError::NotPlainDecimal);
        }
        let fraction = match fraction {
            Some(f) if f.is_empty() || !all_digits(f) => return Err(MoneyError::NotPlainDecimal),
            Some(f) => f.trim_end_matches('0'),
            None => "",
        };
        if fraction.len() > MONEY_SCALE as usize {
            return Err(MoneyError::TooManyDecimals);
        }
        let integer = integer.trim_start_matches('0');
        if integer.len() > INTEGER_DIGITS_MAX {
            return Err(MoneyError::OverMaximum);
        }
        // Both parts are now short runs of ASCII digits: the arithmetic below cannot overflow.
        let whole: i64 =
            if integer.is_empty() { 0 } else { integer.parse().map_err(|_| MoneyError::NotPlainDecimal)? };
        let mut cents_part: i64 =
            if fraction.is_empty() { 0 } else { fraction.parse().map_err(|_| MoneyError::NotPlainDecimal)? };
        if fraction.len() == 1 {
            cents_part *= 10;
        }
        let cents = whole.checked_mul(100).and_then(|c| c.checked_add(cents_part)).ok_or(MoneyError::OverMaximum)?;
        Money::from_cents(cents).ok_or(MoneyError::NotPlainDecimal)
    }

    /// Parses the amount of a request: [`Money::parse`], then `0 < amount <= 1000000000.00`.
    pub fn parse_amount(text: &str) -> Result<Money, MoneyError> {
        let money = Money::parse(text)?;
        if money == Money::ZERO {
            return Err(MoneyError::NotPositive);
        }
        if money.cents() > AMOUNT_MAX_CENTS {
            return Err(MoneyError::OverMaximum);
        }
        Ok(money)
    }

    /// Money from a database NUMERIC; `None` when negative or finer than cents.
    pub fn from_decimal(value: Decimal) -> Option<Money> {
        if value.is_sign_negative() && !value.is_zero() {
            return None;
        }
        let mut rounded = value.round_dp(MONEY_SCALE);
        if rounded != value {
            return None;
        }
        rounded.rescale(MONEY_SCALE);
        Some(Money(rounded))
    }

    /// The value as a `Decimal` with scale 2.
    pub fn as_decimal(self) -> Decimal {
        self.0
    }

    /// The value in cents.
    pub fn cents(self) -> i64 {
        // Scale is always 2 and the magnitude is bounded by INTEGER_DIGITS_MAX, so the
        // mantissa fits an i64.
        i64::try_from(self.0.mantissa()).unwrap_or(i64::MAX)
    }

    /// `self + other`, `None` past [`BALANCE_MAX_CENTS`].
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.cents().checked_add(other.cents()).filter(|&c| c <= BALANCE_MAX_CENTS).and_then(Money::from_cents)
    }

    /// `self - other`, `None` when the result would be negative.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.cents().checked_sub(other.cents()).and_then(Money::from_cents)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse(s)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Money::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cents(text: &str) -> Result<i64, MoneyError> {
        Money::parse_amount(text).map(Money::cents)
    }

    #[test]
    fn parses_plain_decimals_exactly() {
        assert_eq!(cents("12.34"), Ok(1234));
        assert_eq!(cents("0.1"), Ok(10));
        assert_eq!(cents("1"), Ok(100));
        assert_eq!(cents("1.000"), Ok(100));
        assert_eq!(cents("007.50"), Ok(750));
        assert_eq!(cents("1000000000.00"), Ok(AMOUNT_MAX_CENTS));
    }

    #[test]
    fn rejects_what_is_not_plain_decimal() {
        for bad in ["", ".5", "1.", "-1", "+1", "1e2", " 1", "1 ", "1,5", "0x10", "1.2.3", "NaN", "١"] {
            assert_eq!(cents(bad), Err(MoneyError::NotPlainDecimal), "{bad:?}");
        }
    }

    #[test]
    fn enforces_bounds_and_precision() {
        assert_eq!(cents("0"), Err(MoneyError::NotPositive));
        assert_eq!(cents("0.00"), Err(MoneyError::NotPositive));
        assert_eq!(cents("1.001"), Err(MoneyError::TooManyDecimals));
        assert_eq!(cents("1.0000000000000001"), Err(MoneyError::TooManyDecimals));
        assert_eq!(cents("1000000000.01"), Err(MoneyError::OverMaximum));
        assert_eq!(cents("99999999999999999999999999"), Err(MoneyError::OverMaximum));
    }

    #[test]
    fn displays_two_decimals_and_round_trips() {
        let money = Money::parse("12.3").unwrap();
        assert_eq!(money.to_string(), "12.30");
        assert_eq!(Money::ZERO.to_string(), "0.00");
        assert_eq!(Money::from_decimal(money.as_decimal()), Some(money));
        assert_eq!(Money::from_decimal(Decimal::new(5, 0)).map(|m| m.to_string()), Some("5.00".into()));
        assert_eq!(Money::from_decimal(Decimal::new(-5, 0)), None);
        assert_eq!(Money::from_decimal(Decimal::new(5, 3)), None);
    }

    #[test]
    fn arithmetic_never_goes_negative() {
        let ten = Money::parse("10").unwrap();
        let three = Money::parse("3").unwrap();
        assert_eq!(ten.checked_sub(three).map(Money::cents), Some(700));
        assert_eq!(three.checked_sub(ten), None);
        assert_eq!(ten.checked_add(three).map(Money::cents), Some(1300));
    }
}
