//! `ferry loadgen --target janus` against a real Janus (Debian's `janus`): its VideoRoom forwards
//! the loadgen's publisher to two subscribers, and the payloads arrive intact.
//!
//! Janus never gathers loopback candidates, so the test runs in a network namespace of its own
//! with a veth pair, both ends inside: Janus's ICE on one end, the loadgen's sockets on the other.
//! Janus's packets leave through its end's device and arrive on the other with a source address
//! that is local to the namespace, which it must accept (`accept_local`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::{Place, in_new_netns};
use common::{ChildGuard, TempDir, wait_for_listener};
use ferry::loadgen::{LoadgenArgs, Target, run};

const JANUS_IP: &str = "10.213.0.1";
const CLIENT_IP: &str = "10.213.0.2";
const JANUS_PORT: u16 = 8188;
const VETH: &str = "ip link add fj0 type veth peer name fj1 \
    && ip addr add 10.213.0.1/24 dev fj0 && ip addr add 10.213.0.2/24 dev fj1 \
    && ip link set fj0 up && ip link set fj1 up \
    && echo 1 > /proc/sys/net/ipv4/conf/all/accept_local";

/// Where Janus's modules are (the folder holding `plugins/` and `transports/`).
fn janus_lib() -> Option<PathBuf> {
    let arch = format!("/usr/lib/{}-linux-gnu/janus", std::env::consts::ARCH);
    [
        arch.as_str(),
        "/usr/lib/janus",
        "/usr/local/lib/janus",
        "/opt/janus/lib/janus",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|d| d.join("plugins/libjanus_videoroom.so").exists())
}

/// A configuration in `dir` that loads only the VideoRoom plugin and the WebSocket transport
/// (their folders hold links to just those two), gathers candidates on `fj0` only, no STUN.
fn write_config(dir: &Path, lib: &Path) -> PathBuf {
    for (folder, module) in [
        ("plugins", "libjanus_videoroom.so"),
        ("transports", "libjanus_websockets.so"),
        ("none", ""),
    ] {
        let d = dir.join(folder);
        std::fs::create_dir_all(&d).unwrap();
        if !module.is_empty() {
            let from = lib.join(folder).join(module);
            std::os::unix::fs::symlink(&from, d.join(module)).unwrap();
        }
    }
    let d = dir.display();
    let jcfg = dir.join("janus.jcfg");
    let files = [
        (
            jcfg.clone(),
            format!(
                "general: {{\n  configs_folder = \"{d}\"\n  plugins_folder = \"{d}/plugins\"\n  \
                 transports_folder = \"{d}/transports\"\n  events_folder = \"{d}/none\"\n  \
                 loggers_folder = \"{d}/none\"\n  interface = \"{JANUS_IP}\"\n  debug_level = 4\n}}\n\
                 media: {{\n}}\nnat: {{\n  ice_enforce_list = \"fj0\"\n  ignore_mdns = true\n}}\n"
            ),
        ),
        (
            dir.join("janus.transport.websockets.jcfg"),
            format!(
                "general: {{\n  json = \"compact\"\n  ws = true\n  ws_port = {JANUS_PORT}\n  \
                 ws_ip = \"{JANUS_IP}\"\n  wss = false\n}}\nadmin: {{\n  admin_ws = false\n  \
                 admin_wss = false\n}}\n"
            ),
        ),
        (
            dir.join("janus.plugin.videoroom.jcfg"),
            "general: {\n}\n".to_string(),
        ),
    ];
    for (path, text) in files {
        std::fs::write(path, text).unwrap();
    }
    jcfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_drives_a_janus_videoroom() {
    const TEST: &str = "loadgen_drives_a_janus_videoroom";
    let lib = janus_lib();
    let missing = lib
        .is_none()
        .then_some("Janus is not installed (apt-get install janus)");
    match in_new_netns(TEST, VETH, missing) {
        Place::Inside => {}
        Place::Done | Place::Skipped => return,
    }
    let dir = TempDir::new("ferry-janus");
    let jcfg = write_config(dir.path(), &lib.unwrap());
    let log_path = dir.path().join("janus.log");
    let janus = ChildGuard(
        Command::new("janus")
            .arg("-C")
            .arg(&jcfg)
            .arg("-F")
            .arg(dir.path())
            .arg("--disable-colors")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log_path).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start janus"),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let addr = format!("{JANUS_IP}:{JANUS_PORT}").parse().unwrap();
    assert!(
        wait_for_listener(addr).await,
        "janus is not listening on {addr}:\n{}",
        log()
    );
    let r = run(LoadgenArgs {
        target: Target::Janus,
        url: Some(format!("ws://{addr}")),
        local_ip: CLIENT_IP.parse().unwrap(),
        server_pid: Some(janus.0.id()),
        subscribers: 2,
        duration: Duration::from_secs(3),
        video_kbps: 500,
        packet_bytes: 1000,
        fps: 15,
        verify_every: 1,
        json: true,
        ..LoadgenArgs::default()
    })
    .await
    .unwrap_or_else(|e| panic!("loadgen against janus: {e}\njanus log:\n{}", log()));
    eprintln!("{r:#}");
    let errors = r["errors"].as_array().unwrap();
    assert!(errors.is_empty(), "{r}\njanus log:\n{}", log());
    assert_eq!(r["target"], "janus", "{r}");
    assert_eq!(r["receiving_clients"], 2, "{r}");
    assert_eq!(r["clients_without_media"], 0, "{r}");
    // Every received payload was checked (--verify-every 1) and was what the publisher sent.
    assert_eq!(r["corrupt_payloads"], 0, "{r}");
    let sent = r["packets_sent_per_s"].as_f64().unwrap();
    let received = r["packets_received_per_s"].as_f64().unwrap();
    assert!(sent > 10.0, "{r}");
    // Janus forwards each packet to both subscribers.
    assert!(received > 1.5 * sent && received < 2.5 * sent, "{r}");
    assert!(r["loss_percent"].as_f64().unwrap() < 10.0, "{r}");
    // Janus has no /metrics: its CPU and memory come from /proc.
    assert!(r["server_cpu_seconds"].is_null(), "{r}");
    assert!(r["server_process"]["cpu_seconds"].as_f64().is_some(), "{r}");
    assert!(
        r["server_process"]["rss_bytes"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(r["join_ms"]["n"], 2, "{r}");
}
