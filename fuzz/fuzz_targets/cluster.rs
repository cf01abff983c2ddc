//! What crosses between the nodes of a cluster, and what a client can present to them: a signed
//! resume token is read only when this cluster signed it, and then names exactly the node and
//! user it was signed for; anything changed in a signed token is refused or still names them
//! (the MAC covers them); an `attach` message is read or refused without a panic.
//!
//! Input: a text; as a token to read, as an attach message, and its first line as a node and
//! user (split at the first space) to sign for.
#![no_main]

use ferry::cluster::{link, token};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The fuzzer cannot compute the MAC: nothing it makes up is read.
    assert_eq!(token::read(SECRET, text), None, "read a token nobody signed: {text:?}");
    if let Ok(a) = link::read_attach(text) {
        assert_eq!(a.ty, "attach");
        assert!(!a.user_id.is_empty() && a.user_id.len() <= 64);
    }

    let (line, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (node, user) = line.split_once(' ').unwrap_or((line, "u-x"));
    if node.is_empty() || user.is_empty() || node.contains('~') || user.contains('~') {
        return;
    }
    let signed = token::sign(SECRET, node, user, "r4nd0m");
    assert_eq!(token::read(SECRET, &signed), Some((node, user)));
    assert_eq!(token::read("another-cluster-secret", &signed), None);
    // Changed at one place (by the rest of the input): refused, or the same node and user.
    if let Some(b) = rest.bytes().next() {
        let at = usize::from(b) % signed.len();
        let mut changed = signed.clone().into_bytes();
        changed[at] ^= 1 + (b % 7);
        if let Ok(changed) = String::from_utf8(changed)
            && let Some(got) = token::read(SECRET, &changed)
        {
            assert_eq!(got, (node, user), "{changed:?}");
        }
    }
});
