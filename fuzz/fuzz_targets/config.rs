//! The TOML configuration file: any text parsed as the file and merged over the defaults (no
//! flags). No panic; a configuration that is accepted holds what validation promises, and the
//! same text always gives the same answer.
#![no_main]

use ferry::config::{Config, FileConfig, MAX_MEDIA_SHARDS, ServeArgs, parse_duration};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_duration("fuzz", text);
    let Ok(file) = toml::from_str::<FileConfig>(text) else {
        return;
    };
    let shards_given = file.media_shards;
    let result = Config::merge(&ServeArgs::default(), file);
    let again = Config::merge(
        &ServeArgs::default(),
        toml::from_str::<FileConfig>(text).unwrap(),
    );
    assert_eq!(
        format!("{:?}", result.as_ref().map_err(|e| e.to_string())),
        format!("{:?}", again.as_ref().map_err(|e| e.to_string()))
    );
    let Ok(c) = result else {
        return;
    };
    assert!((1..=MAX_MEDIA_SHARDS).contains(&c.media_shards));
    assert!(shards_given.is_none_or(|n| n == 0 || n == c.media_shards));
    assert!(
        c.media_listen.port() == 0
            || usize::from(c.media_listen.port()) + c.media_shards - 1 <= 65535
    );
    assert!(c.max_room_peers >= 2);
    assert!(c.max_connections >= 1);
    assert!((1024..=16 * 1024 * 1024).contains(&c.max_message_bytes));
    assert!(c.rate_limit >= 1 && c.rate_burst >= 1);
    assert!(!c.ping_interval.is_zero() && c.ping_timeout > c.ping_interval);
    assert!(!c.hello_timeout.is_zero() && !c.p2p_timeout.is_zero());
    assert!(c.announce.iter().all(|a| !a.is_unspecified()));
    assert!(!c.srtp_profiles.is_empty());
    if let Some((key, secret)) = &c.api {
        assert!(!key.is_empty() && secret.len() >= 32);
    }
    for t in &c.turn_servers {
        assert!(!t.secret.is_empty() && !t.ttl.is_zero() && !t.urls.is_empty());
    }
    let schemes = ["stun:", "stuns:", "turn:", "turns:"];
    for urls in c
        .ice_servers
        .iter()
        .map(|s| &s.urls)
        .chain(c.turn_servers.iter().map(|t| &t.urls))
    {
        assert!(!urls.is_empty());
        assert!(
            urls.iter()
                .all(|u| schemes.iter().any(|s| u.starts_with(s))),
            "{urls:?}"
        );
    }
    assert!(
        c.allowed_origins
            .iter()
            .all(|o| !o.is_empty() && !o.ends_with('/') && *o == o.to_ascii_lowercase())
    );
});
