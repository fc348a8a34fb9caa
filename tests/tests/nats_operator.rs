//! `perch-bootstrap init` makes a NATS operator, accounts and a server
//! config include; Debian's nats-server must accept all of it, and enforce
//! the credentials perch issues.

use std::fs;

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use perch_tests::nats::{NatsServer, RawClient};
use perch_tests::Scratch;

/// Reads a .creds file: (jwt, user key).
fn creds(path: &std::path::Path) -> (String, KeyPair) {
    let text = fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let jwt = lines[lines.iter().position(|l| l.contains("BEGIN NATS USER JWT")).unwrap() + 1].to_string();
    let seed = lines[lines.iter().position(|l| l.contains("BEGIN USER NKEY SEED")).unwrap() + 1];
    (jwt, KeyPair::from_seed(seed).unwrap())
}

fn connect(port: u16, creds_path: &std::path::Path) -> (RawClient, String) {
    let (jwt, user) = creds(creds_path);
    RawClient::connect(port, &jwt, |nonce| BASE64URL_NOPAD.encode(&user.sign(nonce).unwrap()))
}

fn setup() -> (Scratch, NatsServer) {
    let s = Scratch::new();
    s.org(1, 1);
    // nats-server 2.9 resolves includes relative to the including file.
    let include = "include \"org/nats/server.conf\"";
    let server = NatsServer::start(s.dir.path(), include);
    (s, server)
}

#[test]
fn init_writes_the_nats_side_with_private_seeds() {
    let s = Scratch::new();
    s.org(1, 1);
    for f in ["operator.jwt", "sys.jwt", "provisioning.jwt", "fleet.jwt", "server.conf"] {
        assert!(s.path(&format!("org/nats/{f}")).is_file(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "operator.nk",
        "sys.nk",
        "provisioning.nk",
        "fleet.nk",
        "fleet-signing.nk",
        "provisioning-signing.nk",
    ] {
        let mode = fs::metadata(s.path(&format!("org/nats/{f}"))).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let conf = fs::read_to_string(s.path("org/nats/server.conf")).unwrap();
    assert!(conf.contains("type: full"), "{conf}");
    // The config test of the real server accepts it.
    let include = s.path("check.conf");
    fs::write(&include, "include \"org/nats/server.conf\"\n").unwrap();
    let out = std::process::Command::new("nats-server").arg("-t").arg("-c").arg(&include).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn nats_server_enforces_perch_credentials() {
    let (s, server) = setup();
    s.ok(
        "perch-bootstrap",
        &[
            "nats",
            "creds",
            "--dir",
            "org",
            "--account",
            "fleet",
            "--name",
            "dev1",
            "--pub",
            "perch.report.dev1",
            "--pub",
            "$JS.API.INFO",
            "--sub",
            "_INBOX.>",
            "--out",
            "dev1.creds",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(s.path("dev1.creds")).unwrap().permissions().mode() & 0o777, 0o600);

    let (mut dev1, answer) = connect(server.port, &s.path("dev1.creds"));
    assert_eq!(answer, "PONG", "a FLEET user signed by the FLEET signing key must connect");
    assert_eq!(dev1.publish("perch.report.dev1", None, "hello"), "PONG");
    let denied = dev1.publish("perch.report.dev2", None, "hello");
    assert!(denied.contains("Permissions Violation for Publish to \"perch.report.dev2\""), "{denied}");
    // JetStream is enabled for FLEET...
    let info = dev1.request("$JS.API.INFO", "_INBOX.js", 1).expect("JetStream account info");
    assert!(info.contains("account_info_response") && !info.contains("\"error\""), "{info}");

    // ...but not for PROVISIONING, which cannot see FLEET's traffic either.
    s.ok(
        "perch-bootstrap",
        &[
            "nats",
            "creds",
            "--dir",
            "org",
            "--account",
            "provisioning",
            "--name",
            "p",
            "--pub",
            ">",
            "--sub",
            ">",
            "--out",
            "p.creds",
        ],
    );
    let (mut prov, answer) = connect(server.port, &s.path("p.creds"));
    assert_eq!(answer, "PONG");
    if let Some(info) = prov.request("$JS.API.INFO", "_INBOX.p", 1) {
        assert!(info.contains("\"error\""), "JetStream must be off for PROVISIONING: {info}");
    }
    prov.send("SUB perch.> 2\r\nPING\r\n");
    assert_eq!(prov.line(), "PONG");
    assert_eq!(dev1.publish("perch.report.dev1", None, "secret"), "PONG");
    prov.send("PING\r\n");
    assert_eq!(prov.line(), "PONG", "a FLEET message must not reach PROVISIONING");
}

#[test]
fn a_credential_from_an_unknown_key_is_refused() {
    let (_s, server) = setup();
    // A user JWT signed by an account key the operator never listed.
    let rogue_account = KeyPair::new_account();
    let user = KeyPair::new_user();
    let jwt = perch_bootstrap_user_jwt(&rogue_account, &user);
    let (_c, answer) =
        RawClient::connect(server.port, &jwt, |n| BASE64URL_NOPAD.encode(&user.sign(n).unwrap()));
    assert!(answer.contains("Authorization Violation"), "{answer}");
}

/// Builds a user JWT by hand (header.claims.sig), independent of perch's encoder.
fn perch_bootstrap_user_jwt(signer: &KeyPair, user: &KeyPair) -> String {
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": "X", "iat": 1, "iss": signer.public_key(), "sub": user.public_key(), "name": "rogue",
        "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    });
    let body = BASE64URL_NOPAD.encode(serde_json::to_string(&claims).unwrap().as_bytes());
    let input = format!("{header}.{body}");
    format!("{input}.{}", BASE64URL_NOPAD.encode(&signer.sign(input.as_bytes()).unwrap()))
}
