//! `ferry loadgen` against a real in-process server: a small broadcast and a small meeting, and the
//! report says what happened (media received intact, the server's own counters read).

mod common;

use std::time::Duration;

use common::*;
use ferry::loadgen::{LoadgenArgs, Shape, run};

fn args(s: &TestServer, shape: Shape, publishers: u32, subscribers: u32) -> LoadgenArgs {
    LoadgenArgs {
        url: Some(format!("http://{}", s.addr)),
        shape,
        publishers,
        subscribers,
        duration: Duration::from_secs(3),
        video_kbps: 500,
        packet_bytes: 1000,
        fps: 15,
        verify_every: 1,
        join_rate: 50,
        json: true,
        ..LoadgenArgs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reports_forwarded_media() {
    let s = spawn(test_config()).await;
    let r = run(args(&s, Shape::Broadcast, 1, 3))
        .await
        .expect("loadgen runs");
    eprintln!("{r:#}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["receiving_clients"], 3, "{r}");
    assert_eq!(r["clients_without_media"], 0, "{r}");
    assert_eq!(r["corrupt_payloads"], 0, "{r}");
    // Every packet a publisher sends reaches each of the 3 subscribers, through the server.
    let sent = r["packets_sent_per_s"].as_f64().unwrap();
    let received = r["packets_received_per_s"].as_f64().unwrap();
    let forwarded = r["server_forwarded_per_s"].as_f64().unwrap();
    assert!(sent > 10.0, "{r}");
    assert!(received > 2.0 * sent && received < 4.0 * sent, "{r}");
    assert!(forwarded > 2.0 * sent && forwarded < 4.0 * sent, "{r}");
    assert!(r["loss_percent"].as_f64().unwrap() < 5.0, "{r}");
    assert!(
        r["server_cpu_us_per_forwarded_packet"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(
        r["server_rss_bytes_per_subscriber"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(r["latency_us"]["p50"].as_u64().unwrap() > 0, "{r}");
    let within_1ms = r["server_forward_latency_s"]["within_1ms_percent"]
        .as_f64()
        .unwrap();
    assert!((0.0..=100.0).contains(&within_1ms), "{r}");
    assert_eq!(r["join_ms"]["n"], 3, "{r}");
}

/// `--tcp`: every client reaches the relay over ICE-TCP (an active TCP candidate to the relay's
/// passive one; the server counts them connected while the run lasts) and every payload arrives
/// intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_tcp_receive_intact_media() {
    let s = spawn(test_config()).await;
    assert!(
        s.media_tcp_addr.is_some(),
        "the test server takes media over TCP"
    );
    let metrics = s.hub.metrics.clone();
    let load = tokio::spawn(run(LoadgenArgs {
        tcp: true,
        ..args(&s, Shape::Broadcast, 1, 3)
    }));
    let mut most = 0;
    while !load.is_finished() {
        most = most.max(metrics.media_tcp_connections.get());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = load.await.unwrap().expect("loadgen runs");
    eprintln!("{r:#}");
    assert_eq!(most, 4, "the publisher and 3 subscribers over TCP");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["receiving_clients"], 3, "{r}");
    assert_eq!(r["corrupt_payloads"], 0, "{r}");
    let sent = r["packets_sent_per_s"].as_f64().unwrap();
    let received = r["packets_received_per_s"].as_f64().unwrap();
    assert!(sent > 10.0 && received > 2.0 * sent, "{r}");
    assert!(r["loss_percent"].as_f64().unwrap() < 5.0, "{r}");
}

/// `--light-subscribers`: the subscribers open the relayed SRTP with their own handshake's keys
/// (not through webrtc-rs's receive pipeline) and every payload still checks out, with AES-GCM
/// (webrtc-rs's first choice) and with AES-CM/HMAC-SHA1 offered first (as Chrome does); the
/// publisher paces its frames (`--pacing 2.5`) and still sends all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_subscribers_open_srtp_themselves_from_a_paced_publisher() {
    let s = spawn(test_config()).await;
    for profiles in [None, Some(vec!["aes128-cm-sha1-80".to_string()])] {
        let r = run(LoadgenArgs {
            light_subscribers: true,
            pacing: 2.5,
            srtp_profiles: profiles.clone(),
            ..args(&s, Shape::Broadcast, 1, 3)
        })
        .await
        .expect("loadgen runs");
        eprintln!("{r:#}");
        assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["light_subscribers"], true, "{r}");
        assert_eq!(r["pacing"], 2.5, "{r}");
        assert_eq!(r["receiving_clients"], 3, "{r}");
        assert_eq!(r["corrupt_payloads"], 0, "{r}");
        assert_eq!(r["malformed_packets"], 0, "{profiles:?}: {r}");
        // 500 kbit/s in 1000-byte packets at 15 fps (5 per frame, one every 6.4 ms: 75/s) + 50
        // audio/s.
        let sent = r["packets_sent_per_s"].as_f64().unwrap();
        let received = r["packets_received_per_s"].as_f64().unwrap();
        assert!(sent > 100.0 && sent < 150.0, "{r}");
        assert!(received > 2.0 * sent && received < 4.0 * sent, "{r}");
        assert!(r["loss_percent"].as_f64().unwrap() < 5.0, "{r}");
        assert!(r["latency_us"]["p50"].as_u64().unwrap() > 0, "{r}");
        // Nearly all of it opened by the subscribers themselves: only what arrived in the moment
        // between the handshake and the keys being taken went through rtc.
        let opened = r["packets_opened_by_light_subscribers"].as_f64().unwrap();
        let total = received * r["seconds"].as_f64().unwrap();
        assert!(
            opened > 0.9 * total,
            "{profiles:?}: opened {opened} of {total}: {r}"
        );
    }
}

/// A simulcast publisher (three layers at 1/16, 1/4 and all of 1.2 Mbit/s) and subscribers on
/// different downlinks: one emulated at 250 kbit/s, two not limited. The thin one's estimate
/// (from its transport-cc feedback) keeps it on the low layer, the others climb to the high one:
/// the relay's egress by layer shows both, the layer nobody takes is paused at the publisher
/// (dynacast), and the media arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_subscribers_on_different_downlinks_get_different_layers() {
    let s = spawn(test_config()).await;
    let r = run(LoadgenArgs {
        simulcast: true,
        downlinks: vec![250, 0, 0],
        video_kbps: 1200,
        duration: Duration::from_secs(6),
        ..args(&s, Shape::Broadcast, 1, 3)
    })
    .await
    .expect("loadgen runs");
    eprintln!("{r:#}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["receiving_clients"], 3, "{r}");
    assert_eq!(r["corrupt_payloads"], 0, "{r}");
    assert_eq!(r["malformed_packets"], 0, "{r}");
    let layers = &r["simulcast_kbps_by_layer"];
    let kbps = |l: &str| layers[l].as_f64().unwrap_or(0.0);
    // Two subscribers on the high layer (1.2 Mbit/s each), one on the low (75 kbit/s).
    assert!(kbps("high") > 1500.0, "{r}");
    assert!(kbps("low") > 30.0, "{r}");
    assert!(
        kbps("medium") + kbps("high") < 3000.0,
        "the thin one is not on high: {r}"
    );
    // Nobody takes the medium layer: the relay told the publisher, which stopped sending it.
    assert_eq!(r["publisher_layers_paused"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meeting_members_receive_each_other() {
    let s = spawn(test_config()).await;
    let r = run(args(&s, Shape::Meeting, 3, 0))
        .await
        .expect("loadgen runs");
    eprintln!("{r:#}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["receiving_clients"], 3, "{r}");
    assert_eq!(r["corrupt_payloads"], 0, "{r}");
    // Each member's packets go to the two others.
    let sent = r["packets_sent_per_s"].as_f64().unwrap();
    let received = r["packets_received_per_s"].as_f64().unwrap();
    assert!(received > 1.5 * sent && received < 2.5 * sent, "{r}");
}

#[tokio::test]
async fn a_server_that_is_not_there_is_a_clear_error() {
    let port = free_port();
    let s_url = format!("http://127.0.0.1:{port}");
    let mut a = args_for_url(&s_url);
    a.duration = Duration::from_secs(1);
    let e = run(a).await.expect_err("no server");
    assert!(e.contains(&s_url), "{e}");
}

#[tokio::test]
async fn out_of_range_options_are_clear_errors() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for (a, flag) in [
        (
            LoadgenArgs {
                pacing: 0.5,
                ..args_for_url(&url)
            },
            "--pacing",
        ),
        (
            LoadgenArgs {
                fps: 0,
                ..args_for_url(&url)
            },
            "--fps",
        ),
        (
            LoadgenArgs {
                srtp_profiles: Some(vec!["rot13".into()]),
                ..args_for_url(&url)
            },
            "--srtp-profiles",
        ),
        (
            LoadgenArgs {
                downlinks: vec![300],
                light_subscribers: true,
                ..args_for_url(&url)
            },
            "--downlinks",
        ),
    ] {
        let e = run(a).await.expect_err("refused");
        assert!(e.contains(flag), "{e}");
    }
}

fn args_for_url(url: &str) -> LoadgenArgs {
    LoadgenArgs {
        url: Some(url.to_string()),
        duration: Duration::from_secs(1),
        video_kbps: 100,
        packet_bytes: 1000,
        fps: 10,
        no_audio: true,
        verify_every: 1,
        json: true,
        ..LoadgenArgs::default()
    }
}

/// 10 000 members come and go (join and leave, vanish without a close, a room of their own, and
/// every 200th a relay connection: abandoned mid-handshake, or up and receiving, in turn): none
/// fails, and once they are gone every table of the hub and of the media core is back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_joins_and_leaves_leave_every_table_empty() {
    let s = spawn(ferry::config::Config {
        // Vanished members are held this long for a resume before they leave.
        resume_timeout: Duration::from_millis(300),
        empty_room_ttl: Duration::from_secs(1),
        ..test_config()
    })
    .await;
    let r = run(LoadgenArgs {
        churn: true,
        churn_cycles: 10_000,
        churn_media_every: 200,
        churn_sample: Duration::from_secs(5),
        churn_settle: Duration::from_secs(30),
        duration: Duration::from_secs(600),
        ..args(&s, Shape::Broadcast, 1, 0)
    })
    .await
    .expect("loadgen runs");
    let samples = r["samples"].as_array().unwrap();
    eprintln!(
        "{} cycles in {:.1} s; last sample {}",
        r["cycles"],
        r["seconds"].as_f64().unwrap(),
        samples.last().unwrap()
    );
    assert_eq!(r["cycles"], 10_000, "{r}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["not_drained"].as_array().unwrap().len(), 0, "{r}");
    let last = samples.last().unwrap();
    let tables = last["tables"].as_object().unwrap();
    assert!(tables.len() >= 17, "every table sampled: {last}");
    for (t, n) in tables {
        if t != "rooms" && t != "room_creators" {
            assert_eq!(n.as_f64(), Some(0.0), "{t}: {last}");
        }
    }
    // The hub's own view agrees.
    assert_eq!(s.hub.connection_count(), 0);
}
