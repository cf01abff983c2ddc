//! The ICE servers a session is given in its welcome: Ferry's own STUN on the media port, the
//! configured static servers, and TURN servers with per-session credentials (TURN REST scheme:
//! username `<expiry unix time>:<userId>`, credential base64(HMAC-SHA1(secret, username)), as
//! coturn checks with `use-auth-secret`).

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{Value, json};

use crate::config::{Config, TurnServer};

pub fn stun_url(addr: SocketAddr) -> String {
    format!("stun:{addr}")
}

/// TURN REST credentials valid until `now + ttl`.
pub fn turn_credentials(turn: &TurnServer, user_id: &str, now: SystemTime) -> (String, String) {
    let expiry = now.duration_since(UNIX_EPOCH).unwrap_or_default() + turn.ttl;
    let username = format!("{}:{user_id}", expiry.as_secs());
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        turn.secret.as_bytes(),
    );
    let tag = ring::hmac::sign(&key, username.as_bytes());
    let credential = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    (username, credential)
}

/// The `iceServers` value of a welcome.
pub fn for_session(config: &Config, media_addrs: &[SocketAddr], user_id: &str) -> Value {
    let mut servers = Vec::new();
    if !media_addrs.is_empty() {
        let urls: Vec<String> = media_addrs.iter().map(|a| stun_url(*a)).collect();
        servers.push(json!({ "urls": urls }));
    }
    for s in &config.ice_servers {
        servers.push(serde_json::to_value(s).expect("ICE server serializes"));
    }
    let now = SystemTime::now();
    for t in &config.turn_servers {
        let (username, credential) = turn_credentials(t, user_id, now);
        servers.push(json!({ "urls": t.urls, "username": username, "credential": credential }));
    }
    Value::Array(servers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn turn_rest_credentials_match_the_published_scheme() {
        // Worked example computed independently: printf '1700003600:u-abc' |
        //   openssl dgst -sha1 -hmac 'north' -binary | base64
        let t = TurnServer {
            urls: vec!["turn:127.0.0.1:3478".into()],
            secret: "north".into(),
            ttl: Duration::from_secs(3600),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (user, cred) = turn_credentials(&t, "u-abc", now);
        assert_eq!(user, "1700003600:u-abc");
        assert_eq!(cred, EXPECTED);
    }

    const EXPECTED: &str = "9qRg7JCHoqvgmTX15PqkMrYLzGY=";

    #[test]
    fn welcome_lists_our_stun_first() {
        let cfg = Config::default();
        let v = for_session(&cfg, &["127.0.0.1:3478".parse().unwrap()], "u-1");
        assert_eq!(v, json!([{ "urls": ["stun:127.0.0.1:3478"] }]));
    }
}
