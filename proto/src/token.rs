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
    sign_payload(secret, &format!("v1.{}.{expires_unix_s}", user.0))
}

/// `payload.signature` for any payload, as written: for tests that need a
/// correctly signed token in a form [`verify`] refuses (`+ID`, `000ID`).
pub fn sign_payload(secret: &[u8], payload: &str) -> String {
    let sig = hex::encode(mac(secret, payload).finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// Longest token accepted: a canonical one is at most 113 bytes.
pub const TOKEN_BYTES_MAX: usize = 256;

/// Checks a token's signature (in constant time) and expiry against
/// `now_unix_s`; returns the user it names. Only the canonical form that
/// [`mint`] writes is accepted: decimal numbers without sign or leading
/// zeros, a lowercase hex signature of 64 digits. So one user and expiry
/// have exactly one token string, whatever the signer's parser would take.
pub fn verify(secret: &[u8], token: &str, now_unix_s: u64) -> Result<UserId, TokenError> {
    check(secret, token, now_unix_s, true)
}

/// [`verify`] as it was before it insisted on the canonical form: `+ID`,
/// `000ID` and an uppercase signature were the same user. Kept only for
/// the server's `lenient_tokens` bug switch (a regression test).
pub fn verify_lenient(secret: &[u8], token: &str, now_unix_s: u64) -> Result<UserId, TokenError> {
    check(secret, token, now_unix_s, false)
}

fn check(
    secret: &[u8],
    token: &str,
    now_unix_s: u64,
    canonical: bool,
) -> Result<UserId, TokenError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(TokenError::Malformed);
    }
    let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut parts = payload.split('.');
    let (Some("v1"), Some(user), Some(expires), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let number = |text: &str| -> Result<u64, TokenError> {
        let n: u64 = text.parse().map_err(|_| TokenError::Malformed)?;
        if canonical && n.to_string() != text {
            return Err(TokenError::Malformed);
        }
        Ok(n)
    };
    let user = number(user)?;
    let expires = number(expires)?;
    if canonical
        && (sig.len() != 64 || sig.bytes().any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err(TokenError::Malformed);
    }
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

    /// Signs a payload as the auth service would, whatever its form.
    fn signed(secret: &[u8], payload: &str) -> String {
        let sig = hex::encode(mac(secret, payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    #[test]
    fn only_the_canonical_form_of_a_token_is_accepted() {
        let canonical = mint(b"k", UserId(1001), 2_000);
        assert_eq!(verify(b"k", &canonical, 1_000), Ok(UserId(1001)));
        let upper = {
            let (payload, sig) = canonical.rsplit_once('.').unwrap();
            format!("{payload}.{}", sig.to_uppercase())
        };
        for t in [
            signed(b"k", "v1.+1001.2000"),
            signed(b"k", "v1.0001001.2000"),
            signed(b"k", "v1.1001.02000"),
            upper,
        ] {
            assert_eq!(verify(b"k", &t, 1_000), Err(TokenError::Malformed), "{t}");
            assert_eq!(
                verify_lenient(b"k", &t, 1_000),
                Ok(UserId(1001)),
                "the lenient parser (the bug) took {t}"
            );
        }
        let long = format!("{canonical}{}", "0".repeat(TOKEN_BYTES_MAX));
        assert_eq!(verify(b"k", &long, 1_000), Err(TokenError::Malformed));
    }
}
