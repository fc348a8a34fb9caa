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

/// `perch context`: an operator saves the URL, credential and CA once and
/// selects them; the environment overrides the context, and a flag
/// overrides both. Nothing given is one line naming the three ways.
#[test]
fn a_context_or_the_environment_supplies_the_connection() {
    let f = Fleet::start(1);
    let s = &f.s;
    s.fleet_creds("reader");
    let cfg = s.path("cfg");
    let run = |args: &[&str], env: &[(&str, &str)]| -> perch_tests::Run {
        let mut c = std::process::Command::new(perch_tests::bin("perch"));
        c.args(args).current_dir(s.dir.path()).env("PERCH_CONFIG_DIR", &cfg);
        for var in ["PERCH_URL", "PERCH_CREDS", "PERCH_CA", "PERCH_CONTEXT"] {
            c.env_remove(var);
        }
        c.envs(env.iter().copied());
        let r: perch_tests::Run = c.output().expect("spawn").into();
        perch_tests::schema::check_cli_output("perch", args, &r.stdout);
        r
    };
    let r = run(&["status", "--json"], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--creds") && r.stderr.contains("PERCH_CREDS"), "{}", r.stderr);
    assert!(r.stderr.contains("perch context add"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    let add = ["context", "add", "lab", "--url", &f.url, "--creds", "reader.creds", "--ca", "org/tls/ca.pem"];
    let r = run(&[&add[..], &["--description", "the lab fleet", "--use"]].concat(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(&["status", "--json"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["devices"].is_array(), "{v}");
    let ls: serde_json::Value = serde_json::from_str(&run(&["context", "ls", "--json"], &[]).stdout).unwrap();
    assert_eq!(ls["contexts"][0]["name"], "lab", "{ls}");
    assert_eq!(ls["contexts"][0]["selected"], true, "{ls}");
    assert!(ls["contexts"][0]["creds"].as_str().unwrap().starts_with('/'), "saved absolute: {ls}");

    // The environment beats the context; a flag beats the environment.
    let r = run(&["status", "--json"], &[("PERCH_CREDS", "nowhere.creds")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("nowhere.creds"), "{}", r.stderr);
    let r = run(&["status", "--json", "--creds", "reader.creds"], &[("PERCH_CREDS", "nowhere.creds")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(&["context", "show", "--json"], &[("PERCH_CA", "org/tls/ca.pem")]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["creds_from"].as_str(), v["ca_from"].as_str()),
        (Some("context 'lab'"), Some("environment (PERCH_CA)"))
    );

    // A context that does not exist, named by PERCH_CONTEXT or --context.
    for (args, env) in
        [(&["status"][..], &[("PERCH_CONTEXT", "prod")][..]), (&["status", "--context", "prod"], &[])]
    {
        let r = run(args, env);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("no context 'prod'"), "{}", r.stderr);
    }
    // Removing the selected context unselects it.
    assert_eq!(run(&["context", "rm", "lab"], &[]).code, 0);
    assert_eq!(run(&["status"], &[]).code, 2);
    assert_eq!(run(&["context", "use", "lab"], &[]).code, 2);
}
