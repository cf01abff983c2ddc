//! Resume tokens of a cluster node: `<node>~<user>~<random>~<mac>`, the MAC an HMAC-SHA256 of
//! the rest under `cluster_secret`. Any node can tell which node holds the session (and carry a
//! `resume` there) and, when that session is gone, give its user id back to the client that held
//! it (`hello` with `rejoin`), so that the other members keep their connections with it.

use base64::Engine;
use ring::hmac;

const MAC_BYTES: usize = 16;

fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

fn mac(secret: &str, body: &str) -> String {
    let tag = hmac::sign(&key(secret), body.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..MAC_BYTES])
}

/// A token for `user`'s session on `node`, `random` making it unique.
pub fn sign(secret: &str, node: &str, user: &str, random: &str) -> String {
    let body = format!("{node}~{user}~{random}");
    let m = mac(secret, &body);
    format!("{body}~{m}")
}

/// The node and user of a token this cluster signed; `None` for anything else.
pub fn read<'a>(secret: &str, token: &'a str) -> Option<(&'a str, &'a str)> {
    let (body, m) = token.rsplit_once('~')?;
    let mut parts = body.split('~');
    let (node, user, _random) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || node.is_empty() || user.is_empty() {
        return None;
    }
    let want = mac(secret, body);
    let same = want.len() == m.len()
        && want
            .bytes()
            .zip(m.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    same.then_some((node, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_node_and_user_and_cannot_be_forged() {
        let s = "0123456789abcdef";
        let t = sign(s, "n-1", "u-abc", "r4nd0m");
        assert_eq!(read(s, &t), Some(("n-1", "u-abc")));
        assert_eq!(read("another-secret-xx", &t), None, "another cluster's");
        let forged = t.replace("u-abc", "u-abd");
        assert_eq!(read(s, &forged), None, "a changed user id");
        assert_eq!(read(s, "Qm4xrandomtokenofonenode"), None);
        assert_eq!(read(s, "a~b~c~d~e"), None);
        assert_eq!(read(s, ""), None);
    }
}
