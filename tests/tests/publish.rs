//! `perch publish`: a verified bundle into PERCH_CHUNKS, idempotently.

use perch_protocol::subjects;
use perch_tests::fleet::Fleet;

#[test]
fn publish_uploads_a_verified_bundle_once() {
    let f = Fleet::start(1);
    let s = &f.s;
    let payload = s.write_payload("img", 2 << 20, 7);
    s.ok(
        "perch",
        &[
            "bundle",
            "build",
            "--name",
            "os",
            "--counter",
            "1",
            "--kind",
            "image",
            "--input",
            "img",
            "--out",
            "b.perch",
            "--chunk-size",
            "262144",
        ],
    );
    s.ok("perch", &["bundle", "sign", "--key", "k1.key", "b.perch"]);
    s.fleet_creds("release");
    let publish = |file: &str| {
        s.run(
            "perch",
            &[
                "publish",
                "--trust",
                "org/trust.doc",
                "--url",
                &f.url,
                "--creds",
                "release.creds",
                "--ca",
                "org/tls/ca.pem",
                file,
            ],
        )
    };
    // A damaged bundle is refused before anything is sent.
    let mut bad = std::fs::read(s.path("b.perch")).unwrap();
    let n = bad.len();
    bad[n - 100] ^= 1;
    std::fs::write(s.path("bad.perch"), bad).unwrap();
    let r = publish("bad.perch");
    assert_eq!(r.code, 3, "{}", r.stderr);

    let r = publish("b.perch");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("published b.perch (8 chunks"), "{}", r.stdout);
    let again = publish("b.perch");
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stdout.contains("already published"), "{}", again.stdout);

    // What a device fetches is exactly the bundle: its head, and each chunk.
    let inspect = s.ok("perch", &["bundle", "inspect", "--json", "b.perch"]);
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let digest_hex = v["digest"].as_str().unwrap().to_string();
    let mut digest = [0u8; 32];
    for (i, b) in digest.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digest_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let reader = f.reports_reader();
    let file = std::fs::read(s.path("b.perch")).unwrap();
    let head = reader.last_by_subject(subjects::CHUNKS_STREAM, &subjects::chunk(&digest, None)).unwrap();
    assert_eq!(&file[..head.len()], &head[..]);
    for i in [0u32, 3, 7] {
        let chunk =
            reader.last_by_subject(subjects::CHUNKS_STREAM, &subjects::chunk(&digest, Some(i))).unwrap();
        let at = (i as usize) << 18;
        assert_eq!(&chunk[..], &payload[at..at + (1 << 18)], "chunk {i}");
    }
}
