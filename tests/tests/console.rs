//! `perch console` end to end: a real nats-server, provisioner and agents,
//! the console in its own process, and Debian's headless Chromium driving
//! it through chromedriver.
//!
//! - `the_console_refuses_...`: its security over plain HTTP (no browser):
//!   nothing without the login token, no change without the CSRF token or
//!   from another origin, a device's `<script>` shown as text.
//! - `an_operator_...`: in the browser: sees the fleet, starts a rollout
//!   and watches both devices commit live, approves a pending device,
//!   revokes one, issues a token as a QR code; screenshots of each page at
//!   1280 and 420 px wide go to `target/console-screenshots/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use perch_protocol::report::{Report, ReportKind};
use perch_tests::browser::Browser;
use perch_tests::fleet::{wait_for, Fleet};

/// A running `perch console`, killed when dropped.
struct Console {
    child: Child,
    /// `http://127.0.0.1:PORT`
    base: String,
    token: String,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn console(f: &Fleet, extra: &[&str]) -> Console {
    f.s.fleet_creds("operator");
    let listen: &[&str] = if extra.contains(&"--listen") { &[] } else { &["--listen", "127.0.0.1:0"] };
    let mut child = Command::new(perch_tests::bin("perch"))
        .args(["console", "--url", &f.url, "--creds", "operator.creds", "--ca", "org/tls/ca.pem"])
        .args(listen)
        .args(extra)
        .current_dir(f.s.path(""))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn perch console");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("perch console: open ").unwrap_or_else(|| panic!("printed: {line:?}"));
    let (base, token) = url.split_once("/login?token=").unwrap();
    Console { child, base: base.to_string(), token: token.to_string() }
}

/// An HTTP/1.1 answer.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// One request on its own connection, `headers` as given.
fn http(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // A TLS port may answer with an alert and a reset: what was read is the answer.
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer { status, head: head.to_string(), body: body.to_string() }
}

/// Logs in with the printed token; the session cookie (`name=value`).
fn login(c: &Console) -> String {
    let a = http(&c.base, "GET", &format!("/login?token={}", c.token), &[], "");
    assert_eq!(a.status, 303, "{}", a.head);
    let cookie = a.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    cookie.split(';').next().unwrap().to_string()
}

/// The CSRF token of the page `path`, from its `<meta name="csrf">`.
fn csrf(c: &Console, cookie: &str) -> String {
    let a = http(&c.base, "GET", "/", &[("Cookie", cookie)], "");
    let at = a.body.find("name=\"csrf\" content=\"").unwrap() + "name=\"csrf\" content=\"".len();
    a.body[at..at + 64].to_string()
}

/// A report as a device would send it, with a failure reason of our choosing.
fn failed_report(device: &str, reason: &str) -> Vec<u8> {
    deploy_report(device, "failed", Some(reason))
}

fn deploy_report(device: &str, state: &str, reason: Option<&str>) -> Vec<u8> {
    Report {
        device: device.into(),
        epoch: 7,
        seq: 1,
        boot_id: "b".into(),
        agent_version: "0.1.0".into(),
        at: 0,
        running_slot: Some("a".into()),
        running_bundle: None,
        journal_state: "idle".into(),
        kind: ReportKind::Deploy { state: state.into(), reason: reason.map(String::from), bundle: None },
    }
    .to_bytes()
}

#[test]
fn the_console_refuses_anonymous_and_cross_site_requests_and_escapes_what_devices_say() {
    let f = Fleet::start(1);
    let evil = "<script>document.title='owned'</script><img src=x onerror=alert(1)>";
    f.reports_reader().js_publish("perch.report.evil-1.events", failed_report("evil-1", evil));
    let mut c = console(&f, &["--org", "org"]);

    // Nothing is served without a session: not a page, not the events, not the script.
    for path in ["/", "/events", "/static/console.js", "/device/evil-1", "/bundles", "/fleet/rows?id=evil-1"]
    {
        let a = http(&c.base, "GET", path, &[], "");
        assert_eq!(a.status, 401, "{path}: {}", a.head);
        assert!(!a.body.contains("evil-1"), "{path}: {}", a.body);
    }
    let a = http(&c.base, "GET", "/", &[("Cookie", "perch_console=0123")], "");
    assert_eq!(a.status, 401);
    assert_eq!(http(&c.base, "GET", "/login?token=00", &[], "").status, 401);
    // A wrong token by form, too.
    assert_eq!(http(&c.base, "POST", "/login", &[], "token=00").status, 401);

    let cookie = login(&c);
    let ok = wait_for(Duration::from_secs(10), || {
        http(&c.base, "GET", "/", &[("Cookie", &cookie)], "").body.contains("evil-1")
    });
    assert!(ok, "the fleet page lists the device");
    let page = http(&c.base, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    // The reason is text: escaped in the fleet page, the device page and a row.
    for path in ["/", "/device/evil-1", "/fleet/rows?id=evil-1"] {
        let a = http(&c.base, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(a.status, 200, "{path}");
        assert!(
            a.body.contains("&lt;script&gt;document.title='owned'&lt;/script&gt;&lt;img"),
            "{path}: {}",
            a.body
        );
        assert!(!a.body.contains("<script>document") && !a.body.contains("<img src=x"), "{path}: {}", a.body);
    }

    // A change needs the session's CSRF token, and the console's own origin.
    let f2 = f.device("drone-9");
    let token = f.token_file("manual", &["--group", "g", "--approval", "manual"]);
    let r = f2.agent(&["enroll", "--device-id", "drone-9", "--token-file", token.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let token = csrf(&c, &cookie);
    let approve = "/enrollment/drone-9/approve";
    let no_csrf = http(&c.base, "POST", approve, &[("Cookie", &cookie)], "");
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    let wrong = http(&c.base, "POST", approve, &[("Cookie", &cookie)], &format!("csrf={}", "0".repeat(64)));
    assert_eq!(wrong.status, 403);
    let other_origin = http(
        &c.base,
        "POST",
        approve,
        &[("Cookie", &cookie), ("Origin", "http://evil.example")],
        &format!("csrf={token}"),
    );
    assert_eq!(other_origin.status, 403);
    let cross = http(
        &c.base,
        "POST",
        approve,
        &[("Cookie", &cookie), ("Sec-Fetch-Site", "cross-site")],
        &format!("csrf={token}"),
    );
    assert_eq!(cross.status, 403);
    let anonymous = http(&c.base, "POST", approve, &[], &format!("csrf={token}"));
    assert_eq!(anonymous.status, 401);
    assert_eq!(f.device_status("drone-9").as_deref(), Some("pending"), "none of those changed anything");
    let origin = c.base.clone();
    let done =
        http(&c.base, "POST", approve, &[("Cookie", &cookie), ("Origin", &origin)], &format!("csrf={token}"));
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(f.device_status("drone-9").as_deref(), Some("approved"));

    // SIGTERM with a browser listening for events: the stream ends and
    // the console exits 0 at once (an open stream would hold it forever).
    let host = c.base.trim_start_matches("http://").to_string();
    let mut events = TcpStream::connect(&host).unwrap();
    write!(events, "GET /events HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n").unwrap();
    let mut head = [0u8; 64];
    let n = events.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"), "{:?}", &head[..n]);
    let stopped = Command::new("kill").args(["-TERM", &c.child.id().to_string()]).status().unwrap();
    assert!(stopped.success());
    let exited = wait_for(Duration::from_secs(10), || c.child.try_wait().unwrap().is_some());
    assert!(exited, "the console still runs 10 s after SIGTERM");
    assert_eq!(c.child.wait().unwrap().code(), Some(0));
    drop(events);
}

#[test]
fn the_console_logs_out() {
    let f = Fleet::start(1);
    let c = console(&f, &[]);
    let cookie = login(&c);
    let token = csrf(&c, &cookie);
    // Logging out is a change like any other: not without the CSRF token.
    assert_eq!(http(&c.base, "POST", "/logout", &[("Cookie", &cookie)], "").status, 403);
    assert_eq!(http(&c.base, "GET", "/", &[("Cookie", &cookie)], "").status, 200);
    // Logged out, the cookie is worth nothing.
    assert_eq!(
        http(&c.base, "POST", "/logout", &[("Cookie", &cookie)], &format!("csrf={token}")).status,
        200
    );
    assert_eq!(http(&c.base, "GET", "/", &[("Cookie", &cookie)], "").status, 401);
}

#[test]
fn the_console_will_not_listen_beyond_loopback_without_tls() {
    let f = Fleet::start(1);
    f.s.fleet_creds("operator");
    let r = f.s.run(
        "perch",
        &[
            "console",
            "--listen",
            "0.0.0.0:0",
            "--url",
            &f.url,
            "--creds",
            "operator.creds",
            "--ca",
            "org/tls/ca.pem",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("needs TLS"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn beyond_loopback_the_console_serves_https_only_with_a_secure_cookie() {
    let f = Fleet::start(1);
    let key = f.s.path("console-key.pem");
    let cert = f.s.path("console.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let c =
        console(&f, &["--listen", "0.0.0.0:0", "--tls-cert", "console.pem", "--tls-key", "console-key.pem"]);
    let port = c.base.rsplit(':').next().unwrap().to_string();
    assert!(c.base.starts_with("https://"), "{}", c.base);
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10", "--cacert"])
            .arg(&cert)
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = curl("/");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    let (_, out) = curl(&format!("/login?token={}", c.token));
    assert!(out.starts_with("HTTP/1.1 303"), "{out}");
    let cookie = out.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap();
    assert!(cookie.contains("; Secure") && cookie.contains("HttpOnly"), "{cookie}");
    // Plain HTTP on the same port gets no page.
    let plain = http(&format!("http://127.0.0.1:{port}"), "GET", "/", &[], "");
    assert_eq!(plain.status, 0, "{}", plain.head);
}

/// Where the screenshots go: `target/console-screenshots/`.
fn shots() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Unwraps a browser step; on failure, the page as the browser has it.
macro_rules! ok {
    ($b:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                let page = $b.source().await.unwrap_or_default();
                let from = page.len().saturating_sub(4000);
                panic!("{e}\nthe page (its last 4000 bytes):\n{}", page.get(from..).unwrap_or(&page))
            }
        }
    };
}

const LIVE: Duration = Duration::from_secs(60);

#[test]
fn an_operator_sees_the_fleet_rolls_out_approves_and_revokes_in_a_real_browser() {
    assert!(Browser::available(), "chromium and chromedriver are missing: run `cargo xtask setup`");
    let f = Fleet::start(1);
    let devices = [f.checked_device("g-a", "g"), f.checked_device("g-b", "g")];
    let _agents: Vec<_> = devices.iter().map(|d| d.spawn_run()).collect();
    let (file, _, _) = {
        std::fs::create_dir_all(f.s.path("app-2/bin")).unwrap();
        std::fs::write(f.s.path("app-2/bin/check"), "exit 0\n").unwrap();
        f.bundle_of_dir("app", 2, "app-2")
    };
    f.publish(&file);
    let c = console(&f, &["--org", "org"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut b = Browser::start(1280, 900).await.unwrap();
        b.goto(&format!("{}/login?token={}", c.base, c.token)).await.unwrap();

        // The fleet: both devices, online, as they report.
        ok!(b, b.wait_text("#fleet", "g-b", LIVE).await);
        ok!(b, b.wait_text("#live", "live", LIVE).await);
        let who = b.text("#who").await.unwrap();
        assert_eq!(who, "operator", "the page says whose credentials it acts with");

        // A rollout from the catalog, watched live: no reload.
        b.goto(&format!("{}/rollouts", c.base)).await.unwrap();
        ok!(b, b.wait_text("select[name=bundle]", "app@2", LIVE).await);
        b.execute("document.querySelector('select[name=group]').value = 'g';", vec![]).await.unwrap();
        ok!(b, b.click("form[action='/rollouts'] button[type=submit]").await);
        ok!(b, b.accept_confirm().await);
        ok!(b, b.wait_text(".note.ok", "Started rollout", LIVE).await);
        ok!(b, b.wait_text("section.rollout h2", "running", LIVE).await);
        // The page is not loaded again from here on: what changes is live.
        b.execute("window.perchMarker = 1;", vec![]).await.unwrap();
        ok!(b, b.wait_text("section.rollout td.committed", "2", LIVE).await);
        ok!(b, b.wait_text("section.rollout h2", "done", LIVE).await);
        let marker = b.execute("return window.perchMarker === 1;", vec![]).await.unwrap();
        assert_eq!(marker, serde_json::json!(true), "the rollout page was updated in place");

        // The fleet page shows both committed on app@2.
        b.goto(&format!("{}/?sort=id", c.base)).await.unwrap();
        ok!(b, b.wait_text("#fleet tr[data-device='g-a']", "app@2", LIVE).await);
        ok!(b, b.wait_text("#fleet tr[data-device='g-b']", "committed", LIVE).await);

        // A broken release (its health check fails) in two waves: the first
        // wave's device rolls back, the rollout pauses by itself, and the
        // page shows why, live; then the operator aborts it.
        std::thread::scope(|t| {
            t.spawn(|| {
                std::fs::create_dir_all(f.s.path("app-3/bin")).unwrap();
                std::fs::write(f.s.path("app-3/bin/check"), "exit 1\n").unwrap();
                let (file, _, _) = f.bundle_of_dir("app", 3, "app-3");
                f.publish(&file);
            });
        });
        b.goto(&format!("{}/rollouts", c.base)).await.unwrap();
        ok!(b, b.wait_text("select[name=bundle]", "app@3", LIVE).await);
        b.execute("document.querySelector('select[name=group]').value = 'g';", vec![]).await.unwrap();
        b.execute("document.querySelector('input[name=waves]').value = '50%,100%';", vec![]).await.unwrap();
        ok!(b, b.click("form[action='/rollouts'] button[type=submit]").await);
        ok!(b, b.accept_confirm().await);
        let broken = "section.rollout:first-of-type";
        ok!(b, b.wait_text(&format!("{broken} h2"), "app@3", LIVE).await);
        ok!(b, b.wait_text(&format!("{broken} h2"), "paused", LIVE).await);
        ok!(b, b.wait_text(&format!("{broken} tr[data-wave='0'] td.failed"), "g-a", LIVE).await);
        ok!(b, b.wait_text(&format!("{broken} .note.err"), "1 of 1 devices failed (g-a)", LIVE).await);
        // Resumed (its failure accepted), the next wave fails the same way
        // and it pauses again.
        ok!(b, b.click(&format!("{broken} form[action$='/resume'] button")).await);
        ok!(b, b.accept_confirm().await);
        ok!(b, b.wait_text(".note.ok", "Resumed rollout", LIVE).await);
        ok!(b, b.wait_text(&format!("{broken} tr[data-wave='1'] td.failed"), "g-b", LIVE).await);
        ok!(b, b.wait_text(&format!("{broken} .note.err"), "1 of 1 devices failed (g-b)", LIVE).await);
        ok!(b, b.click(&format!("{broken} form[action$='/abort'] button")).await);
        ok!(b, b.accept_confirm().await);
        ok!(b, b.wait_text(".note.ok", "Aborted rollout", LIVE).await);
        ok!(b, b.wait_text(&format!("{broken} h2"), "aborted", LIVE).await);

        // A device asks to enroll and waits for approval: it appears live.
        b.goto(&format!("{}/enrollment", c.base)).await.unwrap();
        ok!(b, b.wait_for("#no-pending", LIVE).await);
        let waiting = f.device("drone-9");
        let token = f.token_file("manual", &["--group", "g", "--approval", "manual"]);
        let r = waiting.agent(&["enroll", "--device-id", "drone-9", "--token-file", token.to_str().unwrap()]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        ok!(b, b.wait_text("#pending", "drone-9", LIVE).await);
        ok!(b, b.click("#pending tr[data-device='drone-9'] form[action$='/approve'] button").await);
        ok!(b, b.wait_text(".note.ok", "Approved drone-9", LIVE).await);
        assert_eq!(f.device_status("drone-9").as_deref(), Some("approved"));

        // A token for a technician's phone, as a QR code.
        ok!(b, b.fill("input[name=groups]", "g").await);
        ok!(b, b.click("form[action='/enrollment/token'] button[type=submit]").await);
        ok!(b, b.wait_for("#token svg", LIVE).await);
        let text = b.execute("return document.getElementById('token-text').value;", vec![]).await.unwrap();
        let text = text.as_str().unwrap().trim().to_string();
        let check = f.s.run("perch-bootstrap", &["token", "check", "--trust", "org/trust.doc", &text]);
        assert_eq!(check.code, 0, "the QR's token is a valid one: {}", check.stderr);
        for w in [1280, 420] {
            b.resize(w, 900).await.unwrap();
            b.screenshot(&shots().join(format!("enrollment-{w}.png"))).await.unwrap();
        }
        b.resize(1280, 900).await.unwrap();

        // Revoke g-b from its page, confirming.
        b.goto(&format!("{}/device/g-b", c.base)).await.unwrap();
        ok!(b, b.wait_text("#timeline", "committed", LIVE).await);
        ok!(b, b.click("form[action='/enrollment/g-b/revoke'] button").await);
        ok!(b, b.accept_confirm().await);
        ok!(b, b.wait_text(".note.ok", "Revoked g-b", LIVE).await);
        assert_eq!(f.device_status("g-b").as_deref(), Some("revoked"));

        // Every page, at both widths.
        let pages = [
            ("fleet", "/?sort=id".to_string(), "#fleet"),
            ("device", "/device/g-a".to_string(), "#timeline"),
            ("rollouts", "/rollouts".to_string(), "section.rollout"),
            ("bundles", "/bundles".to_string(), "#bundles"),
        ];
        for w in [1280, 420] {
            b.resize(w, 900).await.unwrap();
            for (name, path, ready) in &pages {
                b.goto(&format!("{}{path}", c.base)).await.unwrap();
                ok!(b, b.wait_for(ready, LIVE).await);
                b.screenshot(&shots().join(format!("{name}-{w}.png"))).await.unwrap();
            }
        }
        let bundles = b.text("#bundles").await.unwrap();
        assert!(bundles.contains("app@2") && bundles.contains("of threshold 1"), "{bundles}");
        // What a device says is text in the browser too: no script runs.
        let evil = "<script>document.title='owned'</script><img src=x onerror=\"document.title='owned'\">";
        // (From a thread of its own: the reader blocks on its own runtime.)
        std::thread::scope(|t| {
            t.spawn(|| {
                f.reports_reader().js_publish("perch.report.evil-1.events", failed_report("evil-1", evil))
            });
        });
        b.goto(&format!("{}/?q=evil", c.base)).await.unwrap();
        let row = ok!(b, b.wait_text("#fleet tr[data-device='evil-1']", "<script>", LIVE).await);
        assert!(row.contains(evil), "{row}");
        b.goto(&format!("{}/device/evil-1", c.base)).await.unwrap();
        ok!(b, b.wait_text("#timeline", "<img src=x", LIVE).await);
        let title = b.execute("return document.title;", vec![]).await.unwrap();
        assert_eq!(title, serde_json::json!("Device evil-1 · perch console"));
        b.close().await.unwrap();
    });
}

#[test]
fn ten_thousand_devices_are_paged_sorted_and_filtered_in_the_browser() {
    // (A provisioner makes the streams.)
    let f = Fleet::start(1);
    let c = console(&f, &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let b = Browser::start(1280, 900).await.unwrap();
        b.goto(&format!("{}/login?token={}", c.base, c.token)).await.unwrap();
        ok!(b, b.wait_text("#summary", "0 devices", LIVE).await);
        // 10,000 devices report while the page is open; every tenth failed.
        let reports: Vec<(String, Vec<u8>)> = (0..10_000)
            .map(|i| {
                let id = format!("sim-{i:05}");
                let state = if i % 10 == 0 { "failed" } else { "committed" };
                (format!("perch.report.{id}.events"), deploy_report(&id, state, None))
            })
            .collect();
        std::thread::scope(|t| {
            t.spawn(|| f.reports_reader().js_publish_all(reports));
        });
        // They are counted live; not being on the page, they are offered
        // as a reload instead of growing it.
        ok!(b, b.wait_text("#summary", "10000 devices: 10000 online", LIVE).await);
        ok!(b, b.wait_for("#newer:not([hidden])", LIVE).await);
        b.click("#newer a").await.unwrap();
        let rows =
            b.execute("return document.querySelectorAll('#fleet tbody tr').length;", vec![]).await.unwrap();
        assert_eq!(rows, serde_json::json!(100));
        ok!(b, b.wait_text(".pager", "page 1 of 100", LIVE).await);
        // No rollout bucket exists yet: that is not "still reading".
        let page = b.source().await.unwrap();
        assert!(!page.contains("Still reading"), "a fleet without rollouts is not incomplete");
        // Sorted by id, reversed by a second click on its heading.
        b.click("#fleet th a[href*='sort=id']").await.unwrap();
        ok!(b, b.wait_text("#fleet tbody tr:first-child", "sim-09999", LIVE).await);
        // The failed ones, page 2 of 10.
        b.goto(&format!("{}/?state=failed&sort=id&page=2", c.base)).await.unwrap();
        ok!(b, b.wait_text(".pager", "1000 shown · page 2 of 10", LIVE).await);
        ok!(b, b.wait_text("#fleet tbody tr:first-child", "sim-01000", LIVE).await);
        b.click(".pager a[rel=next]").await.unwrap();
        ok!(b, b.wait_text("#fleet tbody tr:first-child", "sim-02000", LIVE).await);
        b.close().await.unwrap();
    });
}
