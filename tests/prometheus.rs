//! Ferry as Prometheus and Grafana see it: the metrics catalogue (docs/metrics.md), the dashboard
//! and the alert rules in grafana/, checked statically, with promtool, and against a real
//! Prometheus scraping a real Ferry through a session (P2P signaling and relayed media).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::rtc_client::{MediaClient, Publish};
use common::*;
use serde_json::{Value, json};

const SLICE: Duration = Duration::from_millis(5);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo("grafana/dashboards/ferry.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter().cloned());
        }
    }
    out
}

/// `(panel title, expression)` for every query of every panel.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or_default().to_string(),
                t["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// A dashboard expression as Prometheus can run it: Grafana's variables replaced by values that
/// select everything.
fn substitute(expr: &str) -> String {
    let s = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", ".*")
        .replace("$instance", ".*");
    assert!(
        !s.contains('$'),
        "a variable this test does not know: {expr}"
    );
    s
}

/// The metric names an expression selects (outside quoted strings).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_quotes = false;
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if in_quotes {
            in_quotes = c != '"';
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if word.starts_with("ferry_") || word.starts_with("process_") || word == "up" {
            names.insert(word.clone());
        }
        word.clear();
        in_quotes = c == '"';
    }
    names
}

/// The metric families Ferry exports: name -> type, from a fresh registry.
fn exported_families() -> BTreeMap<String, String> {
    let text = every_metric();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, ty) = l.split_once(' ').unwrap();
            (name.to_string(), ty.to_string())
        })
        .collect()
}

/// What a node exports, a cluster node's metrics included.
fn every_metric() -> String {
    let m = ferry::metrics::Metrics::new();
    let _cluster = ferry::cluster::ClusterMetrics::new(&m.registry);
    m.render()
}

/// The family a sample name belongs to (`_bucket`, `_sum`, `_count` of a histogram).
fn family_of(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        (families.get(base).map(String::as_str) == Some("histogram")).then(|| base.to_string())
    })
}

/// The expressions of the alert rules file, read the simple way it is written: `expr:` on one
/// line, or `expr: |` and an indented block.
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo("grafana/alerts/ferry.rules.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let Some((indent, rest)) = l.split_once("expr:") else {
            continue;
        };
        if !indent.trim().is_empty() {
            continue;
        }
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_string());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let deeper = next.len() - next.trim_start().len() > indent.len();
            if !deeper && !next.trim().is_empty() {
                break;
            }
            block.push_str(next.trim());
            block.push(' ');
            lines.next();
        }
        out.push(block.trim().to_string());
    }
    let rules = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    assert_eq!(out.len(), rules, "one expr per rule");
    out
}

#[test]
fn the_dashboard_is_a_grafana_10_dashboard_on_a_datasource_variable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 38);
    assert!(!d["uid"].as_str().unwrap().is_empty());
    assert!(d["id"].is_null(), "no instance-specific id");
    let input = &d["__inputs"][0];
    assert_eq!(input["name"], "DS_PROMETHEUS");
    assert_eq!(input["pluginId"], "prometheus");
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert!(
        instance["definition"]
            .as_str()
            .unwrap()
            .starts_with("label_values(ferry_build_info"),
        "{instance}"
    );
    assert_eq!(instance["includeAll"], true);
    assert_eq!(instance["allValue"], ".*");

    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    let mut rows = 0;
    let all = panels(&d);
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, w, h) = (
            g["x"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        if p["type"] == "row" {
            rows += 1;
            continue;
        }
        assert_eq!(p["datasource"], ds, "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            for name in metric_names(expr) {
                // Every selector is narrowed by the variables.
                let at = expr.find(&format!("{name}{{")).unwrap_or_else(|| {
                    panic!("{title}: {name} without a label selector in {expr}")
                });
                let selector = &expr[at..];
                let selector = &selector[..selector.find('}').unwrap()];
                assert!(
                    selector.contains("instance=~\"$instance\"")
                        && selector.contains("job=~\"$job\""),
                    "{title}: {name} not filtered by $job and $instance in {expr}"
                );
            }
        }
    }
    assert!(rows >= 6, "rows answer the operator's questions in order");
    // The rows come in the order of the questions.
    let row_titles: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for (row, word) in row_titles
        .iter()
        .zip(["up", "relayed", "media", "link", "healthy", "process"])
    {
        assert!(row.contains(word), "row {row:?} should be about {word}");
    }
}

#[test]
fn the_dashboard_and_rules_use_only_metrics_ferry_exports() {
    let families = exported_families();
    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_exprs(&dashboard()) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{title}: selects no metric: {expr}");
        used.extend(names);
    }
    for expr in rule_exprs() {
        used.extend(metric_names(&expr));
    }
    for name in &used {
        if name == "up" {
            continue; // Prometheus's own, per target
        }
        assert!(
            family_of(name, &families).is_some(),
            "{name} is used but Ferry does not export it"
        );
    }
}

/// docs/metrics.md has a table row per metric: name, type, then its labels with every value the
/// code produces.
#[test]
fn every_exported_metric_is_documented_with_its_labels() {
    let doc = std::fs::read_to_string(repo("docs/metrics.md")).unwrap();
    let rows: BTreeMap<String, String> = doc
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("| `")?;
            let name = &rest[..rest.find('`')?];
            Some((name.to_string(), l.to_string()))
        })
        .collect();
    let families = exported_families();
    let text = every_metric();
    for (name, ty) in &families {
        let row = rows
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in docs/metrics.md"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], ty, "{name}: documented type");
        // Label names and values of its samples (a histogram's `le` aside).
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some(labels) = line
                .strip_prefix(name.as_str())
                .and_then(|r| r.strip_prefix('{'))
            else {
                continue;
            };
            for pair in labels[..labels.find('}').unwrap()].split(',') {
                let (label, value) = pair.split_once('=').unwrap();
                let value = value.trim_matches('"');
                if label == "le" || (name == "ferry_build_info" && label == "version") {
                    assert!(cells[3].contains(&format!("`{label}`")), "{name}: {label}");
                    continue;
                }
                assert!(
                    cells[3].contains(&format!("`{label}`")),
                    "{name}: label {label} not documented"
                );
                assert!(
                    cells[3].contains(&format!("`{value}`")),
                    "{name}: value {label}={value} not documented"
                );
            }
        }
    }
    for name in rows.keys() {
        assert!(
            families.contains_key(name),
            "docs/metrics.md documents {name}, which Ferry does not export"
        );
    }
}

#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    let test = "promtool_checks_and_tests_the_alert_rules";
    if !program_available("promtool", "--version", test, "prometheus") {
        return;
    }
    let dir = repo("grafana/alerts");
    let out = Command::new("promtool")
        .args(["check", "rules", "ferry.rules.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool check rules: {said}");
    assert!(!said.contains("WARNING"), "{said}");
    let out = Command::new("promtool")
        .args(["test", "rules", "ferry.rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool test rules: {said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

/// A Prometheus on loopback, scraping one target as job "ferry" every second and evaluating the
/// repository's alert rules. Killed by PID when dropped.
/// The values in a query's `data`: an instant vector's samples, or the scalar.
fn sample_values(data: &Value) -> Vec<f64> {
    let number = |v: &Value| -> f64 { v.as_str().unwrap().parse().unwrap() };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| number(&s["value"][1]))
            .collect(),
        Some("scalar") => vec![number(&data["result"][1])],
        other => panic!("unexpected result type {other:?}"),
    }
}

struct Prometheus {
    addr: SocketAddr,
    // Fields drop in order: the process goes before its directory.
    _child: ChildGuard,
    dir: TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("ferry-prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: ['{target}']\n",
            rules = repo("grafana/alerts/ferry.rules.yml").display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            addr,
            _child: ChildGuard(child),
            dir,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http10_get(addr, "/-/ready").await.0 == 200
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Prometheus did not become ready: {}", p.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str) -> Value {
        let (status, body) = http10_get(self.addr, path).await;
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("{path}: HTTP {status}, not JSON: {body}"));
        v
    }

    /// An instant query: `Ok(result)` or `Err(error)`.
    async fn query(&self, promql: &str) -> Result<Value, String> {
        let v = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// The values of an instant vector (or the scalar) a query returns.
    async fn values(&self, promql: &str) -> Vec<f64> {
        let data = self
            .query(promql)
            .await
            .unwrap_or_else(|e| panic!("{promql}: {e}"));
        sample_values(&data)
    }

    /// Wait (bounded) until a query returns a value at least `min`.
    async fn wait_for(&self, promql: &str, min: f64) {
        for _ in 0..300 {
            if self.values(promql).await.iter().any(|v| *v >= min) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Prometheus never saw {promql} >= {min}: {}", self.log());
    }
}

fn payload(i: u16) -> Bytes {
    Bytes::from(format!("ferry-payload-{i:06}-").repeat(24))
}

async fn pump_both(publ: &mut MediaClient, sub: &mut MediaClient, n: usize) {
    for _ in 0..n {
        publ.pump(SLICE).await;
        sub.pump(SLICE).await;
    }
}

async fn stream(publ: &mut MediaClient, sub: &mut MediaClient, first: u16, n: u16) {
    for i in first..first + n {
        publ.send(i, payload(i));
        pump_both(publ, sub, 1).await;
    }
    pump_both(publ, sub, 100).await;
}

/// A STUN Binding request (RFC 5389 header, no attributes).
fn stun_binding_request() -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    m.extend(rand::random::<[u8; 12]>());
    m
}

/// What Ferry sees in a session worth of traffic: two members calling P2P (signaling only), two
/// more in a relayed room sending video with loss on both legs, a signaling error, a STUN binding
/// and a garbage datagram on the media port. Everything stays connected until the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_alert_expression() {
    let test = "prometheus_evaluates_every_dashboard_and_alert_expression";
    if !program_available("prometheus", "--version", test, "prometheus")
        || !program_available("promtool", "--version", test, "prometheus")
    {
        return;
    }
    // A node of a cluster (with a real Redis), so that the cluster's panels have data too.
    let Some(redis) = common::cluster::Redis::start(test) else {
        return;
    };
    let mut cfg = test_config();
    cfg.cluster = Some(ferry::config::ClusterConfig {
        redis_url: redis.url(),
        name: common::cluster::cluster_name("prom"),
        node_id: "n-prom".into(),
        node_address: "http://127.0.0.1:1".into(),
        secret: common::cluster::CLUSTER_SECRET.into(),
        node_ttl: Duration::from_secs(2),
    });
    let s = spawn(cfg).await;
    let prom = Prometheus::start(s.addr).await;
    prom.wait_for("up{job=\"ferry\"}", 1.0).await;

    // P2P: signaling relayed between two members.
    let (mut a, mut b, _) = two_in_a_room(s.addr, "alice", "bob").await;
    a.request("offer", json!({"to": b.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(b.event().await["type"], "offer");
    b.request("answer", json!({"to": a.user_id, "sdp": "v=0\r\n"}))
        .await
        .unwrap();
    assert_eq!(a.event().await["type"], "answer");
    a.request(
        "candidate",
        json!({"to": b.user_id, "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}}),
    )
    .await
    .unwrap();
    let e = a.request("noSuchThing", json!({})).await.unwrap_err();
    assert_eq!(e.0, "unknown_type");

    // Relayed media.
    let mut p = Client::joined_hello(s.addr, "publisher").await;
    let room = p.create_room(json!({"mode": "relay"})).await;
    p.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    let mut q = Client::joined_hello(s.addr, "subscriber").await;
    q.request("joinRoom", json!({"roomId": room}))
        .await
        .unwrap();
    q.request("subscribe", json!({"userId": p.user_id}))
        .await
        .unwrap();
    p.request(
        "reportMode",
        json!({"mode": "relay", "reason": "room_mode"}),
    )
    .await
    .unwrap();
    let mut publ = MediaClient::connect(p, true).await;
    let mut sub = MediaClient::connect(q, false).await;
    for _ in 0..1000 {
        pump_both(&mut publ, &mut sub, 1).await;
        if publ.connected && sub.connected {
            break;
        }
    }
    assert!(publ.connected && sub.connected, "relay connections up");
    stream(&mut publ, &mut sub, 0, 100).await;
    sub.drop_every = 7;
    stream(&mut publ, &mut sub, 100, 150).await;
    sub.drop_every = 0;
    publ.drop_sent_every = 5;
    stream(&mut publ, &mut sub, 250, 150).await;
    publ.drop_sent_every = 0;
    stream(&mut publ, &mut sub, 400, 10).await;
    assert!(!sub.received.is_empty(), "media relayed");

    // Simulcast: a publisher of three layers (a keyframe every 10 frames); its subscriber's
    // route takes one of them (a switch up).
    let mut p2 = Client::joined_hello(s.addr, "simulcaster").await;
    let room2 = p2.create_room(json!({"mode": "relay"})).await;
    p2.request("joinRoom", json!({"roomId": room2}))
        .await
        .unwrap();
    let mut q2 = Client::joined_hello(s.addr, "viewer").await;
    q2.request("joinRoom", json!({"roomId": room2}))
        .await
        .unwrap();
    q2.request("subscribe", json!({"userId": p2.user_id}))
        .await
        .unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut spub = MediaClient::connect_full(
        p2,
        Publish::Simulcast,
        0x5200_0000,
        false,
        Vec::new(),
        None,
        socket,
    )
    .await;
    let mut ssub = MediaClient::connect(q2, false).await;
    for _ in 0..1000 {
        pump_both(&mut spub, &mut ssub, 1).await;
        if spub.connected && ssub.connected {
            break;
        }
    }
    for i in 0..40u16 {
        let frame = if i % 10 == 0 { 0x9c } else { 0x9d };
        for layer in 0..3 {
            spub.send_layer(
                layer,
                i,
                Bytes::from(vec![0x10, frame, layer as u8, 0, 0, 0]),
            );
        }
        pump_both(&mut spub, &mut ssub, 1).await;
    }
    pump_both(&mut spub, &mut ssub, 50).await;
    assert!(!ssub.received.is_empty(), "a simulcast layer relayed");

    // The media port: a STUN binding, and a datagram that is nothing.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&stun_binding_request(), s.media_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .expect("STUN answered")
        .unwrap();
    udp.send_to(b"\xffnot a datagram Ferry knows", s.media_addr)
        .await
        .unwrap();

    for _ in 0..200 {
        if s.hub
            .metrics
            .media_dropped
            .with_label_values(&["malformed"])
            .get()
            > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Prometheus has scraped the end of it.
    let (_, text) = http_get(s.addr, "/metrics").await;
    for (series, promql) in [
        (
            "ferry_retransmits_total",
            "ferry_retransmits_total{job=\"ferry\"}",
        ),
        (
            "ferry_nacks_total{direction=\"sent\"}",
            "ferry_nacks_total{job=\"ferry\",direction=\"sent\"}",
        ),
        (
            "ferry_media_dropped_total{reason=\"malformed\"}",
            "ferry_media_dropped_total{job=\"ferry\",reason=\"malformed\"}",
        ),
        (
            "ferry_stun_bindings_total",
            "ferry_stun_bindings_total{job=\"ferry\"}",
        ),
    ] {
        let v = metric(&text, series).unwrap_or_else(|| panic!("{series} in {text}"));
        assert!(v >= 1.0, "{series} = {v}: the session did not move it");
        prom.wait_for(promql, v).await;
    }

    // Every dashboard query evaluates and has data. Those about something the session did have
    // a value above zero; a few are about trouble this healthy session did not have.
    let quiet_panels = [
        // Drops on the relay path itself (full send buffer, refused, undecryptable): none here.
        "Relay-path drop ratio",
        // No relay connection failed.
        "Relay connection failures /min by stage",
        // One node: no member of another node, nothing forwarded, nothing failed or moved.
        "Member links",
        "Forwarded signaling",
        "Directory failures, takeovers, lost rooms",
    ];
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let mut problems = Vec::new();
    for (title, expr) in &exprs {
        let promql = substitute(expr);
        let values = match prom.query(&promql).await {
            Ok(data) => sample_values(&data),
            Err(e) => {
                problems.push(format!("{title}: {e}: {promql}"));
                continue;
            }
        };
        if values.is_empty() {
            problems.push(format!("{title}: no data: {promql}"));
        } else if !quiet_panels.contains(&title.as_str()) && !values.iter().any(|v| *v > 0.0) {
            problems.push(format!("{title}: all zero {values:?}: {promql}"));
        }
    }
    // The template variables' queries find this instance and job.
    for v in d["templating"]["list"].as_array().unwrap() {
        let Some(def) = v["definition"].as_str() else {
            continue;
        };
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {def}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let promql = substitute(&format!("count by ({}) ({selector})", label.trim()));
        if prom.values(&promql).await.is_empty() {
            problems.push(format!("variable {}: no values: {promql}", v["name"]));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // Every alert rule is loaded, evaluated without error, and selects metrics that exist.
    let rules_file = rule_exprs();
    let mut loaded = Vec::new();
    for _ in 0..100 {
        let v = prom.api("/api/v1/rules").await;
        loaded = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect::<Vec<Value>>();
        if loaded.len() == rules_file.len() && loaded.iter().all(|r| r["health"] == "ok") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(loaded.len(), rules_file.len(), "rules loaded: {loaded:#?}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r:#}");
        let query = r["query"].as_str().unwrap();
        prom.query(query)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", r["name"]));
    }
    for expr in &rules_file {
        prom.query(expr)
            .await
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        for name in metric_names(expr) {
            let exists = format!("count({{__name__=\"{name}\", job=\"ferry\"}})");
            assert!(
                !prom.values(&exists).await.is_empty(),
                "the rule selects {name}, which Prometheus does not have: {expr}"
            );
        }
    }

    // promtool has nothing to say about the exposition, every label value present.
    let (_, text) = http_get(s.addr, "/metrics").await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );

    drop(prom);
    drop((a, b, publ, sub));
    s.shutdown.shutdown();
}
