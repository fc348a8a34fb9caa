//! The provisioner as a fleet service, end to end with a real nats-server:
//! it republishes devices' lifecycle events only under their own names,
//! it logs garbage within a budget and counts it, and it stops on SIGTERM
//! whatever its server does. Also: the operator commands' answer to an
//! unknown id, and the device grant in the docs against the issued JWT.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use data_encoding::BASE64URL_NOPAD;
use perch_protocol::lifecycle::{Event, Kind};
use perch_protocol::subjects;
use perch_protocol::token::SignedToken;
use perch_tests::fleet::{wait_for, Device, Fleet};
use perch_tests::nats::RawClient;

fn enroll(d: &Device, token: &std::path::Path) {
    let r = d.agent(&["enroll", "--device-id", d.name.as_str(), "--token-file", token.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

fn event(kind: Kind, identity: &str, n: u8) -> String {
    String::from_utf8(Event::new(kind, identity, "0.1.0", [n; 16], 1_700_000_000).to_json()).unwrap()
}

#[test]
fn a_device_cannot_publish_lifecycle_events_under_another_device_s_name() {
    // Two provisioners: each event comes out once (one queue group).
    let f = Fleet::start(2);
    let token = f.token_file("token", &["--group", "north", "--uses", "2"]);
    let (x, y) = (f.device("dev-x"), f.device("dev-y"));
    enroll(&x, &token);
    enroll(&y, &token);
    let reader = f.reports_reader();
    let mut out = reader.subscribe("choria.lifecycle.event.>");
    let (mut cx, hello) = f.raw_as(&x);
    assert_eq!(hello, "PONG");

    // X claims to be Y on its own subject: taken by the server, dropped by the provisioner.
    assert_eq!(cx.publish(&subjects::lifecycle("dev-x"), None, &event(Kind::Startup, "dev-y", 1)), "PONG");
    // X cannot publish on Y's subject, nor on Choria's subjects directly.
    for subject in [
        subjects::lifecycle("dev-y"),
        "choria.lifecycle.event.startup.perch".to_string(),
        "choria.lifecycle.event.shutdown.perch".to_string(),
        "choria.lifecycle.event.alive.perch".to_string(),
    ] {
        let answer = cx.publish(&subject, None, &event(Kind::Startup, "dev-y", 2));
        assert!(answer.contains("Permissions Violation"), "{subject}: {answer}");
    }
    // X's own event comes out, as it was sent, and is the only one.
    let own = event(Kind::Startup, "dev-x", 3);
    assert_eq!(cx.publish(&subjects::lifecycle("dev-x"), None, &own), "PONG");
    let m = out.next(Duration::from_secs(10)).expect("X's own startup event");
    assert_eq!(m.subject.as_str(), "choria.lifecycle.event.startup.perch");
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["identity"], "dev-x");
    assert_eq!(m.payload.as_ref(), own.as_bytes());
    let shutdown = event(Kind::Shutdown, "dev-x", 4);
    assert_eq!(cx.publish(&subjects::lifecycle("dev-x"), None, &shutdown), "PONG");
    let m = out.next(Duration::from_secs(10)).expect("X's own shutdown event");
    assert_eq!(m.subject.as_str(), "choria.lifecycle.event.shutdown.perch");
    assert_eq!(m.payload.as_ref(), shutdown.as_bytes());
    if let Some(m) = out.next(Duration::from_millis(500)) {
        panic!("unexpected event on {}: {:?}", m.subject, m.payload);
    }
    let log = f.all_logs();
    assert!(log.contains("dropped a bad lifecycle event"), "{log}");
}

/// Lines of `log` that contain `what`.
fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

#[test]
fn a_burst_of_garbage_costs_the_provisioner_log_a_line_per_kind_and_is_counted() {
    const N: usize = 2000;
    let mut f = Fleet::start(1);
    let token = f.token_file("token", &["--group", "north"]);
    let x = f.device("dev-x");
    enroll(&x, &token);
    let reader = f.reports_reader();
    let mut out = reader.subscribe("choria.lifecycle.event.>");
    let (mut cx, hello) = f.raw_as(&x);
    assert_eq!(hello, "PONG");
    // The token's PROVISIONING credential sends garbage requests.
    let t = SignedToken::parse(&std::fs::read_to_string(&token).unwrap()).unwrap();
    let user = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, t.unverified_body().provisioning_seed)
        .unwrap();
    let (mut pc, hello) =
        RawClient::connect(f.server.port, &f.ca_der(), &t.unverified_body().provisioning_jwt(), |n| {
            BASE64URL_NOPAD.encode(&user.sign(n).unwrap())
        });
    assert_eq!(hello, "PONG");
    let inbox = format!("{}.x", subjects::token_inbox_prefix(&t.unverified_body().token_id));
    assert_eq!(pc.subscribe(&inbox, 1), "PONG");
    // Requests in one write (their answers would interleave with PONGs).
    let mut burst = String::new();
    for i in 0..N {
        let garbage = format!("garbage-{i}");
        assert_eq!(cx.publish(&subjects::hello("dev-x"), None, &garbage), "PONG");
        assert_eq!(cx.publish(&subjects::lifecycle("dev-x"), None, &garbage), "PONG");
        burst.push_str(&format!(
            "PUB {} {inbox} {}\r\n{garbage}\r\n",
            subjects::ENROLL_REQUEST,
            garbage.len()
        ));
    }
    pc.send(&burst);
    // Every request was answered (refused), and the events before a good
    // one were all handled: the provisioner has seen the whole burst.
    let mut answers = 0;
    while answers < N {
        assert!(pc.next_msg().is_some(), "{answers} of {N} garbage requests answered");
        answers += 1;
    }
    assert_eq!(cx.publish(&subjects::lifecycle("dev-x"), None, &event(Kind::Startup, "dev-x", 1)), "PONG");
    assert!(out.next(Duration::from_secs(10)).is_some(), "the good event after the burst");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(f.terminate_provisioner(0, Duration::from_secs(10)), Some(0));

    let log = f.log("provisioner-0.log");
    for kind in ["enrollment request", "hello", "lifecycle event"] {
        let lines = count(&log, &format!("dropped a bad {kind} "));
        assert_eq!(lines, 1, "one line for {N} bad {kind}s, not {lines}");
        let summary = count(&log, &format!("more bad {kind}s without a line"));
        assert!(summary <= 1, "{summary} summaries for {kind}");
    }
    let stopped = log.lines().find(|l| l.contains("provisioner stopped")).expect("a last line");
    for field in ["dropped_requests=2000", "dropped_hellos=2000", "dropped_lifecycle_events=2000"] {
        assert!(stopped.contains(field), "{field} in {stopped}");
    }
}

/// Starts an enrollment load against `f`, stops (`STOP`) or kills its
/// server mid-load, and SIGTERMs the provisioner: it must exit 0 within
/// the drain limit and a margin.
fn provisioner_stops_while_its_server(hangs: bool) {
    let mut f = Fleet::start(1);
    let token = f.token_file("token", &["--group", "north", "--uses", "5000"]);
    let load = std::process::Command::new(perch_tests::bin("enroll-load"))
        .args([token.to_str().unwrap(), "5000", "100", "load"])
        .current_dir(f.s.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut load = perch_tests::fleet::Running(load);
    assert!(
        wait_for(Duration::from_secs(20), || f.log("provisioner-0.log").contains("device enrolled")),
        "no enrollments under load"
    );
    if hangs {
        f.server.signal("STOP");
    } else {
        f.server.kill();
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let code = f.terminate_provisioner(0, Duration::from_secs(15));
    if hangs {
        f.server.signal("CONT");
    }
    load.kill();
    assert_eq!(code, Some(0), "{}", f.log("provisioner-0.log"));
    // The drain is capped at DRAIN_LIMIT (5 s) and the runtime's shutdown at
    // 1 s; the rest is slack for a loaded CI machine. A shutdown that waits
    // on the server never ends, and `terminate` gives up at 15 s.
    assert!(started.elapsed() < Duration::from_secs(12), "took {:?}", started.elapsed());
}

#[test]
fn the_provisioner_stops_on_sigterm_while_its_server_hangs() {
    provisioner_stops_while_its_server(true);
}

#[test]
fn the_provisioner_stops_on_sigterm_after_its_server_died() {
    provisioner_stops_while_its_server(false);
}

#[test]
fn the_provisioner_stops_on_sigterm_while_still_connecting_to_a_hung_server() {
    let f = Fleet::start(0);
    f.server.signal("STOP");
    let child = std::process::Command::new(perch_tests::bin("perch-bootstrap"))
        .args(["run", "--dir", "org", "--url", &f.url])
        .current_dir(f.s.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut p = perch_tests::fleet::Running(child);
    std::thread::sleep(Duration::from_millis(500));
    let code = p.terminate(Duration::from_secs(5));
    f.server.signal("CONT");
    assert_eq!(code, Some(0), "a stop while connecting is a clean stop");
}

/// An enrolled agent whose link is up; `perch-agent run` must stop on
/// SIGTERM within its bound whatever the server does.
fn agent_stops_while_its_server(hangs: bool) {
    let mut f = Fleet::start(1);
    let d = f.enrolled_device("dev-r", &f.url, "north", "[link]\nping_interval = \"1s\"\n");
    let mut agent = d.spawn_run();
    let log_file = f.s.path("dev-r-run.log");
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(15), || log().contains("FLEET link up")), "{}", log());
    if hangs {
        f.server.signal("STOP");
    } else {
        f.server.kill();
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let code = agent.terminate(Duration::from_secs(15));
    if hangs {
        f.server.signal("CONT");
    }
    assert_eq!(code, Some(0), "{}", log());
    // A bound with slack for a loaded CI machine; waiting on the server would never end.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn the_agent_stops_on_sigterm_while_its_server_hangs() {
    agent_stops_while_its_server(true);
}

#[test]
fn the_agent_stops_on_sigterm_after_its_server_died() {
    agent_stops_while_its_server(false);
}

#[test]
fn the_agent_stops_on_sigterm_mid_fetch_while_its_server_hangs() {
    let f = Fleet::start(1);
    let d =
        f.enrolled_device("dev-f", &f.url, "north", "[link]\nping_interval = \"1s\"\n[fetch]\nwindow = 4\n");
    std::fs::create_dir_all(d.dir.join("slots/a")).unwrap();
    std::os::unix::fs::symlink("a", d.dir.join("slots/current")).unwrap();
    let (_, digest, _) = f.published_bundle("os", 2, 8 << 20, 5);
    let mut agent = d.spawn_run();
    let log_file = f.s.path("dev-f-run.log");
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(15), || log().contains("FLEET link up")), "{}", log());
    let want = format!("{{\"bundle\": \"{}\"}}", hex::encode(digest));
    f.reports_reader().kv_put("PERCH_DESIRED", "device.dev-f", &want);
    assert!(wait_for(Duration::from_secs(15), || log().contains("fetching it")), "{}", log());
    f.server.signal("STOP");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let code = agent.terminate(Duration::from_secs(30));
    f.server.signal("CONT");
    assert_eq!(code, Some(0), "{}", log());
    // A bound with slack for a loaded CI machine; waiting on the server would never end.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn approve_reject_and_revoke_of_an_unknown_id_exit_2_with_one_line() {
    let f = Fleet::start(0);
    for action in ["approve", "reject", "revoke"] {
        let r = f.admin(&[action, "ghost-1"]);
        assert_eq!(r.code, 2, "{action}: {}", r.stderr);
        assert_eq!(r.stderr, "perch-bootstrap: no device 'ghost-1' in the registry\n", "{action}");
        assert_eq!(r.stdout, "", "{action}");
    }
    // And the pages operators read say the same.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/content");
    let provisioning = std::fs::read_to_string(root.join("operations/provisioning.md")).unwrap();
    assert!(
        provisioning.contains("an unknown id with\n`no device 'ID' in the registry` (exit 2)"),
        "provisioning.md must give exit 2 for an unknown id"
    );
    let cli = std::fs::read_to_string(root.join("reference/cli.md")).unwrap();
    assert!(!cli.contains("Exit 1 if `ID` is unknown"), "cli.md must not give exit 1 for an unknown id");
}

/// The subjects of a user JWT's `pub` or `sub` allow list.
fn jwt_allow(jwt: &str, which: &str) -> BTreeSet<String> {
    let body = jwt.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&BASE64URL_NOPAD.decode(body.as_bytes()).unwrap()).unwrap();
    claims["nats"][which]["allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The device grant table in provisioning.md, for device `id` in `groups`:
/// (publish, subscribe). A row's subject is in backticks; `<id>` is the
/// device id and a row with `<g>` stands for one line per group.
fn docs_grant(id: &str, groups: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/content");
    let page = std::fs::read_to_string(root.join("operations/provisioning.md")).unwrap();
    let section = page.split("## What an enrolled device may do").nth(1).expect("the grant section");
    let table =
        section.split("\n\n").find(|p| p.trim_start().starts_with("| may |")).expect("the grant table");
    let (mut publish, mut subscribe) = (BTreeSet::new(), BTreeSet::new());
    for row in table.lines().skip(2) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (may, subject) = (cells[1], cells[2]);
        assert!(
            subject.starts_with('`') && subject.ends_with('`') && subject.matches('`').count() == 2,
            "{row}"
        );
        let subject = subject.trim_matches('`').replace("<id>", id);
        let all: Vec<String> = if subject.contains("<g>") {
            groups.iter().map(|g| subject.replace("<g>", g)).collect()
        } else {
            vec![subject]
        };
        match may {
            "publish" => publish.extend(all),
            "subscribe" => subscribe.extend(all),
            other => panic!("{other}: {row}"),
        }
    }
    (publish, subscribe)
}

#[test]
fn the_device_grant_in_the_docs_is_the_one_in_the_code_and_in_the_issued_jwt() {
    let (docs_pub, docs_sub) = docs_grant("dev-a", &["north", "south"]);
    let g = subjects::device_grant("dev-a", &["north".into(), "south".into()]);
    assert_eq!(docs_pub, g.publish.iter().cloned().collect::<BTreeSet<_>>(), "publish: docs vs code");
    assert_eq!(docs_sub, g.subscribe.iter().cloned().collect::<BTreeSet<_>>(), "subscribe: docs vs code");
    // And what a provisioner actually issues.
    let f = Fleet::start(1);
    let token = f.token_file("token", &["--group", "north", "--group", "south"]);
    let d = f.device("dev-a");
    enroll(&d, &token);
    let jwt = d.enrollment().user_jwt;
    assert_eq!(jwt_allow(&jwt, "pub"), docs_pub, "publish: docs vs issued JWT");
    assert_eq!(jwt_allow(&jwt, "sub"), docs_sub, "subscribe: docs vs issued JWT");
}
