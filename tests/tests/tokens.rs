//! Enrollment tokens: issued by `perch-bootstrap token issue`, checked
//! against the trust document, and the PROVISIONING credential inside one
//! checked against the real nats-server.

use data_encoding::BASE64URL_NOPAD;
use nkeys::{KeyPair, KeyPairType};
use perch_protocol::token::SignedToken;
use perch_tests::nats::{org_ca_der, NatsServer, RawClient};
use perch_tests::Scratch;

fn issue(s: &Scratch, extra: &[&str]) -> String {
    let mut args = vec!["token", "issue", "--dir", "org", "--group", "drones"];
    args.extend_from_slice(extra);
    s.ok("perch-bootstrap", &args).stdout.trim().to_string()
}

#[test]
fn tokens_fit_a_qr_code_and_forgeries_exit_3() {
    let s = Scratch::new();
    s.org(1, 1);
    let t = issue(&s, &["--uses", "5", "--approval", "manual", "--id-pattern", "drone-*"]);
    assert!(t.len() <= 1536, "token is {} characters", t.len());
    let ok = s.ok("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", "--json", &t]);
    let v: serde_json::Value = serde_json::from_str(&ok.stdout).unwrap();
    assert_eq!(v["uses"], 5);
    assert_eq!(v["approval"], "manual");
    // One character changed anywhere: refused.
    for i in (7..t.len()).step_by(53) {
        let mut b = t.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        let r = s.run(
            "perch-bootstrap",
            &["token", "check", "--trust", "org/trust.doc", &String::from_utf8(b).unwrap()],
        );
        assert_eq!(r.code, 3, "change at {i}: {}", r.stderr);
    }
    // Another org's token: signed by a key this trust document does not list.
    let other = Scratch::new();
    other.org(1, 1);
    let foreign = issue(&other, &[]);
    let r = s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", &foreign]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("not an issuing key"), "{}", r.stderr);
    // Expired.
    let short = issue(&s, &["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", &short]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("expired"), "{}", r.stderr);
    assert_eq!(s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", "hello"]).code, 3);
    assert_eq!(s.run("perch-bootstrap", &["token", "issue", "--dir", "org", "--group", "bad group"]).code, 2);
}

#[test]
fn the_token_credential_can_only_ask_to_enroll() {
    let s = Scratch::new();
    s.org(1, 1);
    let server = NatsServer::start(s.dir.path(), "include \"org/nats/server.conf\"");
    let t = issue(&s, &[]);
    let body = SignedToken::parse(&t).unwrap().unverified_body().clone();
    let user = KeyPair::new_from_raw(KeyPairType::User, body.provisioning_seed).unwrap();
    let ca = org_ca_der(&s.path("org"));
    let (mut c, answer) = RawClient::connect(server.port, &ca, &body.provisioning_jwt(), |n| {
        BASE64URL_NOPAD.encode(&user.sign(n).unwrap())
    });
    assert_eq!(answer, "PONG", "the token's credential must connect to PROVISIONING");
    assert_eq!(c.publish("perch.enroll.request", Some("_INBOX.me"), "{}"), "PONG");
    let r = c.publish("perch.report.dev1", None, "x");
    assert!(r.contains("Permissions Violation for Publish"), "{r}");
    // It cannot listen to other devices' enrollment traffic.
    c.send("SUB perch.enroll.request 1\r\nPING\r\n");
    let r = c.line();
    assert!(r.contains("Permissions Violation for Subscription"), "{r}");
    let _ = c.line();
    // It hears answers on its token's own inboxes only, not everyone's.
    let own = perch_protocol::subjects::token_inbox_prefix(&body.token_id);
    assert_eq!(c.subscribe(&format!("{own}.>"), 2), "PONG");
    let r = c.subscribe("_INBOX.>", 3);
    assert!(r.contains("Permissions Violation for Subscription"), "{r}");
    let r = c.subscribe(&format!("{}.>", perch_protocol::subjects::token_inbox_prefix(&[0; 16])), 4);
    assert!(r.contains("Permissions Violation for Subscription"), "{r}");
}

#[test]
fn token_issue_refuses_a_ttl_under_one_second() {
    let s = Scratch::new();
    s.org(1, 1);
    for ttl in ["0s", "500ms"] {
        let r = s.run("perch-bootstrap", &["token", "issue", "--dir", "org", "--group", "g", "--ttl", ttl]);
        assert_eq!(r.code, 2, "--ttl {ttl}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "--ttl {ttl}: {}", r.stderr);
        assert!(r.stderr.contains("--ttl"), "{}", r.stderr);
        assert!(r.stdout.is_empty(), "--ttl {ttl} printed a token");
    }
}

#[test]
fn an_oversized_token_file_is_refused_as_hostile_with_exit_3() {
    let s = Scratch::new();
    s.org(1, 1);
    let t = issue(&s, &[]);
    // A real token padded far past any real one.
    std::fs::write(s.path("big.token"), format!("{t}{}", " ".repeat(1 << 20))).unwrap();
    let r = s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", "--file", "big.token"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("big.token"), "{}", r.stderr);
    // A missing file stays a usage error.
    let r = s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", "--file", "none.token"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// The org directory from `PERCH_ORG` when `--dir` is not given; neither is
/// exit 2, and the help names the variable.
#[test]
fn the_org_directory_can_come_from_perch_org() {
    let s = Scratch::new();
    s.org(1, 1);
    let run = |env: Option<&str>| -> perch_tests::Run {
        let mut c = std::process::Command::new(perch_tests::bin("perch-bootstrap"));
        c.args(["token", "issue", "--group", "drones"]).current_dir(s.dir.path()).env_remove("PERCH_ORG");
        if let Some(dir) = env {
            c.env("PERCH_ORG", dir);
        }
        c.output().expect("spawn").into()
    };
    let r = run(Some("org"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.trim().len() > 20, "{}", r.stdout);
    let r = run(None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--dir <ORG_DIR>"), "{}", r.stderr);
    let help = s.ok("perch-bootstrap", &["token", "issue", "--help"]).stdout;
    assert!(help.contains("[env: PERCH_ORG"), "{help}");
}
