//! The agent as a service: it tells systemd it is ready and alive (the
//! notify protocol on `$NOTIFY_SOCKET`, with a watchdog), and tells Choria
//! tooling it started and stopped (lifecycle events on the FLEET link).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use perch_tests::fleet::{wait_for, Fleet, Subscription};

/// The next event on `subject` within `limit`, skipping others; parsed.
fn next_on(events: &mut Subscription, subject: &str, limit: Duration) -> Option<serde_json::Value> {
    let until = std::time::Instant::now() + limit;
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        let m = events.next(left)?;
        if m.subject.as_str() == subject {
            let v = serde_json::from_slice(&m.payload).expect("an event is JSON");
            perch_tests::schema::check("wire/lifecycle", &v);
            return Some(v);
        }
    }
    None
}

#[test]
fn ready_watchdog_and_choria_lifecycle_events() {
    let f = Fleet::start(1);
    let d = f.enrolled_device("svc-1", &f.url, "g", "[link]\nping_interval = \"1s\"\n");
    let reader = f.reports_reader();
    let mut events = reader.subscribe("choria.lifecycle.event.>");
    // systemd's side of the notify protocol.
    let sock_path = d.dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&sock_path).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut agent =
        d.spawn_run_env(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")]);
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).expect("no READY=1");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    eprintln!("systemd heard: {ready:?}");
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    // Then pings at half the watchdog timeout, and the state once the
    // journal's work is done.
    let (mut pings, mut status) = (0, None);
    while pings < 3 || status.is_none() {
        let n = systemd.recv(&mut buf).expect("systemd heard nothing more");
        match &buf[..n] {
            b"WATCHDOG=1" => pings += 1,
            other => status = Some(String::from_utf8_lossy(other).to_string()),
        }
    }
    assert_eq!(status.as_deref(), Some("STATUS=deploy idle"));
    let v = next_on(&mut events, "choria.lifecycle.event.startup.perch", Duration::from_secs(15))
        .expect("no startup event");
    assert_eq!(v["protocol"], "io.choria.lifecycle.v1.startup");
    assert_eq!(v["identity"], "svc-1");
    assert_eq!(v["component"], "perch");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["id"].as_str().map(str::len), Some(36));

    // SIGTERM: STOPPING=1, a shutdown event, exit 0.
    assert_eq!(agent.terminate(Duration::from_secs(10)), Some(0), "{}", f.log("svc-1-run.log"));
    let stopping = wait_for(Duration::from_secs(5), || {
        systemd.recv(&mut buf).is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"))
    });
    assert!(stopping, "no STOPPING=1");
    let v = next_on(&mut events, "choria.lifecycle.event.shutdown.perch", Duration::from_secs(5))
        .expect("no shutdown event");
    assert_eq!(v["protocol"], "io.choria.lifecycle.v1.shutdown");
    assert_eq!(v["identity"], "svc-1");
}

#[test]
fn choria_sees_devices_provisioned_alive_and_upgraded_and_the_provisioner_come_and_go() {
    let mut f = Fleet::start(1);
    let reader = f.reports_reader();
    let mut events = reader.subscribe("choria.lifecycle.event.>");
    let secs = Duration::from_secs;

    // A second provisioner announces itself as its own component.
    f.start_provisioner();
    let up = next_on(&mut events, "choria.lifecycle.event.startup.perch-provisioner", secs(10))
        .expect("no provisioner startup event");
    assert_eq!(
        (&up["component"], &up["version"]),
        (&"perch-provisioner".into(), &env!("CARGO_PKG_VERSION").into())
    );
    assert!(up["identity"].as_str().is_some_and(|i| !i.is_empty()), "{up}");
    assert_eq!(f.terminate_provisioner(1, secs(10)), Some(0));
    let down = next_on(&mut events, "choria.lifecycle.event.shutdown.perch-provisioner", secs(10))
        .expect("no provisioner shutdown event");
    assert_eq!(down["protocol"], "io.choria.lifecycle.v1.shutdown");

    // A desktop enrolls online: provisioned, once its daemon has a link.
    let d = f.device("desk-1");
    std::fs::copy(f.s.path("org/trust.doc"), d.trust()).unwrap();
    let token = f.token_file("desk-1.token", &["--group", "desktops"]);
    let r = d.agent(&["enroll", "--device-id", "desk-1", "--token-file", token.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    d.write_config("[reports]\nheartbeat = \"300ms\"\n");
    let mut agent = d.spawn_run();
    let p = next_on(&mut events, "choria.lifecycle.event.provisioned.perch", secs(15))
        .expect("no provisioned event");
    assert_eq!((&p["identity"], &p["component"]), (&"desk-1".into(), &"perch".into()), "{p}");
    assert!(p.get("version").is_none(), "{p}");
    // alive, on the heartbeat.
    for _ in 0..2 {
        let a = next_on(&mut events, "choria.lifecycle.event.alive.perch", secs(5)).expect("no alive event");
        assert_eq!((&a["identity"], &a["version"]), (&"desk-1".into(), &env!("CARGO_PKG_VERSION").into()));
    }

    // Two deploys commit: upgraded names the bundles before and after.
    for (counter, before) in [(1, "none"), (2, "app@1")] {
        std::fs::create_dir_all(f.s.path(&format!("app{counter}"))).unwrap();
        std::fs::write(f.s.path(&format!("app{counter}/app")), format!("app {counter}\n")).unwrap();
        let file = format!("app{counter}.perch");
        f.s.signed_archive("app", counter, &format!("app{counter}"), &file);
        let r = d.agent(&["install", f.s.path(&file).to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let u = next_on(&mut events, "choria.lifecycle.event.upgraded.perch", secs(15))
            .expect("no upgraded event");
        assert_eq!(
            (&u["version"], &u["new_version"]),
            (&before.into(), &format!("app@{counter}").into()),
            "{u}"
        );
        assert_eq!(u["protocol"], "io.choria.lifecycle.v1.upgraded");
    }
    // What the device reported: heartbeats and the deploys, as the id it
    // enrolled with.
    let kinds = || {
        let mut kinds = std::collections::BTreeSet::new();
        for r in reader.all() {
            // (The reader checks each against schemas/wire/report.json.)
            let v = serde_json::to_value(&r).unwrap();
            // As enrolled (--device-id), not as configured (the hostname).
            assert_eq!(v["device"], "desk-1", "{v}");
            let kind = v["kind"].as_object().and_then(|k| k.keys().next().cloned());
            kinds.insert(kind.unwrap_or(v["kind"].to_string()));
        }
        kinds
    };
    // A local install is reported by the daemon's journal watch (within
    // 2 s), as its outcome: no transfer, which only a fleet deploy makes
    // (checked in link.rs).
    let wanted = ["\"Heartbeat\"", "Deploy"].map(String::from);
    let all_kinds = wait_for(secs(15), || wanted.iter().all(|k| kinds().contains(k)));
    assert!(all_kinds, "not every kind of report among {:?}", kinds());

    // Each once: nothing more of them from the stopping daemon, nor from a
    // restarted one (every event up to its startup, and 3 s after).
    assert_eq!(agent.terminate(secs(10)), Some(0));
    let _again = d.spawn_run();
    let (mut seen, mut restarted) = (vec![], false);
    let until = std::time::Instant::now() + secs(15);
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        let Some(m) = events.next(left) else { break };
        let kind = m.subject.to_string();
        if kind == "choria.lifecycle.event.startup.perch" && !restarted {
            restarted = true;
            let after = std::time::Instant::now() + secs(3);
            if until > after {
                // Watch 3 s past the new startup, then stop.
                while let Some(left) = after.checked_duration_since(std::time::Instant::now()) {
                    let Some(m) = events.next(left) else { break };
                    seen.push(m.subject.to_string());
                }
                break;
            }
        }
        seen.push(kind);
    }
    assert!(restarted, "no startup after the restart: {seen:?}");
    let again: Vec<_> =
        seen.iter().filter(|k| k.contains(".upgraded.") || k.contains(".provisioned.")).collect();
    assert!(again.is_empty(), "sent again: {again:?}");
}
