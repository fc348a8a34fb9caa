//! The agent as a service: it tells systemd it is ready and alive (the
//! notify protocol on `$NOTIFY_SOCKET`, with a watchdog), and tells Choria
//! tooling it started and stopped (lifecycle events on the FLEET link).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use perch_tests::fleet::{wait_for, Fleet};

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
    let startup = events.next(Duration::from_secs(15)).expect("no startup event");
    assert_eq!(startup.subject.as_str(), "choria.lifecycle.event.startup.perch");
    let v: serde_json::Value = serde_json::from_slice(&startup.payload).unwrap();
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
    let shutdown = events.next(Duration::from_secs(5)).expect("no shutdown event");
    assert_eq!(shutdown.subject.as_str(), "choria.lifecycle.event.shutdown.perch");
    let v: serde_json::Value = serde_json::from_slice(&shutdown.payload).unwrap();
    assert_eq!(v["protocol"], "io.choria.lifecycle.v1.shutdown");
    assert_eq!(v["identity"], "svc-1");
}
