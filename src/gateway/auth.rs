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
pub const MIN_SECRET_BYTES: usize = 32;
/// Clock skew tolerated on `exp`, in seconds.
pub const EXPIRY_LEEWAY_S: u64 = 30;

/// The HS256 signing secret. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct JwtSecret(Vec<u8>);

impl JwtSecret {
    /// A secret of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> anyhow::Result<Self> {
        let bytes = bytes.into();
        anyhow::ensure!(
            bytes.len() >= MIN_SECRET_BYTES,
            "{JWT_SECRET_ENV} must be at least {MIN_SECRET_BYTES} bytes (HS256 needs a 256-bit key)"
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
    /// Issued at, in seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// Expiry, in seconds since the epoch (required).
    pub exp: u64,
}

/// Signs an HS256 token for `user`, valid for `ttl` from now.
pub fn mint_token(secret: &JwtSecret, user: &UserId, ttl: Duration) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims { sub: user.as_str().to_owned(), iat: now, exp: now.saturating_add(ttl.as_secs()) };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.bytes()))
        .context("signing the token")
}

/// Verifies bearer tokens.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`; `exp` is required and checked.
    pub fn new(secret: &JwtSecret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = EXPIRY_LEEWAY_S;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier { key: DecodingKey::from_secret(secret.bytes()), validation }
    }

    /// The user of a verified token, or why it is refused.
    pub fn user(&self, token: &str) -> Result<UserId, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
            ErrorKind::InvalidSignature => "the token's signature is not valid".to_owned(),
            ErrorKind::InvalidAlgorithm => "the token must be signed with HS256".to_owned(),
            ErrorKind::MissingRequiredClaim(claim) => format!("the token lacks the `{claim}` claim"),
            _ => format!("the token is not a valid JWT ({e})"),
        })?;
        UserId::parse(&data.claims.sub)
            .ok_or_else(|| "the token's `sub` is not a user id (1-64 characters of [A-Za-z0-9._:-])".to_owned())
    }
}

/// The authenticated user of a request: the `sub` of its verified bearer token.
#[derive(Debug, Clone)]
pub struct User(pub UserId);

/// Gives extractors access to the verifier in the router's state.
pub trait HasVerifier {
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
        state.verifier().user(token).map(User).map_err(|detail| unauthorized(&detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(fill: u8) -> JwtSecret {
        JwtSecret::new(vec![fill; MIN_SECRET_BYTES]).unwrap()
    }

    #[test]
    fn tokens_round_trip_and_are_checked() {
        let alice = UserId::parse("alice").unwrap();
        let token = mint_token(&secret(1), &alice, Duration::from_secs(60)).unwrap();
        assert_eq!(Verifier::new(&secret(1)).user(&token), Ok(alice.clone()));
        assert!(Verifier::new(&secret(2)).user(&token).unwrap_err().contains("signature"));
        assert!(Verifier::new(&secret(1)).user("not.a.jwt").unwrap_err().contains("not a valid JWT"));

        let now = jsonwebtoken::get_current_timestamp();
        let expired = Claims { sub: "alice".into(), iat: now - 7200, exp: now - 3600 };
        let key = EncodingKey::from_secret(secret(1).bytes());
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key).unwrap();
        assert!(Verifier::new(&secret(1)).user(&token).unwrap_err().contains("expired"));
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS384), &expired, &key).unwrap();
        assert!(Verifier::new(&secret(1)).user(&token).unwrap_err().contains("HS256"));
    }

    #[test]
    fn secrets_are_long_and_never_shown() {
        assert!(JwtSecret::new("short").is_err());
        assert_eq!(format!("{:?}", secret(b'x')), "JwtSecret(***)");
    }
}
