//! Bearer-token authentication: HS256 JWTs whose `sub` is the wallet's owner.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::problem::{Problem, ProblemKind};
use crate::domain::UserId;

/// Environment variable that holds the signing secret.
pub const JWT_SECRET_ENV: &str = "WALLETQ_JWT_SECRET";
/// Shortest secret accepted: RFC 7518 §3.2 asks HS256 keys to be at least 256 bits.
pub const SECRET_MIN_BYTES: usize = 32;
/// Clock skew tolerated between the token's issuer and the gateway, in seconds: on `exp`,
/// `nbf` and `iat` (jsonwebtoken's `Validation::leeway`, whose own default is 60 s).
pub const CLOCK_LEEWAY_S: u64 = 30;
/// Default of `--jwt-max-ttl`: the longest lifetime a token may declare.
pub const TOKEN_TTL_MAX_DEFAULT: Duration = Duration::from_secs(24 * 60 * 60);

/// The HS256 signing secret. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct JwtSecret(Vec<u8>);

impl JwtSecret {
    /// A secret of at least [`SECRET_MIN_BYTES`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> anyhow::Result<Self> {
        let bytes = bytes.into();
        anyhow::ensure!(
            bytes.len() >= SECRET_MIN_BYTES,
            "{JWT_SECRET_ENV} must be at least {SECRET_MIN_BYTES} bytes (HS256 needs a 256-bit key)"
        );
        Ok(JwtSecret(bytes))
    }

    /// The secret from `WALLETQ_JWT_SECRET`; an error when unset or too short.
    pub fn from_env() -> anyhow::Result<Self> {
        let value = std::env::var(JWT_SECRET_ENV)
            .with_context(|| format!("{JWT_SECRET_ENV} must be set to the HS256 token secret"))?;
        JwtSecret::new(value)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtSecret(***)")
    }
}

/// The claims a gateway token carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user the token speaks for.
    pub sub: String,
    /// Issued at, in seconds since the epoch (optional). When present it may not be in the
    /// future, and the token's lifetime is measured from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, in seconds since the epoch (optional): the token is refused until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Expiry, in seconds since the epoch (required).
    pub exp: u64,
}

/// Signs an HS256 token for `user`, valid for `ttl` from now.
pub fn mint_token(secret: &JwtSecret, user: &UserId, ttl: Duration) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims =
        Claims { sub: user.as_str().to_owned(), iat: Some(now), nbf: None, exp: now.saturating_add(ttl.as_secs()) };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.bytes()))
        .context("signing the token")
}

/// Why a bearer token is refused. The messages are the `detail` of the 401 answer: they
/// name the rule, never the token or its claims' values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    /// `exp` is past (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("the token is not valid yet (its `nbf` is in the future)")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("the token's `iat` is in the future")]
    IssuedInTheFuture,
    #[error(
        "the token's lifetime is over the gateway's maximum of {max_ttl_s} s (`exp` - `iat`, or `exp` - now without `iat`)"
    )]
    /// The token's lifetime is longer than `--jwt-max-ttl`.
    LivesTooLong {
        /// The longest lifetime accepted, in seconds.
        max_ttl_s: u64,
    },
    /// The signature does not match the gateway's secret.
    #[error("the token's signature is not valid")]
    BadSignature,
    /// Not HS256.
    #[error("the token must be signed with HS256")]
    WrongAlgorithm,
    /// A required claim (named) is absent.
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    /// A claim (named) has the wrong type or value.
    #[error("the token's `{0}` claim is not a number of seconds")]
    MalformedClaim(String),
    #[error(
        "the token is not a valid JWT (three base64url parts of JSON, with `sub` a string and `exp`, `nbf`, `iat` whole seconds)"
    )]
    /// Not a JWT at all.
    Malformed,
    /// `sub` is not a valid user id.
    #[error("the token's `sub` is not a user id (1-64 characters of [A-Za-z0-9._:-])")]
    BadSubject,
}

impl From<jsonwebtoken::errors::Error> for TokenRefused {
    fn from(error: jsonwebtoken::errors::Error) -> Self {
        match error.into_kind() {
            ErrorKind::ExpiredSignature => TokenRefused::Expired,
            ErrorKind::ImmatureSignature => TokenRefused::NotYetValid,
            ErrorKind::InvalidSignature => TokenRefused::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenRefused::WrongAlgorithm,
            ErrorKind::MissingRequiredClaim(claim) => TokenRefused::MissingClaim(claim),
            ErrorKind::InvalidClaimFormat(claim) => TokenRefused::MalformedClaim(claim),
            _ => TokenRefused::Malformed,
        }
    }
}

/// Verifies bearer tokens.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Longest lifetime a token may declare, in seconds (`--jwt-max-ttl`).
    max_ttl_s: u64,
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`: `exp` is required and checked, `nbf`
    /// and `iat` when present, each with [`CLOCK_LEEWAY_S`]; lifetimes over `max_ttl` are refused.
    pub fn new(secret: &JwtSecret, max_ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_LEEWAY_S;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier { key: DecodingKey::from_secret(secret.bytes()), validation, max_ttl_s: max_ttl.as_secs() }
    }

    /// The user of a verified token, or why it is refused.
    pub fn user(&self, token: &str) -> Result<UserId, TokenRefused> {
        // Decoded loosely first, so that jsonwebtoken's own checks (a missing `exp`, a
        // malformed `nbf`) say what is wrong instead of a generic deserialization error.
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)?.claims;
        if claims.get("iat").is_some_and(|iat| !iat.is_u64()) {
            return Err(TokenRefused::MalformedClaim("iat".into()));
        }
        let claims: Claims = serde_json::from_value(claims).map_err(|_| TokenRefused::Malformed)?;
        self.check_times(&claims, jsonwebtoken::get_current_timestamp())?;
        UserId::parse(&claims.sub).ok_or(TokenRefused::BadSubject)
    }

    /// The checks jsonwebtoken does not make (`exp` and `nbf` are its own): `iat` is not in
    /// the future, and the lifetime is at most the maximum. The lifetime counts from `iat`
    /// when present (both on the issuer's clock, so without leeway), else from `now` (the
    /// gateway's clock, with leeway).
    fn check_times(&self, claims: &Claims, now_s: u64) -> Result<(), TokenRefused> {
        let latest_s = now_s.saturating_add(CLOCK_LEEWAY_S);
        let lifetime_s = match claims.iat {
            Some(iat) if iat > latest_s => return Err(TokenRefused::IssuedInTheFuture),
            Some(iat) => claims.exp.saturating_sub(iat),
            None => claims.exp.saturating_sub(latest_s),
        };
        if lifetime_s > self.max_ttl_s {
            return Err(TokenRefused::LivesTooLong { max_ttl_s: self.max_ttl_s });
        }
        Ok(())
    }
}

/// The authenticated user of a request: the `sub` of its verified bearer token.
#[derive(Debug, Clone)]
pub struct User(pub UserId);

/// Gives extractors access to the verifier in the router's state.
pub trait HasVerifier {
    /// The verifier of the gateway's bearer tokens.
    fn verifier(&self) -> &Verifier;
}

impl<S: HasVerifier + Send + Sync> FromRequestParts<S> for User {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let unauthorized = |detail: &str| Problem::new(ProblemKind::Unauthorized, detail);
        let mut values = parts.headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(unauthorized("send exactly one `Authorization: Bearer <token>` header"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        state.verifier().user(token).map(User).map_err(|refused| unauthorized(&refused.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(fill: u8) -> JwtSecret {
        JwtSecret::new(vec![fill; SECRET_MIN_BYTES]).unwrap()
    }

    fn sign(claims: &serde_json::Value, algorithm: Algorithm) -> String {
        let key = EncodingKey::from_secret(secret(1).bytes());
        jsonwebtoken::encode(&Header::new(algorithm), claims, &key).unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(&secret(1), TOKEN_TTL_MAX_DEFAULT)
    }

    #[test]
    fn tokens_round_trip_and_are_checked() {
        let alice = UserId::parse("alice").unwrap();
        let token = mint_token(&secret(1), &alice, Duration::from_secs(60)).unwrap();
        assert_eq!(verifier().user(&token), Ok(alice.clone()));
        assert_eq!(Verifier::new(&secret(2), TOKEN_TTL_MAX_DEFAULT).user(&token), Err(TokenRefused::BadSignature));
        assert_eq!(verifier().user("not.a.jwt"), Err(TokenRefused::Malformed));
        assert_eq!(verifier().user(""), Err(TokenRefused::Malformed));

        let now = jsonwebtoken::get_current_timestamp();
        let expired = serde_json::json!({ "sub": "alice", "iat": now - 7200, "exp": now - 3600 });
        assert_eq!(verifier().user(&sign(&expired, Algorithm::HS256)), Err(TokenRefused::Expired));
        assert_eq!(verifier().user(&sign(&expired, Algorithm::HS384)), Err(TokenRefused::WrongAlgorithm));
        let no_exp = serde_json::json!({ "sub": "alice" });
        assert_eq!(verifier().user(&sign(&no_exp, Algorithm::HS256)), Err(TokenRefused::MissingClaim("exp".into())));
        let bad_sub = serde_json::json!({ "sub": "not a user", "exp": now + 60 });
        assert_eq!(verifier().user(&sign(&bad_sub, Algorithm::HS256)), Err(TokenRefused::BadSubject));
    }

    #[test]
    fn not_before_issued_at_and_lifetime_are_enforced() {
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = CLOCK_LEEWAY_S;
        let max = TOKEN_TTL_MAX_DEFAULT.as_secs();
        let check = |claims: serde_json::Value| verifier().user(&sign(&claims, Algorithm::HS256)).map(|_| ());
        let token = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({ "sub": "alice", "exp": now + 600 });
            claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            check(claims)
        };
        use TokenRefused::*;
        use serde_json::json;
        // nbf (RFC 7519 §4.1.5): refused until then, give or take the leeway.
        assert_eq!(token(json!({ "nbf": now - 10 })), Ok(()));
        assert_eq!(token(json!({ "nbf": now + leeway - 5 })), Ok(()), "within the leeway");
        assert_eq!(token(json!({ "nbf": now + leeway + 60 })), Err(NotYetValid));
        assert_eq!(token(json!({ "nbf": u64::MAX })), Err(NotYetValid));
        assert_eq!(token(json!({ "nbf": "soon" })), Err(MalformedClaim("nbf".into())));
        // iat: not in the future beyond the leeway.
        assert_eq!(token(json!({ "iat": now + leeway - 5 })), Ok(()), "within the leeway");
        assert_eq!(token(json!({ "iat": now + leeway + 60 })), Err(IssuedInTheFuture));
        assert_eq!(token(json!({ "iat": u64::MAX })), Err(IssuedInTheFuture));
        assert_eq!(token(json!({ "iat": "now" })), Err(MalformedClaim("iat".into())));
        assert_eq!(token(json!({ "iat": -1 })), Err(MalformedClaim("iat".into())));
        // Lifetime: from iat when present (exactly the maximum is fine), else from now.
        let too_long = LivesTooLong { max_ttl_s: max };
        assert_eq!(check(json!({ "sub": "alice", "iat": now, "exp": now + max })), Ok(()));
        assert_eq!(check(json!({ "sub": "alice", "iat": now, "exp": now + max + 1 })), Err(too_long.clone()));
        assert_eq!(check(json!({ "sub": "alice", "iat": now - 3600, "exp": now + max - 3600 })), Ok(()));
        assert_eq!(check(json!({ "sub": "alice", "iat": now - 3600, "exp": now + max })), Err(too_long.clone()));
        assert_eq!(check(json!({ "sub": "alice", "exp": now + max })), Ok(()));
        assert_eq!(check(json!({ "sub": "alice", "exp": now + max + leeway + 60 })), Err(too_long.clone()));
        assert_eq!(check(json!({ "sub": "alice", "exp": u64::MAX })), Err(too_long));
        let short = Verifier::new(&secret(1), Duration::from_secs(60));
        let minted = mint_token(&secret(1), &UserId::parse("alice").unwrap(), Duration::from_secs(61)).unwrap();
        assert_eq!(short.user(&minted), Err(LivesTooLong { max_ttl_s: 60 }));
    }

    #[test]
    fn refusals_never_echo_the_token() {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({ "sub": "secret-subject", "iat": "secret-iat", "exp": now + 60 });
        let token = sign(&claims, Algorithm::HS256);
        for refused in [verifier().user(&token), verifier().user("secret.token.text"), verifier().user(&token[1..])] {
            let detail = refused.unwrap_err().to_string();
            assert!(!detail.contains("secret"), "{detail}");
        }
    }

    #[test]
    fn secrets_are_long_and_never_shown() {
        assert!(JwtSecret::new("short").is_err());
        assert_eq!(format!("{:?}", secret(b'x')), "JwtSecret(***)");
    }
}
