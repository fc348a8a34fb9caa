//! The exit-code contract, walked through every binary: 0 success, 1
//! runtime failure, 2 usage or config error, 3 refused for security. Each
//! failure is one line on stderr. And the operator's commands that must
//! fail rather than print an empty answer.

use std::fs;

use perch_tests::device::{Backend, Device};
use perch_tests::fleet::Fleet;
use perch_tests::Run;

fn expect(what: &str, r: &Run, code: i32, needle: &str) {
    assert_eq!(r.code, code, "{what}: exit {}, not {code}: {}{}", r.code, r.stdout, r.stderr);
    if code != 0 {
        assert_eq!(r.stderr.lines().count(), 1, "{what}: not one line: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{what}: no '{needle}' in: {}", r.stderr);
    }
}

#[test]
fn every_documented_exit_code_through_every_binary() {
    let d = Device::new(Backend::Dir);
    let s = &d.s;
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    let mut tampered = fs::read(d.path("v2.perch")).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    fs::write(d.path("tampered.perch"), &tampered).unwrap();
    s.fleet_creds("op");
    // Nothing listens there.
    let dead = format!("tls://127.0.0.1:{}", perch_tests::nats::free_port());
    let conn =
        |creds: &'static str| ["--url", &dead, "--creds", creds, "--ca", "org/tls/ca.pem"].map(String::from);
    let perch = |args: &[&str], extra: &[String]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(extra.iter().map(String::as_str));
        s.run("perch", &all)
    };

    // perch
    expect("perch --version", &s.run("perch", &["--version"]), 0, "");
    expect(
        "perch bundle verify",
        &s.run("perch", &["bundle", "verify", "--trust", "org/trust.doc", "v2.perch"]),
        0,
        "",
    );
    expect("perch: unreachable server", &perch(&["status"], &conn("op.creds")), 1, &dead);
    expect(
        "perch: no such bundle",
        &s.run("perch", &["bundle", "inspect", "nowhere.perch"]),
        2,
        "nowhere.perch",
    );
    expect("perch: missing --creds file", &perch(&["status"], &conn("nowhere.creds")), 2, "nowhere.creds");
    expect("perch: not a creds file", &perch(&["status"], &conn("org/tls/ca.pem")), 2, "ca.pem");
    expect("perch: bad flag", &s.run("perch", &["bundle", "inspect", "--frobnicate"]), 2, "--frobnicate");
    let r = s.run("perch", &["bundle", "verify", "--trust", "org/trust.doc", "tampered.perch"]);
    expect("perch: tampered bundle", &r, 3, "tampered.perch");

    // perch-bootstrap
    let r = s.run("perch-bootstrap", &["init", "--dir", "org2"]);
    expect("perch-bootstrap: missing flag", &r, 2, "--release-key");
    expect("perch-bootstrap --version", &s.run("perch-bootstrap", &["--version"]), 0, "");
    let r = s.run("perch-bootstrap", &["devices", "--dir", "org", "--url", &dead]);
    expect("perch-bootstrap: unreachable server", &r, 1, &dead);
    s.ok("perch", &["keygen", "--out", "k3"]);
    let r =
        s.run("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k3.pub", "--threshold", "1"]);
    expect("perch-bootstrap: org exists", &r, 2, "already holds an org");
    let token =
        s.ok("perch-bootstrap", &["token", "issue", "--dir", "org", "--url", &dead, "--group", "g"]).stdout;
    let mut forged = token.trim().to_string();
    let at = forged.len() / 2;
    let flipped = if &forged[at..at + 1] == "A" { "B" } else { "A" };
    forged.replace_range(at..at + 1, flipped);
    let r = s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", &forged]);
    expect("perch-bootstrap: forged token", &r, 3, "token");

    // perch-agent
    expect("perch-agent --version", &d.agent(&["--version"]), 0, "");
    expect("perch-agent: nothing on trial", &d.agent(&["commit"]), 1, "nothing");
    expect("perch-agent: no such bundle", &d.agent(&["install", "nowhere.perch"]), 2, "nowhere.perch");
    expect("perch-agent: unknown command", &d.agent(&["instal", "v2.perch"]), 2, "install");
    let r = s.run("perch-agent", &["--config", "nowhere.toml", "--state-dir", "state", "status"]);
    expect("perch-agent: missing config", &r, 2, "nowhere.toml");
    expect("perch-agent: tampered bundle", &d.agent(&["install", "tampered.perch"]), 3, "tampered.perch");
    expect("perch-agent install", &d.agent(&["install", "v2.perch"]), 0, "");
}

/// Wrong credentials, an unknown device: an error, never an empty fleet.
#[test]
fn the_operator_gets_an_error_not_an_empty_answer() {
    let f = Fleet::start(1);
    let s = &f.s;
    s.fleet_creds("reader");
    let args =
        ["nats", "creds", "--dir", "org", "--account", "provisioning", "--name", "p", "--out", "prov.creds"];
    s.ok("perch-bootstrap", &args);
    let as_ = |creds: &str, command: &[&str]| {
        let mut all = command.to_vec();
        all.extend(["--url", &f.url, "--creds", creds, "--ca", "org/tls/ca.pem"]);
        s.run("perch", &all)
    };
    for command in [&["status"][..], &["status", "--json"], &["desired", "list"], &["deploy", "list"]] {
        let r = as_("prov.creds", command);
        assert_eq!(r.code, 1, "{command:?} with another account's creds: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.is_empty(), "{command:?}: {}", r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
    let r = as_("reader.creds", &["status", "--device", "ghost"]);
    expect("status --device ghost", &r, 2, "no device 'ghost'");
    let (bundle, _, _) = f.bundle("os", 2, 4096, 1);
    f.publish(&bundle);
    let r = as_("reader.creds", &["desired", "set", "--device", "ghost", "--bundle", &bundle]);
    expect("desired set --device ghost", &r, 2, "no device 'ghost'");
    let r = as_("reader.creds", &["desired", "list", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("ghost"), "{}", r.stdout);
    // The whole fleet, with nothing enrolled yet, is empty and fine.
    expect("status", &as_("reader.creds", &["status"]), 0, "");
    // PERCH_LOG turns on the log, on stderr; without it stderr is quiet.
    let mut c = std::process::Command::new(perch_tests::bin("perch"));
    c.args(["status", "--url", &f.url, "--creds", "reader.creds", "--ca", "org/tls/ca.pem"]);
    let r: Run = c.current_dir(s.dir.path()).env("PERCH_LOG", "debug").output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("DEBUG"), "PERCH_LOG=debug logged nothing: {}", r.stderr);
    assert!(as_("reader.creds", &["status"]).stderr.is_empty());
}

/// `perch bundle inspect F | head -1`: output to a pipe that closed ends
/// the command quietly (SIGPIPE, as any Unix tool), never a panic.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let d = Device::new(Backend::Dir);
    d.archive_bundle("v2.perch", 2, &[("app", "two\n")]);
    let runs: [(&str, Vec<&str>); 3] = [
        ("perch", vec!["bundle", "inspect", "v2.perch"]),
        ("perch-bootstrap", vec!["trust", "show", "org/trust.doc"]),
        ("perch-agent", vec!["check", "--trust", "org/trust.doc", "v2.perch"]),
    ];
    for (bin, args) in runs {
        // The reader is gone before the command starts, so its first write
        // meets a closed pipe. (Dropped after the spawn, a busy machine
        // let a fast command write and end first.)
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let child = Command::new(perch_tests::bin(bin))
            .args(&args)
            .current_dir(d.s.dir.path())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{bin} {args:?}: {stderr}");
        assert_eq!(out.status.signal(), Some(13), "{bin} {args:?}: {:?}", out.status);
    }
}
