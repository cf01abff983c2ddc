//! A cluster for the tests: a real `redis-server` and real `ferry` nodes, configured as
//! docs/deploy.md tells operators; balancer configurations in front of them.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub const CLUSTER_SECRET: &str = "cluster-test-secret-0123456789";
/// Short, so that a killed node's rooms are taken over quickly in the tests.
pub const NODE_TTL: &str = "1500ms";

/// A real redis-server on a free loopback port, no persistence, stopped by PID when dropped.
pub struct Redis {
    child: ChildGuard,
    pub port: u16,
    _dir: TempDir,
}

impl Redis {
    pub fn start(test: &str) -> Option<Redis> {
        if !program_available("redis-server", "--version", test, "redis-server") {
            return None;
        }
        let dir = TempDir::new("ferry-redis");
        let port = free_port();
        Some(Redis {
            child: start_redis(port, &dir),
            port,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kill it (SIGKILL) and start it again on the same port, empty.
    pub async fn restart_empty(&mut self, down_for: Duration) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        tokio::time::sleep(down_for).await;
        self.child = start_redis(self.port, &self._dir);
        assert!(wait_for_listener(SocketAddr::from(([127, 0, 0, 1], self.port))).await);
    }

    pub fn stop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Every key of cluster `name`.
    pub async fn keys(&self, name: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("ferry:{name}:*"))
            .query_async(&mut c)
            .await
            .unwrap();
        keys.sort();
        keys
    }
}

pub fn start_redis(port: u16, dir: &TempDir) -> ChildGuard {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    ChildGuard(child)
}

/// One real `ferry` node of cluster `name`, its HTTP on 127.0.0.1 and a wildcard-free media port.
pub struct Node {
    pub child: ChildGuard,
    pub http: SocketAddr,
    _log: TempDir,
}

impl Node {
    pub async fn start(redis: &Redis, name: &str, extra: &[&str]) -> Node {
        let (http, media) = (free_port(), free_port());
        let log = TempDir::new("ferry-node");
        let out = std::fs::File::create(log.path().join("ferry.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "--http-listen",
                &format!("127.0.0.1:{http}"),
                "--media-listen",
                &format!("127.0.0.1:{media}"),
                "--redis-url",
                &redis.url(),
                "--cluster-name",
                name,
                "--node-address",
                &format!("http://127.0.0.1:{http}"),
                "--cluster-secret",
                CLUSTER_SECRET,
                "--node-ttl",
                NODE_TTL,
                "--empty-room-ttl",
                "1s",
                "--drain-timeout",
                "10s",
            ])
            .args(extra)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start ferry");
        let http = SocketAddr::from(([127, 0, 0, 1], http));
        assert!(wait_for_listener(http).await, "ferry did not listen");
        Node {
            child: ChildGuard(child),
            http,
            _log: log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    pub fn sigterm(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    /// The node's id (its log says it when it starts).
    pub fn id(&self) -> String {
        let log = self.log();
        let at = log.find("node=").map(|i| &log[i + 5..]).unwrap_or_default();
        at.split_whitespace()
            .next()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._log.path().join("ferry.log")).unwrap_or_default()
    }
}

/// Wait until every node's registry shows `n` nodes (each node reads it at its heartbeat).
pub async fn until_nodes_seen(nodes: &[&Node], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in nodes {
        loop {
            let (_, body) = http_get(node.http, "/readyz").await;
            if body.contains(&format!("{n} nodes seen")) && body.contains("redis reachable") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never saw {n} nodes: {body}",
                node.http
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn cluster_name(test: &str) -> String {
    format!("{test}-{:x}", rand::random::<u32>())
}

/// nginx in front of `nodes`, round-robin (no hashing: correctness must not depend on it), as
/// docs/deploy.md's cluster section shows but on loopback and with every path inside `dir`.
/// Stopped by PID when dropped.
pub fn nginx_round_robin(dir: &TempDir, listen: u16, nodes: &[SocketAddr]) -> ChildGuard {
    let d = dir.path().display();
    let servers: String = nodes
        .iter()
        .map(|n| format!("        server {n} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    let conf = format!(
        r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream ferry {{
{servers}    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://ferry;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_connect_timeout 2s;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_buffering off;
        }}
    }}
}}
"#
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let nginx = if std::path::Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let child = Command::new(nginx)
        .args([
            "-c",
            path.to_str().unwrap(),
            "-p",
            dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    ChildGuard(child)
}

/// A Redis and `N` nodes of a fresh cluster (named after `short`), every node seeing all of
/// them; `None` when redis-server is missing outside CI (the test says it is skipped).
pub async fn start_cluster<const N: usize>(
    test: &str,
    short: &str,
) -> Option<(Redis, String, [Node; N])> {
    let redis = Redis::start(test)?;
    let name = cluster_name(short);
    let mut nodes = Vec::new();
    for _ in 0..N {
        nodes.push(Node::start(&redis, &name, &[]).await);
    }
    until_nodes_seen(&nodes.iter().collect::<Vec<_>>(), N).await;
    let nodes: [Node; N] = nodes.try_into().unwrap_or_else(|_| unreachable!());
    Some((redis, name, nodes))
}
