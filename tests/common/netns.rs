//! Tests that run inside a network namespace of their own, so that the WebRTC stacks they start
//! (Chromium, Janus) cannot send anything past it: the test re-executes itself under
//! `unshare --net` (root), with `lo` up and whatever else it asks for (a veth pair for Janus).
//! The namespace goes away with the last process in it.

use std::io::Write;
use std::process::Command;

const NETNS_ENV: &str = "FERRY_TEST_IN_NETNS";

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Where a namespaced test runs.
pub enum Place {
    /// We are inside the namespace: run the test body.
    Inside,
    /// We re-ran ourselves in the namespace and it is done (the outcome was asserted).
    Done,
    /// The test cannot run on this machine; the reason was printed.
    Skipped,
}

/// Make sure the calling test runs in a fresh network namespace. Outside one, re-run exactly this
/// test (`test_name`) of this test binary under `unshare --net`, after `ip link set lo up` and the
/// shell commands `setup` (may be empty), and assert that it passed. When something it needs is
/// `missing` (a program), or without root, the test is skipped with a clear message, except in CI
/// (`CI` set), where that is a failure.
pub fn in_new_netns(test_name: &str, setup: &str, missing: Option<&str>) -> Place {
    if std::env::var(NETNS_ENV).as_deref() == Ok("1") {
        return Place::Inside;
    }
    let missing = missing.or(if !is_root() {
        Some("creating a network namespace needs root (unshare --net)")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the `ip` command (iproute2) is missing")
    } else {
        None
    });
    if let Some(why) = missing {
        if std::env::var_os("CI").is_some() {
            panic!("{test_name} cannot run in CI: {why}");
        }
        // Past the test harness's capture, so that .ci/run's summary counts the skip.
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test_name}: {why}. Run .ci/run (as root) to install and run it."
        );
        return Place::Skipped;
    }
    // One namespaced test at a time: each starts heavy programs, and the machine has two cores.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("test binary path");
    let script = if setup.is_empty() {
        "ip link set lo up && exec \"$0\" \"$@\"".to_string()
    } else {
        format!("ip link set lo up && {setup} && exec \"$0\" \"$@\"")
    };
    let out = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", &script])
        .arg(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .output()
        .expect("run unshare");
    // Show what happened inside (written past the test harness's capture, so that CI logs carry
    // the measured times), prefixed so that its result lines are not counted twice.
    let mut err = std::io::stderr().lock();
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        let _ = writeln!(err, "  [netns] {line}");
    }
    drop(err);
    assert!(
        out.status.success(),
        "{test_name} failed inside its network namespace"
    );
    Place::Done
}

/// `f`'s result, run on a thread that entered the named network namespace `ns` (`ip netns`):
/// sockets it makes stay in that namespace.
pub fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace");
        // SAFETY: a valid network namespace descriptor; only this short-lived thread moves.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// A TCP connection to `addr` made from inside the named network namespace `ns`: its loopback,
/// for instance, is not this process's.
pub fn connect_in(ns: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let stream = inside(ns, move || {
        std::net::TcpStream::connect(addr).expect("connect in the namespace")
    });
    stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(stream).unwrap()
}

/// Setup commands (for [`in_new_netns`]) for a server behind a 1:1 NAT: the test's namespace is
/// the server's inside network (10.203.0.1, default route to the router), the namespace `router`
/// translates the outside address 10.204.0.100 to it (DNAT), and the namespace `client` is
/// outside (10.204.0.2, `lo` up). Both named namespaces are made afresh.
pub fn one_to_one_nat(router: &str, client: &str) -> String {
    let r = format!("ip netns exec {router}");
    format!(
        "for n in {router} {client}; do ip netns del $n 2>/dev/null; ip netns add $n || exit 1; done \
        && ip link add si type veth peer name ri netns {router} \
        && ip -n {router} link add ro type veth peer name co netns {client} \
        && ip addr add 10.203.0.1/24 dev si && ip link set si up && ip route add default via 10.203.0.2 \
        && ip -n {router} addr add 10.203.0.2/24 dev ri && ip -n {router} link set ri up \
        && ip -n {router} addr add 10.204.0.1/24 dev ro && ip -n {router} addr add 10.204.0.100/32 dev ro \
        && ip -n {router} link set ro up && ip -n {router} link set lo up \
        && {r} sysctl -qw net.ipv4.ip_forward=1 \
        && {r} iptables -t nat -A PREROUTING -d 10.204.0.100 -j DNAT --to-destination 10.203.0.1 \
        && ip -n {client} addr add 10.204.0.2/24 dev co && ip -n {client} link set co up \
        && ip -n {client} link set lo up && ip -n {client} route add default via 10.204.0.1"
    )
}

/// Named network namespaces a test made, deleted when it ends.
pub struct Namespaces(pub &'static [&'static str]);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
