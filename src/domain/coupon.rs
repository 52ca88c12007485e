//! Coupons granted on deposits, by tier (from the seed's top-up promotion).

use serde::{Deserialize, Serialize};

use super::money::Money;

/// The kind of coupon a deposit earns.
///
/// The wire names are those of [`CouponKind::as_str`] (also stored in the `coupons` table);
/// the aliases read results written when serde's `snake_case` gave `spend300_save50`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CouponKind {
    /// 100 to under 300: a "10 off, no minimum" red packet.
    #[serde(rename = "red_packet_10", alias = "red_packet10")]
    RedPacket10,
    /// 300 to under 500: "50 off 300".
    #[serde(rename = "spend_300_save_50", alias = "spend300_save50")]
    Spend300Save50,
    /// 500 and above: "lifetime 20% off".
    #[serde(rename = "lifetime_20_off", alias = "lifetime20_off")]
    Lifetime20Off,
}

impl CouponKind {
    /// The wire name, e.g. `red_packet_10`.
    pub fn as_str(self) -> &'static str {
        match self {
            CouponKind::RedPacket10 => "red_packet_10",
            CouponKind::Spend300Save50 => "spend_300_save_50",
            CouponKind::Lifetime20Off => "lifetime_20_off",
        }
    }

    /// The tier a deposit of `amount` falls in; `None` under 100.
    pub fn for_deposit(amount: Money) -> Option<CouponKind> {
        match amount.cents() {
            ..10_000 => None,
            10_000..30_000 => Some(CouponKind::RedPacket10),
            30_000..50_000 => Some(CouponKind::Spend300Save50),
            _ => Some(CouponKind::Lifetime20Off),
        }
    }
}

/// A granted coupon: a unique code and its kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coupon {
    /// The code a user redeems (`WQ-` and 16 hex digits), unique.
    pub code: String,
    /// Which tier's coupon it is.
    pub kind: CouponKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(text: &str) -> Option<CouponKind> {
        CouponKind::for_deposit(Money::parse(text).unwrap())
    }

    #[test]
    fn wire_names_match_the_contract_and_the_database() {
        for kind in [CouponKind::RedPacket10, CouponKind::Spend300Save50, CouponKind::Lifetime20Off] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<CouponKind>(&json).unwrap(), kind);
        }
        assert_eq!(CouponKind::Spend300Save50.as_str(), "spend_300_save_50");
    }

    #[test]
    fn tiers_follow_the_seed() {
        assert_eq!(tier("99.99"), None);
        assert_eq!(tier("100"), Some(CouponKind::RedPacket10));
        assert_eq!(tier("299.99"), Some(CouponKind::RedPacket10));
        assert_eq!(tier("300"), Some(CouponKind::Spend300Save50));
        assert_eq!(tier("499.99"), Some(CouponKind::Spend300Save50));
        assert_eq!(tier("500"), Some(CouponKind::Lifetime20Off));
        assert_eq!(tier("1000000000"), Some(CouponKind::Lifetime20Off));
    }

    #[test]
    fn wire_names_match_the_stored_kinds() {
        for kind in [CouponKind::RedPacket10, CouponKind::Spend300Save50, CouponKind::Lifetime20Off] {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str(), "serialized as the coupons table stores it");
            assert_eq!(serde_json::from_value::<CouponKind>(json).unwrap(), kind);
        }
        let old: CouponKind = serde_json::from_str("\"spend300_save50\"").unwrap();
        assert_eq!(old, CouponKind::Spend300Save50);
    }
}
