//! Ferry as a cluster, with the real parts: a real `redis-server` and real `ferry` processes on
//! loopback, configured as docs/deploy.md tells operators (`redis_url`, `node_address`,
//! `cluster_secret`). Members whose WebSockets reach different nodes meet and signal as in one
//! node; a room's owner killed with SIGKILL has its room taken over; a drained node hands its
//! rooms off; Redis restarting leaves calls alone; nothing is left in Redis once everyone left.
//! The directory's scripts are also driven directly, two directories on one Redis, to check
//! ownership and fencing step by step.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use ferry::cluster::{Located, Placed, RedisDirectory, RoomSettings};
use ferry::config::ClusterConfig;
use ferry::signal::protocol::RoomMode;
use serde_json::json;

/// Alice on node 1 makes a room; Bob, on node 2, joins it. Everything a member of one node does
/// works between them: presence both ways, offers/answers/candidates with `from`, errors as on
/// one node (unknown target, room full, already in room, a room that does not exist), leaving.
#[tokio::test]
async fn members_on_two_nodes_meet_and_signal_as_on_one() {
    let Some((_redis, name, [n1, n2])) =
        start_cluster("members_on_two_nodes_meet_and_signal_as_on_one", "meet").await
    else {
        return;
    };

    let mut alice = Client::joined_hello(n1.http, "alice").await;
    let mut bob = Client::joined_hello(n2.http, "bob").await;
    let room = alice
        .create_room(json!({"maxPeers": 2, "roomId": format!("r-{name}")}))
        .await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .expect("alice joins on the owner");
    // A room that does not exist anywhere: the same error as on one node.
    let err = bob
        .request("joinRoom", json!({"roomId": "no-such-room"}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "room_not_found");
    // The same id again, from the other node: taken in the cluster.
    let err = bob
        .request("createRoom", json!({"roomId": room}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "room_exists");

    let joined = bob
        .request("joinRoom", json!({"roomId": room}))
        .await
        .expect("bob joins through node 2");
    assert_eq!(joined["members"][0]["userId"], alice.user_id.as_str());
    assert_eq!(joined["maxPeers"], 2);
    let ev = alice.event().await;
    assert_eq!(ev["event"], "join");
    assert_eq!(ev["userId"], bob.user_id.as_str());
    assert_eq!(ev["identity"], "bob");

    // P2P signaling both ways, in order.
    for i in 0..20 {
        bob.request(
            "candidate",
            json!({"to": alice.user_id, "candidate": {"candidate": format!("candidate:{i} 1 udp 1 127.0.0.1 {} typ host", 5000 + i), "sdpMid": "0", "sdpMLineIndex": 0}}),
        )
        .await
        .unwrap();
    }
    for i in 0..20 {
        let c = alice.event_where(|e| e["type"] == "candidate").await;
        assert_eq!(c["from"], bob.user_id.as_str());
        assert!(
            c["candidate"]["candidate"]
                .as_str()
                .unwrap()
                .starts_with(&format!("candidate:{i} ")),
            "in order: {c}"
        );
    }
    alice
        .request(
            "offer",
            json!({"to": bob.user_id, "sdp": "v=0\r\n", "meta": {"streams": {}}}),
        )
        .await
        .unwrap();
    let offer = bob.event_where(|e| e["type"] == "offer").await;
    assert_eq!(offer["from"], alice.user_id.as_str());
    bob.request("answer", json!({"to": alice.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    let answer = alice.event_where(|e| e["type"] == "answer").await;
    assert_eq!(answer["from"], bob.user_id.as_str());

    // Errors from the owner reach the member on the other node unchanged.
    let err = bob
        .request("offer", json!({"to": "u-nobody", "sdp": "v=0\r\n"}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "target_not_found");
    let err = bob
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "already_in_room");
    let mut carol = Client::joined_hello(n2.http, "carol").await;
    let err = carol
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "room_full", "{err:?}");
    let err = bob.request("bogus", json!({})).await.unwrap_err();
    assert_eq!(err.0, "unknown_type");

    // Leaving from node 2: alice sees it; bob can join another room afterwards.
    bob.request("leaveRoom", json!({})).await.unwrap();
    let ev = alice.event_where(|e| e["type"] == "presence").await;
    assert_eq!(ev["event"], "leave");
    assert_eq!(ev["userId"], bob.user_id.as_str());
    let other = bob.create_room(json!({})).await;
    bob.request("joinRoom", json!({"roomId": other}))
        .await
        .expect("a room of its own after leaving the remote one");

    let (_, metrics) = http_get(n2.http, "/metrics").await;
    assert!(
        metric(
            &metrics,
            "ferry_cluster_forwarded_messages_total{direction=\"to_owner\"}"
        )
        .unwrap_or(0.0)
            >= 20.0,
        "node 2 forwarded bob's messages"
    );
    assert_eq!(metric(&metrics, "ferry_cluster_nodes"), Some(2.0));
    assert_eq!(metric(&metrics, "ferry_cluster_redis_up"), Some(1.0));
}

/// A member whose room's owner is killed (SIGKILL) is told (1012) by its own node, reconnects,
/// and joins the room again: the room was taken over by the node it reached, with its settings,
/// once the dead node's registry entry expired.
#[tokio::test]
async fn a_room_whose_owner_is_killed_is_taken_over() {
    let Some((_redis, _name, [mut n1, n2])) =
        start_cluster("a_room_whose_owner_is_killed_is_taken_over", "kill").await
    else {
        return;
    };
    let mut alice = Client::joined_hello(n1.http, "alice").await;
    let room = alice
        .create_room(json!({"maxPeers": 3, "mode": "relay"}))
        .await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut bob = Client::joined_hello(n2.http, "bob").await;
    bob.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();

    n1.kill9();
    let killed = Instant::now();
    let (code, _) = bob.expect_close().await;
    assert_eq!(
        code, 1012,
        "the member on the surviving node is told its room moved"
    );
    // What the SDK does: a new session, the same room (retrying while the directory says the
    // room cannot be reached yet).
    let mut bob = Client::joined_hello(n2.http, "bob").await;
    let joined = loop {
        match bob.request("joinRoom", json!({"roomId": room})).await {
            Ok(j) => break j,
            Err((code, msg)) => {
                assert_eq!(code, "cluster_unavailable", "{msg}");
                assert!(
                    killed.elapsed() < Duration::from_secs(10),
                    "never taken over"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(joined["maxPeers"], 3, "the room's settings survive");
    assert_eq!(joined["mode"], "relay");
    eprintln!(
        "room taken over {} ms after its owner was killed",
        killed.elapsed().as_millis()
    );
    // Alice, reconnecting to the survivor, finds bob there.
    let mut alice = Client::joined_hello(n2.http, "alice").await;
    let j = alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(j["members"][0]["userId"], bob.user_id.as_str());
    let (_, metrics) = http_get(n2.http, "/metrics").await;
    assert_eq!(
        metric(&metrics, "ferry_cluster_room_takeovers_total"),
        Some(1.0)
    );
}

/// A node that drains gives its rooms to another node and closes its members with 1012; they
/// join again through any node and meet on the heir. The drained node refuses new sessions and
/// leaves the registry when it stops.
#[tokio::test]
async fn a_draining_node_hands_its_rooms_off() {
    let Some((redis, name, [n1, n2])) =
        start_cluster("a_draining_node_hands_its_rooms_off", "drain").await
    else {
        return;
    };
    let mut alice = Client::joined_hello(n1.http, "alice").await;
    let room = alice.create_room(json!({"maxPeers": 4})).await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut bob = Client::joined_hello(n2.http, "bob").await;
    bob.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();

    n1.sigterm();
    let (code, _) = alice.expect_close().await;
    assert_eq!(code, 1012, "alice, on the draining node");
    let (code, _) = bob.expect_close().await;
    assert_eq!(code, 1012, "bob, linked to the draining node");
    let (status, _) = http_get(n1.http, "/readyz").await;
    assert_eq!(status, 503);

    let mut bob = Client::joined_hello(n2.http, "bob").await;
    bob.request("joinRoom", json!({"roomId": room}))
        .await
        .expect("the room lives on node 2 now");
    let mut alice = Client::joined_hello(n2.http, "alice").await;
    let j = alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    assert_eq!(j["members"][0]["userId"], bob.user_id.as_str());
    assert_eq!(j["maxPeers"], 4);
    // The drained node stops and leaves the registry at once.
    let mut n1 = n1;
    let deadline = Instant::now() + Duration::from_secs(15);
    while n1.child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "node 1 did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = redis.keys(&name).await;
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("node:") && !k.ends_with(&n2.id())),
        "{keys:?}"
    );
    assert!(n1.log().contains("rooms handed off"), "{}", n1.log());
}

/// Redis goes away in the middle of a call: the call goes on (signaling between members on two
/// nodes does not touch Redis), a new join that needs the directory gets a clear retryable
/// error, and once Redis is back (empty) the owner writes its rooms again and joins work.
#[tokio::test]
async fn calls_go_on_while_redis_is_away_and_all_recovers() {
    let Some((mut redis, _name, [n1, n2])) =
        start_cluster("calls_go_on_while_redis_is_away_and_all_recovers", "redis").await
    else {
        return;
    };
    let (mut alice, mut bob, room) = {
        let mut alice = Client::joined_hello(n1.http, "alice").await;
        let room = alice.create_room(json!({})).await;
        alice
            .request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        let mut bob = Client::joined_hello(n2.http, "bob").await;
        bob.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        (alice, bob, room)
    };
    let _ = alice.event_where(|e| e["event"] == "join").await;

    redis.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    bob.request("offer", json!({"to": alice.user_id, "sdp": "v=0\r\n"}))
        .await
        .expect("signaling between nodes goes on without redis");
    let o = alice.event_where(|e| e["type"] == "offer").await;
    assert_eq!(o["from"], bob.user_id.as_str());
    let mut carol = Client::joined_hello(n2.http, "carol").await;
    let err = carol
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "cluster_unavailable", "{err:?}");
    let (status, body) = http_get(n2.http, "/readyz").await;
    assert_eq!(status, 200, "a node stays ready without redis: {body}");
    assert!(body.contains("redis unreachable"), "{body}");
    // The owner's own members still join its rooms.
    let mut dave = Client::joined_hello(n1.http, "dave").await;
    dave.request("joinRoom", json!({"roomId": room}))
        .await
        .expect("a room's owner takes joins without redis");

    redis.restart_empty(Duration::ZERO).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match carol.request("joinRoom", json!({"roomId": room})).await {
            Ok(j) => {
                assert_eq!(j["members"].as_array().unwrap().len(), 3);
                break;
            }
            Err((code, _)) => {
                assert!(
                    ["cluster_unavailable", "room_not_found"].contains(&code.as_str()),
                    "{code}"
                );
                assert!(Instant::now() < deadline, "never recovered: {code}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let o = alice
        .event_where(|e| e["type"] == "presence" && e["identity"] == "carol")
        .await;
    assert_eq!(o["event"], "join");
}

/// Everyone leaves, the room expires, the nodes stop: nothing of the cluster is left in Redis.
#[tokio::test]
async fn no_keys_are_left_behind_after_everyone_leaves() {
    let Some((redis, name, [n1, n2])) =
        start_cluster("no_keys_are_left_behind_after_everyone_leaves", "keys").await
    else {
        return;
    };
    let mut alice = Client::joined_hello(n1.http, "alice").await;
    let room = alice.create_room(json!({})).await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut bob = Client::joined_hello(n2.http, "bob").await;
    bob.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let keys = redis.keys(&name).await;
    assert!(
        keys.contains(&format!("ferry:{name}:room:{room}")),
        "{keys:?}"
    );
    bob.request("leaveRoom", json!({})).await.unwrap();
    alice.request("leaveRoom", json!({})).await.unwrap();
    drop((alice, bob));
    // empty_room_ttl is 1 s in these tests.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys(&name).await.iter().any(|k| k.contains(":room:")) {
        assert!(Instant::now() < deadline, "the room's key stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for mut n in [n1, n2] {
        n.sigterm();
        let deadline = Instant::now() + Duration::from_secs(15);
        while n.child.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "node did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(redis.keys(&name).await, Vec::<String>::new());
}

/// A node's `/cluster/attach` takes only the cluster's secret.
#[tokio::test]
async fn member_links_need_the_cluster_secret() {
    let Some(redis) = Redis::start("member_links_need_the_cluster_secret") else {
        return;
    };
    let n1 = Node::start(&redis, &cluster_name("secret"), &[]).await;
    let req = "GET /cluster/attach HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         x-ferry-cluster-secret: not-the-secret-at-all\r\n\r\n";
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(n1.http).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

fn dir_config(redis: &Redis, name: &str, node: &str) -> ClusterConfig {
    ClusterConfig {
        redis_url: redis.url(),
        name: name.into(),
        node_id: node.into(),
        node_address: format!("http://{node}.invalid:8080"),
        secret: CLUSTER_SECRET.into(),
        node_ttl: Duration::from_millis(1000),
    }
}

/// The directory's logic, step by step on a real Redis with two directories: a claim, a
/// locate from the other node, a takeover once the owner's entry is gone, and fencing: the old
/// owner's release and renewal fail, its check reports the room lost.
#[tokio::test]
async fn the_directory_fences_ownership_by_epoch() {
    let Some(redis) = Redis::start("the_directory_fences_ownership_by_epoch") else {
        return;
    };
    assert!(wait_for_listener(SocketAddr::from(([127, 0, 0, 1], redis.port))).await);
    let name = cluster_name("dir");
    let reg_a = prometheus::Registry::new();
    let reg_b = prometheus::Registry::new();
    let a = RedisDirectory::new(dir_config(&redis, &name, "a"), vec![], &reg_a).unwrap();
    let b = RedisDirectory::new(dir_config(&redis, &name, "b"), vec![], &reg_b).unwrap();
    assert!(a.beat(0, 0, 0.0, false).await.is_empty());
    assert!(b.beat(0, 0, 0.0, false).await.is_empty());
    assert!(a.beat(0, 0, 0.0, false).await.is_empty());
    assert_eq!(a.nodes().len(), 2);
    let s = RoomSettings {
        max_peers: 5,
        mode: RoomMode::Relay,
    };
    assert_eq!(a.place("r1", s, false).await.unwrap(), Placed::Here);
    assert_eq!(b.place("r1", s, false).await.unwrap(), Placed::Exists);
    match b.locate("r1").await.unwrap() {
        Located::There(n) => assert_eq!(n.id, "a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.locate("r2").await.unwrap(), Located::Nowhere);

    // a stops beating: its entry expires (node_ttl 1 s); b takes r1 over at epoch 2.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    b.beat(0, 0, 0.0, false).await;
    assert_eq!(
        b.nodes().len(),
        1,
        "a dropped out of the registry by itself"
    );
    assert_eq!(b.locate("r1").await.unwrap(), Located::Here(Some(s)));
    let mut c = redis.conn().await;
    let epoch: String = redis::cmd("HGET")
        .arg(format!("ferry:{name}:room:r1"))
        .arg("epoch")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(epoch, "2");
    // a comes back (a partition healed): its next check finds r1 lost, and its release of it
    // does nothing.
    assert_eq!(a.beat(0, 0, 0.0, false).await, vec!["r1".to_string()]);
    assert!(!a.owns("r1"));
    a.release("r1").await;
    match a.locate("r1").await.unwrap() {
        Located::There(n) => assert_eq!(n.id, "b"),
        other => panic!("{other:?}"),
    }
    // b hands its rooms to a (a drain): a owns r1 at epoch 3 without locating it again... once
    // it locates it; b's later release does nothing.
    assert_eq!(b.hand_off_all("a").await, vec!["r1".to_string()]);
    assert_eq!(a.locate("r1").await.unwrap(), Located::Here(Some(s)));
    b.release("r1").await;
    let owner: String = redis::cmd("HGET")
        .arg(format!("ferry:{name}:room:r1"))
        .arg("owner")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, "a");
    // The owner deletes its room's entry; leaving removes its node entry.
    a.release("r1").await;
    a.leave().await;
    b.leave().await;
    assert_eq!(redis.keys(&name).await, Vec::<String>::new());
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Directory operations of joins and creations (not the heartbeat's) a node has done.
async fn join_ops(node: &Node) -> f64 {
    let (_, m) = http_get(node.http, "/metrics").await;
    ["locate", "claim", "release"]
        .iter()
        .map(|op| {
            metric(
                &m,
                &format!("ferry_cluster_directory_seconds_count{{op=\"{op}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .sum()
}

/// The numbers of docs/performance.md "Cluster": join latency for a member on the room's node
/// and on another node, directory operations per join, and the signaling messages per second
/// one node forwards for another. Run it with
/// `cargo test --release --test cluster -- --ignored --nocapture cluster_numbers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints numbers, asserts nothing about time"]
async fn cluster_numbers() {
    let Some(redis) = Redis::start("cluster_numbers") else {
        return;
    };
    let name = cluster_name("numbers");
    let fast = ["--rate-limit", "100000", "--rate-burst", "100000"];
    let n1 = Node::start(&redis, &name, &fast).await;
    let n2 = Node::start(&redis, &name, &fast).await;
    until_nodes_seen(&[&n1, &n2], 2).await;
    let mut owner = Client::joined_hello(n1.http, "owner").await;
    let room = owner.create_room(json!({"maxPeers": 50})).await;
    owner
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    const JOINS: usize = 300;
    for (label, node) in [("local", &n1), ("remote", &n2)] {
        let ops_before = join_ops(node).await;
        let mut times = Vec::new();
        for _ in 0..JOINS {
            let mut c = Client::joined_hello(node.http, "m").await;
            let t = Instant::now();
            c.request("joinRoom", json!({"roomId": room}))
                .await
                .unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            c.request("leaveRoom", json!({})).await.unwrap();
        }
        let ops = join_ops(node).await - ops_before;
        times.sort_by(f64::total_cmp);
        eprintln!(
            "join {label}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {JOINS}; directory operations per join {:.2}",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times[times.len() - 1],
            ops / JOINS as f64
        );
    }
    let ops_before = join_ops(&n2).await;
    for _ in 0..50 {
        let mut c = Client::joined_hello(n2.http, "creator").await;
        c.create_room(json!({})).await;
    }
    eprintln!(
        "directory operations per createRoom: {:.2}",
        (join_ops(&n2).await - ops_before) / 50.0
    );

    // Forwarding: senders on node 2 (their room is on node 1) send candidates to receivers on
    // node 1 as fast as they can.
    const PAIRS: usize = 8;
    const EACH: usize = 5000;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..PAIRS {
        let mut r = Client::joined_hello(n1.http, "rx").await;
        let mut s = Client::joined_hello(n2.http, "tx").await;
        let room = r.create_room(json!({"roomId": format!("fw-{i}")})).await;
        r.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        s.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        let _ = r.event().await;
        senders.push(s);
        receivers.push(r);
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (mut s, mut r) in senders.into_iter().zip(receivers) {
        let to = r.user_id.clone();
        tasks.push(tokio::spawn(async move {
            // A window of 100 requests in flight, and their 100 events read, before the next:
            // no queue (256 messages) ever fills.
            for window in 0..EACH / 100 {
                for i in 0..100 {
                    s.send_raw(
                        &json!({"id": window * 100 + i, "type": "candidate", "to": to, "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}})
                            .to_string(),
                    )
                    .await;
                }
                let mut answered = 0;
                while answered < 100 {
                    let m = s.recv().await.expect("sender open");
                    assert!(m.get("error").is_none(), "{m}");
                    if m["type"] == "response" {
                        answered += 1;
                    }
                }
                let mut got = 0;
                while got < 100 {
                    let m = r.recv().await.expect("receiver open");
                    if m["type"] == "candidate" {
                        got += 1;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let total = (PAIRS * EACH) as f64;
    eprintln!(
        "forwarding: {total} requests from members on node 2 to a room on node 1 (each: request and response over the link, one event to the receiver) in {secs:.2} s: {:.0} requests/s, {:.0} messages/s over the links",
        total / secs,
        2.0 * total / secs
    );
}

/// The fenced block of docs/deploy.md that starts with ```` ```lang ```` and holds `marker`.
fn deploy_block(lang: &str, marker: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deploy.md"))
        .expect("docs/deploy.md");
    let fence = format!("```{lang}\n");
    doc.split(fence.as_str())
        .skip(1)
        .map(|b| &b[..b.find("```").unwrap()])
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no {lang} block with {marker} in docs/deploy.md"))
        .to_string()
}

/// The nginx and haproxy configurations that docs/deploy.md gives for a cluster are accepted by
/// the real programs (`nginx -t`, `haproxy -c`).
#[test]
fn the_balancer_configs_in_deploy_md_are_valid() {
    let test = "the_balancer_configs_in_deploy_md_are_valid";
    let nginx = if std::path::Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let haproxy = if std::path::Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy"
    } else {
        "haproxy"
    };
    if !program_available(nginx, "-v", test, "nginx")
        || !program_available(haproxy, "-v", test, "haproxy")
    {
        return;
    }
    let dir = TempDir::new("ferry-lb-conf");
    let d = dir.path().display();
    // The documented block goes into nginx's http context, as /etc/nginx/conf.d/ files do.
    let block = deploy_block("nginx", "ferry_cluster");
    let conf = format!(
        "pid {d}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\naccess_log off;\n\
         client_body_temp_path {d}/cb; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;\n\
         uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n{block}}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let out = std::process::Command::new(nginx)
        .args(["-t", "-c"])
        .arg(dir.path().join("nginx.conf"))
        .args(["-p", &d.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let block = deploy_block("haproxy", "ferry_cluster");
    std::fs::write(dir.path().join("haproxy.cfg"), block).unwrap();
    let out = std::process::Command::new(haproxy)
        .args(["-c", "-f"])
        .arg(dir.path().join("haproxy.cfg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Say hello on a new connection to `addr`; returns the client and the welcome.
async fn hello_at(addr: SocketAddr, fields: serde_json::Value) -> (Client, serde_json::Value) {
    let mut c = Client::connect(addr).await;
    let w = c.request("hello", fields).await.expect("hello accepted");
    c.user_id = w["userId"].as_str().unwrap().to_string();
    (c, w)
}

/// A client whose connection to one node drops and whose reconnect the balancer sends to
/// another node resumes its session there: the second node carries the connection to the node
/// that holds the session. The answer has the room as it is (asked of the room's node when that
/// is yet another node), what was queued arrives, signaling goes on, and the room sees the
/// member `reconnecting` wherever its session is held.
#[tokio::test]
async fn a_resume_that_reaches_another_node_is_carried_to_the_session() {
    let Some((_redis, _name, [n1, n2])) = start_cluster(
        "a_resume_that_reaches_another_node_is_carried_to_the_session",
        "resume",
    )
    .await
    else {
        return;
    };
    // Alice's session and her room on node 1; Bob's session on node 2, linked to node 1.
    let (mut alice, w) = hello_at(n1.http, json!({"identity": "alice"})).await;
    let token = w["resumeToken"].as_str().unwrap().to_string();
    let room = alice.create_room(json!({})).await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let (mut bob, wb) = hello_at(n2.http, json!({"identity": "bob"})).await;
    let bob_token = wb["resumeToken"].as_str().unwrap().to_string();
    bob.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let _ = alice.event_where(|e| e["event"] == "join").await;

    // Alice's connection drops (no Close frame); meanwhile Bob sends her an offer.
    drop(alice);
    let reconnecting = bob.event_where(|e| e["type"] == "presence").await;
    assert_eq!(reconnecting["event"], "reconnecting");
    bob.request("offer", json!({"to": w["userId"], "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    // She comes back through node 2.
    let mut alice = Client::connect(n2.http).await;
    let r = alice
        .request("resume", json!({"token": token}))
        .await
        .expect("resumed through node 2");
    assert_eq!(r["resumed"], true);
    assert_eq!(r["userId"], w["userId"]);
    assert_eq!(r["room"]["roomId"], room.as_str());
    assert_eq!(r["room"]["members"][0]["userId"], bob.user_id.as_str());
    let queued = alice.queued().expect("the offer queued while she was away");
    assert_eq!(queued["type"], "offer");
    assert_eq!(queued["from"], bob.user_id.as_str());
    bob.request("candidate", json!({"to": w["userId"], "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}}))
        .await
        .unwrap();
    let c = alice.event_where(|e| e["type"] == "candidate").await;
    assert_eq!(c["from"], bob.user_id.as_str());

    // Bob's session is on node 2, his room on node 1: his resume on node 1 is carried to node 2,
    // and node 2 asks node 1 for the room.
    drop(bob);
    let mut bob = Client::connect(n1.http).await;
    let r = bob
        .request("resume", json!({"token": bob_token}))
        .await
        .expect("bob resumed through node 1");
    assert_eq!(r["room"]["roomId"], room.as_str());
    assert_eq!(r["room"]["members"][0]["userId"], w["userId"]);
    let ev = alice.event_where(|e| e["type"] == "presence").await;
    assert_eq!(ev["event"], "reconnecting");
}

/// A member whose room's node died says hello again with its last resume token (`rejoin`) and
/// gets its user id back, so that the others keep their connections with it; a token that this
/// cluster did not sign gets a new id; the token used again takes the id over from the session
/// that has it.
#[tokio::test]
async fn a_member_whose_room_moved_gets_its_user_id_back() {
    let Some((_redis, _name, [mut n1, n2])) =
        start_cluster("a_member_whose_room_moved_gets_its_user_id_back", "rejoin").await
    else {
        return;
    };
    let (mut alice, _) = hello_at(n1.http, json!({"identity": "alice"})).await;
    let room = alice.create_room(json!({})).await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let (mut bob, wb) = hello_at(n2.http, json!({"identity": "bob"})).await;
    bob.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    n1.kill9();
    assert_eq!(bob.expect_close().await.0, 1012);
    // What the SDK does: resume (the session went with the link: resume_failed), then hello
    // with the token.
    let mut c = Client::connect(n2.http).await;
    let err = c
        .request("resume", json!({"token": wb["resumeToken"]}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "resume_failed");
    let (mut bob2, w2) = hello_at(
        n2.http,
        json!({"identity": "bob", "rejoin": wb["resumeToken"]}),
    )
    .await;
    assert_eq!(w2["userId"], wb["userId"], "the same member");
    loop {
        match bob2.request("joinRoom", json!({"roomId": room})).await {
            Ok(_) => break,
            Err((code, _)) => {
                assert_eq!(code, "cluster_unavailable");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // Alice, back too (her session died with node 1): her old id, and bob is there.
    // (Her token is of node 1, which is dead: nothing to resume; the rejoin gives the id.)
    let forged = wb["resumeToken"].as_str().unwrap().replace("~u-", "~u-x");
    let (_, w3) = hello_at(n2.http, json!({"identity": "eve", "rejoin": forged})).await;
    assert_ne!(w3["userId"], wb["userId"], "a forged token gets a new id");
    // The token again, while bob2 lives: the newest wins (whoever holds the token is that
    // member), and the session it replaces is closed as moved.
    let (_, w4) = hello_at(
        n2.http,
        json!({"identity": "bob", "rejoin": wb["resumeToken"]}),
    )
    .await;
    assert_eq!(w4["userId"], wb["userId"]);
    assert_eq!(bob2.expect_close().await.0, 1012);
}

/// The node a member's WebSocket reached dies, its room's node lives: the room sees the member
/// `reconnecting` (its session there is held, not ended), and when the member comes back, as
/// itself (`hello` with `rejoin`), through the room's node or through yet another node, it takes
/// its place: the others see no `leave`, only its `join`, under its id.
#[tokio::test]
async fn a_member_whose_own_node_dies_comes_back_as_itself() {
    let Some(redis) = Redis::start("a_member_whose_own_node_dies_comes_back_as_itself") else {
        return;
    };
    let name = cluster_name("entry");
    let owner = Node::start(&redis, &name, &[]).await;
    let mut bob_node = Node::start(&redis, &name, &[]).await;
    let mut carol_node = Node::start(&redis, &name, &[]).await;
    let spare = Node::start(&redis, &name, &[]).await;
    until_nodes_seen(&[&owner, &bob_node, &carol_node, &spare], 4).await;
    let (mut alice, _) = hello_at(owner.http, json!({"identity": "alice"})).await;
    let room = alice.create_room(json!({})).await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for (who, node) in [("bob", &bob_node), ("carol", &carol_node)] {
        let (mut c, w) = hello_at(node.http, json!({"identity": who})).await;
        c.request("joinRoom", json!({"roomId": room}))
            .await
            .unwrap();
        let ev = alice.event_where(|e| e["type"] == "presence").await;
        assert_eq!(ev["event"], "join");
        tokens.push((c.user_id.clone(), w["resumeToken"].clone()));
        std::mem::forget(c); // its socket dies with its node
    }
    bob_node.kill9();
    carol_node.kill9();
    for _ in 0..2 {
        let ev = alice.event_where(|e| e["type"] == "presence").await;
        assert_eq!(ev["event"], "reconnecting", "{ev}");
    }
    // Bob comes back through the room's node, carol through the spare one.
    let mut back = Vec::new();
    for ((user, token), node) in tokens.iter().zip([&owner, &spare]) {
        let (mut c, w) = hello_at(node.http, json!({"rejoin": token})).await;
        assert_eq!(w["userId"], user.as_str(), "the same member");
        let j = loop {
            match c.request("joinRoom", json!({"roomId": room})).await {
                Ok(j) => break j,
                Err((code, m)) => {
                    assert_eq!(code, "cluster_unavailable", "{m}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        assert!(
            j["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["userId"] != user.as_str()),
            "not twice in the room: {j}"
        );
        back.push(c);
    }
    for (user, _) in &tokens {
        let ev = alice
            .event_where(|e| e["type"] == "presence" && e["event"] != "reconnecting")
            .await;
        assert_eq!(ev["event"], "join", "no leave: {ev}");
        assert!(
            tokens.iter().any(|(u, _)| ev["userId"] == u.as_str()),
            "{ev} {user}"
        );
    }
    let r = alice.request("getRoom", json!({})).await.unwrap();
    assert_eq!(r["members"].as_array().unwrap().len(), 2, "{r}");
    // Signaling reaches them where they are now.
    for (user, _) in &tokens {
        alice
            .request("offer", json!({"to": user, "sdp": "v=0\r\n"}))
            .await
            .expect("to the member's new session");
    }
    for c in &mut back {
        let o = c.event_where(|e| e["type"] == "offer").await;
        assert_eq!(o["from"], alice.user_id.as_str());
    }
}

/// A partition, played by freezing a node (SIGSTOP) for longer than `node_ttl`: another node
/// takes its room over for a member who joins meanwhile. When the frozen node runs again (the
/// partition heals), its next check finds the room owned by another at a newer epoch: it never
/// serves it on, and its members there are moved (1012) to the room's new node, where they meet.
#[tokio::test]
async fn after_a_partition_heals_the_old_owner_gives_the_room_up() {
    let Some((_redis, _name, [n1, n2])) = start_cluster(
        "after_a_partition_heals_the_old_owner_gives_the_room_up",
        "partition",
    )
    .await
    else {
        return;
    };
    let (mut alice, wa) = hello_at(n1.http, json!({"identity": "alice"})).await;
    let room = alice.create_room(json!({})).await;
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();

    unsafe { libc::kill(n1.pid(), libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut bob, _) = hello_at(n2.http, json!({"identity": "bob"})).await;
    let j = bob
        .request("joinRoom", json!({"roomId": room}))
        .await
        .expect("node 2 took the room over");
    assert_eq!(
        j["members"].as_array().unwrap().len(),
        0,
        "a new life of the room"
    );
    unsafe { libc::kill(n1.pid(), libc::SIGCONT) };

    let (code, _) = alice.expect_close().await;
    assert_eq!(code, 1012, "the old owner let its member go");
    // Alice comes back as herself and meets bob on the room's node.
    let (mut alice, w) = hello_at(
        n1.http,
        json!({"identity": "alice", "rejoin": wa["resumeToken"]}),
    )
    .await;
    assert_eq!(w["userId"], wa["userId"]);
    let j = alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .expect("joined on node 2 through node 1");
    assert_eq!(j["members"][0]["userId"], bob.user_id.as_str());
    let (_, m) = http_get(n1.http, "/metrics").await;
    assert_eq!(metric(&m, "ferry_cluster_rooms_lost_total"), Some(1.0));
    assert_eq!(metric(&m, "ferry_cluster_rooms_owned"), Some(0.0));
}

/// A room is made on the node its creator reached, unless another node is much less busy: with
/// 40 sessions on node 1 and none on node 2, `createRoom` through node 1 makes the room on node
/// 2 (its members' relayed media goes there), and joining it through node 1 works.
#[tokio::test]
async fn a_new_room_goes_to_a_much_less_busy_node() {
    let Some((redis, name, [n1, n2])) =
        start_cluster("a_new_room_goes_to_a_much_less_busy_node", "place").await
    else {
        return;
    };
    let mut crowd = Vec::new();
    for i in 0..40 {
        crowd.push(Client::joined_hello(n1.http, &format!("c{i}")).await);
    }
    // The load reaches the registry at node 1's next heartbeat (a third of node_ttl).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut alice = Client::joined_hello(n1.http, "alice").await;
    let room = alice
        .create_room(json!({"roomId": format!("busy-{name}")}))
        .await;
    let mut c = redis.conn().await;
    let owner: String = redis::cmd("HGET")
        .arg(format!("ferry:{name}:room:{room}"))
        .arg("owner")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, n2.id(), "placed on the quiet node");
    alice
        .request("joinRoom", json!({"roomId": room}))
        .await
        .expect("joined through node 1");
    let (_, m) = http_get(n2.http, "/metrics").await;
    assert_eq!(metric(&m, "ferry_cluster_rooms_owned"), Some(1.0));
    // Few sessions: a room stays where it is asked for.
    let mut bob = Client::joined_hello(n2.http, "bob").await;
    let other = bob.create_room(json!({})).await;
    let owner: String = redis::cmd("HGET")
        .arg(format!("ferry:{name}:room:{other}"))
        .arg("owner")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, n2.id());
    drop(crowd);
}
