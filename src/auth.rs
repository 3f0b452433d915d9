//! Access tokens: JWT HS256 with claims `sub`, `room` (or `*`), `grants` and `exp`.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A token longer than this is refused before it is parsed.
pub const TOKEN_BYTES_MAX: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    #[serde(default)]
    pub publish: bool,
    #[serde(default)]
    pub subscribe: bool,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub room: String,
    pub grants: Grants,
    pub exp: u64,
    /// Where the client would like new rooms placed (`seoul`, `busan`), after the
    /// `x-region-preference` and `x-korean-region` headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Publish,
    Subscribe,
    Admin,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed Authorization header")]
    MalformedHeader,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token lacks the {0:?} grant")]
    MissingGrant(Grant),
    #[error("token is not valid for this room")]
    WrongRoom,
}

impl AuthError {
    /// 401 for who-are-you failures, 403 for you-may-not.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::MissingGrant(_) | AuthError::WrongRoom)
    }
}

#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenKeys {
    pub fn new(secret: &str) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    pub fn create(&self, identity: &str, room: &str, grants: Grants, ttl: Duration) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let claims = Claims {
            sub: identity.to_string(),
            room: room.to_string(),
            grants,
            exp,
            region: None,
        };
        // Encoding HS256 claims with an HMAC key has no failure mode but allocation.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims")
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::Invalid("token too long".into()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })
    }

    /// Verifies a token and checks that it grants `grant` on `room` (`None`: any room).
    pub fn authorize(&self, token: &str, grant: Grant, room: Option<&str>) -> Result<Claims, AuthError> {
        let claims = self.verify(token)?;
        self.check(&claims, grant, room)?;
        Ok(claims)
    }

    /// Checks that verified claims grant `grant` on `room` (`None`: any room).
    pub fn check(&self, claims: &Claims, grant: Grant, room: Option<&str>) -> Result<(), AuthError> {
        let granted = match grant {
            Grant::Publish => claims.grants.publish,
            Grant::Subscribe => claims.grants.subscribe,
            Grant::Admin => claims.grants.admin,
        };
        if !granted {
            return Err(AuthError::MissingGrant(grant));
        }
        if let Some(room) = room
            && claims.room != "*"
            && claims.room != room
        {
            return Err(AuthError::WrongRoom);
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(AuthError::MalformedHeader)?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// Parses durations like `90s`, `15m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60)?,
        "h" => number.checked_mul(3_600)?,
        "d" => number.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_rooms_and_expiry() {
        let keys = TokenKeys::new("0123456789abcdef0123456789abcdef");
        let token = keys.create(
            "alice",
            "live",
            Grants {
                publish: true,
                ..Default::default()
            },
            Duration::from_secs(60),
        );
        assert_eq!(
            keys.authorize(&token, Grant::Publish, Some("live")).expect("valid").sub,
            "alice"
        );
        assert_eq!(
            keys.authorize(&token, Grant::Subscribe, Some("live")),
            Err(AuthError::MissingGrant(Grant::Subscribe))
        );
        assert_eq!(
            keys.authorize(&token, Grant::Publish, Some("other")),
            Err(AuthError::WrongRoom)
        );
        let other = TokenKeys::new("another-secret-of-enough-length");
        assert!(matches!(other.verify(&token), Err(AuthError::Invalid(_))));
        // Just expired is within the 5 s leeway and still verifies; an hour old does not.
        let expired = keys.create("bob", "*", Grants::default(), Duration::ZERO);
        let mut old = keys.verify(&expired).expect("within leeway");
        old.exp -= 3_600;
        let old_token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &keys.encoding).expect("encode");
        assert_eq!(keys.verify(&old_token), Err(AuthError::Expired));
        assert!(keys.verify("not.a.jwt").is_err());
    }

    #[test]
    fn headers_and_ttls() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::MalformedHeader));
        assert_eq!(parse_ttl("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_ttl("h"), None);
        assert_eq!(parse_ttl("10x"), None);
    }
}
