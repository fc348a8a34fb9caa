//! Every `--json` output parses as JSON and has the fields the command
//! line reference documents for it (`docs/content/reference/cli.md`).

use perch_tests::device::{Backend, Device};
use perch_tests::fleet::Fleet;
use serde_json::Value;

/// Parses stdout as one JSON document and checks `fields` (dotted paths
/// into objects) are there.
fn doc(what: &str, r: &perch_tests::Run, fields: &[&str]) -> Value {
    assert_eq!(r.code, 0, "{what}: {}{}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {}", r.stdout));
    has(what, &v, fields);
    v
}

fn has(what: &str, v: &Value, fields: &[&str]) {
    for f in fields {
        let found = f.split('.').try_fold(v, |v, k| v.get(k));
        assert!(found.is_some(), "{what}: no field {f} in {v}");
    }
}

#[test]
fn every_json_output_parses_and_has_its_documented_fields() {
    let f = Fleet::start(1);
    let s = &f.s;
    let conn = ["--url", &f.url, "--creds", "op.creds", "--ca", "org/tls/ca.pem"];
    s.fleet_creds("op");
    // `perch ARGS CONN`.
    let with_conn = |args: &[&str]| {
        let all: Vec<&str> = args.iter().chain(conn.iter()).copied().collect();
        s.run("perch", &all)
    };

    let r = s.run("perch", &["keygen", "--out", "k9", "--json"]);
    doc("keygen", &r, &["key_id", "secret", "public"]);
    s.write_payload("img", 64 * 1024, 3);
    let build = [
        "bundle",
        "build",
        "--name",
        "os",
        "--counter",
        "7",
        "--kind",
        "image",
        "--input",
        "img",
        "--out",
        "os7.perch",
        "--json",
    ];
    let built =
        doc("bundle build", &s.run("perch", &build), &["out", "name", "counter", "digest", "chunk_count"]);
    assert_eq!(built["signed"], false);
    for added in [true, false] {
        let r = s.run("perch", &["bundle", "sign", "--key", "k1.key", "os7.perch", "--json"]);
        assert_eq!(doc("bundle sign", &r, &["file", "key_id", "added"])["added"], added);
    }
    let verify = s.run("perch", &["bundle", "verify", "--trust", "org/trust.doc", "os7.perch", "--json"]);
    doc("bundle verify", &verify, &["verified", "digest", "signers", "threshold", "chunk_count"]);
    doc(
        "bundle inspect",
        &s.run("perch", &["bundle", "inspect", "os7.perch", "--json"]),
        &["name", "counter"],
    );
    let publish = ["publish", "--trust", "org/trust.doc", "os7.perch", "--json"];
    let published =
        doc("publish", &with_conn(&publish), &["digest", "chunk_count", "bytes_sent", "already_published"]);
    assert_eq!(published["digest"], built["digest"], "publish and build name the same bundle");
    doc("status", &with_conn(&["status", "--json"]), &["devices"]);
    doc("desired list", &with_conn(&["desired", "list", "--json"]), &[]);

    // deploy start --json: JSON lines, the first the rollout created.
    let r = with_conn(&["deploy", "start", "--bundle", "os@7", "--device", "d1", "--detach", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 1, "{}", r.stdout);
    has("deploy start", &lines[0], &["event", "rollout.id", "rollout.state"]);
    assert_eq!(lines[0]["event"], "created");
    let id = lines[0]["rollout"]["id"].as_str().unwrap().to_string();
    // The old form, and a bundle file for --bundle.
    let r = with_conn(&["deploy", "--bundle", "os7.perch", "--device", "d2", "--detach", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed = doc("deploy list", &with_conn(&["deploy", "list", "--json"]), &[]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let paused = with_conn(&["deploy", "pause", &id, "--json"]);
    doc("deploy pause", &paused, &["id", "state"]);

    doc("context ls", &s.run("perch", &["context", "ls", "--json"]), &["contexts"]);

    let r = s.run("perch-bootstrap", &["trust", "show", "org/trust.doc", "--json"]);
    doc("trust show", &r, &["org", "version", "fingerprint", "release_keys", "threshold"]);
    let token = s.run(
        "perch-bootstrap",
        &["token", "issue", "--dir", "org", "--url", &f.url, "--group", "g", "--json"],
    );
    let token = doc("token issue", &token, &["token", "id", "expires_at"]);
    let check = ["token", "check", "--trust", "org/trust.doc", token["token"].as_str().unwrap(), "--json"];
    doc("token check", &s.run("perch-bootstrap", &check), &["id", "org", "groups", "uses", "expires_at"]);
}

#[test]
fn the_agent_json_outputs_parse_and_have_their_documented_fields() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    // No --trust: the config's trust file and target.
    let check = doc(
        "check",
        &d.agent(&["check", "v2.perch", "--json"]),
        &["file", "verified", "name", "counter", "digest", "chunk_count", "target_checked"],
    );
    assert_eq!(check["target_checked"], "test-board");
    let r = d.agent(&["install", "v2.perch", "--json"]);
    let done = doc("install", &r, &["outcome", "bundle.name", "bundle.digest", "deploy.state"]);
    assert_eq!(done["outcome"], "committed", "{done}");
    assert_eq!(r.stdout.lines().count(), 1, "install --json prints only its document: {}", r.stdout);
    doc("status", &d.agent(&["status", "--json"]), &["deploy.state"]);
    // The text form: one column of labels, the values aligned after it.
    let text = d.agent(&["status"]).stdout;
    for line in text.lines() {
        let (label, value) = line.split_at(13.min(line.len()));
        assert!(!label.trim().is_empty() && !label.trim().contains("  "), "{line:?} in\n{text}");
        assert!(value.starts_with(|c: char| !c.is_whitespace()), "not aligned: {line:?} in\n{text}");
    }
    let again = doc("install again", &d.agent(&["install", "v2.perch", "--json"]), &["outcome"]);
    assert_eq!(again["outcome"], "already_running");
}
