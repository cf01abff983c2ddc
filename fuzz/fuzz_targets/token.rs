//! Access tokens: any string given as a token is refused or accepted without a panic, and never
//! accepted unless it is one we minted (a signature cannot be guessed); a minted token, changed
//! anywhere, is refused or still carries exactly the claims it was minted with.
//!
//! Input: a text; its first line (if any) is an identity and grants to mint with, the whole of it
//! a token to verify.
#![no_main]

use std::time::Duration;

use ferry::auth::{Grants, TokenError, Verifier, mint};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let v = Verifier::new("k", SECRET);
    match v.verify(text) {
        // The fuzzer cannot sign: only a token minted here verifies (none is in the corpus that
        // has not expired, and a refusal says why).
        Ok(c) => panic!("accepted a token nobody minted now: {c:?}"),
        Err(e) => assert_ne!(e, TokenError::Missing),
    }

    let (line, _) = text.split_once('\n').unwrap_or((text, ""));
    let flags = line.bytes().fold(0u8, |a, b| a.rotate_left(1) ^ b);
    let grants = Grants {
        room: (flags & 1 != 0).then(|| line.chars().rev().collect()),
        create: flags & 2 != 0,
        publish: flags & 4 != 0,
        subscribe: flags & 8 != 0,
        relay_only: flags & 16 != 0,
    };
    let token = mint("k", SECRET, line, Duration::from_secs(60), grants.clone()).unwrap();
    let claims = match v.verify(&token) {
        Ok(c) => {
            assert!(!line.is_empty() && line.len() <= 256, "{line:?}");
            assert_eq!((c.sub.as_str(), &c.grants), (line, &grants));
            c
        }
        Err(e) => {
            assert_eq!(e, TokenError::Malformed);
            assert!(line.is_empty() || line.len() > 256, "{line:?}");
            return;
        }
    };
    // Other keys and secrets are refused.
    assert_eq!(
        Verifier::new("k2", SECRET).verify(&token).unwrap_err(),
        TokenError::UnknownKey
    );
    assert_eq!(
        Verifier::new("k", "fedcba9876543210fedcba9876543210")
            .verify(&token)
            .unwrap_err(),
        TokenError::BadSignature
    );
    // One character changed, wherever: refused, or (base64's spare bits) the same claims.
    let at = usize::from(flags) * 7 % token.len();
    let mut changed = token.clone().into_bytes();
    changed[at] = match changed[at] {
        b'A' => b'B',
        b'.' => b'A',
        _ => b'A',
    };
    let changed = String::from_utf8(changed).unwrap();
    if let Ok(c) = v.verify(&changed) {
        assert_eq!(
            (c.sub, c.grants, c.exp),
            (claims.sub, claims.grants, claims.exp)
        );
    }
});
