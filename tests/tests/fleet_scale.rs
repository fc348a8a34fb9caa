//! A thousand simulated devices (`perch_tests::sim`: the agent's own
//! enrollment, link, outbox and desired-state follower, without slots) on
//! a three-server cluster with a real provisioner, driven by the real
//! `perch` commands. Correctness, not timing (`cargo xtask bench fleet`
//! measures): every device converges on a group's desired state, a
//! three-wave rollout pauses on its failure threshold and finishes after
//! `resume`, `perch status` accounts for every device, and every report
//! each device queued is in `PERCH_REPORTS` exactly once.
//!
//! `PERCH_FLEET_DEVICES` changes the fleet size (default 1,000).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use perch_protocol::report::Report;
use perch_tests::hub::Hub;
use perch_tests::sim::{self, Event, SimDevice, SimSettings};
use tokio::sync::mpsc::UnboundedReceiver;

fn devices() -> usize {
    std::env::var("PERCH_FLEET_DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

fn id(i: usize) -> String {
    format!("sim-{i:05}")
}

/// `perch ARGS --creds reader.creds --ca ... --url ...` in the hub's scratch.
fn perch(h: &Hub, args: &[&str]) -> perch_tests::Run {
    let _ = h.s.fleet_creds("reader");
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--creds".into(), "reader.creds".into(), "--ca".into(), "org/tls/ca.pem".into()]);
    all.extend(h.url_args());
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    h.s.run("perch", &all)
}

/// Collects events until `done` says the set is complete, or fails after `limit`.
fn until(
    rt: &tokio::runtime::Runtime,
    rx: &mut UnboundedReceiver<Event>,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&Event) -> bool,
) {
    let deadline = Instant::now() + limit;
    rt.block_on(async {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(e)) => {
                    if let Event::Failed { device, reason } = &e {
                        panic!("{device}: {reason}");
                    }
                    if done(&e) {
                        return;
                    }
                }
                _ => panic!("timed out after {limit:?} waiting for {what}"),
            }
        }
    })
}

#[test]
fn a_thousand_simulated_devices_converge_roll_out_and_every_report_is_accounted_for() {
    let n = devices();
    let h = Hub::start();
    let v1 = h.published_bundle("one", 256 << 10);
    let v2 = h.published_bundle("two", 256 << 10);
    let mut issue = vec!["token", "issue", "--dir", "org", "--group", "g", "--uses"];
    let uses = n.to_string();
    issue.push(&uses);
    let urls = h.url_args();
    issue.extend(urls.iter().map(String::as_str));
    let token = h.s.ok("perch-bootstrap", &issue).stdout.trim().to_string();

    // Waves of 1%, 10%, 100% over the sorted ids: the second wave holds
    // ids ⌈n/100⌉ .. ⌈n/10⌉; up to three of them roll the second bundle back.
    let (w1, w2) = (n.div_ceil(100), n.div_ceil(10));
    let failing: BTreeSet<String> = (w1..(w1 + 3).min(w2)).map(id).collect();
    let mut d2 = [0u8; 32];
    hex::decode_to_slice(&v2, &mut d2).unwrap();
    let root = h.s.path("sim");
    let extra = "[reports]\nheartbeat = \"20s\"\n[fetch]\nresync = \"30s\"\n[link]\nmax_backoff = \"2s\"\n";
    let settings = SimSettings {
        agent: sim::agent_config(&root, extra).unwrap(),
        root,
        chunk_share: 0.25,
        trial: Duration::from_millis(50),
        fail: Some((d2, Arc::new(failing.clone()))),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let fleet: Vec<SimDevice> = rt.block_on(async {
        let slots = Arc::new(tokio::sync::Semaphore::new(100));
        let mut tasks = vec![];
        for i in 0..n {
            let (s, token, permit) = (settings.clone(), token.clone(), slots.clone().acquire_owned().await);
            tasks.push(tokio::spawn(async move {
                let v = sim::enroll(&s, &token, &id(i), "g").await;
                drop(permit);
                v
            }));
        }
        let mut fleet = vec![];
        for t in tasks {
            let v = t.await.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
            fleet.push(sim::start(&settings, v, tx.clone()).await.unwrap());
        }
        fleet
    });

    // A group's desired state reaches every device, once.
    let r = perch(&h, &["desired", "set", "--group", "g", "--digest", &v1]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut noticed = BTreeMap::new();
    let mut committed = BTreeSet::new();
    until(&rt, &mut rx, Duration::from_secs(300), "every device to commit bundle one", |e| {
        match e {
            Event::Noticed { device, key, .. } => {
                assert_eq!(key, "group.g");
                *noticed.entry(device.clone()).or_insert(0) += 1;
            }
            Event::Ended { device, committed: ok, digest, .. } => {
                assert!(*ok && hex::encode(digest) == v1, "{device} did not commit bundle one");
                committed.insert(device.clone());
            }
            Event::Failed { .. } => {}
        }
        committed.len() == n
    });
    assert!(noticed.values().all(|c| *c == 1), "a device acted on one desired state twice");

    // A rollout in three waves pauses when the second wave's failures pass
    // the limit (all of them: the limit is one fewer), and finishes after
    // `resume` accepts them.
    let limit = (failing.len() - 1).to_string();
    let r = perch(
        &h,
        &[
            "deploy",
            "start",
            "--bundle",
            "two@2",
            "--group",
            "g",
            "--waves",
            "1%,10%,100%",
            "--max-failures",
            &limit,
        ],
    );
    assert_ne!(r.code, 0, "the rollout should have paused:\n{}", r.stdout);
    assert!(r.stderr.contains("paused") && r.stderr.contains("wave 2"), "{}\n{}", r.stdout, r.stderr);
    for f in &failing {
        assert!(r.stderr.contains(f.as_str()), "{f} not named: {}", r.stderr);
    }
    let rollout_id = r.stdout.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_string();
    let r = perch(&h, &["deploy", "resume", &rollout_id]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("done"), "{}", r.stdout);
    let mut ended = BTreeMap::new();
    until(&rt, &mut rx, Duration::from_secs(60), "the last outcomes of bundle two", |e| {
        if let Event::Ended { device, committed, digest, .. } = e {
            assert_eq!(hex::encode(digest), v2);
            ended.insert(device.clone(), *committed);
        }
        ended.len() == n
    });
    let rolled_back: BTreeSet<String> =
        ended.iter().filter(|(_, ok)| !**ok).map(|(d, _)| d.clone()).collect();
    assert_eq!(rolled_back, failing);

    // Every queued report reaches the stream, exactly once. Heartbeats go
    // on meanwhile: every report up to the last queued before the outboxes
    // drained must be there, and any later ones in order after them.
    for d in &fleet {
        d.heartbeat().unwrap();
    }
    let queued: Vec<u64> = fleet.iter().map(SimDevice::last_seq).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while fleet.iter().any(|d| d.backlog() > 0) {
        assert!(Instant::now() < deadline, "reports still queued after 2 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    let reader = h.reader();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in reader.reports() {
        let Report { device, seq, .. } = r;
        seqs.entry(device).or_default().push(seq);
    }
    for (d, queued) in fleet.iter().zip(queued) {
        let mut got = seqs.remove(&d.id).unwrap_or_default();
        got.sort();
        let last = got.last().copied().unwrap_or(0);
        assert!(queued <= last && last <= d.last_seq(), "{}: {last} in the stream, {queued} queued", d.id);
        assert_eq!(got, (1..=last).collect::<Vec<u64>>(), "{}: a report lost or stored twice", d.id);
    }
    assert!(seqs.is_empty(), "reports from devices that are not in the fleet: {:?}", seqs.keys());

    // `perch status` shows each device on what it runs.
    let r = perch(&h, &["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let listed = v["devices"].as_array().unwrap();
    assert_eq!(listed.len(), n);
    for d in listed {
        let id = d["id"].as_str().unwrap();
        let want = if failing.contains(id) { &v1 } else { &v2 };
        assert_eq!(d["running_bundle"]["digest"].as_str(), Some(want.as_str()), "{d}");
    }
    for d in &fleet {
        d.stop();
    }
}
