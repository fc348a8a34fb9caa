//! Trust rotation on a device, end to end: the agent keeps the highest
//! trust version it accepted, takes newer ones only by a valid rotation
//! chain, and refuses an older document put back on disk.

use std::fs;

use perch_tests::device::{Backend, Device};

/// An archive bundle of `os` at `counter`, signed by the release keys `keys` only.
fn bundle_signed_by(d: &Device, out: &str, counter: u64, keys: &[&str]) {
    let tree = d.path(&format!("{out}.tree"));
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("app"), format!("app {counter}\n")).unwrap();
    let c = counter.to_string();
    let input = format!("{out}.tree");
    let args = ["bundle", "build", "--name", "os", "--counter", &c, "--kind", "archive", "--input", &input];
    let mut args = args.to_vec();
    args.extend_from_slice(&["--out", out, "--chunk-size", "1024", "--target", &d.target]);
    d.s.ok("perch", &args);
    for k in keys {
        d.s.ok("perch", &["bundle", "sign", "--key", &format!("{k}.key"), out]);
    }
}

/// `perch-bootstrap trust rotate` from ORG/trust.doc into `out`, co-signed by `signers`.
fn rotate(d: &Device, out: &str, release: &[&str], threshold: &str, signers: &[&str]) {
    let mut args = vec!["trust", "rotate", "--dir", "org", "--threshold", threshold, "--out", out];
    let pubs: Vec<String> = release.iter().map(|k| format!("{k}.pub")).collect();
    for p in &pubs {
        args.extend_from_slice(&["--release-key", p]);
    }
    d.s.ok("perch-bootstrap", &args);
    for k in signers {
        d.s.ok("perch-bootstrap", &["trust", "sign", "--key", &format!("{k}.key"), out]);
    }
}

#[test]
fn a_rotation_retires_a_key_and_the_older_trust_document_cannot_come_back() {
    // Version 1: k1 and k2, both needed. (The device's trust path is org/trust.doc.)
    let d = Device::new(Backend::Dir);
    // Version 2: k1 or k2 alone, signed over by both (v1's threshold).
    rotate(&d, "v2.doc", &["k1", "k2"], "1", &["k1", "k2"]);
    let r = d.agent(&["trust", "update", "v2.doc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("version 2"), "{}", r.stdout);
    bundle_signed_by(&d, "k1-only-2.perch", 2, &["k1"]);
    let r = d.agent(&["install", "k1-only-2.perch"]);
    assert_eq!(r.code, 0, "v2 takes a bundle k1 alone signed: {}", r.stderr);

    // Version 3 retires k1; one of v2's keys (k2) signs the rotation.
    rotate(&d, "v3.doc", &["k2"], "1", &["k2"]);
    let r = d.agent(&["trust", "update", "v3.doc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    bundle_signed_by(&d, "k1-only-3.perch", 3, &["k1"]);
    let r = d.agent(&["install", "k1-only-3.perch"]);
    assert_eq!(r.code, 3, "the retired key alone still counts: {}", r.stderr);

    // The attack: version 2 put back on disk brings k1 back. Refused, in one line.
    fs::copy(d.path("v2.doc"), d.path("org/trust.doc")).unwrap();
    let r = d.agent(&["install", "k1-only-3.perch"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("version 2 is older than version 3"), "{}", r.stderr);
    let r = d.agent(&["trust", "update", "v2.doc"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // With the copy of version 3 lost, its version record alone holds the floor.
    fs::copy(d.path("v3.doc"), d.path("org/trust.doc")).unwrap();
    fs::remove_file(d.path("state/trust.accepted")).unwrap();
    fs::copy(d.path("v2.doc"), d.path("org/trust.doc")).unwrap();
    assert_eq!(d.agent(&["install", "k1-only-3.perch"]).code, 3);

    // Back on version 3: what its keys sign installs.
    fs::copy(d.path("v3.doc"), d.path("org/trust.doc")).unwrap();
    bundle_signed_by(&d, "k2-only-3.perch", 3, &["k2"]);
    let r = d.agent(&["install", "k2-only-3.perch"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(d.path("state/trust.accepted").is_file(), "the lost copy was not written again");
}

#[test]
fn a_newer_trust_document_without_the_rotation_signatures_is_refused() {
    let d = Device::new(Backend::Dir);
    let v1 = fs::read(d.path("org/trust.doc")).unwrap();
    // Root-signed, but only one of v1's two release keys signed the rotation.
    rotate(&d, "v2.doc", &["k1"], "1", &["k1"]);
    let r = d.agent(&["trust", "update", "v2.doc"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("does not follow the accepted version 1"), "{}", r.stderr);
    assert_eq!(
        fs::read(d.path("org/trust.doc")).unwrap(),
        v1,
        "a refused update replaced the trust document"
    );
    // Dropped straight onto the trust path instead: the engine refuses it too.
    fs::copy(d.path("v2.doc"), d.path("org/trust.doc")).unwrap();
    bundle_signed_by(&d, "k1-only.perch", 2, &["k1"]);
    let r = d.agent(&["install", "k1-only.perch"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("does not follow the accepted version 1"), "{}", r.stderr);
}

#[test]
fn the_fleet_pushes_a_rotation_and_a_device_refuses_an_older_push() {
    use perch_tests::fleet::{wait_for, Fleet};
    use std::time::Duration;

    let f = Fleet::start(0);
    let d = f.enrolled_device("drone-1", &f.url, "g", "");
    let v1 = fs::read(d.trust()).unwrap();
    let mut agent = d.spawn_run();
    let log = || f.log("drone-1-run.log");
    let link_up =
        || fs::read_to_string(d.state().join("link.json")).is_ok_and(|t| t.contains("\"connected\""));
    assert!(wait_for(Duration::from_secs(20), link_up), "{}", log());

    // Version 2 adds k2; k1 (v1's only key) signs the rotation.
    f.s.ok("perch", &["keygen", "--out", "k2"]);
    let rot = ["--release-key", "k1.pub", "--release-key", "k2.pub", "--threshold", "1", "--out", "v2.doc"];
    let mut args = vec!["trust", "rotate", "--dir", "org"];
    args.extend_from_slice(&rot);
    f.s.ok("perch-bootstrap", &args);
    f.s.ok("perch-bootstrap", &["trust", "sign", "--key", "k1.key", "v2.doc"]);
    let v2 = fs::read(f.s.path("v2.doc")).unwrap();
    let r = f.s.run("perch-bootstrap", &["trust", "push", "--dir", "org", "--url", &f.url, "v2.doc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("version 2"), "{}", r.stdout);
    let took = wait_for(Duration::from_secs(20), || fs::read(d.trust()).is_ok_and(|b| b == v2));
    assert!(took, "the device did not take the pushed version 2: {}", log());

    // Someone pushes version 1 again: the device refuses it and keeps 2.
    let r = f.s.run("perch-bootstrap", &["trust", "push", "--dir", "org", "--url", &f.url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let refused = wait_for(Duration::from_secs(20), || log().contains("trust push refused"));
    assert!(refused, "{}", log());
    assert!(log().contains("version 1 is older than version 2"), "{}", log());
    assert_eq!(fs::read(d.trust()).unwrap(), v2);
    assert_ne!(v1, v2);
    agent.kill();
    // The device's enrollment (made under version 1) still loads under version 2.
    let r = d.agent(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(st["enrollment"]["enrolled"], true, "{st}");

    // A file that is not this org's, or not signed: refused before anything is pushed.
    let other = perch_tests::Scratch::new();
    other.org(1, 1);
    fs::copy(other.path("org/trust.doc"), f.s.path("foreign.doc")).unwrap();
    let r = f.s.run("perch-bootstrap", &["trust", "push", "--dir", "org", "--url", &f.url, "foreign.doc"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
}

#[test]
fn an_enrollment_keeps_loading_after_its_rotated_past_trust_document_expires() {
    let f = perch_tests::fleet::Fleet::start(0);
    // Version 2 expires in a few seconds; the drone enrolls under it.
    let rotate = |out: &str, expires: &[&str]| {
        let mut args = vec!["trust", "rotate", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"];
        args.extend_from_slice(expires);
        args.extend_from_slice(&["--out", out]);
        f.s.ok("perch-bootstrap", &args);
        f.s.ok("perch-bootstrap", &["trust", "sign", "--key", "k1.key", out]);
        fs::copy(f.s.path(out), f.s.path("org/trust.doc")).unwrap();
    };
    rotate("v2.doc", &["--expires-in", "4s"]);
    let expires = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let d = f.enrolled_device("drone-1", &f.url, "g", "");
    // The enrollment's document seeded the floor a push is checked against.
    let floor = fs::read_to_string(d.state().join("trust-version")).unwrap_or_default();
    assert!(floor.contains(" version=2 "), "{floor:?}");
    // Version 3 does not expire; the device takes it by its chain from 2.
    rotate("v3.doc", &[]);
    let v3 = f.s.path("v3.doc");
    let r = d.agent(&["trust", "update", v3.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::thread::sleep(
        expires.saturating_duration_since(std::time::Instant::now()) + std::time::Duration::from_secs(1),
    );
    let r = d.agent(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(st["enrollment"]["enrolled"], true, "{st} {}", r.stderr);
}
