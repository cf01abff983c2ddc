//! A signaling frame as the session reads it: JSON, the envelope (`id`, `type`), the request type,
//! the request's fields; and the same text as an SDP through the grant check (which m-sections
//! send or receive media).
#![no_main]

use ferry::auth::Grants;
use ferry::fuzzing::check_sdp_grants;
use ferry::signal::protocol::{
    self, Bye, Candidate, CreateRoom, Empty, ErrorCode, Hello, JoinRoom, ReportMode, RequestType,
    Resume, Sdp, SetVideoQuality, SignalError, Subscription,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn grants(publish: bool, subscribe: bool) -> Grants {
    Grants {
        publish,
        subscribe,
        ..Grants::default()
    }
}

/// A request's fields into its type: a refusal is a `bad_request` that names the request type.
fn fields<T: serde::de::DeserializeOwned>(ty: RequestType, obj: Map<String, Value>) -> Option<T> {
    match protocol::fields::<T>(ty, obj) {
        Ok(v) => Some(v),
        Err(SignalError { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains(ty.as_str()), "{message}");
            None
        }
    }
}

fn frame(text: &str) {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let env = match protocol::envelope(value) {
        Ok(env) => env,
        Err((id, err)) => {
            assert_eq!(err.code, ErrorCode::BadRequest);
            // An id that comes back is one the client may be answered with.
            assert!(id.is_null() || id.is_number() || id.as_str().is_some_and(|s| s.len() <= 64));
            let _ = protocol::response_err(&id, &err);
            return;
        }
    };
    assert!(env.id.is_number() || env.id.as_str().is_some_and(|s| s.len() <= 64));
    assert!(!env.fields.contains_key("id") && !env.fields.contains_key("type"));
    let Some(ty) = RequestType::parse(&env.ty) else {
        return;
    };
    assert_eq!(ty.as_str(), env.ty, "the type's name goes both ways");
    let obj = env.fields;
    match ty {
        RequestType::Hello => drop(fields::<Hello>(ty, obj)),
        RequestType::Resume => drop(fields::<Resume>(ty, obj)),
        RequestType::Ping | RequestType::LeaveRoom | RequestType::GetRoom => {
            drop(fields::<Empty>(ty, obj))
        }
        RequestType::CreateRoom => drop(fields::<CreateRoom>(ty, obj)),
        RequestType::JoinRoom => drop(fields::<JoinRoom>(ty, obj)),
        RequestType::Offer | RequestType::Answer => {
            if let Some(s) = fields::<Sdp>(ty, obj) {
                sdp(&s.sdp);
            }
        }
        RequestType::Candidate => drop(fields::<Candidate>(ty, obj)),
        RequestType::Bye => drop(fields::<Bye>(ty, obj)),
        RequestType::ReportMode => drop(fields::<ReportMode>(ty, obj)),
        RequestType::Subscribe | RequestType::Unsubscribe => drop(fields::<Subscription>(ty, obj)),
        RequestType::SetVideoQuality => drop(fields::<SetVideoQuality>(ty, obj)),
    }
    let _ = protocol::response_ok(&env.id, Value::Object(Map::new()));
}

/// The grant check's properties, whatever the SDP.
fn sdp(text: &str) {
    let ok = |s: &str, publish, subscribe| check_sdp_grants(s, &grants(publish, subscribe)).is_ok();
    // Every grant: anything goes.
    assert!(ok(text, true, true));
    // Fewer grants never let more through.
    let none = ok(text, false, false);
    let (publish_only, subscribe_only) = (ok(text, true, false), ok(text, false, true));
    if none {
        assert!(publish_only && subscribe_only, "{text:?}");
    }
    for (publish, subscribe) in [(false, false), (true, false), (false, true)] {
        if let Err(e) = check_sdp_grants(text, &grants(publish, subscribe)) {
            assert_eq!(e.code, ErrorCode::Forbidden);
        }
    }
    // An m-section that sends after whatever came before is refused without `publish`; one that
    // receives, without `subscribe`.
    let sends = format!("{text}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\n");
    assert!(!ok(&sends, false, true), "{sends:?}");
    assert!(ok(&sends, true, false) == publish_only, "{sends:?}");
    let receives = format!("{text}\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n");
    assert!(!ok(&receives, true, false), "{receives:?}");
    assert!(ok(&receives, false, true) == subscribe_only, "{receives:?}");
    // A disabled m-section (port 0) or a data channel changes nothing.
    for tail in [
        "\r\nm=video 0 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n",
        "\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n",
    ] {
        let more = format!("{text}{tail}");
        assert_eq!(ok(&more, false, false), none, "{more:?}");
        assert_eq!(ok(&more, true, false), publish_only, "{more:?}");
        assert_eq!(ok(&more, false, true), subscribe_only, "{more:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    frame(text);
    sdp(text);
});
