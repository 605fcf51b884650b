//! Access tokens for WebSocket clients (browsers, devices without a
//! certificate): signed, expiring JWTs (HS256) carrying an identity and a
//! [`Grant`].
//!
//! The signing key is 32 random bytes created in the PKI directory on first
//! use (`token-signing.key`, mode 0600); there is no default key. Time is an
//! argument (Unix seconds): expiry is checked here against the caller's
//! clock, not by the JWT library's.
//!
//! Claims: `iss` = `fleetcall`, `sub` (identity shown to others), `iat`,
//! `exp`, `jti` (random; "the same token" means the same `jti`), `rooms`
//! (names or `prefix*`), `publish`, `subscribe`, and `guest` (demo links:
//! each connection gets its own numbered identity, `sub #n`).

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::grants::{Credential, CredentialKey, Grant, RoomPattern};
use crate::ids::DeviceId;
use crate::pki::{self, PkiError};

/// Issuer claim of every token.
const ISSUER: &str = "fleetcall";
/// Longest lifetime a token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(400 * 24 * 3600);
/// Longest token accepted, in bytes (a token is a URL query parameter).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a token was refused or could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a JWT of ours (shape, encoding, algorithm, issuer, claims).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match: forged, or signed by another server.
    #[error("token signature is not valid")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {0} (Unix seconds)")]
    Expired(u64),
    /// Issued in the future (clock skew, or forged).
    #[error("token is not valid before {0} (Unix seconds)")]
    NotYetValid(u64),
    /// The identity is not a valid device id.
    #[error("invalid identity {0:?}")]
    InvalidIdentity(String),
    /// A room pattern is not valid.
    #[error("invalid room grant {0:?}")]
    InvalidRoom(String),
    /// A lifetime of zero or beyond [`MAX_TTL`].
    #[error("token lifetime must be between 1 s and {} days", MAX_TTL.as_secs() / 86_400)]
    InvalidTtl,
}

/// What to put in a new token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Identity shown to others (the token's subject).
    pub identity: String,
    /// Lifetime from now.
    pub ttl: Duration,
    /// Rooms and media rights.
    pub grant: Grant,
    /// A demo link: every connection gets its own identity `identity #n`.
    pub guest: bool,
}

/// A genuine, unexpired token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The credential it proves (for a guest link, the transport numbers the
    /// identity per connection).
    pub credential: Credential,
    /// A demo link (see [`TokenRequest::guest`]).
    pub guest: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(default)]
    rooms: Vec<String>,
    publish: bool,
    subscribe: bool,
    #[serde(default)]
    guest: bool,
}

/// Mints and verifies access tokens with the installation's signing key.
#[derive(Clone)]
pub struct AccessTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessTokens(..)")
    }
}

impl AccessTokens {
    /// Opens (or creates) the signing key in the PKI directory `dir`.
    pub fn open_or_init(dir: &Path) -> Result<AccessTokens, PkiError> {
        let path = dir.join("token-signing.key");
        if !path.exists() {
            pki::write_private(&path, &pki::random_bytes::<32>()?)?;
        }
        let secret = pki::read(&path)?;
        if secret.len() < 32 {
            return Err(PkiError::Certificate(format!("{}: signing key shorter than 32 bytes", path.display())));
        }
        Ok(AccessTokens::from_secret(&secret))
    }

    /// Tokens signed with `secret` (tests; servers use [`Self::open_or_init`]).
    pub fn from_secret(secret: &[u8]) -> AccessTokens {
        AccessTokens {
            // HMAC keys of any length are valid.
            encoding: EncodingKey::from_secret(secret).expect("HMAC key"),
            decoding: DecodingKey::from_secret(secret).expect("HMAC key"),
        }
    }

    /// A new token, issued at `now` (Unix seconds).
    pub fn mint(&self, request: &TokenRequest, now: u64) -> Result<String, TokenError> {
        DeviceId::new(request.identity.clone()).map_err(|_| TokenError::InvalidIdentity(request.identity.clone()))?;
        if request.ttl.is_zero() || request.ttl > MAX_TTL {
            return Err(TokenError::InvalidTtl);
        }
        let jti: String = pki::random_bytes::<16>()
            .map_err(|e| TokenError::Malformed(e.to_string()))?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: request.identity.clone(),
            iat: now,
            exp: now + request.ttl.as_secs().max(1),
            jti,
            rooms: request.grant.rooms.iter().map(ToString::to_string).collect(),
            publish: request.grant.publish,
            subscribe: request.grant.subscribe,
            guest: request.guest,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }

    /// Checks a token's signature and lifetime at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // Lifetime is checked below against the caller's clock.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[ISSUER]);
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed(e.to_string()),
            })?
            .claims;
        if now >= claims.exp {
            return Err(TokenError::Expired(claims.exp));
        }
        // A minute of skew between the minting and the checking clock.
        if claims.iat > now + 60 {
            return Err(TokenError::NotYetValid(claims.iat));
        }
        let identity = DeviceId::new(claims.sub.clone()).map_err(|_| TokenError::InvalidIdentity(claims.sub.clone()))?;
        let rooms = claims
            .rooms
            .iter()
            .map(|r| RoomPattern::parse(r).map_err(|_| TokenError::InvalidRoom(r.clone())))
            .collect::<Result<_, _>>()?;
        Ok(VerifiedToken {
            credential: Credential {
                identity,
                subject: claims.sub,
                key: CredentialKey::digest(format!("token:{}", claims.jti).as_bytes()),
                issued_at: claims.iat,
                expires_at: claims.exp,
                grant: Grant { rooms, publish: claims.publish, subscribe: claims.subscribe },
            },
            guest: claims.guest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn request(identity: &str, rooms: &[&str]) -> TokenRequest {
        TokenRequest {
            identity: identity.into(),
            ttl: Duration::from_secs(3600),
            grant: Grant {
                rooms: rooms.iter().map(|r| RoomPattern::parse(r).unwrap()).collect(),
                publish: true,
                subscribe: true,
            },
            guest: false,
        }
    }

    #[test]
    fn a_token_carries_its_identity_and_grant() {
        let tokens = AccessTokens::from_secret(b"0123456789abcdef0123456789abcdef");
        let token = tokens.mint(&request("Nurse A", &["ward-3", "lab-*"]), NOW).unwrap();
        let verified = tokens.verify(&token, NOW + 10).unwrap();
        assert_eq!(verified.credential.identity.as_str(), "Nurse A");
        assert_eq!(verified.credential.subject, "Nurse A");
        assert_eq!(verified.credential.issued_at, NOW);
        assert_eq!(verified.credential.expires_at, NOW + 3600);
        assert_eq!(verified.credential.grant.rooms.len(), 2);
        assert!(verified.credential.grant.publish && !verified.guest);
        // The same token is the same credential; another token is not.
        assert_eq!(tokens.verify(&token, NOW).unwrap().credential.key, verified.credential.key);
        let other = tokens.mint(&request("Nurse A", &["ward-3"]), NOW).unwrap();
        assert_ne!(tokens.verify(&other, NOW).unwrap().credential.key, verified.credential.key);
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let tokens = AccessTokens::from_secret(b"0123456789abcdef0123456789abcdef");
        let token = tokens.mint(&request("kiosk-3", &[]), NOW).unwrap();
        assert_eq!(tokens.verify(&token, NOW + 3600), Err(TokenError::Expired(NOW + 3600)));
        assert_eq!(tokens.verify(&token, NOW - 3600), Err(TokenError::NotYetValid(NOW)));
        let foreign = AccessTokens::from_secret(b"another installation's key......");
        assert_eq!(foreign.verify(&token, NOW), Err(TokenError::BadSignature));
        // A payload edited to another identity no longer matches its signature.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = {
            use base64::Engine;
            let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let json = String::from_utf8(engine.decode(parts[1]).unwrap()).unwrap();
            engine.encode(json.replace("kiosk-3", "bed-12"))
        };
        let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(tokens.verify(&forged, NOW), Err(TokenError::BadSignature));
        for junk in ["", "a.b.c", "not a token", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(matches!(tokens.verify(junk, NOW), Err(TokenError::Malformed(_))), "{junk:?}");
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let tokens = AccessTokens::from_secret(b"0123456789abcdef0123456789abcdef");
        assert!(matches!(tokens.mint(&request("", &[]), NOW), Err(TokenError::InvalidIdentity(_))));
        let mut long = request("a", &[]);
        long.ttl = MAX_TTL + Duration::from_secs(1);
        assert_eq!(tokens.mint(&long, NOW), Err(TokenError::InvalidTtl));
        long.ttl = Duration::ZERO;
        assert_eq!(tokens.mint(&long, NOW), Err(TokenError::InvalidTtl));
    }

    #[test]
    fn the_signing_key_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fleetcall-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let first = AccessTokens::open_or_init(&dir).unwrap();
        let token = first.mint(&request("kiosk-3", &[]), NOW).unwrap();
        let mode = std::fs::metadata(dir.join("token-signing.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(AccessTokens::open_or_init(&dir).unwrap().verify(&token, NOW).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
