//! Rollouts end to end: real nats-server, real provisioner, real agents.
//! `perch deploy` drives a good release through two waves, then a broken
//! release whose health check fails: the first wave rolls back, the
//! rollout pauses by itself, and abort points the device back.

use std::time::Duration;

use perch_tests::fleet::{wait_for, Device, Fleet, Running};

/// A release whose health check exits `code`, built, signed and published.
fn release(f: &Fleet, counter: u32, code: i32) -> [u8; 32] {
    let dir = format!("app-{counter}");
    std::fs::create_dir_all(f.s.path(&format!("{dir}/bin"))).unwrap();
    std::fs::write(f.s.path(&format!("{dir}/bin/check")), format!("exit {code}\n")).unwrap();
    let (file, digest, _) = f.bundle_of_dir("app", counter, &dir);
    f.publish(&file);
    digest
}

fn running(d: &Device) -> (String, Option<u64>) {
    let r = d.agent(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    let booted = v["booted_slot"].as_str().unwrap_or_default().to_string();
    (v["deploy"]["state"].as_str().unwrap_or_default().to_string(), v["slots"][&booted]["counter"].as_u64())
}

#[test]
fn waves_commit_in_order_a_failing_wave_pauses_and_abort_points_back() {
    let f = Fleet::start(1);
    let names = ["g-a", "g-b", "g-c", "g-d"];
    let devices: Vec<Device> = names.iter().map(|n| f.checked_device(n, "g")).collect();
    let mut agents: Vec<Running> = devices.iter().map(|d| d.spawn_run()).collect();
    // Every device has said hello (so the registry has it) and reported.
    let all_seen = wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = serde_json::from_str(&f.status(&["--json"]).stdout).unwrap_or_default();
        let online = v["devices"].as_array().map_or(0, |d| {
            d.iter().filter(|d| d["liveness"] == "online" && d["registry"] == "enrolled").count()
        });
        online == names.len()
    });
    assert!(all_seen, "{}", f.status(&[]).stdout);

    // A good release, in two waves: 25% (one device), then the rest.
    let good = release(&f, 2, 0);
    let r = f.operator(&["deploy", "start"], &["--bundle", "app@2", "--group", "g", "--waves", "25%,100%"]);
    assert_eq!(r.code, 0, "{}\n{}\n{}", r.stdout, r.stderr, f.all_logs());
    eprintln!("{}", r.stdout);
    assert!(r.stdout.contains("done: every wave committed"), "{}", r.stdout);
    // The first wave committed before the second one was told.
    assert!(r.stdout.contains("wave 1 ( 25%)    1 devices: 1 committed"), "{}", r.stdout);
    for d in &devices {
        assert_eq!(running(d), ("committed".into(), Some(2)), "{}", d.name);
    }

    // A broken release: its health check fails, so the first wave's device
    // rolls back by itself; the rollout pauses before anyone else is told.
    let broken = release(&f, 3, 1);
    let r = f.operator(&["deploy"], &["--bundle", "app@3", "--group", "g", "--waves", "25%,100%"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("paused: wave 1 (25%): 1 of 1 devices failed (g-a)"), "{}", r.stderr);
    eprintln!("{}{}", r.stdout, r.stderr);
    let id = r.stdout.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_string();
    assert_eq!(running(&devices[0]).1, Some(2), "g-a runs release 2 again");
    let listed = f.operator(&["desired", "list"], &["--json"]).stdout;
    let keys: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    let named = |dev: &str| {
        keys.iter()
            .find(|k| k["key"] == format!("device.{dev}"))
            .map(|k| k["bundle"].as_str().unwrap().to_string())
    };
    assert_eq!(named("g-a"), Some(hex::encode(broken)));
    // The good release's last wave named it in the group's key, and once
    // done it cleared the first wave's device key: every other device
    // follows the group, which still names the good release.
    for n in &names[1..] {
        assert_eq!(named(n), None, "{n} has a key of its own");
    }
    let group = keys.iter().find(|k| k["key"] == "group.g").map(|k| k["bundle"].as_str().unwrap());
    assert_eq!(group, Some(hex::encode(good).as_str()), "{listed}");
    // The fleet view says what happened, and why.
    let shown = f.status(&[]).stdout;
    eprintln!("{shown}");
    assert!(shown.contains(&format!("rollout {id}")) && shown.contains("paused"), "{shown}");
    assert!(shown.contains("g-a: health: "), "{shown}");

    // Abort: the device the rollout reached follows the group's key again,
    // which names release 2.
    let r = f.operator(&["deploy", "abort"], &[&id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed = f.operator(&["desired", "list"], &["--json"]).stdout;
    assert!(listed.contains(&hex::encode(good)) && !listed.contains(&hex::encode(broken)), "{listed}");
    let list = f.operator(&["deploy", "list"], &[]).stdout;
    assert!(list.contains("aborted") && list.contains("done"), "{list}");
    // Pausing an aborted rollout is the operator's mistake.
    assert_eq!(f.operator(&["deploy", "pause"], &[&id]).code, 2);
    for a in &mut agents {
        a.kill();
    }
}
