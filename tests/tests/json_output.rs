//! Every `--json` output parses as JSON, matches its schema
//! (`schemas/cli/`), and has the fields the command line reference
//! documents for it (`docs/content/reference/cli.md`). The records the
//! commands leave in the fleet's buckets match `schemas/wire/`.

use perch_protocol::enroll::{EnrollResponse, Rejection};
use perch_protocol::subjects;
use perch_tests::device::{Backend, Device};
use perch_tests::fleet::Fleet;
use perch_tests::schema;
use serde_json::Value;

/// Parses stdout as one JSON document, checks it against
/// `schemas/cli/<what>.json`, and checks `fields` (dotted paths into
/// objects) are there.
fn doc(what: &str, r: &perch_tests::Run, fields: &[&str]) -> Value {
    assert_eq!(r.code, 0, "{what}: {}{}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {}", r.stdout));
    schema::check(&format!("cli/{what}"), &v);
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
    doc("perch-keygen", &r, &["key_id", "secret", "public"]);
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
    let built = doc(
        "perch-bundle-build",
        &s.run("perch", &build),
        &["out", "name", "counter", "digest", "chunk_count"],
    );
    assert_eq!(built["signed"], false);
    for added in [true, false] {
        let r = s.run("perch", &["bundle", "sign", "--key", "k1.key", "os7.perch", "--json"]);
        assert_eq!(doc("perch-bundle-sign", &r, &["file", "key_id", "added"])["added"], added);
    }
    let verify = s.run("perch", &["bundle", "verify", "--trust", "org/trust.doc", "os7.perch", "--json"]);
    doc("perch-bundle-verify", &verify, &["verified", "digest", "signers", "threshold", "chunk_count"]);
    doc(
        "perch-bundle-inspect",
        &s.run("perch", &["bundle", "inspect", "os7.perch", "--json"]),
        &["name", "counter"],
    );
    let publish = ["publish", "--trust", "org/trust.doc", "os7.perch", "--json"];
    let published = doc(
        "perch-publish",
        &with_conn(&publish),
        &["digest", "chunk_count", "bytes_sent", "already_published"],
    );
    assert_eq!(published["digest"], built["digest"], "publish and build name the same bundle");
    doc("perch-status", &with_conn(&["status", "--json"]), &["devices"]);
    doc("perch-desired-list", &with_conn(&["desired", "list", "--json"]), &[]);

    // deploy start --json: JSON lines, the first the rollout created.
    let r = with_conn(&["deploy", "start", "--bundle", "os@7", "--device", "d1", "--detach", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 1, "{}", r.stdout);
    schema::check("cli/perch-deploy-start", &lines[0]);
    has("deploy start", &lines[0], &["event", "rollout.id", "rollout.state"]);
    assert_eq!(lines[0]["event"], "created");
    let id = lines[0]["rollout"]["id"].as_str().unwrap().to_string();
    // The old form, and a bundle file for --bundle.
    let r = with_conn(&["deploy", "--bundle", "os7.perch", "--device", "d2", "--detach", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed = doc("perch-deploy-list", &with_conn(&["deploy", "list", "--json"]), &[]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let paused = with_conn(&["deploy", "pause", &id, "--json"]);
    doc("perch-deploy-pause", &paused, &["id", "state"]);
    // resume prints JSON lines, as start does; --detach: the first only.
    let r = with_conn(&["deploy", "resume", &id, "--detach", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for line in r.stdout.lines() {
        schema::check("cli/perch-deploy-resume", &serde_json::from_str(line).expect("a JSON line"));
    }
    // What the fleet's buckets hold: the rollouts.
    let reader = f.reports_reader();
    for r in listed.as_array().unwrap() {
        let key = format!("$KV.{}.{}", subjects::ROLLOUTS_BUCKET, r["id"].as_str().unwrap());
        let stored = reader.last_by_subject(&format!("KV_{}", subjects::ROLLOUTS_BUCKET), &key).expect(&key);
        schema::check("wire/rollout", &serde_json::from_slice(&stored).unwrap());
    }
    let aborted = with_conn(&["deploy", "abort", &id, "--json"]);
    doc("perch-deploy-abort", &aborted, &["id", "state"]);
    doc("perch-streams", &with_conn(&["streams", "--json"]), &[]);
    doc("perch-context-show", &with_conn(&["context", "show", "--json"]), &["urls", "creds", "ca"]);
    s.write_payload("img8", 64 * 1024, 4);
    let build8 = ["bundle", "build", "--name", "os", "--counter", "8", "--kind", "image", "--input", "img8"];
    s.ok("perch", &[&build8[..], &["--out", "os8.perch"]].concat());
    let r = s.run("perch", &["bundle", "diff", "os7.perch", "os8.perch", "--json"]);
    doc("perch-bundle-diff", &r, &["chunks", "reused", "fetched"]);

    doc("perch-context-ls", &s.run("perch", &["context", "ls", "--json"]), &["contexts"]);

    let r = s.run("perch-bootstrap", &["trust", "show", "org/trust.doc", "--json"]);
    doc("perch-bootstrap-trust-show", &r, &["org", "version", "fingerprint", "release_keys", "threshold"]);
    let token = s.run(
        "perch-bootstrap",
        &["token", "issue", "--dir", "org", "--url", &f.url, "--group", "g", "--json"],
    );
    let token = doc("perch-bootstrap-token-issue", &token, &["token", "id", "expires_at"]);
    let check = ["token", "check", "--trust", "org/trust.doc", token["token"].as_str().unwrap(), "--json"];
    doc(
        "perch-bootstrap-token-check",
        &s.run("perch-bootstrap", &check),
        &["id", "org", "groups", "uses", "expires_at"],
    );

    // The registry: a device enrolled, one waiting for approval.
    let auto = f.token_file("auto.token", &["--group", "g"]);
    let manual = f.token_file("manual.token", &["--group", "g", "--approval", "manual"]);
    for (id, token, code) in [("e1", &auto, 0), ("w1", &manual, 1)] {
        let d = f.device(id);
        std::fs::copy(s.path("org/trust.doc"), d.trust()).unwrap();
        let r = d.agent(&["enroll", "--device-id", id, "--token-file", token.to_str().unwrap()]);
        assert_eq!(r.code, code, "{id}: {}", r.stderr);
    }
    // The enrollment the provisioner sent e1, as the device keeps it, and
    // the other answers a device can get.
    let enrollment = f.device("e1").enrollment();
    schema::check("wire/enrollment", &serde_json::to_value(&enrollment).unwrap());
    let answers = [
        EnrollResponse::Enrolled(Box::new(enrollment)),
        EnrollResponse::Pending("waiting for an operator".into()),
        EnrollResponse::Rejected(Rejection::TokenUsedUp),
        EnrollResponse::Rejected(Rejection::IdNotAllowed { id: "x".into(), pattern: "drone-*".into() }),
        EnrollResponse::Rejected(Rejection::Internal("registry: timed out".into())),
    ];
    for a in answers {
        schema::check("wire/enroll-response", &serde_json::to_value(&a).unwrap());
    }
    // An offline request file, as a technician carries it.
    let req = s.path("w2.req");
    let r = f.device("w2").agent(&["enroll", "--device-id", "w2", "--request-out", req.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&req).unwrap();
    let request = perch_protocol::enroll::SignedRequest::from_text(&text).unwrap();
    schema::check("wire/enroll-request", &request.to_json());
    // Desired state for a device and a group.
    for scope in [["--device", "e1"], ["--group", "g"]] {
        let r = with_conn(&[&["desired", "set", "--bundle", "os@7"][..], &scope[..]].concat());
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let desired = doc("perch-desired-list", &with_conn(&["desired", "list", "--json"]), &[]);
    let keys: Vec<&str> = desired.as_array().unwrap().iter().filter_map(|d| d["key"].as_str()).collect();
    assert_eq!(keys, ["device.e1", "group.g"], "{desired}");
    for k in keys {
        let key = format!("$KV.{}.{k}", subjects::DESIRED_BUCKET);
        let stored = reader.last_by_subject(&format!("KV_{}", subjects::DESIRED_BUCKET), &key).expect(&key);
        schema::check("wire/desired", &serde_json::from_slice(&stored).unwrap());
    }
    let devices = doc("perch-bootstrap-devices", &f.admin(&["devices", "--json"]), &["devices"]);
    assert_eq!(devices["devices"].as_array().map(Vec::len), Some(2), "{devices}");
    let pending = doc("perch-bootstrap-pending", &f.admin(&["pending", "--json"]), &["devices"]);
    assert_eq!(pending["devices"].as_array().map(Vec::len), Some(1), "{pending}");
    for id in ["e1", "w1"] {
        let key = format!("$KV.{}.{}", subjects::REGISTRY_BUCKET, perch_protocol::registry::device_key(id));
        let stored = reader.last_by_subject(&format!("KV_{}", subjects::REGISTRY_BUCKET), &key).expect(&key);
        schema::check("wire/registry-device", &serde_json::from_slice(&stored).unwrap());
    }
}

#[test]
fn the_agent_json_outputs_parse_and_have_their_documented_fields() {
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    // No --trust: the config's trust file and target.
    let check = doc(
        "perch-agent-check",
        &d.agent(&["check", "v2.perch", "--json"]),
        &["file", "verified", "name", "counter", "digest", "chunk_count", "target_checked"],
    );
    assert_eq!(check["target_checked"], "test-board");
    let r = d.agent(&["install", "v2.perch", "--json"]);
    let done = doc("perch-agent-install", &r, &["outcome", "bundle.name", "bundle.digest", "deploy.state"]);
    assert_eq!(done["outcome"], "committed", "{done}");
    assert_eq!(r.stdout.lines().count(), 1, "install --json prints only its document: {}", r.stdout);
    doc("perch-agent-status", &d.agent(&["status", "--json"]), &["deploy.state"]);
    // The text form: one column of labels, the values aligned after it.
    let text = d.agent(&["status"]).stdout;
    for line in text.lines() {
        let (label, value) = line.split_at(13.min(line.len()));
        assert!(!label.trim().is_empty() && !label.trim().contains("  "), "{line:?} in\n{text}");
        assert!(value.starts_with(|c: char| !c.is_whitespace()), "not aligned: {line:?} in\n{text}");
    }
    let again = doc("perch-agent-install", &d.agent(&["install", "v2.perch", "--json"]), &["outcome"]);
    assert_eq!(again["outcome"], "already_running");
}
