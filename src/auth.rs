//! Access tokens: HS256 JWTs signed with the configured API secret, `kid` = API key.
//!
//! Claims: `sub` (identity), `exp`, `iat`, and `grants` (room, create, publish, subscribe, relayOnly).
//! A server without a secret (dev mode) accepts anonymous clients with every grant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

/// What a token allows. Missing fields take the permissive default, except `room`
/// (absent = any room).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grants {
    /// The only room this token may join; `None` = any room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default = "yes")]
    pub create: bool,
    #[serde(default = "yes")]
    pub publish: bool,
    #[serde(default = "yes")]
    pub subscribe: bool,
    /// Media of this client always goes through the relay.
    #[serde(default)]
    pub relay_only: bool,
}

fn yes() -> bool {
    true
}

impl Default for Grants {
    fn default() -> Self {
        Grants {
            room: None,
            create: true,
            publish: true,
            subscribe: true,
            relay_only: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    /// Not valid before this time (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub grants: Grants,
}

/// Why a token was refused. The `Display` text is the WebSocket close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("access token required")]
    Missing,
    #[error("access token expired")]
    Expired,
    #[error("access token signature invalid")]
    BadSignature,
    #[error("access token signed with unknown key")]
    UnknownKey,
    #[error("access token malformed")]
    Malformed,
    #[error("access token not valid yet (nbf, or iat in the future)")]
    NotYetValid,
}

/// Clock difference allowed between the token's issuer and this server for `nbf` and `iat`.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(60);

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Verifies tokens for one API key/secret pair.
#[derive(Clone)]
pub struct Verifier {
    key: String,
    decoding: DecodingKey,
}

impl Verifier {
    pub fn new(key: &str, secret: &str) -> Self {
        Verifier {
            key: key.to_string(),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Malformed);
        }
        if header.kid.as_deref() != Some(self.key.as_str()) {
            return Err(TokenError::UnknownKey);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = false; // checked below, with the clock leeway
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            },
        )?;
        if data.claims.sub.is_empty() || data.claims.sub.len() > 256 {
            return Err(TokenError::Malformed);
        }
        let latest = unix_now() + CLOCK_LEEWAY.as_secs();
        if data.claims.nbf.is_some_and(|nbf| nbf > latest) || data.claims.iat > latest {
            return Err(TokenError::NotYetValid);
        }
        Ok(data.claims)
    }
}

/// Mint a token: what `ferry token` prints.
pub fn mint(
    key: &str,
    secret: &str,
    identity: &str,
    ttl: Duration,
    grants: Grants,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: identity.to_string(),
        iat: now,
        exp: now + ttl.as_secs().max(1),
        nbf: None,
        grants,
    };
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.to_string());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip_keeps_grants() {
        let g = Grants {
            room: Some("r1".into()),
            publish: false,
            ..Grants::default()
        };
        let t = mint("k", SECRET, "alice", Duration::from_secs(60), g.clone()).unwrap();
        let c = Verifier::new("k", SECRET).verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.grants, g);
    }

    #[test]
    fn refusals_say_why() {
        let v = Verifier::new("k", SECRET);
        let t = mint("k", SECRET, "a", Duration::from_secs(60), Grants::default()).unwrap();
        assert_eq!(v.verify("nonsense").unwrap_err(), TokenError::Malformed);
        let other = mint(
            "k",
            "ffffffffffffffffffffffffffffffff",
            "a",
            Duration::from_secs(60),
            Grants::default(),
        )
        .unwrap();
        assert_eq!(v.verify(&other).unwrap_err(), TokenError::BadSignature);
        let wrong_kid = mint(
            "k2",
            SECRET,
            "a",
            Duration::from_secs(60),
            Grants::default(),
        )
        .unwrap();
        assert_eq!(v.verify(&wrong_kid).unwrap_err(), TokenError::UnknownKey);
        assert!(v.verify(&t).is_ok());
    }

    fn signed(claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k".into());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn tokens_from_the_future_are_refused() {
        let v = Verifier::new("k", SECRET);
        let now = unix_now();
        let base = Claims {
            sub: "a".into(),
            exp: now + 3600,
            iat: now,
            nbf: None,
            grants: Grants::default(),
        };
        assert!(v.verify(&signed(&base)).is_ok());
        let later = Claims {
            nbf: Some(now + 600),
            ..base.clone()
        };
        assert_eq!(
            v.verify(&signed(&later)).unwrap_err(),
            TokenError::NotYetValid
        );
        let issued_later = Claims {
            iat: now + 600,
            ..base.clone()
        };
        assert_eq!(
            v.verify(&signed(&issued_later)).unwrap_err(),
            TokenError::NotYetValid
        );
        // Within the clock leeway: accepted.
        let skewed = Claims {
            nbf: Some(now + 30),
            iat: now + 30,
            ..base
        };
        assert!(v.verify(&signed(&skewed)).is_ok());
    }
}
