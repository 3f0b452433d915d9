//! TURN REST credentials (draft-uberti-behave-turn-rest, coturn's `use-auth-secret`): username
//! `<unix-expiry>:<identity>`, password `base64(HMAC-SHA1(secret, username))`. Every node mints and
//! verifies them from the secrets in the store; the previous secret stays valid for a grace period
//! after a rotation.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Longest identity put in a username, in bytes.
pub const IDENTITY_BYTES_MAX: usize = 256;

/// The shared secrets as the relay sees them (the store's record, converted at the edge).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TurnSecrets {
    /// Secret new credentials are signed with.
    pub current: String,
    /// Secret before the last rotation.
    pub previous: Option<String>,
    /// When `current` became current (ms since the Unix epoch).
    pub rotated_at_ms: u64,
}

impl std::fmt::Debug for TurnSecrets {
    // Secrets never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnSecrets")
            .field("rotated_at_ms", &self.rotated_at_ms)
            .finish_non_exhaustive()
    }
}

impl TurnSecrets {
    /// The secrets a credential may be signed with at `now_ms`: the current one, and the previous
    /// one until `rotated_at_ms + grace_ms`.
    pub fn valid_at(&self, now_ms: u64, grace_ms: u64) -> impl Iterator<Item = &str> {
        let previous = self
            .previous
            .as_deref()
            .filter(|_| now_ms < self.rotated_at_ms.saturating_add(grace_ms));
        std::iter::once(self.current.as_str())
            .filter(|s| !s.is_empty())
            .chain(previous)
    }
}

/// A minted credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// `<unix-expiry>:<identity>`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").finish_non_exhaustive()
    }
}

/// Mints a credential for `identity` valid until `expires_at_s` (Unix seconds).
pub fn mint(secret: &str, identity: &str, expires_at_s: u64) -> Credential {
    let username = format!("{expires_at_s}:{identity}");
    let password = password(secret, &username);
    Credential { username, password }
}

/// `base64(HMAC-SHA1(secret, username))`.
pub fn password(secret: &str, username: &str) -> String {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Why a username is refused before any key is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameError {
    /// Not `<unix-expiry>:<identity>`.
    Malformed,
    /// The expiry has passed.
    Expired,
}

/// Splits `<unix-expiry>:<identity>` and checks the expiry against `now_s`.
pub fn parse_username(username: &str, now_s: u64) -> Result<(u64, &str), UsernameError> {
    let (expiry, identity) = username.split_once(':').ok_or(UsernameError::Malformed)?;
    let expiry: u64 = expiry.parse().map_err(|_| UsernameError::Malformed)?;
    if identity.is_empty() || identity.len() > IDENTITY_BYTES_MAX {
        return Err(UsernameError::Malformed);
    }
    if expiry <= now_s {
        return Err(UsernameError::Expired);
    }
    Ok((expiry, identity))
}

/// The identity in `username` and the long-term keys (RFC 8489 §9.2.2,
/// `MD5(username:realm:password)`) a request from it may be signed with: one per secret still
/// valid at `now_ms`.
pub fn long_term_keys<'a>(
    secrets: &TurnSecrets,
    grace_ms: u64,
    username: &'a str,
    realm: &str,
    now_ms: u64,
) -> Result<(&'a str, Vec<Vec<u8>>), UsernameError> {
    let (_, identity) = parse_username(username, now_ms / 1000)?;
    let keys = secrets
        .valid_at(now_ms, grace_ms)
        .map(|secret| turn::auth::generate_auth_key(username, realm, &password(secret, username)))
        .collect();
    Ok((identity, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_matches_coturn_rest_form() {
        // Same construction as coturn's turnutils_uclient -W (HMAC-SHA1, standard base64).
        let c = mint("secret", "alice", 1_700_000_000);
        assert_eq!(c.username, "1700000000:alice");
        assert_eq!(c.password, password("secret", "1700000000:alice"));
        assert_eq!(c.password.len(), 28);
        // Computed independently: printf %s 1700000000:alice | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(c.password, "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
    }

    #[test]
    fn previous_secret_valid_only_during_grace() {
        let s = TurnSecrets {
            current: "new".into(),
            previous: Some("old".into()),
            rotated_at_ms: 10_000,
        };
        assert_eq!(s.valid_at(10_500, 1_000).collect::<Vec<_>>(), ["new", "old"]);
        assert_eq!(s.valid_at(11_000, 1_000).collect::<Vec<_>>(), ["new"]);
    }

    #[test]
    fn usernames_are_checked() {
        assert_eq!(parse_username("100:bob", 50), Ok((100, "bob")));
        assert_eq!(parse_username("100:bob:x", 50), Ok((100, "bob:x")));
        assert_eq!(parse_username("100:bob", 100), Err(UsernameError::Expired));
        assert_eq!(parse_username("bob", 1), Err(UsernameError::Malformed));
        assert_eq!(parse_username("x:bob", 1), Err(UsernameError::Malformed));
        assert_eq!(parse_username("100:", 1), Err(UsernameError::Malformed));
    }
}
