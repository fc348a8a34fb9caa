//! `perch-bootstrap init` makes a NATS operator, accounts and a server
//! config include; Debian's nats-server must accept all of it, and enforce
//! the credentials perch issues, over TLS only.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use perch_tests::nats::{org_ca_der, read_info, NatsServer, RawClient};
use perch_tests::Scratch;

/// Reads a .creds file: (jwt, user key).
fn creds(path: &std::path::Path) -> (String, KeyPair) {
    let text = fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let jwt = lines[lines.iter().position(|l| l.contains("BEGIN NATS USER JWT")).unwrap() + 1].to_string();
    let seed = lines[lines.iter().position(|l| l.contains("BEGIN USER NKEY SEED")).unwrap() + 1];
    (jwt, KeyPair::from_seed(seed).unwrap())
}

fn connect(s: &Scratch, port: u16, creds_path: &std::path::Path) -> (RawClient, String) {
    let (jwt, user) = creds(creds_path);
    let ca = org_ca_der(&s.path("org"));
    RawClient::connect(port, &ca, &jwt, |nonce| BASE64URL_NOPAD.encode(&user.sign(nonce).unwrap()))
}

/// `perch-bootstrap nats creds` for a FLEET user `dev1` allowed to publish
/// its reports, written to `dev1.creds`.
fn dev1_creds(s: &Scratch) {
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
        "operator-signing.nk",
    ] {
        let mode = fs::metadata(s.path(&format!("org/nats/{f}"))).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    for f in ["ca.pem", "server.pem"] {
        assert!(s.path(&format!("org/tls/{f}")).is_file(), "{f}");
    }
    for f in ["ca.key", "server.key"] {
        let mode = fs::metadata(s.path(&format!("org/tls/{f}"))).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let conf = fs::read_to_string(s.path("org/nats/server.conf")).unwrap();
    assert!(conf.contains("type: full"), "{conf}");
    let tls = conf.find("tls {").unwrap_or_else(|| panic!("no tls block: {conf}"));
    let block = &conf[tls..tls + conf[tls..].find('}').expect("tls block closes")];
    for key in ["cert_file", "server.pem", "key_file", "server.key"] {
        assert!(block.contains(key), "{key} not in {block}");
    }
    // The config test of the real server accepts it.
    let include = s.path("check.conf");
    fs::write(&include, "include \"org/nats/server.conf\"\n").unwrap();
    // Its `tls {}` paths are relative to the org's parent, like `--dir org`.
    let out = std::process::Command::new(perch_tests::nats::server_binary())
        .current_dir(s.dir.path())
        .arg("-t")
        .arg("-c")
        .arg(&include)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn nats_server_enforces_perch_credentials() {
    let (s, server) = setup();
    dev1_creds(&s);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(s.path("dev1.creds")).unwrap().permissions().mode() & 0o777, 0o600);

    let (mut dev1, answer) = connect(&s, server.port, &s.path("dev1.creds"));
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
    let (mut prov, answer) = connect(&s, server.port, &s.path("p.creds"));
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
    let (s, server) = setup();
    // A user JWT signed by an account key the operator never listed.
    let rogue_account = KeyPair::new_account();
    let user = KeyPair::new_user();
    let jwt = perch_bootstrap_user_jwt(&rogue_account, &user);
    let ca = org_ca_der(&s.path("org"));
    let (_c, answer) =
        RawClient::connect(server.port, &ca, &jwt, |n| BASE64URL_NOPAD.encode(&user.sign(n).unwrap()));
    assert!(answer.contains("Authorization Violation"), "{answer}");
}

#[test]
fn a_plaintext_client_is_refused() {
    let (s, server) = setup();
    // Valid credentials: only the missing TLS can be the reason for refusal.
    dev1_creds(&s);
    let (jwt, user) = creds(&s.path("dev1.creds"));
    let mut sock = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let info = read_info(&mut sock);
    assert_eq!(info["tls_required"], true, "{info}");
    let nonce = info["nonce"].as_str().unwrap_or("");
    let connect = serde_json::json!({
        "jwt": jwt, "sig": BASE64URL_NOPAD.encode(&user.sign(nonce.as_bytes()).unwrap()),
        "verbose": false, "pedantic": false, "tls_required": false, "protocol": 1,
        "headers": false, "name": "plaintext",
    });
    let start = Instant::now();
    // The server may already have hung up, so a failed write is a refusal too.
    let _ = sock.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes());
    let _ = sock.write_all(b"PUB perch.report.dev1 5\r\nhello\r\nPING\r\n");
    // Whatever comes back in plaintext, it is never a PONG, and the server
    // closes the connection rather than letting it idle.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("nats-server did not close the plaintext connection: {e}"),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(!got.contains("PONG"), "a plaintext client got a PONG: {got}");
    assert!(start.elapsed() < Duration::from_secs(10));
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
