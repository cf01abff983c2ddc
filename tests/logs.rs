//! What the server logs at its default level (`FERRY_LOG` unset) while a relayed call comes up and
//! carries media: only what an operator must act on, so no WARN line for an ordinary call. Its own
//! test binary: the log subscriber is global to the process.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::rtc_client::{RoomSockets, relay_room_on};
use common::*;
use serde_json::json;

/// Log lines written by the server's threads, whole.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process's log subscriber (the server's default filter, text format), installed once;
/// every test of this binary reads what it captured.
fn captured() -> &'static Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let sink = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                ferry::DEFAULT_LOG_FILTER,
            ))
            .with_thread_names(true)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .init();
        captured
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&captured().0.lock().unwrap()).into_owned()
}

/// A session that joins and leaves rooms many times: its log lines stay short (the text format
/// would append a span field recorded again to every later line).
#[tokio::test]
async fn log_lines_stay_short_over_many_joins() {
    captured();
    let s = spawn(ferry::config::Config {
        rate_limit: 100_000,
        rate_burst: 100_000,
        ..test_config()
    })
    .await;
    let mut a = Client::joined_hello(s.addr, "rejoiner").await;
    let room = a.create_room(json!({})).await;
    for _ in 0..300 {
        a.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        a.request("leaveRoom", json!({})).await.unwrap();
    }
    let text = log_text();
    let ours: Vec<&str> = text.lines().filter(|l| l.contains(&a.user_id)).collect();
    assert!(ours.len() >= 600, "{} lines", ours.len());
    let longest = ours.iter().map(|l| l.len()).max().unwrap();
    assert!(
        longest < 400,
        "a line of {longest} bytes: {:?}",
        ours.last()
    );
}

/// A client without a token connecting again and again: the refusals are counted, but logged a
/// few times a second at most.
#[tokio::test]
async fn refused_tokens_are_logged_a_few_times_a_second() {
    captured();
    let s = spawn(secured_config()).await;
    let start = std::time::Instant::now();
    for _ in 0..200 {
        let mut c = Client::connect_query(s.addr, "?token=not-a-token").await;
        let (code, _) = c.expect_close().await;
        assert_eq!(code, 4001);
    }
    let secs = start.elapsed().as_secs() + 1;
    let (_, m) = http_get(s.addr, "/metrics").await;
    assert!(metric(&m, "ferry_signal_errors_total{code=\"unauthorized\"}").unwrap() >= 200.0);
    let lines = log_text()
        .lines()
        .filter(|l| l.contains("refused token"))
        .count() as u64;
    assert!(
        lines <= (secs + 1) * ferry::signal::hub::REFUSAL_LINES_PER_SECOND + 1,
        "{lines} lines in {secs} s for 200 refusals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_relayed_call_logs_no_warnings_at_the_default_level() {
    let captured = captured();
    let s = spawn(test_config()).await;
    let sockets = RoomSockets {
        publisher: None,
        subscriber: None,
    };
    let (mut publ, mut sub, _) = relay_room_on(s.addr, true, false, Vec::new(), sockets).await;
    let slice = Duration::from_millis(5);
    for i in 0..100u16 {
        publ.send(i, Bytes::from(vec![i as u8; 900]));
        publ.pump(slice).await;
        sub.pump(slice).await;
    }
    assert!(!sub.received.is_empty(), "media relayed");
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The server's lines: its media threads and the signaling spans (not the test's own peers).
    let server_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ferry-media") || l.contains("ferry::"))
        .collect();
    assert!(
        server_lines.iter().any(|l| l.contains("INFO")),
        "the capture works: {text}"
    );
    // The dev-mode warning is one an operator must act on (this test runs without a secret).
    let warnings: Vec<&&str> = server_lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| !l.contains("DEV MODE"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
