//! Wire protocol v1: JSON text frames over WebSocket. Documented in docs/protocol.md.
//!
//! A request is `{"id": <number|string>, "type": "<name>", ...fields}`; each gets exactly one
//! `{"type":"response","id":…,"result":{…}}` or `{"type":"response","id":…,"error":{"code","message"}}`.
//! Everything else the server sends is an event (no `id`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PROTOCOL_VERSION: u32 = 1;

/// Stable error codes. The string form is part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    MessageTooLarge,
    RateLimited,
    NotAuthenticated,
    AlreadyAuthenticated,
    UnsupportedProtocol,
    Unauthorized,
    Forbidden,
    RoomNotFound,
    RoomExists,
    RoomFull,
    AlreadyInRoom,
    NotInRoom,
    TargetNotFound,
    Draining,
    MediaUnavailable,
    TooManyRooms,
    TooManyConnections,
    ResumeFailed,
    /// The cluster directory (Redis) cannot be reached: retry.
    ClusterUnavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::MessageTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotAuthenticated,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::UnsupportedProtocol,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RoomNotFound,
        ErrorCode::RoomExists,
        ErrorCode::RoomFull,
        ErrorCode::AlreadyInRoom,
        ErrorCode::NotInRoom,
        ErrorCode::TargetNotFound,
        ErrorCode::Draining,
        ErrorCode::MediaUnavailable,
        ErrorCode::TooManyRooms,
        ErrorCode::TooManyConnections,
        ErrorCode::ResumeFailed,
        ErrorCode::ClusterUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RoomNotFound => "room_not_found",
            ErrorCode::RoomExists => "room_exists",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::AlreadyInRoom => "already_in_room",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::TargetNotFound => "target_not_found",
            ErrorCode::Draining => "draining",
            ErrorCode::MediaUnavailable => "media_unavailable",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::ClusterUnavailable => "cluster_unavailable",
        }
    }
}

/// An error response: a code from the stable list and a readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalError {
    pub code: ErrorCode,
    pub message: String,
}

impl SignalError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SignalError {
            code,
            message: message.into(),
        }
    }
}

/// WebSocket close codes the server uses (4000–4999 are Ferry's own).
pub mod close {
    /// Standard: the server is shutting down and the drain timeout passed.
    pub const GOING_AWAY: u16 = 1001;
    /// Standard: a message above the hard transport limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Standard: too many connections, or the server is draining; try another node or later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Missing, malformed, expired or wrongly signed access token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No `hello` within `hello_timeout`.
    pub const HELLO_TIMEOUT: u16 = 4002;
    /// Nothing heard from the client within `ping_timeout`.
    pub const PING_TIMEOUT: u16 = 4003;
    /// The client does not read its messages fast enough (outbound queue full).
    pub const SLOW_CONSUMER: u16 = 4004;
    /// The session was resumed on another connection: this one is no longer used.
    pub const RESUMED_ELSEWHERE: u16 = 4005;
    /// From the client: it gives this connection up and will resume its session on a new one
    /// (the session is held, as for a connection that dropped).
    pub const CLIENT_RECONNECTING: u16 = 4000;
    /// Standard (policy violation): the client kept sending past its rate limit, or sent too many
    /// invalid messages.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// Standard: a text frame that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Standard (service restart): the member's room moved to another node of the cluster (its
    /// node drains, died, or lost it to another): reconnect and join it again.
    pub const ROOM_MOVED: u16 = 1012;
}

/// The request types, with their metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    Hello,
    Resume,
    Ping,
    CreateRoom,
    JoinRoom,
    LeaveRoom,
    Offer,
    Answer,
    Candidate,
    Bye,
    ReportMode,
    Subscribe,
    Unsubscribe,
    SetVideoQuality,
    GetRoom,
}

impl RequestType {
    pub fn parse(s: &str) -> Option<RequestType> {
        Some(match s {
            "hello" => RequestType::Hello,
            "resume" => RequestType::Resume,
            "ping" => RequestType::Ping,
            "createRoom" => RequestType::CreateRoom,
            "joinRoom" => RequestType::JoinRoom,
            "leaveRoom" => RequestType::LeaveRoom,
            "offer" => RequestType::Offer,
            "answer" => RequestType::Answer,
            "candidate" => RequestType::Candidate,
            "bye" => RequestType::Bye,
            "reportMode" => RequestType::ReportMode,
            "subscribe" => RequestType::Subscribe,
            "unsubscribe" => RequestType::Unsubscribe,
            "setVideoQuality" => RequestType::SetVideoQuality,
            "getRoom" => RequestType::GetRoom,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::Hello => "hello",
            RequestType::Resume => "resume",
            RequestType::Ping => "ping",
            RequestType::CreateRoom => "createRoom",
            RequestType::JoinRoom => "joinRoom",
            RequestType::LeaveRoom => "leaveRoom",
            RequestType::Offer => "offer",
            RequestType::Answer => "answer",
            RequestType::Candidate => "candidate",
            RequestType::Bye => "bye",
            RequestType::ReportMode => "reportMode",
            RequestType::Subscribe => "subscribe",
            RequestType::Unsubscribe => "unsubscribe",
            RequestType::SetVideoQuality => "setVideoQuality",
            RequestType::GetRoom => "getRoom",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hello {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub protocol: Option<u32>,
    /// Display name, honoured only on a dev-mode server (a token's `sub` wins otherwise).
    #[serde(default)]
    pub identity: Option<String>,
    /// The resume token of the client's previous session (gone: its node died or its room
    /// moved). On a cluster node the new session gets that session's user id back when no live
    /// session here has it, so that the room's other members keep their connections with it.
    #[serde(default)]
    pub rejoin: Option<String>,
}

/// Take over a session whose connection dropped (see docs/protocol.md "Resume").
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resume {
    /// The session's resume token, from its `hello` answer or its last `resume` answer.
    pub token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoomMode {
    /// P2P while the room is small enough, relay beyond.
    #[default]
    Auto,
    /// Always through the relay.
    Relay,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRoom {
    #[serde(default)]
    pub room_id: Option<String>,
    #[serde(default)]
    pub max_peers: Option<u32>,
    #[serde(default)]
    pub mode: Option<RoomMode>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRoom {
    pub room_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Empty {}

/// `offer` and `answer`: an SDP for one member, with optional app metadata passed through as is.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sdp {
    pub to: String,
    pub sdp: String,
    #[serde(default)]
    pub meta: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Candidate {
    pub to: String,
    /// An RTCIceCandidateInit object, or null for end-of-candidates.
    pub candidate: Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bye {
    pub to: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The reasons a client may give for its media mode; anything else is refused.
pub const MODE_REASONS: [&str; 8] = [
    "room_mode",
    "policy",
    "room_size",
    "p2p_timeout",
    "ice_failed",
    "p2p_failed",
    "room_shrunk",
    "reset",
];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportMode {
    pub mode: MediaMode,
    pub reason: String,
    /// The member this pair is with; absent: every other member of the room.
    #[serde(default)]
    pub user_id: Option<String>,
}

/// `subscribe` / `unsubscribe`: a member's tracks at the relay, all of them or one source.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subscription {
    pub user_id: String,
    #[serde(default)]
    pub stream_type: Option<StreamType>,
}

/// `setVideoQuality`: which simulcast layer of a member's video to receive through the relay.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetVideoQuality {
    pub user_id: String,
    pub quality: VideoQuality,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoQuality {
    Low,
    Medium,
    High,
    Off,
}

impl From<VideoQuality> for crate::media::Quality {
    fn from(q: VideoQuality) -> Self {
        match q {
            VideoQuality::Low => crate::media::Quality::Low,
            VideoQuality::Medium => crate::media::Quality::Medium,
            VideoQuality::High => crate::media::Quality::High,
            VideoQuality::Off => crate::media::Quality::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamType {
    Cam,
    Screen,
}

impl StreamType {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamType::Cam => "cam",
            StreamType::Screen => "screen",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    P2p,
    Relay,
}

/// A member as presented to others.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    pub user_id: String,
    pub identity: String,
    /// The member's token says its media always goes through the relay.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relay_only: bool,
}

/// Deserialize a request's fields (the whole object, `id` and `type` removed) into `T`,
/// turning serde's message into a `bad_request`.
pub fn fields<T: serde::de::DeserializeOwned>(
    ty: RequestType,
    obj: serde_json::Map<String, Value>,
) -> Result<T, SignalError> {
    serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let detail = if path == "." {
            inner.to_string()
        } else {
            format!("field `{path}`: {inner}")
        };
        SignalError::new(
            ErrorCode::BadRequest,
            format!("invalid {} request: {detail}", ty.as_str()),
        )
    })
}

/// A request split into its parts.
#[derive(Debug)]
pub struct Envelope {
    pub id: Value,
    pub ty: String,
    /// The remaining fields, `id` and `type` removed.
    pub fields: serde_json::Map<String, Value>,
}

/// Split a parsed frame into an [`Envelope`]; on error, the id (if it could be read) and why.
pub fn envelope(value: Value) -> Result<Envelope, (Value, SignalError)> {
    let Value::Object(mut obj) = value else {
        return Err((
            Value::Null,
            SignalError::new(ErrorCode::BadRequest, "a request must be a JSON object"),
        ));
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    match &id {
        Value::Number(_) => {}
        Value::String(s) if s.len() <= 64 => {}
        Value::Null => {
            return Err((
                Value::Null,
                SignalError::new(ErrorCode::BadRequest, "missing request id"),
            ));
        }
        _ => {
            return Err((
                Value::Null,
                SignalError::new(
                    ErrorCode::BadRequest,
                    "request id must be a number or a string of at most 64 characters",
                ),
            ));
        }
    }
    match obj.remove("type") {
        Some(Value::String(ty)) => Ok(Envelope {
            id,
            ty,
            fields: obj,
        }),
        Some(_) => Err((
            id,
            SignalError::new(ErrorCode::BadRequest, "field `type` must be a string"),
        )),
        None => Err((
            id,
            SignalError::new(ErrorCode::BadRequest, "missing field `type`"),
        )),
    }
}

pub fn response_ok(id: &Value, result: Value) -> String {
    serde_json::json!({ "type": "response", "id": id, "result": result }).to_string()
}

pub fn response_err(id: &Value, err: &SignalError) -> String {
    serde_json::json!({
        "type": "response",
        "id": id,
        "error": { "code": err.code.as_str(), "message": err.message },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            let s = c.as_str();
            assert!(s.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'));
            assert!(seen.insert(s), "duplicate {s}");
        }
    }

    #[test]
    fn envelope_reports_what_is_wrong() {
        let e = envelope(serde_json::json!([1])).unwrap_err();
        assert_eq!(e.1.code, ErrorCode::BadRequest);
        let e = envelope(serde_json::json!({"type": "ping"})).unwrap_err();
        assert!(e.1.message.contains("id"));
        let e = envelope(serde_json::json!({"id": 3})).unwrap_err();
        assert_eq!(e.0, serde_json::json!(3));
        let e =
            envelope(serde_json::json!({"id": "a", "type": "joinRoom", "roomId": "r"})).unwrap();
        assert_eq!((e.id, e.ty.as_str()), (serde_json::json!("a"), "joinRoom"));
        let j: JoinRoom = fields(RequestType::JoinRoom, e.fields).unwrap();
        assert_eq!(j.room_id, "r");
    }

    #[test]
    fn wrong_field_types_are_bad_requests() {
        let obj = serde_json::json!({"roomId": 5})
            .as_object()
            .unwrap()
            .clone();
        let e = fields::<JoinRoom>(RequestType::JoinRoom, obj).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("joinRoom"), "{}", e.message);
    }
}
