//! Signed login tokens (hardened profile).
//!
//! A token names a user and an expiry and is signed with HMAC-SHA256 under
//! a secret shared by the servers (and, for development, `im-client
//! --auth-secret`): `v1.<user_id>.<expires_unix_s>.<hex signature>`, where
//! the signature covers `v1.<user_id>.<expires_unix_s>`. The server takes
//! the user id from a valid token and ignores `Login.user_id`.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::UserId;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired at {expired_at} (now {now})")]
    Expired { expired_at: u64, now: u64 },
    #[error("token names user 0")]
    NoUser,
}

fn mac(secret: &[u8], payload: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(payload.as_bytes());
    mac
}

/// Signs a token for `user`, valid until `expires_unix_s`.
pub fn mint(secret: &[u8], user: UserId, expires_unix_s: u64) -> String {
    let payload = format!("v1.{}.{expires_unix_s}", user.0);
    let sig = hex::encode(mac(secret, &payload).finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// Checks a token's signature (in constant time) and expiry against
/// `now_unix_s`; returns the user it names.
pub fn verify(secret: &[u8], token: &str, now_unix_s: u64) -> Result<UserId, TokenError> {
    let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut parts = payload.split('.');
    let (Some("v1"), Some(user), Some(expires), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let user: u64 = user.parse().map_err(|_| TokenError::Malformed)?;
    let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    let sig = hex::decode(sig).map_err(|_| TokenError::Malformed)?;
    mac(secret, payload)
        .verify_slice(&sig)
        .map_err(|_| TokenError::BadSignature)?;
    if expires <= now_unix_s {
        return Err(TokenError::Expired {
            expired_at: expires,
            now: now_unix_s,
        });
    }
    if user == 0 {
        return Err(TokenError::NoUser);
    }
    Ok(UserId(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_to_its_user() {
        let t = mint(b"s3cret", UserId(1001), 2_000);
        assert_eq!(verify(b"s3cret", &t, 1_000), Ok(UserId(1001)));
    }

    #[test]
    fn the_wrong_secret_is_refused() {
        let t = mint(b"s3cret", UserId(1001), 2_000);
        assert_eq!(verify(b"other", &t, 1_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_changed_user_is_refused() {
        let t = mint(b"s3cret", UserId(1001), 2_000).replacen("1001", "1002", 1);
        assert_eq!(verify(b"s3cret", &t, 1_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let t = mint(b"s3cret", UserId(1001), 2_000);
        assert!(matches!(
            verify(b"s3cret", &t, 2_000),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        for t in [
            "",
            "v1",
            "v1.1.2",
            "v2.1.2.ab",
            "v1.x.2.ab",
            "v1.1.2.zz",
            "v1.1.2.3.ab",
        ] {
            assert_eq!(verify(b"k", t, 0), Err(TokenError::Malformed), "{t:?}");
        }
    }
}
