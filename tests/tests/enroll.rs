//! Enrollment end to end: real nats-server (operator mode, TLS), real
//! provisioner processes, real agents. The three ways in, forged tokens,
//! impersonation, isolation checked against the server's own permission
//! errors, revocation, a foreign server certificate, and secrets kept out
//! of files and logs.

use std::time::Duration;

use perch_protocol::enroll::{EnrollResponse, Enrollment, Rejection, SignedRequest};
use perch_protocol::subjects;
use perch_protocol::token::SignedToken;
use perch_tests::fleet::{modes, wait_for, Device, Fleet};
use perch_tests::nats::{NatsServer, RawClient};
use perch_tests::Scratch;

fn enroll(d: &Device, token: &std::path::Path, extra: &[&str]) -> perch_tests::Run {
    let mut args = vec!["enroll", "--device-id", d.name.as_str(), "--token-file", token.to_str().unwrap()];
    args.extend_from_slice(extra);
    d.agent(&args)
}

#[test]
fn desktop_enrolls_itself_at_first_boot_even_before_the_provisioner_is_up() {
    let mut f = Fleet::start(0);
    let token = f.token_file("token", &["--group", "desktops"]);
    let d = f.device("desk-1");
    d.write_config(&format!(
        "[device]\nid = \"desk-1\"\n[enroll]\ntoken_file = \"{}\"\nmax_backoff = \"1s\"\n",
        token.display()
    ));
    // First boot: the agent starts with nobody answering and keeps trying.
    let mut agent = d.spawn_run();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!d.is_enrolled());
    f.start_provisioner();
    assert!(wait_for(Duration::from_secs(15), || d.is_enrolled()), "{}", f.all_logs());
    // It then joins FLEET and says hello; the registry has it as enrolled.
    assert!(wait_for(Duration::from_secs(10), || f.device_status("desk-1").as_deref() == Some("enrolled")));
    let status = d.agent(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["enrollment"]["enrolled"], true, "{}", status.stdout);
    assert_eq!(v["enrollment"]["groups"][0], "desktops");
    // The token pinned the trust document; the agent installed it.
    assert_eq!(std::fs::read(d.trust()).unwrap(), std::fs::read(f.s.path("org/trust.doc")).unwrap());
    // Enrolling again is a no-op.
    let again = enroll(&d, &token, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stdout.contains("already enrolled"), "{}", again.stdout);
    agent.kill();
    secrets_stay_secret(&f, &[&d], &std::fs::read_to_string(&token).unwrap());
}

/// Key files are 0600; no secret (device key, org seeds, CA and server
/// keys, the token and its credential seed) appears in any log.
fn secrets_stay_secret(f: &Fleet, devices: &[&Device], token: &str) {
    for d in devices {
        for (p, mode) in modes(&d.state().join("identity")) {
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }
    let mut secrets: Vec<String> = vec![token.trim().to_string()];
    for d in devices {
        let text = std::fs::read_to_string(d.state().join("identity/device.key")).unwrap();
        secrets.push(text.split_whitespace().last().unwrap().to_string());
        secrets.push(hex_seed_as_nkey(&text));
    }
    for (p, mode) in modes(&f.s.path("org")) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".nk") || name.ends_with(".key") {
            assert_eq!(mode, 0o600, "{}", p.display());
            let text = std::fs::read_to_string(&p).unwrap();
            // The seed, or the base64 body of a PEM key.
            secrets
                .extend(text.lines().filter(|l| l.len() > 40 && !l.starts_with("-----")).map(str::to_string));
        }
    }
    let t = SignedToken::parse(token).unwrap();
    let seed = t.unverified_body().provisioning_seed;
    secrets.push(nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, seed).unwrap().seed().unwrap());
    let logs = f.all_logs();
    assert!(logs.len() > 1000, "expected trace logs, got {} bytes", logs.len());
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret ({}...) appears in the logs", &s[..8]);
    }
}

fn hex_seed_as_nkey(key_text: &str) -> String {
    let hex = key_text.split_whitespace().last().unwrap();
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, seed).unwrap().seed().unwrap()
}

#[test]
fn technician_approves_or_rejects_a_waiting_drone() {
    let f = Fleet::start(1);
    let token = f.token_file(
        "token",
        &["--group", "drones", "--uses", "2", "--approval", "manual", "--id-pattern", "drone-*"],
    );
    let d = f.device("drone-1");
    let first = enroll(&d, &token, &[]);
    assert_eq!(first.code, 1, "{}", first.stderr);
    assert!(first.stderr.contains("pending"), "{}", first.stderr);
    // The technician has an operator's FLEET creds file, not the org's keys.
    f.s.fleet_creds("tech");
    let tech = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--creds", "tech.creds", "--ca", "org/tls/ca.pem", "--url", &f.url]);
        f.s.run("perch-bootstrap", &a)
    };
    let pending = tech(&["pending", "--json"]);
    assert!(pending.stdout.contains("\"drone-1\""), "{}{}", pending.stdout, pending.stderr);
    // The device waits while the technician looks at it.
    let waiting = {
        let d = Device { dir: d.dir.clone(), name: d.name.clone() };
        let token = token.clone();
        std::thread::spawn(move || enroll(&d, &token, &["--wait"]))
    };
    std::thread::sleep(Duration::from_millis(500));
    let ok = tech(&["approve", "drone-1"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let r = waiting.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(d.is_enrolled());
    assert_eq!(f.device_status("drone-1").as_deref(), Some("enrolled"));
    assert!(f.admin(&["pending", "--json"]).stdout.contains("[]"));

    // A second drone is turned away by the technician.
    let d2 = f.device("drone-2");
    assert_eq!(enroll(&d2, &token, &[]).code, 1);
    assert_eq!(tech(&["reject", "drone-2"]).code, 0);
    // Revoking signs the FLEET account's revocation list: the org's keys only.
    let r = tech(&["revoke", "drone-1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("needs the org's keys"), "{}", r.stderr);
    assert_eq!(f.device_status("drone-1").as_deref(), Some("enrolled"), "nothing changed");
    // Neither creds nor the org: one line saying both ways.
    let r = f.s.run("perch-bootstrap", &["devices", "--url", &f.url]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--creds") && r.stderr.contains("--dir"), "{}", r.stderr);
    let r = enroll(&d2, &token, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("rejected"), "{}", r.stderr);
    // An id outside the token's pattern is refused before anything is stored.
    let desk = f.device("desk-9");
    let r = enroll(&desk, &token, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("pattern"), "{}", r.stderr);
    assert_eq!(f.device_status("desk-9"), None);
}

#[test]
fn offline_enrollment_travels_as_files() {
    let f = Fleet::start(1);
    let d = f.device("drone-7");
    // The drone's image carries the org trust document.
    std::fs::copy(f.s.path("org/trust.doc"), d.trust()).unwrap();
    let req = f.s.path("drone-7.req");
    let r = d.agent(&["enroll", "--device-id", "drone-7", "--request-out", req.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The technician's laptop signs it, with no network.
    let resp = f.s.path("drone-7.resp");
    let url = f.url.clone();
    f.s.ok(
        "perch-bootstrap",
        &[
            "sign-request",
            "--dir",
            "org",
            req.to_str().unwrap(),
            "--out",
            resp.to_str().unwrap(),
            "--group",
            "drones",
            "--fleet-url",
            &url,
        ],
    );
    // A tampered response is refused and nothing is stored.
    let text = std::fs::read_to_string(&resp).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let line = &mut lines[5];
    let c = if line.starts_with('A') { "B" } else { "A" };
    line.replace_range(0..1, c);
    let bad = f.s.path("bad.resp");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let r = d.agent(&["enroll", "--device-id", "drone-7", "--import", bad.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!d.is_enrolled());
    // Another device cannot use it.
    let other = f.device("drone-8");
    std::fs::copy(f.s.path("org/trust.doc"), other.trust()).unwrap();
    let r = other.agent(&["enroll", "--device-id", "drone-8", "--import", resp.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = d.agent(&["enroll", "--device-id", "drone-7", "--import", resp.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The registry learns of it when it first connects.
    assert_eq!(f.device_status("drone-7"), None);
    let mut agent = d.spawn_run();
    assert!(
        wait_for(Duration::from_secs(15), || f.device_status("drone-7").as_deref() == Some("enrolled")),
        "{}",
        f.all_logs()
    );
    agent.kill();
    let devs = f.devices();
    assert_eq!(devs["devices"][0]["via"], "offline");
}

/// An enrollment file for `d` (offline: request, then `sign-request`).
fn signed_response(f: &Fleet, d: &perch_tests::fleet::Device) -> std::path::PathBuf {
    std::fs::copy(f.s.path("org/trust.doc"), d.trust()).unwrap();
    let (req, resp) = (d.dir.join("req"), d.dir.join("resp"));
    let r = d.agent(&["enroll", "--device-id", &d.name, "--request-out", req.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (req, out) = (req.to_str().unwrap(), resp.to_str().unwrap());
    f.s.ok(
        "perch-bootstrap",
        &["sign-request", "--dir", "org", req, "--out", out, "--group", "g", "--fleet-url", &f.url],
    );
    resp
}

#[test]
fn import_refuses_an_enrollment_whose_user_jwt_has_one_bit_flipped() {
    let f = Fleet::start(0);
    let d = f.device("drone-9");
    let resp = signed_response(&f, &d);
    let good = Enrollment::from_text(&std::fs::read_to_string(&resp).unwrap()).unwrap();
    let jwt = good.user_jwt.clone();
    let dots: Vec<usize> = jwt.match_indices('.').map(|(i, _)| i).collect();
    // In the header, the claims (subject, expiry, permissions) and the signature.
    for i in [3, dots[0] + 5, dots[0] + (dots[1] - dots[0]) / 2, dots[1] - 2, dots[1] + 7, jwt.len() - 3] {
        let mut bytes = jwt.clone().into_bytes();
        bytes[i] ^= 0x01;
        let mut bad = good.clone();
        bad.user_jwt = String::from_utf8(bytes).unwrap();
        let file = f.s.path("bad.resp");
        std::fs::write(&file, bad.to_text()).unwrap();
        let r = d.agent(&["enroll", "--device-id", "drone-9", "--import", file.to_str().unwrap()]);
        assert_eq!(r.code, 3, "flip at {i}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("user JWT"), "{}", r.stderr);
        assert!(!d.is_enrolled(), "flip at {i} was stored");
    }
    let r = d.agent(&["enroll", "--device-id", "drone-9", "--import", resp.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Damaged on disk afterwards: the stored enrollment is refused when loaded.
    let mut bytes = jwt.into_bytes();
    bytes[dots[1] + 7] ^= 0x01;
    let mut bad = good;
    bad.user_jwt = String::from_utf8(bytes).unwrap();
    std::fs::write(d.state().join("identity/enrollment"), bad.to_text()).unwrap();
    let r = d.agent(&["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(st["enrollment"]["enrolled"], false, "{st}");
    assert!(st["enrollment"]["problem"].as_str().unwrap().contains("user JWT"), "{st}");
}

#[test]
fn forged_expired_and_wrong_group_tokens_are_refused() {
    let f = Fleet::start(1);
    // Signed by another org's issuing key, but pointed at this server.
    let other = Scratch::new();
    other.org(1, 1);
    let foreign = other
        .ok("perch-bootstrap", &["token", "issue", "--dir", "org", "--group", "g", "--url", &f.url])
        .stdout;
    let ftoken = f.s.path("foreign.token");
    std::fs::write(&ftoken, foreign).unwrap();
    let d = f.device("dev-1");
    let r = enroll(&d, &ftoken, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!d.is_enrolled());

    let expired = f.token_file("expired.token", &["--group", "g", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let r = enroll(&d, &expired, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);

    let good = f.token_file("good.token", &["--group", "north"]);
    let r = enroll(&d, &good, &["--group", "south"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("group 'south' is not allowed"), "{}", r.stderr);
    assert!(!d.is_enrolled());
    // The refusals did not use up the token.
    let r = enroll(&d, &good, &["--group", "north"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn an_oversized_token_file_is_refused_as_hostile_with_exit_3() {
    let f = Fleet::start(0);
    let d = f.device("dev-1");
    let big = f.s.path("big.token");
    std::fs::write(&big, format!("{}{}", f.token(&["--group", "g"]), " ".repeat(1 << 20))).unwrap();
    let r = enroll(&d, &big, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("big.token"), "{}", r.stderr);
    assert!(!d.is_enrolled());
    // A missing token file stays a usage error.
    assert_eq!(enroll(&d, &f.s.path("none.token"), &[]).code, 2);
}

#[test]
fn twenty_devices_race_for_a_five_use_token_and_exactly_five_win() {
    // Two provisioners, so the race is also between instances.
    let f = Fleet::start(2);
    let token = f.token_file("token", &["--group", "swarm", "--uses", "5"]);
    let devices: Vec<Device> = (0..20).map(|i| f.device(&format!("swarm-{i:02}"))).collect();
    let children: Vec<_> = devices
        .iter()
        .map(|d| {
            std::process::Command::new(perch_tests::bin("perch-agent"))
                .args(["--config", d.config().to_str().unwrap(), "--state-dir", d.state().to_str().unwrap()])
                .args(["enroll", "--device-id", &d.name, "--token-file", token.to_str().unwrap()])
                .output()
                .map(perch_tests::Run::from)
        })
        .collect();
    let mut won = 0;
    for (d, r) in devices.iter().zip(children) {
        let r = r.unwrap();
        match r.code {
            0 => won += 1,
            3 => assert!(r.stderr.contains("no uses left"), "{}: {}", d.name, r.stderr),
            c => panic!("{} exited {c}: {}", d.name, r.stderr),
        }
    }
    assert_eq!(won, 5);
    let enrolled =
        f.devices()["devices"].as_array().unwrap().iter().filter(|d| d["status"] == "enrolled").count();
    assert_eq!(enrolled, 5);
}

#[test]
fn a_known_id_with_a_new_key_needs_approval_and_the_old_key_is_cut_off() {
    let f = Fleet::start(1);
    let token = f.token_file("token", &["--group", "north", "--uses", "3"]);
    let a = f.device("cam-1");
    assert_eq!(enroll(&a, &token, &[]).code, 0);
    // An impostor (or a re-imaged device) with its own key claims the id.
    let b = f.device("cam-1-new");
    let r = b.agent(&["enroll", "--device-id", "cam-1", "--token-file", token.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("enrolled with another key"), "{}", r.stderr);
    let (mut old, hello) = f.raw_as(&a);
    assert_eq!(hello, "PONG");
    let pending = f.admin(&["pending", "--json"]);
    assert!(pending.stdout.contains("cam-1"), "{}", pending.stdout);
    assert_eq!(f.admin(&["approve", "cam-1"]).code, 0);
    let r = b.agent(&["enroll", "--device-id", "cam-1", "--token-file", token.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The old key's connection is closed and it cannot come back.
    assert!(wait_for(Duration::from_secs(5), || old.line().is_empty()));
    let (_, answer) = f.raw_as(&a);
    assert!(answer.contains("Authorization Violation"), "{answer}");
}

#[test]
fn a_replayed_request_is_refused() {
    let f = Fleet::start(1);
    let token_path = f.token_file("token", &["--group", "north", "--uses", "3"]);
    let token = std::fs::read_to_string(&token_path).unwrap();
    let a = f.device("pump-1");
    let req = f.s.path("pump-1.req");
    let r = a.agent(&[
        "enroll",
        "--device-id",
        "pump-1",
        "--token-file",
        token_path.to_str().unwrap(),
        "--request-out",
        req.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bytes = SignedRequest::from_text(&std::fs::read_to_string(&req).unwrap()).unwrap().to_bytes();
    // Someone holding the token sends the device's request, twice.
    let t = SignedToken::parse(&token).unwrap();
    let user = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, t.unverified_body().provisioning_seed)
        .unwrap();
    let (mut c, hello) =
        RawClient::connect(f.server.port, &f.ca_der(), &t.unverified_body().provisioning_jwt(), |n| {
            data_encoding::BASE64URL_NOPAD.encode(&user.sign(n).unwrap())
        });
    assert_eq!(hello, "PONG");
    let inbox = |n: u32| format!("{}.x{n}", subjects::token_inbox_prefix(&t.unverified_body().token_id));
    let first = c.request_bytes(subjects::ENROLL_REQUEST, &inbox(1), 1, &bytes).unwrap();
    assert!(matches!(EnrollResponse::from_bytes(&first).unwrap(), EnrollResponse::Enrolled(_)));
    let again = c.request_bytes(subjects::ENROLL_REQUEST, &inbox(2), 2, &bytes).unwrap();
    assert_eq!(EnrollResponse::from_bytes(&again).unwrap(), EnrollResponse::Rejected(Rejection::Replay));
    // A request whose key was swapped fails proof of possession.
    let mut tampered = bytes.clone();
    let n = tampered.len();
    tampered[n - 10] ^= 1;
    let r = c.request_bytes(subjects::ENROLL_REQUEST, &inbox(3), 3, &tampered).unwrap();
    assert!(matches!(EnrollResponse::from_bytes(&r).unwrap(), EnrollResponse::Rejected(_)));
    // The enrollment it got back is useless without the device key: the
    // real device still enrolls (idempotently) and holds the only key.
    let r = enroll(&a, &token_path, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn devices_are_isolated_by_the_server() {
    let f = Fleet::start(1);
    let token = f.token_file("token", &["--group", "north", "--uses", "2"]);
    let (a, b) = (f.device("dev-a"), f.device("dev-b"));
    assert_eq!(enroll(&a, &token, &[]).code, 0);
    assert_eq!(enroll(&b, &token, &[]).code, 0);
    let (mut ca, hello) = f.raw_as(&a);
    assert_eq!(hello, "PONG");
    let denied = |answer: String, what: &str| {
        assert!(answer.contains("Permissions Violation"), "{what}: {answer}");
    };
    // Its own subjects: allowed.
    assert_eq!(ca.publish("perch.report.dev-a.events", None, "x"), "PONG");
    assert_eq!(ca.publish("perch.hello.dev-a", None, "x"), "PONG");
    assert_eq!(ca.subscribe("_INBOX_dev-a.>", 1), "PONG");
    // B's subjects, B's desired key, B's inbox, enrollment traffic: refused.
    denied(ca.publish("perch.report.dev-b.events", None, "x"), "publish as B");
    denied(ca.publish("perch.hello.dev-b", None, "x"), "hello as B");
    denied(
        ca.publish("$JS.API.DIRECT.GET.KV_PERCH_DESIRED.$KV.PERCH_DESIRED.device.dev-b", None, ""),
        "read B's desired key",
    );
    denied(ca.subscribe("_INBOX_dev-b.>", 2), "B's inbox");
    denied(ca.subscribe("perch.enroll.request", 3), "enrollment traffic");
    denied(ca.subscribe(">", 4), "everything");
    denied(ca.publish("$KV.PERCH_REGISTRY.device.dev-a", None, "{}"), "write the registry");
    denied(ca.publish("$JS.API.STREAM.INFO.KV_PERCH_REGISTRY", None, ""), "read the registry");
    // Its own desired key and its group's: allowed.
    assert_eq!(
        ca.publish("$JS.API.DIRECT.GET.KV_PERCH_DESIRED.$KV.PERCH_DESIRED.device.dev-a", None, ""),
        "PONG"
    );
    assert_eq!(
        ca.publish("$JS.API.DIRECT.GET.KV_PERCH_DESIRED.$KV.PERCH_DESIRED.group.north", None, ""),
        "PONG"
    );
    // The token's PROVISIONING credential cannot reach FLEET subjects.
    let t = SignedToken::parse(&std::fs::read_to_string(&token).unwrap()).unwrap();
    let user = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, t.unverified_body().provisioning_seed)
        .unwrap();
    let (mut pc, hello) =
        RawClient::connect(f.server.port, &f.ca_der(), &t.unverified_body().provisioning_jwt(), |n| {
            data_encoding::BASE64URL_NOPAD.encode(&user.sign(n).unwrap())
        });
    assert_eq!(hello, "PONG");
    denied(pc.publish("perch.report.dev-a.events", None, "x"), "token credential publishing a report");
    denied(
        pc.publish("$JS.API.DIRECT.GET.KV_PERCH_DESIRED.$KV.PERCH_DESIRED.device.dev-a", None, ""),
        "token credential reading FLEET",
    );
    denied(pc.subscribe("perch.enroll.request", 5), "token credential snooping on requests");
    denied(pc.subscribe("_INBOX.>", 6), "token credential snooping on other tokens' answers");
}

#[test]
fn a_revoked_device_is_cut_off_within_seconds_and_cannot_reconnect() {
    let f = Fleet::start(1);
    let token = f.token_file("token", &["--group", "north"]);
    let d = f.device("rover-1");
    assert_eq!(enroll(&d, &token, &[]).code, 0);
    let (mut c, hello) = f.raw_as(&d);
    assert_eq!(hello, "PONG");
    let r = f.admin(&["revoke", "rover-1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The server closes its connection.
    assert!(wait_for(Duration::from_secs(5), || c.line().is_empty()));
    let (_, answer) = f.raw_as(&d);
    assert!(answer.contains("Authorization Violation"), "{answer}");
    assert_eq!(f.device_status("rover-1").as_deref(), Some("revoked"));
    // And it cannot enroll its way back in.
    std::fs::remove_file(d.state().join("identity/enrollment")).unwrap();
    let r = enroll(&d, &token, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("revoked"), "{}", r.stderr);
}

#[test]
fn a_device_refuses_a_server_the_fleet_ca_did_not_sign() {
    let f = Fleet::start(1);
    // A server with another org's certificate, where the token points.
    let rogue = Scratch::new();
    rogue.org(1, 1);
    let rogue_server = NatsServer::start(rogue.dir.path(), "include \"org/nats/server.conf\"");
    let url = format!("tls://127.0.0.1:{}", rogue_server.port);
    let text =
        f.s.ok("perch-bootstrap", &["token", "issue", "--dir", "org", "--group", "g", "--url", &url]).stdout;
    let token = f.s.path("rogue.token");
    std::fs::write(&token, text).unwrap();
    let d = f.device("dev-x");
    let r = enroll(&d, &token, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("fleet CA"), "{}", r.stderr);
    assert!(!d.is_enrolled());
}
