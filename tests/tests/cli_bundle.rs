//! The CLI contract for keys, orgs and bundles, run against the real binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use perch_tests::Scratch;

fn signed_bundle(s: &Scratch, len: usize, chunk: u32) {
    s.write_payload("img", len, 1);
    s.ok(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "5",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
            "--chunk-size",
            &chunk.to_string(),
            "--target",
            "aarch64-drone",
        ],
    );
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "b.perch"]);
    s.ok("perch", &["bundle", "sign", "--key", "k2.key", "b.perch"]);
}

fn verify(s: &Scratch, file: &str) -> perch_tests::Run {
    s.run("perch", &["bundle", "verify", "--trust", "org/trust.doc", file])
}

#[test]
fn every_binary_answers_help_and_version() {
    let s = Scratch::new();
    for b in ["perch", "perch-agent", "perch-bootstrap"] {
        let v = s.ok(b, &["--version"]);
        assert!(v.stdout.starts_with(&format!("{b} ")), "{}", v.stdout);
        assert!(s.ok(b, &["--help"]).stdout.contains("Usage"));
        assert_eq!(s.run(b, &["--no-such-flag"]).code, 2);
    }
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let s = Scratch::new();
    s.ok("perch", &["keygen", "--out", "rel"]);
    let mode = fs::metadata(s.path("rel.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(fs::read_to_string(s.path("rel.pub")).unwrap().starts_with("perch-ed25519-public "));
    let before = fs::read(s.path("rel.key")).unwrap();
    let again = s.run("perch", &["keygen", "--out", "rel"]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert_eq!(fs::read(s.path("rel.key")).unwrap(), before);
    s.ok("perch", &["keygen", "--out", "keys/ci/release"]);
    assert!(s.path("keys/ci/release.pub").is_file());
}

#[test]
fn init_writes_the_org_and_refuses_to_overwrite_it() {
    let s = Scratch::new();
    s.org(3, 2);
    let mode = fs::metadata(s.path("org/root.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(s.path("org/root.pub").is_file());
    let doc = fs::read(s.path("org/trust.doc")).unwrap();
    let again =
        s.run("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("refusing to overwrite"));
    assert_eq!(fs::read(s.path("org/trust.doc")).unwrap(), doc);
    let show = s.ok("perch-bootstrap", &["trust", "show", "--json", "org/trust.doc"]);
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["threshold"], 2);
    assert_eq!(v["release_keys"].as_array().unwrap().len(), 3);
}

#[test]
fn a_refused_init_creates_no_directory_or_file() {
    let s = Scratch::new();
    s.ok("perch", &["keygen", "--out", "k1"]);
    let init = |dir: &str, extra: &[&str]| {
        let mut args = vec!["init", "--dir", dir, "--release-key", "k1.pub"];
        args.extend_from_slice(extra);
        s.run("perch-bootstrap", &args)
    };
    // A threshold above the number of keys, or a TLS name no certificate can
    // carry: a usage error in one line, and no directory at all.
    for (dir, extra) in
        [("org2", &["--threshold", "2"][..]), ("org3", &["--threshold", "1", "--tls-name", "nö.example"])]
    {
        let bad = init(dir, extra);
        assert_eq!(bad.code, 2, "{dir}: {}", bad.stderr);
        assert_eq!(bad.stderr.lines().count(), 1, "{dir}: {}", bad.stderr);
        assert!(!s.path(dir).exists(), "a refused init left {dir}/ behind");
    }
    // Into an existing empty directory: still empty afterwards.
    fs::create_dir(s.path("empty")).unwrap();
    assert_eq!(init("empty", &["--threshold", "0"]).code, 2);
    assert_eq!(fs::read_dir(s.path("empty")).unwrap().count(), 0);
}

#[test]
fn build_sign_verify_with_threshold() {
    let s = Scratch::new();
    s.org(3, 2);
    s.write_payload("img", 300_000, 3);
    s.ok(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
        ],
    );
    let unsigned = verify(&s, "b.perch");
    assert_eq!(unsigned.code, 3);
    assert_eq!(unsigned.stderr.lines().count(), 1, "{}", unsigned.stderr);
    assert!(unsigned.stderr.contains("threshold not met: 0 valid signature(s), 2 required"));
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "b.perch"]);
    let signed_once = fs::read(s.path("b.perch")).unwrap();
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "b.perch"]);
    assert_eq!(
        fs::read(s.path("b.perch")).unwrap(),
        signed_once,
        "second signature by one key changed the file"
    );
    assert_eq!(verify(&s, "b.perch").code, 3);
    s.ok("perch", &["bundle", "sign", "--key", "k3.key", "b.perch"]);
    let ok = s.ok("perch", &["bundle", "verify", "--trust", "org/trust.doc", "--json", "b.perch"]);
    let v: serde_json::Value = serde_json::from_str(&ok.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["signers"].as_array().unwrap().len(), 2);
    assert_eq!(v["chunk_count"], 2);
    let insp = s.ok("perch", &["bundle", "inspect", "--json", "b.perch"]);
    let v: serde_json::Value = serde_json::from_str(&insp.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["payload_len"], 300_000);
    assert_eq!(v["chunk_size"], 262_144);
    assert_eq!(v["kind"], "image");
}

#[test]
fn a_key_outside_the_trust_document_is_refused() {
    let s = Scratch::new();
    s.org(2, 1);
    s.ok("perch", &["keygen", "--out", "stranger"]);
    s.write_payload("img", 5000, 1);
    s.ok(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
        ],
    );
    s.ok("perch", &["bundle", "sign", "--key", "stranger.key", "b.perch"]);
    let r = verify(&s, "b.perch");
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("unknown key"), "{}", r.stderr);
}

/// The promise: any single flipped byte, anywhere, exits 3 with one line.
#[test]
fn every_flipped_byte_and_truncation_exits_3() {
    let s = Scratch::new();
    s.org(2, 2);
    signed_bundle(&s, 9000, 2048);
    let good = fs::read(s.path("b.perch")).unwrap();
    assert_eq!(verify(&s, "b.perch").code, 0);
    let payload_start = good.len() - 9000;
    // Every byte of header, manifest and signatures; every 97th of the payload.
    let positions = (0..payload_start).chain((payload_start..good.len()).step_by(97)).chain([good.len() - 1]);
    for i in positions {
        let mut bad = good.clone();
        bad[i] ^= 0x20;
        fs::write(s.path("bad.perch"), &bad).unwrap();
        let r = verify(&s, "bad.perch");
        assert_eq!(r.code, 3, "flip at {i} exited {}: {}", r.code, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "flip at {i}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"));
    }
    for n in (0..good.len()).step_by(41) {
        fs::write(s.path("cut.perch"), &good[..n]).unwrap();
        let r = verify(&s, "cut.perch");
        assert_eq!(r.code, 3, "truncation at {n} exited {}: {}", r.code, r.stderr);
    }
}

#[test]
fn failures_name_what_failed() {
    let s = Scratch::new();
    s.org(2, 2);
    signed_bundle(&s, 10 * 1024, 2048);
    let good = fs::read(s.path("b.perch")).unwrap();
    let payload_start = good.len() - 10 * 1024;
    let mut bad = good.clone();
    bad[payload_start + 3 * 2048 + 5] ^= 1;
    fs::write(s.path("bad.perch"), &bad).unwrap();
    assert!(verify(&s, "bad.perch").stderr.contains("chunk 3 of 5: sha256 mismatch"));
    // A future format, and format 1 (signatures after the manifest), which
    // no shipped agent reads.
    for version in [4u8, 1] {
        let mut other = good.clone();
        other[8] = version;
        fs::write(s.path("other.perch"), &other).unwrap();
        let r = verify(&s, "other.perch");
        assert_eq!(r.code, 3);
        let want = format!("unsupported bundle format version {version} (this build reads 2 and 3)");
        assert!(r.stderr.contains(&want), "{}", r.stderr);
    }
    fs::write(s.path("junk.perch"), b"hello, this is not a bundle at all").unwrap();
    let r = verify(&s, "junk.perch");
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("bad magic"), "{}", r.stderr);
    let r = s.run("perch", &["bundle", "inspect", "junk.perch"]);
    assert_eq!(r.code, 3);
}

#[test]
fn a_damaged_bundle_is_never_signed() {
    let s = Scratch::new();
    s.org(2, 2);
    signed_bundle(&s, 5000, 1024);
    let mut bad = fs::read(s.path("b.perch")).unwrap();
    let n = bad.len();
    bad[n - 10] ^= 1;
    fs::write(s.path("b.perch"), &bad).unwrap();
    s.ok("perch", &["keygen", "--out", "k9"]);
    let r = s.run("perch", &["bundle", "sign", "--key", "k9.key", "b.perch"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(fs::read(s.path("b.perch")).unwrap(), bad, "file changed");
}

#[test]
fn usage_errors_exit_2() {
    let s = Scratch::new();
    s.org(1, 1);
    s.write_payload("img", 100, 1);
    let build = |extra: &[&str]| {
        let mut a = vec![
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
        ];
        a.extend_from_slice(extra);
        s.run("perch", &a)
    };
    assert_eq!(build(&["--chunk-size", "10"]).code, 2);
    assert_eq!(build(&["--target", "bad target"]).code, 2);
    assert_eq!(
        s.run(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "a.b",
                "--counter",
                "1",
                "--kind",
                "image",
                "--input",
                "img",
                "--out",
                "x"
            ]
        )
        .code,
        2
    );
    assert_eq!(
        s.run(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "a",
                "--counter",
                "1",
                "--kind",
                "image",
                "--input",
                "missing",
                "--out",
                "x"
            ]
        )
        .code,
        2
    );
    assert_eq!(s.run("perch", &["bundle", "verify", "--trust", "org/trust.doc", "missing.perch"]).code, 2);
    assert_eq!(s.run("perch", &["bundle", "verify", "--trust", "nope.doc", "img"]).code, 2);
    fs::set_permissions(s.path("k1.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let r = s.run("perch", &["bundle", "sign", "--key", "k1.key", "img"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
}

#[test]
fn archive_bundles_are_deterministic_and_unpack_to_the_tree() {
    let s = Scratch::new();
    s.org(1, 1);
    fs::create_dir_all(s.path("tree/etc")).unwrap();
    fs::write(s.path("tree/etc/app.conf"), "port=80\n").unwrap();
    fs::write(s.path("tree/run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(s.path("tree/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("run.sh", s.path("tree/start")).unwrap();
    fs::create_dir_all(s.path("tree/private")).unwrap();
    fs::write(s.path("tree/private/key"), "secret\n").unwrap();
    fs::set_permissions(s.path("tree/private/key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(s.path("tree/private"), fs::Permissions::from_mode(0o700)).unwrap();
    let build = |out: &str| {
        s.ok(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "app",
                "--counter",
                "1",
                "--kind",
                "archive",
                "--input",
                "tree",
                "--out",
                out,
            ],
        );
        // The payload as stored: the bytes after the head.
        let v: serde_json::Value =
            serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", out]).stdout).unwrap();
        let stored = v["stored_len"].as_u64().unwrap() as usize;
        let bytes = fs::read(s.path(out)).unwrap();
        bytes[bytes.len() - stored..].to_vec()
    };
    let first = build("a.perch");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(s.path("tree/etc/app.conf"), "port=80\n").unwrap(); // same content, new mtime
    assert_eq!(build("b.perch"), first);
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "a.perch"]);
    s.ok("perch", &["bundle", "verify", "--trust", "org/trust.doc", "a.perch"]);
    s.ok("perch-agent", &["check", "--trust", "org/trust.doc", "a.perch"]);
    // The payload is a tar of the tree.
    let bytes = fs::read(s.path("a.perch")).unwrap();
    let reader = perch_protocol::bundle::BundleReader::open(&bytes[..]).unwrap();
    let len = reader.head().unverified_manifest().stored_len() as usize;
    fs::write(s.path("p.tar"), &bytes[bytes.len() - len..]).unwrap();
    let out =
        std::process::Command::new("tar").args(["-tvf", "p.tar"]).current_dir(s.dir.path()).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("etc/app.conf"), "{listing}");
    assert!(listing.contains("-rwxr-xr-x"), "{listing}");
    assert!(listing.contains("start -> run.sh"), "{listing}");
    // Permission bits as they were, owner root.
    assert!(listing.contains("-rw------- 0/0") && listing.contains("private/key"), "{listing}");
    assert!(listing.contains("drwx------ 0/0"), "{listing}");
}

#[test]
fn archive_build_refuses_setid_and_world_writable_unless_signed_so() {
    let s = Scratch::new();
    s.org(1, 1);
    fs::create_dir_all(s.path("tree")).unwrap();
    fs::write(s.path("tree/su"), "x").unwrap();
    fs::set_permissions(s.path("tree/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    let build = |extra: &[&str]| {
        let mut a = vec![
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "1",
            "--kind",
            "archive",
            "--input",
            "tree",
        ];
        a.extend_from_slice(&["--out", "a.perch"]);
        a.extend_from_slice(extra);
        s.run("perch", &a)
    };
    let r = build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("su: mode 4755 is setuid/setgid"), "{}", r.stderr);
    assert!(!s.path("a.perch").exists());
    let r = build(&["--allow-setid"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", "a.perch"]).stdout).unwrap();
    assert_eq!(v["allow_setid"], true);
    fs::remove_file(s.path("a.perch")).unwrap();
    fs::create_dir(s.path("tree/drop")).unwrap();
    fs::set_permissions(s.path("tree/drop"), fs::Permissions::from_mode(0o777)).unwrap();
    let r = build(&["--allow-setid"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("drop: mode 777 is world-writable"), "{}", r.stderr);
}

#[test]
fn the_agent_refuses_a_bundle_for_another_target() {
    let s = Scratch::new();
    s.org(2, 2);
    signed_bundle(&s, 5000, 1024);
    s.ok("perch-agent", &["check", "--trust", "org/trust.doc", "--target", "aarch64-drone", "b.perch"]);
    let r =
        s.run("perch-agent", &["check", "--trust", "org/trust.doc", "--target", "x86_64-desktop", "b.perch"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("not 'x86_64-desktop'"));
}

#[test]
fn trust_rotation_needs_a_threshold_of_the_current_keys() {
    let s = Scratch::new();
    s.org(3, 2);
    s.ok("perch", &["keygen", "--out", "k4"]);
    s.ok(
        "perch-bootstrap",
        &[
            "trust",
            "rotate",
            "--dir",
            "org",
            "--release-key",
            "k2.pub",
            "--release-key",
            "k3.pub",
            "--release-key",
            "k4.pub",
            "--threshold",
            "2",
            "--out",
            "next.doc",
        ],
    );
    let check = || s.run("perch-bootstrap", &["trust", "verify", "--current", "org/trust.doc", "next.doc"]);
    let r = check();
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("threshold not met"), "{}", r.stderr);
    s.ok("perch-bootstrap", &["trust", "sign", "--key", "k1.key", "next.doc"]);
    assert_eq!(check().code, 3);
    s.ok("perch-bootstrap", &["trust", "sign", "--key", "k4.key", "next.doc"]);
    let r = check();
    assert_eq!(r.code, 3, "a key that is not in the current version must not count");
    assert!(r.stderr.contains("unknown key"), "{}", r.stderr);
}

#[test]
fn trust_rotation_accepted_with_threshold() {
    let s = Scratch::new();
    s.org(3, 2);
    s.ok(
        "perch-bootstrap",
        &[
            "trust",
            "rotate",
            "--dir",
            "org",
            "--release-key",
            "k2.pub",
            "--release-key",
            "k3.pub",
            "--threshold",
            "1",
            "--out",
            "next.doc",
        ],
    );
    s.ok("perch-bootstrap", &["trust", "sign", "--key", "k1.key", "next.doc"]);
    s.ok("perch-bootstrap", &["trust", "sign", "--key", "k2.key", "next.doc"]);
    let r = s.ok("perch-bootstrap", &["trust", "verify", "--current", "org/trust.doc", "next.doc"]);
    assert!(r.stdout.contains("version 1 with version 2"), "{}", r.stdout);
    // And a corrupted trust document is refused everywhere it is used.
    let mut doc = fs::read(s.path("org/trust.doc")).unwrap();
    doc[30] ^= 1;
    fs::write(s.path("org/trust.doc"), &doc).unwrap();
    s.write_payload("img", 100, 1);
    s.ok(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "a",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
        ],
    );
    let r = verify(&s, "b.perch");
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("trust.doc"), "{}", r.stderr);
}

#[test]
fn verify_and_check_refuse_a_signed_archive_a_device_would_refuse() {
    use perch_tests::device::{raw_tar_entry, Backend, Device};
    let d = Device::new(Backend::Dir);
    let mut tar = Vec::new();
    raw_tar_entry(&mut tar, b"app", b'0', 0o755, b"", b"app\n");
    raw_tar_entry(&mut tar, b"fifo", b'6', 0o600, b"", b"");
    tar.extend_from_slice(&[0; 1024]);
    d.signed_tar_bundle("fifo.perch", 2, &tar, false);
    let trust = d.path("org/trust.doc");
    let trust = trust.to_str().unwrap();
    let refused = |bin: &str, args: &[&str]| {
        let r = d.s.run(bin, args);
        assert_eq!(r.code, 3, "{bin}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("archive entry `fifo`: FIFO entries are not allowed"), "{}", r.stderr);
    };
    refused("perch", &["bundle", "verify", "--trust", trust, "fifo.perch"]);
    refused("perch-agent", &["check", "--trust", trust, "fifo.perch"]);
    // The same archive without the FIFO passes both.
    let mut tar = Vec::new();
    raw_tar_entry(&mut tar, b"app", b'0', 0o755, b"", b"app\n");
    tar.extend_from_slice(&[0; 1024]);
    d.signed_tar_bundle("ok.perch", 3, &tar, false);
    d.s.ok("perch", &["bundle", "verify", "--trust", trust, "ok.perch"]);
    d.s.ok("perch-agent", &["check", "--trust", trust, "ok.perch"]);
}

/// A file inserted in the middle of an archive's tree: with content-defined
/// chunks (the default for archives) a device downloads little more than
/// the new file; with fixed chunks every chunk after it shifts.
#[test]
fn content_defined_chunks_keep_an_insertion_delta_small() {
    use perch_tests::device::new_image;
    let s = Scratch::new();
    for (dir, extra) in [("v1", false), ("v2", true)] {
        std::fs::create_dir_all(s.path(dir)).unwrap();
        for i in 0..40u8 {
            std::fs::write(s.path(&format!("{dir}/f{i:02}")), new_image(i, 64 * 1024)).unwrap();
        }
        if extra {
            std::fs::write(s.path(&format!("{dir}/f20a")), new_image(99, 20_000)).unwrap();
        }
    }
    let diff = |chunking: &str| -> serde_json::Value {
        for v in ["v1", "v2"] {
            let out = format!("{v}-{chunking}.perch");
            let input = s.path(v);
            s.ok(
                "perch",
                &["bundle", "build", "--name", "app", "--counter", "1", "--kind", "archive"]
                    .into_iter()
                    .chain(["--input", input.to_str().unwrap(), "--out", &out, "--chunking", chunking])
                    .chain(["--chunk-size", "32768"])
                    .collect::<Vec<_>>(),
            );
        }
        let r = s.ok(
            "perch",
            &["bundle", "diff", &format!("v1-{chunking}.perch"), &format!("v2-{chunking}.perch"), "--json"],
        );
        serde_json::from_str(&r.stdout).unwrap()
    };
    let cdc = diff("cdc");
    let fixed = diff("fixed");
    let share =
        |d: &serde_json::Value| d["fetched_bytes"].as_f64().unwrap() / d["full_bytes"].as_f64().unwrap();
    eprintln!("fetched share: cdc {:.3}, fixed {:.3}", share(&cdc), share(&fixed));
    assert!(share(&cdc) <= 0.10, "content-defined: {cdc}");
    assert!(share(&fixed) >= 0.4, "fixed chunks should shift after the insertion: {fixed}");
    // The text form says the same.
    let r = s.ok("perch", &["bundle", "diff", "v1-cdc.perch", "v2-cdc.perch"]);
    assert!(r.stdout.contains(&format!("{} of {} chunks", cdc["fetched"], cdc["chunks"])), "{}", r.stdout);
}

/// A compressed bundle signed twice keeps its compressed payload: it
/// verifies, installs its bytes, and is the size `inspect` says.
#[test]
fn a_compressed_bundle_survives_signing_and_verifies() {
    let s = Scratch::new();
    s.org(2, 2);
    // Compressible, like a real image: runs of bytes.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i / 4000) as u8).collect();
    fs::write(s.path("img"), &payload).unwrap();
    s.ok(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "app",
            "--counter",
            "5",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "c.perch",
        ]
        .into_iter()
        .chain(["--compress", "zstd:19", "--chunk-size", "65536"])
        .collect::<Vec<_>>(),
    );
    let unsigned = fs::metadata(s.path("c.perch")).unwrap().len();
    for k in ["k1.key", "k2.key"] {
        s.ok("perch", &["bundle", "sign", "--key", k, "c.perch"]);
    }
    let v: serde_json::Value =
        serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", "c.perch"]).stdout).unwrap();
    let stored = v["stored_len"].as_u64().unwrap();
    assert!(stored < payload.len() as u64 / 20, "{v}");
    // Linked chunks (the default window): signing re-checked each one
    // against the chunks before it.
    assert_eq!(v["compress_window"], 4 << 20, "{v}");
    let signed = fs::metadata(s.path("c.perch")).unwrap().len();
    assert!(signed < unsigned + 1024, "signing grew the bundle from {unsigned} to {signed}");
    s.ok("perch", &["bundle", "verify", "--trust", "org/trust.doc", "c.perch"]);
    s.ok("perch-agent", &["check", "--trust", "org/trust.doc", "c.perch"]);
}

/// `--compress-window`: how far back a compressed chunk may refer. Linking
/// is what lets a chunk that repeats earlier bytes cost almost nothing; 0
/// gives independent frames; a window over 8 MiB or not a size is a usage
/// error.
#[test]
fn the_compress_window_links_chunks_to_the_bytes_before_them() {
    let s = Scratch::new();
    s.org(1, 1);
    let payload = perch_tests::device::repeating_image(3, 1 << 20, 64 * 1024);
    fs::write(s.path("img"), &payload).unwrap();
    let build = |out: &str, window: &str| {
        s.run(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "app",
                "--counter",
                "1",
                "--kind",
                "image",
                "--input",
                "img",
                "--out",
                out,
                "--compress",
                "zstd:3",
                "--compress-window",
                window,
            ],
        )
    };
    let inspect = |out: &str| -> serde_json::Value {
        serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", out]).stdout).unwrap()
    };
    for (out, window, bytes) in [("alone.perch", "0", 0), ("linked.perch", "256K", 256 * 1024)] {
        let r = build(out, window);
        assert_eq!(r.code, 0, "{}", r.stderr);
        s.ok("perch", &["bundle", "sign", "--key", "k1.key", out]);
        s.ok("perch", &["bundle", "verify", "--trust", "org/trust.doc", out]);
        assert_eq!(inspect(out)["compress_window"], bytes, "{out}");
    }
    let (alone, linked) =
        (inspect("alone.perch")["stored_len"].clone(), inspect("linked.perch")["stored_len"].clone());
    // Each independent 256 KiB chunk stores its own copy of the noise;
    // linked, only the first copy is stored.
    assert!(linked.as_u64().unwrap() * 3 < alone.as_u64().unwrap(), "linked {linked}, alone {alone}");
    let text = s.ok("perch", &["bundle", "inspect", "linked.perch"]).stdout;
    assert!(text.contains("decoded against up to 262144 bytes before it, in 1 chains"), "{text}");
    assert_eq!(inspect("linked.perch")["compress_chains"], 1);
    assert_eq!(inspect("alone.perch")["compress_chains"], 0);
    // Linking starts afresh every --compress-chain bytes (a device decodes
    // the chains side by side); each restart stores its first chunk whole.
    let chained = |out: &str, chain: &str| {
        let args =
            ["bundle", "build", "--name", "app", "--counter", "1", "--kind", "image", "--input", "img"];
        let more =
            ["--compress", "zstd:3", "--compress-window", "256K", "--compress-chain", chain, "--out", out];
        s.run("perch", &[&args[..], &more[..]].concat())
    };
    let r = chained("chains.perch", "512K");
    assert_eq!(r.code, 0, "{}", r.stderr);
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "chains.perch"]);
    s.ok("perch", &["bundle", "verify", "--trust", "org/trust.doc", "chains.perch"]);
    s.ok("perch-agent", &["check", "--trust", "org/trust.doc", "chains.perch"]);
    let v = inspect("chains.perch");
    assert_eq!(v["compress_chains"], 2, "{v}");
    assert!(v["stored_len"].as_u64() > linked.as_u64(), "{v}");
    for bad in ["32K", "1x"] {
        let r = chained("bad.perch", bad);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains(bad), "{bad}: {}", r.stderr);
    }
    for bad in ["9M", "12x", "-1"] {
        let r = build("bad.perch", bad);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains(bad), "{bad}: {}", r.stderr);
        assert!(!s.path("bad.perch").exists());
    }
}

/// A bundle may be signed to expire past what RFC 3339 can show (the year
/// 9999): inspecting it prints a bound, never a panic.
#[test]
fn an_expiry_past_the_year_9999_prints_as_a_bound() {
    let s = Scratch::new();
    s.org(1, 1);
    fs::write(s.path("img"), vec![7u8; 5000]).unwrap();
    let args = ["bundle", "build", "--name", "app", "--counter", "1", "--kind", "image", "--input", "img"];
    let r =
        s.run("perch", &[&args[..], &["--out", "far.perch", "--expires-in", "500000000000years"]].concat());
    assert_eq!(r.code, 0, "{}", r.stderr);
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "far.perch"]);
    let text = s.ok("perch", &["bundle", "inspect", "far.perch"]).stdout;
    assert!(text.contains("expires     after 9999-12-31T23:59:59Z"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&s.ok("perch", &["bundle", "inspect", "--json", "far.perch"]).stdout).unwrap();
    assert!(json["expires_at"].as_u64().unwrap() > 253_402_300_800, "{json}");
    s.ok("perch", &["bundle", "verify", "--trust", "org/trust.doc", "far.perch"]);
}
