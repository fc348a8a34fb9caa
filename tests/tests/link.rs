//! Links that come and go: a fault-injecting proxy between the real agent
//! and a real nats-server. Reports reach `PERCH_REPORTS` exactly once
//! across a blackhole, SIGKILLs and a reboot; a dead link is noticed within
//! three ping intervals and the agent reconnects when it comes back.

use std::time::{Duration, Instant};

use perch_protocol::report::{Report, ReportKind};
use perch_tests::chaos::{Mode, Proxy};
use perch_tests::fleet::{wait_for, Device, Fleet};

/// CI runs the scenarios scaled down; `PERCH_FULL_SIZE=1` (what `cargo
/// xtask bench link --full` sets) runs them at the sizes the issue names:
/// a 100 MiB bundle, and 10,000 reports through a 2-minute outage.
fn full_size() -> bool {
    std::env::var_os("PERCH_FULL_SIZE").is_some()
}

/// An enrolled device whose FLEET URL is the proxy.
fn device_behind(f: &Fleet, proxy: &Proxy, name: &str, extra: &str) -> Device {
    f.enrolled_device(name, &proxy.url(), "g", extra)
}

fn link_state(d: &Device) -> String {
    std::fs::read_to_string(d.state().join("link.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Waits up to 20 s for the device's agent to report its link connected.
fn await_connected(f: &Fleet, d: &Device) {
    let connected = wait_for(Duration::from_secs(20), || link_state(d) == "connected");
    assert!(connected, "{}", f.log(&format!("{}-run.log", d.name)));
}

/// Waits until the reports stream has stopped growing for 3 s.
fn settle(reader: &perch_tests::fleet::ReportsReader) {
    let mut last = (0, Instant::now());
    let settled = wait_for(Duration::from_secs(60), || {
        let n = reader.count();
        if n != last.0 {
            last = (n, Instant::now());
        }
        last.1.elapsed() > Duration::from_secs(3)
    });
    assert!(settled, "the stream never settled");
}

fn kill(c: &mut perch_tests::fleet::Running) {
    c.kill();
}

#[test]
fn a_blackholed_link_is_noticed_within_three_pings_and_comes_back() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = device_behind(&f, &proxy, "rover-1", "[link]\nping_interval = \"1s\"\nmax_backoff = \"1s\"\n");
    let mut agent = d.spawn_run();
    assert!(wait_for(Duration::from_secs(15), || link_state(&d) == "connected"), "{}", f.all_logs());
    proxy.set_mode(Mode::Blackhole);
    let cut = Instant::now();
    assert!(wait_for(Duration::from_secs(6), || link_state(&d) == "disconnected"), "never noticed");
    let noticed = cut.elapsed();
    assert!(noticed <= Duration::from_millis(3300), "dead link noticed after {noticed:?}, more than 3 pings");
    proxy.set_mode(Mode::Pass);
    assert!(wait_for(Duration::from_secs(10), || link_state(&d) == "connected"), "no reconnect");
    kill(&mut agent);
}

#[test]
fn reports_arrive_exactly_once_through_an_outage_a_crash_and_a_reboot() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = device_behind(
        &f,
        &proxy,
        "drone-3",
        "[link]\nping_interval = \"500ms\"\nmax_backoff = \"1s\"\n[reports]\nheartbeat = \"5ms\"\nack_timeout = \"2s\"\n",
    );
    let reader = f.reports_reader();
    let mut agent = d.spawn_run();
    assert!(wait_for(Duration::from_secs(15), || reader.count() > 50), "{}", f.all_logs());
    // The link goes dark; reports pile up in the outbox.
    proxy.set_mode(Mode::Blackhole);
    // Three phases of the outage: 3 s each in CI, 40 s each (2 minutes) at full size.
    let phase = Duration::from_secs(if full_size() { 40 } else { 3 });
    std::thread::sleep(phase);
    // The agent is killed mid-outage and starts again.
    kill(&mut agent);
    agent = d.spawn_run();
    std::thread::sleep(phase);
    // A reboot: a new boot id, another hard stop.
    std::fs::write(d.dir.join("boot_id"), "boot-2\n").unwrap();
    kill(&mut agent);
    agent = d.spawn_run();
    std::thread::sleep(phase);
    proxy.set_mode(Mode::Pass);
    std::thread::sleep(Duration::from_secs(2));
    // Stop making reports; let the last agent drain the outbox.
    kill(&mut agent);
    d.edit_config("heartbeat = \"5ms\"", "heartbeat = \"1h\"");
    let mut drain = d.spawn_run();
    settle(&reader);
    kill(&mut drain);
    let reports: Vec<Report> = reader.all();
    let mut seqs: Vec<u64> = reports.iter().map(|r| r.seq).collect();
    seqs.sort();
    let n = seqs.len() as u64;
    let floor = if full_size() { 10_000 } else { 1500 };
    assert!(n > floor, "only {n} reports: the outage did not queue enough to mean anything");
    eprintln!("{n} reports stored, each exactly once");
    let dupes = seqs.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(dupes, 0, "{dupes} reports stored twice");
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "gaps in the sequence");
    assert!(reports.iter().all(|r| !matches!(r.kind, ReportKind::Dropped { .. })));
    // Both boots are in there, and the device's own id on every one.
    assert!(reports.iter().any(|r| r.boot_id == "boot-1") && reports.iter().any(|r| r.boot_id == "boot-2"));
    assert!(reports.iter().all(|r| r.device == "drone-3"));
    // The operator's view says the same.
    let shown = f.status(&["--device", "drone-3"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(
        shown.stdout.contains(&format!("{n} stored, seq 1..{n}: each once, no gaps")),
        "{}",
        shown.stdout
    );
    let fleet: serde_json::Value = serde_json::from_str(&f.status(&["--json"]).stdout).unwrap();
    let me = fleet["devices"].as_array().unwrap().iter().find(|d| d["id"] == "drone-3").unwrap();
    assert_eq!(me["liveness"], "online");
    assert_eq!(me["boot_id"], "boot-2");
}

#[test]
fn a_device_whose_state_was_wiped_counts_again_from_one_and_no_report_is_taken_for_a_resend() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = device_behind(&f, &proxy, "drone-4", "[reports]\nheartbeat = \"20ms\"\n");
    let reader = f.reports_reader();
    let mut agent = d.spawn_run();
    assert!(wait_for(Duration::from_secs(15), || reader.count() >= 30), "{}", f.all_logs());
    kill(&mut agent);
    settle(&reader);
    let before = reader.all();
    let old_epoch = before[0].epoch;
    // Reflashed in the field: the outbox (and with it the sequence numbers)
    // is gone. Within JetStream's 24 h duplicate window.
    std::fs::remove_dir_all(d.state().join("outbox")).unwrap();
    agent = d.spawn_run();
    let n0 = before.len() as u64;
    assert!(wait_for(Duration::from_secs(15), || reader.count() >= n0 + 10), "{}", f.all_logs());
    kill(&mut agent);
    d.edit_config("heartbeat = \"20ms\"", "heartbeat = \"1h\"");
    let mut drain = d.spawn_run();
    settle(&reader);
    kill(&mut drain);
    let after: Vec<Report> = reader.all().into_iter().filter(|r| r.epoch != old_epoch).collect();
    let mut seqs: Vec<u64> = after.iter().map(|r| r.seq).collect();
    seqs.sort();
    let m = seqs.len() as u64;
    assert!(m >= 10, "only {m} reports after the wipe");
    // Every new report was stored, from 1, though the old ones took the same numbers.
    assert_eq!(seqs, (1..=m).collect::<Vec<_>>());
    assert!(before.iter().all(|r| r.epoch == old_epoch) && before.iter().any(|r| r.seq == 1));
    let shown = f.status(&["--device", "drone-4"]);
    assert!(
        shown.stdout.contains(&format!(
            "{m} stored, seq 1..{m}: each once, no gaps (and {n0} from before its state was wiped)"
        )),
        "{}",
        shown.stdout
    );
    let fleet: serde_json::Value = serde_json::from_str(&f.status(&["--json"]).stdout).unwrap();
    let me = fleet["devices"].as_array().unwrap().iter().find(|d| d["id"] == "drone-4").unwrap();
    assert_eq!(me["last_seq"], m, "the device's state is its newest epoch's");
}

#[test]
fn reports_continue_exactly_once_across_a_server_crash() {
    let mut f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = device_behind(
        &f,
        &proxy,
        "pump-9",
        "[link]\nping_interval = \"500ms\"\nmax_backoff = \"1s\"\n[reports]\nheartbeat = \"10ms\"\nack_timeout = \"2s\"\n",
    );
    let mut agent = d.spawn_run();
    {
        let reader = f.reports_reader();
        assert!(wait_for(Duration::from_secs(15), || reader.count() > 100), "{}", f.all_logs());
    }
    // The server dies hard mid-stream and comes back with its store.
    f.server.restart();
    std::thread::sleep(Duration::from_secs(3));
    kill(&mut agent);
    d.edit_config("heartbeat = \"10ms\"", "heartbeat = \"1h\"");
    let mut drain = d.spawn_run();
    let reader = f.reports_reader();
    settle(&reader);
    kill(&mut drain);
    let mut seqs: Vec<u64> = reader.all().iter().map(|r| r.seq).collect();
    seqs.sort();
    let n = seqs.len() as u64;
    assert!(n > 200, "only {n} reports");
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "duplicates or gaps after a server crash");
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn deploy_state(d: &Device) -> (String, Option<String>) {
    let r = d.agent(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    (
        v["deploy"]["state"].as_str().unwrap_or_default().to_string(),
        v["slots"]["b"]["name"]
            .as_str()
            .map(str::to_string)
            .or_else(|| v["slots"]["a"]["name"].as_str().map(str::to_string)),
    )
}

fn fetch_device(f: &Fleet, proxy: &Proxy, name: &str) -> Device {
    fetch_device_resync(f, proxy, name, "500ms")
}

/// A device that reads the desired state in full only every `resync`; a
/// long one shows that the live watch and the catch-up on reconnect work
/// by themselves.
fn fetch_device_resync(f: &Fleet, proxy: &Proxy, name: &str, resync: &str) -> Device {
    fetch_device_with(f, proxy, name, &format!("resync = \"{resync}\"\n"))
}

/// A fetching device with more `[fetch]` settings.
fn fetch_device_with(f: &Fleet, proxy: &Proxy, name: &str, fetch: &str) -> Device {
    let d = device_behind(
        f,
        proxy,
        name,
        &format!("[link]\nping_interval = \"1s\"\nmax_backoff = \"1s\"\n[fetch]\n{fetch}window = 4\n[health]\ntrial = \"5s\"\n"),
    );
    // The factory image: slot a, running.
    std::fs::create_dir_all(d.dir.join("slots/a")).unwrap();
    std::os::unix::fs::symlink("a", d.dir.join("slots/current")).unwrap();
    d
}

#[test]
fn a_bundle_arrives_over_a_flapping_capped_link_each_chunk_fetched_once() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = fetch_device(&f, &proxy, "rover-2");
    let size: usize = if full_size() { 100 << 20 } else { 6 << 20 };
    // Fixed 256-KiB chunks: enough of them for progress reports (one
    // every 16 chunks), and a known size for the byte count below.
    std::fs::create_dir_all(f.s.path("os-2")).unwrap();
    f.s.write_payload("os-2/data.bin", size, 3);
    let (digest, payload_len) =
        f.s.signed_archive_with("os", 2, "os-2", "os-2.perch", &["--chunking", "fixed"]);
    f.publish("os-2.perch");
    let admin = f.reports_reader();
    admin.kv_put("PERCH_DESIRED", "device.rover-2", &format!("{{\"bundle\": \"{}\"}}", hex(&digest)));
    // 2 MB/s, and the link drops for 3 s every 3 s.
    proxy.set_shape(perch_tests::chaos::Shape { latency: Duration::ZERO, bandwidth: 2_000_000 });
    proxy.flap(Duration::from_secs(3));
    let mut agent = d.spawn_run();
    let limit = Duration::from_secs(if full_size() { 600 } else { 90 });
    let done = wait_for(limit, || deploy_state(&d).0 == "committed");
    proxy.set_mode(Mode::Pass);
    assert!(done, "not committed: {:?}\n{}", deploy_state(&d), f.log("rover-2-run.log"));
    // Every state change and the staging progress were reported.
    let reported = wait_for(Duration::from_secs(20), || {
        admin
            .all()
            .iter()
            .any(|r| matches!(&r.kind, ReportKind::Deploy { state, .. } if state == "committed"))
    });
    kill(&mut agent);
    assert!(reported, "no committed report");
    let reports = admin.all();
    let states: Vec<&str> = reports
        .iter()
        .filter_map(|r| match &r.kind {
            ReportKind::Deploy { state, .. } => Some(state.as_str()),
            _ => None,
        })
        .collect();
    for s in ["staging", "staged", "activating", "trial", "committed"] {
        assert!(states.contains(&s), "no {s} report in {states:?}");
    }
    // Reports say which slot runs and what it holds.
    let last = reports.iter().max_by_key(|r| r.seq).unwrap();
    assert_eq!(last.running_slot.as_deref(), Some("b"));
    assert_eq!(last.running_bundle.as_ref().map(|b| b.counter), Some(2));
    assert!(reports.iter().any(|r| r.running_slot.as_deref() == Some("a")));
    assert!(
        reports.iter().any(|r| matches!(r.kind, ReportKind::Progress { chunks_done, chunk_count } if chunks_done >= 16 && chunk_count > chunks_done)),
        "no progress report"
    );
    let data = std::fs::read(d.dir.join("slots/current/data.bin")).unwrap();
    assert_eq!(data.len(), size);
    // Every chunk crossed the link once, plus at most the window in flight
    // when the link dropped, for each drop (and the protocol's own bytes).
    let (down, _) = proxy.bytes();
    let chunk = 256 * 1024;
    let drops = proxy.connections();
    let allowed = payload_len + drops * 4 * chunk + (1 << 20);
    eprintln!(
        "fetched {down} bytes for a {payload_len}-byte payload over {drops} connections (allowed {allowed})"
    );
    assert!(
        down <= allowed,
        "{down} bytes came down for a {payload_len}-byte payload over {drops} connections"
    );
}

#[test]
fn desired_state_changed_while_offline_and_a_server_restart_is_applied_on_reconnect() {
    let mut f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    // No periodic resync in this test's time: the reconnect alone must do it.
    let d = fetch_device_resync(&f, &proxy, "rover-3", "1h");
    let (_, first, _) = f.published_bundle("os", 2, 1 << 20, 4);
    let (_, second, _) = f.published_bundle("os", 3, 1 << 20, 5);
    {
        let admin = f.reports_reader();
        admin.kv_put("PERCH_DESIRED", "group.g", &format!("{{\"bundle\": \"{}\"}}", hex(&first)));
    }
    let mut agent = d.spawn_run();
    assert!(
        wait_for(Duration::from_secs(60), || deploy_state(&d).0 == "committed"),
        "{}",
        f.log("rover-3-run.log")
    );
    // The device goes offline; meanwhile the operator names release 3 (for
    // this device: its own key beats the group's), and the server restarts.
    proxy.set_mode(Mode::Blackhole);
    std::thread::sleep(Duration::from_secs(1));
    {
        let admin = f.reports_reader();
        admin.kv_put("PERCH_DESIRED", "device.rover-3", &format!("{{\"bundle\": \"{}\"}}", hex(&second)));
    }
    f.server.restart();
    proxy.set_mode(Mode::Pass);
    proxy.reset();
    let upgraded = wait_for(Duration::from_secs(60), || {
        let r = d.agent(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
        v["deploy"]["state"] == "committed" && v["deploy"]["bundle"]["counter"] == 3
    });
    kill(&mut agent);
    assert!(upgraded, "{}", f.log("rover-3-run.log"));
}

#[test]
fn a_put_is_applied_live_and_putting_a_failed_bundle_again_retries_it() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = fetch_device_resync(&f, &proxy, "rover-5", "1h");
    let mut agent = d.spawn_run();
    await_connected(&f, &d);
    let admin = f.reports_reader();
    // A digest nobody published yet: `perch desired` refuses to name it...
    let (bundle, digest, _) = f.bundle("os", 2, 1 << 20, 7);
    let refused = f.operator(&["desired", "set"], &["--device", "rover-5", "--bundle", &bundle]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("is not published"), "{}", refused.stderr);
    // ...but a raw put (the `nats` CLI, say) gets through: the device says,
    // once, that it waits for the bundle (a field site may still be
    // copying it), and fails nothing.
    let want = format!("{{\"bundle\": \"{}\"}}", hex(&digest));
    admin.kv_put("PERCH_DESIRED", "device.rover-5", &want);
    let waiting = |r: &Report| {
        matches!(&r.kind, ReportKind::Deploy { state, reason: Some(why), bundle: Some(b) }
            if state == "waiting" && why.contains("not on the server yet") && *b == digest)
    };
    let said = wait_for(Duration::from_secs(20), || admin.all().iter().any(waiting));
    assert!(said, "the put was not acted on live\n{}", f.log("rover-5-run.log"));
    let deploys =
        |all: Vec<Report>| all.into_iter().filter(|r| matches!(r.kind, ReportKind::Deploy { .. })).count();
    assert_eq!(deploys(admin.all()), 1, "said more than once, or failed: {:?}", admin.all());
    // Published now: it is tried at the next resync (an hour here) or...
    f.publish(&bundle);
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(deploy_state(&d).0, "committed");
    // ...as soon as the operator names it again: a new revision.
    let set = f.operator(&["desired", "set"], &["--device", "rover-5", "--bundle", &bundle]);
    assert_eq!(set.code, 0, "{}", set.stderr);
    let listed = f.operator(&["desired", "list"], &["--json"]);
    assert!(listed.stdout.contains(&hex(&digest)), "{}", listed.stdout);
    // Committed, and the revision recorded (the agent writes its record
    // just after the install returns).
    let recorded = || d.dir.join("state/desired.json").exists();
    let done = wait_for(Duration::from_secs(60), || deploy_state(&d).0 == "committed" && recorded());
    // A restart resumes from the recorded revision: nothing is redone.
    kill(&mut agent);
    assert!(done, "{}", f.log("rover-5-run.log"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("state/desired.json")).unwrap()).unwrap();
    assert_eq!(record["key"], "device.rover-5");
    assert_eq!(record["bundle"], hex(&digest));
}

#[test]
fn desired_state_waits_while_a_technician_holds_the_engine() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let gate = f.s.path("gate");
    let d = device_behind(
        &f,
        &proxy,
        "rover-7",
        &format!(
            "[fetch]\nresync = \"500ms\"\n[health]\ntrial = \"5s\"\n[inhibit]\nfile = \"{}\"\npoll = \"100ms\"\n",
            gate.display()
        ),
    );
    std::fs::create_dir_all(d.dir.join("slots/a")).unwrap();
    std::os::unix::fs::symlink("a", d.dir.join("slots/current")).unwrap();
    let _agent = d.spawn_run();
    await_connected(&f, &d);
    // A technician installs release 2 from a stick; it waits at the gate,
    // holding the deploy engine.
    std::fs::write(&gate, "").unwrap();
    let (local, _, _) = f.bundle("os", 2, 64 << 10, 3);
    let local = f.s.path(&local);
    let _install = d.spawn_agent(&["install", local.to_str().unwrap()], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || deploy_state(&d).0 == "staged"),
        "{}",
        f.log("rover-7-install.log")
    );
    // Meanwhile the fleet asks for release 3: the agent leaves it for later.
    let (bundle, digest, _) = f.bundle("os", 3, 64 << 10, 4);
    f.publish(&bundle);
    let set = f.operator(&["desired", "set"], &["--device", "rover-7", "--bundle", &bundle]);
    assert_eq!(set.code, 0, "{}", set.stderr);
    assert!(
        wait_for(Duration::from_secs(20), || f.log("rover-7-run.log").contains("is using the deploy engine")),
        "{}",
        f.log("rover-7-run.log")
    );
    assert_eq!(deploy_state(&d).0, "staged", "the technician's install is untouched");
    assert!(!d.state().join("desired.json").exists(), "the revision is not recorded as handled");
    // The gate opens: release 2 commits, then the agent installs release 3.
    std::fs::remove_file(&gate).unwrap();
    let status = || -> serde_json::Value {
        serde_json::from_str(&d.agent(&["status", "--json"]).stdout).unwrap_or_default()
    };
    let done = wait_for(Duration::from_secs(60), || {
        let v = status();
        v["deploy"]["state"] == "committed" && v["deploy"]["bundle"]["counter"] == 3
    });
    assert!(done, "{}\n{}", status(), f.log("rover-7-run.log"));
    // The revision is recorded as handled once the install returns, a
    // moment after the journal says committed.
    let record = || -> serde_json::Value {
        std::fs::read(d.state().join("desired.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    assert!(
        wait_for(Duration::from_secs(10), || record()["bundle"] == hex(&digest)),
        "{}\n{}",
        record(),
        f.log("rover-7-run.log")
    );
}

#[test]
fn a_technicians_install_reaches_the_fleet_as_deploy_reports() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = fetch_device(&f, &proxy, "rover-8");
    let _agent = d.spawn_run();
    await_connected(&f, &d);
    let admin = f.reports_reader();
    // Installed by hand from a file, while the agent runs.
    let (local, digest, _) = f.bundle("os", 2, 64 << 10, 5);
    let r = d.agent(&["install", f.s.path(&local).to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let committed = |r: &Report| matches!(&r.kind, ReportKind::Deploy { state, bundle: Some(b), .. } if state == "committed" && *b == digest);
    assert!(
        wait_for(Duration::from_secs(20), || admin.all().iter().any(committed)),
        "{}",
        f.log("rover-8-run.log")
    );
    // Only the install's own states (as the agent saw them pass): the
    // state it found when it started (idle) is not reported.
    for r in admin.all() {
        if let ReportKind::Deploy { bundle, .. } = &r.kind {
            assert_eq!(*bundle, Some(digest), "{r:?}");
        }
    }
    // A fleet deploy that cannot start before the engine records anything
    // (nobody published the bundle) is reported as waiting, and stays the
    // newest deploy report: the unchanged journal is not reported over it.
    let (_, unpublished, _) = f.bundle("os", 3, 64 << 10, 6);
    admin.kv_put("PERCH_DESIRED", "device.rover-8", &format!("{{\"bundle\": \"{}\"}}", hex(&unpublished)));
    let newest_deploy = || {
        admin.all().into_iter().filter(|r| matches!(r.kind, ReportKind::Deploy { .. })).max_by_key(|r| r.seq)
    };
    let waits = |r: Option<Report>| {
        r.is_some_and(|r| matches!(r.kind, ReportKind::Deploy { state, bundle, .. } if state == "waiting" && bundle == Some(unpublished)))
    };
    assert!(wait_for(Duration::from_secs(20), || waits(newest_deploy())), "{}", f.log("rover-8-run.log"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(waits(newest_deploy()), "{:?}", newest_deploy());
}

#[test]
fn the_data_budget_holds_across_restarts() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let budget: u64 = 3_000_000;
    let d = fetch_device_with(&f, &proxy, "rover-6", &format!("resync = \"500ms\"\nbudget = {budget}\n"));
    let (_, digest, _) = f.published_bundle("os", 2, 6 << 20, 8);
    let admin = f.reports_reader();
    admin.kv_put("PERCH_DESIRED", "device.rover-6", &format!("{{\"bundle\": \"{}\"}}", hex(&digest)));
    proxy.set_shape(perch_tests::chaos::Shape { latency: Duration::ZERO, bandwidth: 800_000 });
    let mut agent = d.spawn_run();
    // Two thirds of the budget, then a crash: the next run must not start
    // counting from zero.
    assert!(
        wait_for(Duration::from_secs(30), || proxy.bytes().0 > 2_000_000),
        "{}",
        f.log("rover-6-run.log")
    );
    kill(&mut agent);
    let mut agent = d.spawn_run();
    let stopped = wait_for(Duration::from_secs(30), || {
        admin.all().iter().any(|r| {
            matches!(&r.kind, ReportKind::Deploy { state, reason: Some(why), .. } if state == "failed" && why.contains("budget"))
        })
    });
    kill(&mut agent);
    assert!(stopped, "no failed report naming the budget\n{}", f.log("rover-6-run.log"));
    assert_ne!(deploy_state(&d).0, "committed");
    // The budget, plus what a crash can forget (the ledger is written every
    // 4 chunks), the window in flight at the crash and at the stop, and the
    // protocol's own bytes.
    let (down, _) = proxy.bytes();
    let allowed = budget + (4 + 2 * 4) * 256 * 1024 + (1 << 20);
    eprintln!("{down} bytes came down against a budget of {budget} across a crash");
    assert!(down <= allowed, "{down} bytes came down against a budget of {budget}");
}

#[test]
fn killed_at_ten_points_mid_fetch_it_resumes_without_fetching_verified_chunks_again() {
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = fetch_device(&f, &proxy, "rover-4");
    let (_, digest, payload_len) = f.published_bundle("os", 2, 6 << 20, 6);
    f.reports_reader().kv_put(
        "PERCH_DESIRED",
        "device.rover-4",
        &format!("{{\"bundle\": \"{}\"}}", hex(&digest)),
    );
    // 800 kB/s: the fetch takes about 8 s, long enough to be killed ten times in.
    proxy.set_shape(perch_tests::chaos::Shape { latency: Duration::ZERO, bandwidth: 800_000 });
    let mut agent = d.spawn_run();
    // Ten SIGKILLs at uneven moments while it fetches.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut kills = 0;
    while kills < 10 && deploy_state(&d).0 != "committed" {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(1300 + x % 700));
        kill(&mut agent);
        kills += 1;
        agent = d.spawn_run();
    }
    let done = wait_for(Duration::from_secs(90), || deploy_state(&d).0 == "committed");
    kill(&mut agent);
    assert!(done, "not committed after {kills} kills: {:?}", deploy_state(&d));
    assert_eq!(kills, 10, "the install finished after only {kills} kills");
    assert_eq!(std::fs::read(d.dir.join("slots/current/data.bin")).unwrap().len(), 6 << 20);
    // Each restart costs at most the chunks that were in flight, not the
    // ones already verified and written.
    let (down, _) = proxy.bytes();
    let chunk = 256 * 1024;
    let allowed = payload_len + (kills as u64 + 1) * 4 * chunk + (1 << 20);
    eprintln!(
        "fetched {down} bytes for a {payload_len}-byte payload across {kills} kills (allowed {allowed})"
    );
    assert!(down <= allowed, "{down} bytes came down for a {payload_len}-byte payload across {kills} kills");
}

/// The attack of issue 13: a FLEET publisher (no release key) puts another
/// validly signed bundle's head and chunks under the desired bundle's
/// subjects. The device must refuse it before fetching a chunk, say so with
/// both digests, and keep running what it ran.
#[test]
fn a_signed_bundle_published_under_another_bundles_digest_is_refused_naming_both() {
    use perch_protocol::subjects::{chunk, CHUNKS_STREAM};
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = fetch_device_resync(&f, &proxy, "rover-9", "1h");
    let (_, desired, _) = f.published_bundle("os", 2, 2 << 20, 11);
    let (_, other, _) = f.published_bundle("os", 3, 2 << 20, 12);
    let admin = f.reports_reader();
    // B's head and every chunk, re-published under A's subjects.
    let head = admin.last_by_subject(CHUNKS_STREAM, &chunk(&other, None)).expect("B's head");
    admin.js_publish(&chunk(&desired, None), head);
    let mut i = 0;
    while let Some(data) = admin.last_by_subject(CHUNKS_STREAM, &chunk(&other, Some(i))) {
        admin.js_publish(&chunk(&desired, Some(i)), data);
        i += 1;
    }
    assert!(i >= 8, "only {i} chunks copied");
    let mut agent = d.spawn_run();
    await_connected(&f, &d);
    let (before, _) = proxy.bytes();
    admin.kv_put("PERCH_DESIRED", "device.rover-9", &format!("{{\"bundle\": \"{}\"}}", hex(&desired)));
    let refused = |r: &Report| {
        matches!(&r.kind, ReportKind::Deploy { state, reason: Some(why), bundle: Some(b) }
            if state == "failed" && *b == desired && why.contains("security")
                && why.contains(&hex(&desired)) && why.contains(&hex(&other)))
    };
    let reported = wait_for(Duration::from_secs(30), || admin.all().iter().any(refused));
    std::thread::sleep(Duration::from_secs(2));
    kill(&mut agent);
    let log = f.log("rover-9-run.log");
    assert!(reported, "no security failure naming both digests\n{log}");
    assert!(log.contains(&hex(&other)), "{log}");
    // Nothing was staged or activated: slot a runs, slot b is untouched.
    assert_eq!(std::fs::read_link(d.dir.join("slots/current")).unwrap(), std::path::Path::new("a"));
    let b = d.dir.join("slots/b");
    assert!(!b.exists() || std::fs::read_dir(&b).unwrap().next().is_none(), "slot b was written");
    let (state, _) = deploy_state(&d);
    assert!(!["staging", "staged", "activating", "trial", "committed"].contains(&state.as_str()), "{state}");
    assert!(!admin
        .all()
        .iter()
        .any(|r| matches!(&r.kind, ReportKind::Deploy { state, .. } if state != "failed")));
    // No chunk came down: only the head (and reports, pings) after the put.
    let (after, _) = proxy.bytes();
    assert!(after - before < 256 * 1024, "{} bytes came down after the put", after - before);
}

/// The committed counter in the slot that runs, per `perch-agent status`.
fn running_counter(d: &Device) -> Option<u64> {
    let r = d.agent(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
    let booted = v["booted_slot"].as_str()?.to_string();
    (v["deploy"]["state"] == "committed").then(|| v["slots"][&booted]["counter"].as_u64())?
}

#[test]
fn a_release_that_changes_one_file_fetches_only_its_chunks_over_the_link() {
    use perch_tests::device::new_image;
    const FILES: u8 = 32;
    const FILE: usize = 256 * 1024;
    let f = Fleet::start(1);
    let proxy = Proxy::start(([127, 0, 0, 1], f.server.port).into());
    let d = fetch_device(&f, &proxy, "rover-8");
    let admin = f.reports_reader();
    let mut agent = d.spawn_run();
    await_connected(&f, &d);
    // Release 2: 32 files of 256 KiB, each noise, in pairs of copies (as an
    // image holds copies of one library). The factory image has no
    // record, so it comes whole, compressed: with chunks linked to the
    // bytes before them, the second copy of each pair costs almost nothing.
    for dir in ["os-2", "os-3"] {
        std::fs::create_dir_all(f.s.path(dir)).unwrap();
        for i in 0..FILES {
            std::fs::write(f.s.path(&format!("{dir}/f{i:02}")), new_image(i / 2 + 1, FILE)).unwrap();
        }
    }
    // Release 3: one file rewritten in place.
    let changed = new_image(200, FILE);
    std::fs::write(f.s.path("os-3/f17"), &changed).unwrap();
    let mut digests = vec![];
    for (counter, dir) in [(2, "os-2"), (3, "os-3")] {
        let file = format!("os-{counter}.perch");
        // Two chains of linked chunks: the agent decodes them side by
        // side, so it asks for the chunks of both in turn.
        let args = ["--compress", "zstd:3", "--compress-chain", "4M"];
        let (digest, len) = f.s.signed_archive_with("os", counter, dir, &file, &args);
        f.publish(&file);
        digests.push((digest, len));
    }
    let mut down = vec![];
    for (i, (digest, _)) in digests.iter().enumerate() {
        let before = proxy.bytes().0;
        admin.kv_put("PERCH_DESIRED", "device.rover-8", &format!("{{\"bundle\": \"{}\"}}", hex(digest)));
        let counter = 2 + i as u64;
        let done = wait_for(Duration::from_secs(60), || running_counter(&d) == Some(counter));
        assert!(done, "release {counter} not committed\n{}", f.log("rover-8-run.log"));
        down.push(proxy.bytes().0 - before);
    }
    let (_, payload_len) = digests[1];
    eprintln!("bytes down the link: release 2 {}, release 3 {} (payload {payload_len})", down[0], down[1]);
    assert!(down[0] > payload_len / 2, "release 2 came whole: {down:?}");
    assert!(down[0] < payload_len * 6 / 10, "the second copies were not linked to the first: {down:?}");
    // Content-defined chunks (the default for archives) average 256 KiB and
    // reach 768 KiB: the changed file lies in one or two of them. The head,
    // reports and pings are the rest.
    assert!(down[1] >= FILE as u64, "the changed file must cross the link: {down:?}");
    assert!(down[1] <= 2 * 768 * 1024, "release 3 fetched more than its changed chunks: {down:?}");
    assert_eq!(std::fs::read(d.dir.join("slots/current/f17")).unwrap(), changed);
    assert_eq!(std::fs::read(d.dir.join("slots/current/f03")).unwrap(), new_image(2, FILE));
    // The device says so, and `perch status --device` shows it.
    let transfer = wait_for(Duration::from_secs(20), || {
        admin.all().iter().any(|r| {
            matches!(r.kind, ReportKind::Transfer { bundle, fetched_chunks, reused_bytes, .. }
                if bundle == digests[1].0 && fetched_chunks <= 2 && reused_bytes >= payload_len * 8 / 10)
        })
    });
    kill(&mut agent);
    assert!(transfer, "no transfer report for release 3: {:?}", admin.all());
    let st = f.operator(&["status"], &["--device", "rover-8"]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(
        st.stdout.contains("last staging: bundle ") && st.stdout.contains("reused from the device ("),
        "{}",
        st.stdout
    );
}
