//! Access-token parsing and verification (`signaling/src/tokens.rs`), as
//! the WebSocket upgrade checks the `token` query parameter
//! (`ws_device::TokenCheck`).
//!
//! The first byte picks the input's form: even, the rest is the token text
//! as it arrives; odd, the rest is read (with `arbitrary`) as a header and
//! claims that are then signed with the server's key, so the checks behind
//! the signature (lifetime, identity, room grants) are reached too.
//!
//! Invariants: a token is refused with a value or verified into a
//! credential that is unexpired, not from the future beyond the allowed
//! skew, with a valid identity and exactly the rooms it names; a guest
//! link's identity is numbered. Nothing unsigned by the key is accepted.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fleetcall_signaling::service::unix_now;
use fleetcall_signaling::tokens::{AccessTokens, MAX_TOKEN_BYTES};
use fleetcall_signaling::ws_device::TokenCheck;

const SECRET: &[u8; 32] = b"fuzz-signing-key-0123456789abcde";

fn check() -> &'static (AccessTokens, TokenCheck) {
    static CHECK: OnceLock<(AccessTokens, TokenCheck)> = OnceLock::new();
    CHECK.get_or_init(|| {
        let tokens = AccessTokens::from_secret(SECRET);
        (tokens.clone(), TokenCheck::new(tokens))
    })
}

/// A header and claims to sign. Times are offsets from now, so inputs keep
/// their meaning on any day.
#[derive(Debug, Arbitrary)]
pub struct Forged {
    header: Header,
    /// None: the right issuer.
    iss: Option<String>,
    sub: String,
    iat: i32,
    exp: i32,
    jti: String,
    rooms: Option<Vec<String>>,
    publish: Option<bool>,
    subscribe: Option<bool>,
    guest: Option<bool>,
    /// Replaces a claim's value with JSON of another type.
    retype: Option<(u8, i64)>,
    tab: Option<String>,
}

#[derive(Debug, Arbitrary)]
enum Header {
    Hs256,
    Hs512,
    None,
    Rs256,
    Raw(String),
}

impl Forged {
    fn token(&self, now: u64) -> String {
        let header = match &self.header {
            Header::Hs256 => r#"{"alg":"HS256","typ":"JWT"}"#.to_owned(),
            Header::Hs512 => r#"{"alg":"HS512","typ":"JWT"}"#.to_owned(),
            Header::None => r#"{"alg":"none"}"#.to_owned(),
            Header::Rs256 => r#"{"alg":"RS256"}"#.to_owned(),
            Header::Raw(raw) => raw.clone(),
        };
        let at = |offset: i32| now.saturating_add_signed(i64::from(offset));
        let mut claims = serde_json::json!({
            "iss": self.iss.clone().unwrap_or_else(|| "fleetcall".into()),
            "sub": self.sub,
            "iat": at(self.iat),
            "exp": at(self.exp),
            "jti": self.jti,
        });
        let object = claims.as_object_mut().expect("an object");
        if let Some(rooms) = &self.rooms {
            object.insert("rooms".into(), rooms.clone().into());
        }
        for (name, value) in [("publish", self.publish), ("subscribe", self.subscribe), ("guest", self.guest)] {
            if let Some(value) = value {
                object.insert(name.into(), value.into());
            }
        }
        if let Some((which, value)) = self.retype {
            let names = ["iss", "sub", "iat", "exp", "jti", "rooms", "publish", "guest"];
            object.insert(names[usize::from(which) % names.len()].into(), value.into());
        }
        let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
        let tag = ring::hmac::sign(&key, signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }
}

/// Runs one input (see the module docs).
pub fn run(data: &[u8]) {
    let Some((&form, rest)) = data.split_first() else { return };
    let now = unix_now();
    let (token, tab, forged) = if form % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        (text.to_owned(), None, None)
    } else {
        let Ok(forged) = Forged::arbitrary_take_rest(Unstructured::new(rest)) else { return };
        (forged.token(now), forged.tab.clone(), Some(forged))
    };
    let (tokens, check) = check();
    let verified = tokens.verify(&token, now);
    if let Ok(v) = &verified {
        let c = &v.credential;
        assert!(token.len() <= MAX_TOKEN_BYTES, "an oversize token was accepted");
        assert!(c.expires_at > now, "an expired token was accepted: {c:?}");
        assert!(c.issued_at <= now + 60, "a token from the future was accepted: {c:?}");
        assert_eq!(c.identity.as_str(), c.subject, "the identity is not the token's subject");
        if let Some(f) = &forged {
            assert!(matches!(f.header, Header::Hs256 | Header::Raw(_)), "a token signed with another algorithm was accepted: {:?}", f.header);
            assert_eq!(c.grant.rooms.len(), f.rooms.as_ref().map_or(0, Vec::len), "room grants lost or invented");
        }
    }
    // The upgrade path agrees with `verify` (it adds only guest numbering).
    match (check.check(Some(&token), tab.as_deref()), &verified) {
        (Ok(credential), Ok(v)) if v.guest => {
            assert!(credential.identity.as_str().starts_with(&format!("{} #", v.credential.subject)), "guest not numbered: {credential:?}");
        }
        (Ok(credential), Ok(v)) => assert_eq!(credential, v.credential),
        (Err(_), Err(_)) => {}
        // The guest's numbered identity may be too long for a device id.
        // The guest's numbered identity may be too long for a device id, and
        // the upgrade reads the clock again: a second may have passed.
        (Err(refusal), Ok(v)) => {
            assert!(v.guest || v.credential.expires_at <= unix_now(), "the upgrade refused a verified token: {refusal:?}");
        }
        (Ok(_), Err(e)) => panic!("the upgrade accepted a token verify refused ({e})"),
    }
}
