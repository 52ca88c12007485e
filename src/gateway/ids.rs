//! Request ids minted by the gateway: an `Idempotency-Key` scoped to its user, with a tag
//! that lets the gateway tell, from the id alone, that it minted the id for that user.
//!
//! `request_id = "g" + D + T` (49 characters of `[0-9a-g]`), where
//! - `D` = first 32 hex of SHA-256(`sub` ‖ 0x00 ‖ key): the same user and key give the
//!   same id (replays are idempotent); another user's same key gives another id;
//! - `T` = first 16 hex of HMAC-SHA256(K, `sub` ‖ 0x00 ‖ `D`), with
//!   K = HMAC-SHA256(secret, "walletq request-id v1") (a subkey, apart from the JWT key).
//!
//! `GET /v1/requests/{id}` recomputes `T` with the token's `sub`: an id of another user, or
//! one the gateway never minted, fails the check and is answered 404 without a database
//! look-up. Rotating the secret changes every id, so keys replayed across a rotation are new
//! requests and older ids read as unknown.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::auth::JwtSecret;
use crate::domain::{RequestId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// Longest `Idempotency-Key`, in characters.
pub const KEY_MAX_CHARS: usize = 64;
const PREFIX: &str = "g";
const DIGEST_HEX: usize = 32;
const TAG_HEX: usize = 16;
const ID_CHARS: usize = PREFIX.len() + DIGEST_HEX + TAG_HEX;
const SUBKEY_LABEL: &[u8] = b"walletq request-id v1";

/// A client's idempotency key: 1–64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates a header value.
    pub fn parse(text: &str) -> Option<Self> {
        let ok = (1..=KEY_MAX_CHARS).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        ok.then(|| IdempotencyKey(text.to_owned()))
    }

    /// A fresh random key, for a request sent without one.
    pub fn fresh() -> Self {
        IdempotencyKey(uuid::Uuid::new_v4().to_string())
    }
}

/// Mints and checks gateway request ids.
#[derive(Clone)]
pub struct RequestIds {
    mac: HmacSha256,
}

impl RequestIds {
    /// Ids keyed by a subkey of `secret`.
    pub fn new(secret: &JwtSecret) -> Self {
        let subkey = hmac_sha256(secret.bytes(), &[SUBKEY_LABEL]);
        // HMAC takes keys of any length.
        let mac = HmacSha256::new_from_slice(&subkey).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        RequestIds { mac }
    }

    /// The request id of `key` for `user`.
    pub fn mint(&self, user: &UserId, key: &IdempotencyKey) -> RequestId {
        let mut digest = Sha256::new();
        digest.update(user.as_str());
        digest.update([0u8]);
        digest.update(key.0.as_bytes());
        let digest = hex::encode(digest.finalize());
        let digest = &digest[..DIGEST_HEX];
        let tag = hex::encode(self.tag(user, digest).finalize().into_bytes());
        let id = format!("{PREFIX}{digest}{}", &tag[..TAG_HEX]);
        // 49 characters of [0-9a-g]: always a valid request id.
        RequestId::parse(&id).unwrap_or_else(|| unreachable!("minted ids are valid request ids"))
    }

    /// Whether `id` was minted by this gateway for `user` (constant-time tag check).
    pub fn belongs_to(&self, id: &str, user: &UserId) -> bool {
        if id.len() != ID_CHARS || !id.starts_with(PREFIX) {
            return false;
        }
        let (digest, tag) = id[PREFIX.len()..].split_at(DIGEST_HEX);
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !lower_hex(digest) || !lower_hex(tag) {
            return false;
        }
        match hex::decode(tag) {
            Ok(tag) => self.tag(user, digest).verify_truncated_left(&tag).is_ok(),
            Err(_) => false,
        }
    }

    fn tag(&self, user: &UserId, digest: &str) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(user.as_str().as_bytes());
        mac.update(&[0u8]);
        mac.update(digest.as_bytes());
        mac
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(fill: u8) -> RequestIds {
        RequestIds::new(&JwtSecret::new(vec![fill; 32]).unwrap())
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn ids_are_scoped_to_user_and_key_and_checkable() {
        let ids = ids(7);
        let key = IdempotencyKey::parse("order-42").unwrap();
        let a = ids.mint(&user("alice"), &key);
        assert_eq!(a, ids.mint(&user("alice"), &key), "the same key replays the same id");
        assert_eq!(a.as_str().len(), 49);
        assert!(a.as_str().starts_with('g'));
        let b = ids.mint(&user("bob"), &key);
        assert_ne!(a, b, "keys are scoped to their user");

        assert!(ids.belongs_to(a.as_str(), &user("alice")));
        assert!(!ids.belongs_to(a.as_str(), &user("bob")));
        assert!(!ids.belongs_to(b.as_str(), &user("alice")));
        assert!(!self::ids(8).belongs_to(a.as_str(), &user("alice")), "another secret's ids are unknown");

        let mut forged = a.as_str().to_owned();
        let last = if forged.ends_with('0') { "1" } else { "0" };
        forged.replace_range(48.., last);
        assert!(!ids.belongs_to(&forged, &user("alice")));
        for bad in ["", "g", "x", "G0000", &a.as_str().to_uppercase(), &format!("{}0", a.as_str())] {
            assert!(!ids.belongs_to(bad, &user("alice")), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_restricted_and_fresh_keys_differ() {
        assert!(IdempotencyKey::parse("a").is_some());
        assert!(IdempotencyKey::parse(&"k".repeat(64)).is_some());
        for bad in ["", " ", "a b", "é", "a/b", &"k".repeat(65)] {
            assert!(IdempotencyKey::parse(bad).is_none(), "{bad:?}");
        }
        assert_ne!(IdempotencyKey::fresh(), IdempotencyKey::fresh());
    }
}
