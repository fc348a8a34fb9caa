//! `perch watch`: Choria's presence advisories (`io.choria.sr.v2.age_advisory`)
//! for devices that are first heard from, go quiet, come back and expire,
//! from two watchers of which one is elected, each advisory said once,
//! and carried on by the other when the leader dies.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use perch_tests::fleet::{Fleet, Running, Subscription};
use serde_json::Value;

/// Every advisory read so far, in order: (event, device, replicator).
#[derive(Default)]
struct Seen(Vec<(String, String, String)>);

impl Seen {
    /// Reads advisories until `device` has had `event` for the `nth` time
    /// (from 1), within `limit`; returns its index.
    fn until(
        &mut self,
        sub: &mut Subscription,
        (device, event, nth): (&str, &str, usize),
        limit: Duration,
        f: &Fleet,
    ) -> usize {
        let found = |s: &Seen| {
            s.0.iter()
                .enumerate()
                .filter(|(_, (e, d, _))| e == event && d == device)
                .nth(nth - 1)
                .map(|(i, _)| i)
        };
        let until = Instant::now() + limit;
        while found(self).is_none() {
            let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
            let Some(m) = sub.next(left) else {
                panic!("no {event} for {device} within {limit:?}; seen {:?}\n{}", self.0, f.all_logs());
            };
            let v: Value = serde_json::from_slice(&m.payload).expect("an advisory is JSON");
            perch_tests::schema::check("wire/age-advisory", &v);
            let (e, d) = (v["event"].as_str().unwrap(), v["value"].as_str().unwrap());
            assert_eq!(m.subject.as_str(), format!("perch.advisories.{e}.{d}"));
            if e == "timeout" && d == "ghost" {
                assert_eq!(
                    (v["age"].as_f64(), v["seen"].as_i64()),
                    (Some(-1.0), Some(0)),
                    "never heard from: {v}"
                );
            }
            if e == "timeout" && d != "ghost" {
                assert!(v["age"].as_f64().unwrap() >= 2.0, "{v}");
            }
            self.0.push((e.into(), d.into(), v["replicator"].as_str().unwrap().into()));
        }
        found(self).unwrap()
    }

    fn events_of(&self, device: &str) -> Vec<&str> {
        self.0.iter().filter(|(_, d, _)| d == device).map(|(e, _, _)| e.as_str()).collect()
    }
}

fn watcher(f: &Fleet, name: &str) -> Running {
    let log = std::fs::File::create(f.s.path(&format!("{name}.log"))).unwrap();
    let child = Command::new(perch_tests::bin("perch"))
        .args(["watch", "--url", &f.url, "--creds", "reader.creds", "--ca", "org/tls/ca.pem", "--name", name])
        .args(["--stale-after", "2s", "--expire-after", "6s", "--every", "500ms"])
        .current_dir(f.s.dir.path())
        .env("PERCH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

#[test]
fn presence_advisories_come_once_each_from_the_elected_watcher_and_survive_its_death() {
    let f = Fleet::start(1);
    let fast = "[reports]\nheartbeat = \"300ms\"\n";
    let d1 = f.enrolled_device("d1", &f.url, "g", fast);
    let d2 = f.enrolled_device("d2", &f.url, "g", fast);
    // Enrolled online, and never run: it never reports.
    let ghost = f.device("ghost");
    std::fs::copy(f.s.path("org/trust.doc"), ghost.trust()).unwrap();
    let token = f.token_file("ghost.token", &["--group", "g"]);
    let r = ghost.agent(&["enroll", "--device-id", "ghost", "--token-file", token.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let reader = f.reports_reader();
    let mut sub = reader.subscribe("perch.advisories.>");
    let mut seen = Seen::default();
    let secs = Duration::from_secs;
    let mut agent1 = d1.spawn_run();
    let mut agent2 = d2.spawn_run();
    let mut watchers = vec![watcher(&f, "w1"), watcher(&f, "w2")];

    seen.until(&mut sub, ("d1", "new", 1), secs(20), &f);
    seen.until(&mut sub, ("d2", "new", 1), secs(20), &f);
    // Quiet: d2 times out, then expires; the ghost too, never heard from.
    agent2.kill();
    seen.until(&mut sub, ("d2", "timeout", 1), secs(10), &f);
    seen.until(&mut sub, ("ghost", "timeout", 1), secs(10), &f);
    seen.until(&mut sub, ("d2", "expire", 1), secs(15), &f);
    seen.until(&mut sub, ("ghost", "expire", 1), secs(15), &f);

    // The leader dies; the other takes over from the records: d2, back,
    // is new (it had expired), and nothing already said is said again.
    let leader = seen.0[0].2.clone();
    assert!(seen.0.iter().all(|(_, _, w)| *w == leader), "one watcher sent them all: {:?}", seen.0);
    let at = if leader == "w1" { 0 } else { 1 };
    watchers[at].kill();
    agent2 = d2.spawn_run();
    let back = seen.until(&mut sub, ("d2", "new", 2), secs(15), &f);
    let other = if leader == "w1" { "w2" } else { "w1" };
    assert_eq!(seen.0[back].2, other, "{:?}", seen.0);

    // A device that comes back before it expires recovers.
    agent1.kill();
    seen.until(&mut sub, ("d1", "timeout", 1), secs(10), &f);
    agent1 = d1.spawn_run();
    seen.until(&mut sub, ("d1", "recover", 1), secs(10), &f);

    // Once each, in order; a few more ticks say nothing new.
    std::thread::sleep(secs(1));
    if let Some(m) = sub.next(Duration::from_millis(500)) {
        panic!("said more: {} {:?}", m.subject, seen.0);
    }
    assert_eq!(seen.events_of("d1"), ["new", "timeout", "recover"], "{:?}", seen.0);
    assert_eq!(seen.events_of("d2"), ["new", "timeout", "expire", "new"], "{:?}", seen.0);
    assert_eq!(seen.events_of("ghost"), ["timeout", "expire"], "{:?}", seen.0);
    drop((agent1, agent2, watchers));
}
