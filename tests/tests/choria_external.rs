//! perch as a Choria external agent, driven exactly as a Choria server
//! drives one: `perch.json` and the executable `perch` (a symlink to
//! perch-agent) in an agent directory; the request in a file, an empty
//! reply file, `perch REQUEST REPLY PROTOCOL`, an environment of only
//! `CHORIA_EXTERNAL_*` and `PATH`, the temp directory as the working
//! directory; the reply read back from its file after exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use perch_tests::device::{Backend, Device};
use serde_json::{json, Value};

const RPC: &str = "io.choria.mcorpc.external.v1.rpc_request";
const ACTIVATION: &str = "io.choria.mcorpc.external.v1.activation_request";

/// A Choria server's view of one node: its agent directory and plugin.d.
struct Node {
    agent_dir: PathBuf,
    plugin_config: PathBuf,
    calls: std::cell::Cell<u32>,
}

impl Node {
    /// The agent directory as the .deb lays it out, pointing at the
    /// device's config and state directory.
    fn new(root: &Path, config: &Path, state_dir: &Path) -> Node {
        let agent_dir = root.join("choria/mcollective/agent");
        std::fs::create_dir_all(&agent_dir).unwrap();
        std::os::unix::fs::symlink(perch_tests::bin("perch-agent"), agent_dir.join("perch")).unwrap();
        let ddl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/choria/perch.json");
        std::fs::copy(ddl, agent_dir.join("perch.json")).unwrap();
        let plugin_d = root.join("choria/plugin.d");
        std::fs::create_dir_all(&plugin_d).unwrap();
        let plugin_config = plugin_d.join("perch");
        std::fs::write(
            &plugin_config,
            format!(
                "# perch's Choria agent\nconfig = {}\nstate_dir = {}\n",
                config.display(),
                state_dir.display()
            ),
        )
        .unwrap();
        Node { agent_dir, plugin_config, calls: Default::default() }
    }

    /// One call: the executable's exit code and its reply file, parsed.
    fn call(&self, protocol: &str, request: &Value) -> (Option<i32>, Value) {
        let n = self.calls.get() + 1;
        self.calls.set(n);
        let dir = self.agent_dir.parent().unwrap();
        let (req, reply) = (dir.join(format!("request-{n}")), dir.join(format!("reply-{n}")));
        std::fs::write(&req, request.to_string()).unwrap();
        std::fs::write(&reply, "").unwrap();
        let out = Command::new(self.agent_dir.join("perch"))
            .arg(&req)
            .arg(&reply)
            // The server passes the RPC protocol here even for activation.
            .arg(RPC)
            .env_clear()
            .env("CHORIA_EXTERNAL_REQUEST", &req)
            .env("CHORIA_EXTERNAL_REPLY", &reply)
            .env("CHORIA_EXTERNAL_PROTOCOL", protocol)
            .env("CHORIA_EXTERNAL_CONFIG", &self.plugin_config)
            .env("CHORIA_EXTERNAL_FACTS", dir.join("facts"))
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        let text = std::fs::read_to_string(&reply).unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("reply is not JSON ({e}): {text:?}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.code(), v)
    }

    fn rpc(&self, action: &str, data: Value) -> Value {
        let request = json!({
            "$schema": "https://choria.io/schemas/mcorpc/external/v1/rpc_request.json",
            "protocol": RPC,
            "agent": "perch",
            "action": action,
            "requestid": format!("0123456789abcdef{}", self.calls.get()),
            "senderid": "desk-1.example.net",
            "callerid": "choria=operator.mcollective",
            "collective": "mcollective",
            "ttl": 60,
            "msgtime": 1_764_500_000,
            "data": data,
        });
        let (code, reply) = self.call(RPC, &request);
        assert_eq!(code, Some(0), "a reply is always written and the exit is 0: {reply}");
        assert_reply_shape(&reply);
        reply
    }
}

/// `{"statuscode": 0..=5, "statusmsg": "...", "data": {...}}`, nothing else.
fn assert_reply_shape(reply: &Value) {
    let obj = reply.as_object().unwrap_or_else(|| panic!("not an object: {reply}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["data", "statuscode", "statusmsg"], "{reply}");
    assert!(reply["statuscode"].as_u64().is_some_and(|c| c <= 5), "{reply}");
    assert!(reply["statusmsg"].is_string() && reply["data"].is_object(), "{reply}");
}

fn node_for(d: &Device) -> Node {
    Node::new(d.s.dir.path(), &d.path("agent.toml"), &d.path("state"))
}

#[test]
fn activation_is_true_only_where_perch_agent_is_configured() {
    let d = Device::new(Backend::Dir);
    let node = node_for(&d);
    let ask = |agent: &str| {
        let req = json!({
            "$schema": "https://choria.io/schemas/mcorpc/external/v1/activation_request.json",
            "protocol": ACTIVATION,
            "agent": agent,
        });
        node.call(ACTIVATION, &req)
    };
    assert_eq!(ask("perch"), (Some(0), json!({ "activate": true })));
    assert_eq!(ask("other").1["activate"], false);
    // No agent.toml: a node without perch-agent configured does not activate.
    std::fs::remove_file(d.path("agent.toml")).unwrap();
    let (code, reply) = ask("perch");
    assert_eq!((code, &reply["activate"]), (Some(0), &json!(false)), "{reply}");
}

#[test]
fn status_install_commit_and_a_refused_bundle_through_choria() {
    let d = Device::new(Backend::Dir);
    let node = node_for(&d);

    let st = node.rpc("status", json!({}));
    assert_eq!(st["statuscode"], 0, "{st}");
    assert_eq!(st["data"]["bundle"], "-");
    assert_eq!(st["data"]["deploy_state"], "idle");
    assert_eq!(st["data"]["running_slot"], "a");
    assert_eq!(st["data"]["enrolled"], false);
    assert_eq!(st["data"]["link"], "none");
    assert_eq!(st["data"]["status"]["backend"], "dir");

    d.archive_bundle("v2.perch", 2, &[("app", "new app\n")]);
    let installed = node.rpc("install", json!({ "bundle": d.path("v2.perch").to_str().unwrap() }));
    assert_eq!(installed["statuscode"], 0, "{installed}");
    let data = &installed["data"];
    assert_eq!(
        (&data["outcome"], &data["bundle"], &data["exit_code"]),
        (&json!("committed"), &json!("os@2"), &json!(0))
    );
    assert_eq!(data["refused"], false);
    let st = node.rpc("status", json!({}));
    assert_eq!((&st["data"]["bundle"], &st["data"]["running_slot"]), (&json!("os@2"), &json!("b")), "{st}");
    assert_eq!(st["data"]["last_outcome"], "committed");

    // A file:// URL names the same file: already running, nothing to do.
    let again = node.rpc("install", json!({ "bundle": format!("file://{}", d.path("v2.perch").display()) }));
    assert_eq!(
        (&again["statuscode"], &again["data"]["outcome"]),
        (&json!(0), &json!("already_running")),
        "{again}"
    );

    // A bundle with a flipped payload byte: refused as such, nothing changed.
    d.archive_bundle("v3.perch", 3, &[("app", "v3 app\n")]);
    let mut bytes = std::fs::read(d.path("v3.perch")).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x40;
    std::fs::write(d.path("tampered.perch"), bytes).unwrap();
    let refused = node.rpc("install", json!({ "bundle": d.path("tampered.perch").to_str().unwrap() }));
    assert_eq!(refused["statuscode"], 1, "{refused}");
    assert!(refused["statusmsg"].as_str().unwrap().starts_with("refused: "), "{refused}");
    assert_eq!(
        (&refused["data"]["refused"], &refused["data"]["exit_code"]),
        (&json!(true), &json!(3)),
        "{refused}"
    );
    let st = node.rpc("status", json!({}));
    assert_eq!((&st["data"]["bundle"], &st["data"]["running_slot"]), (&json!("os@2"), &json!("b")), "{st}");

    // commit with no trial: the engine says so (exit 1), as on its command line.
    let commit = node.rpc("commit", json!({}));
    assert_eq!((&commit["statuscode"], &commit["data"]["exit_code"]), (&json!(1), &json!(1)), "{commit}");
    assert!(commit["statusmsg"].as_str().unwrap().starts_with("nothing to commit"), "{commit}");
    assert_eq!(commit["data"]["deploy_state"], "failed", "{commit}");
    eprintln!("{refused}");
}

#[test]
fn a_rollback_is_reported_with_its_reason() {
    let mut d = Device::new(Backend::Dir);
    d.health = "commands = [\"false\"]\ntrial = \"1s\"\ninterval = \"100ms\"\n".into();
    d.write_config();
    let node = node_for(&d);
    d.archive_bundle("v2.perch", 2, &[("app", "unhealthy\n")]);
    let r = node.rpc("install", json!({ "bundle": d.path("v2.perch").to_str().unwrap() }));
    assert_eq!((&r["statuscode"], &r["data"]["outcome"]), (&json!(1), &json!("rolled_back")), "{r}");
    let reason = r["data"]["reason"].as_str().unwrap();
    assert!(reason.contains("health"), "{r}");
    assert_eq!(r["statusmsg"].as_str().unwrap(), format!("rolled_back os@2: {reason}"), "{r}");
    assert_eq!((&r["data"]["refused"], &r["data"]["exit_code"]), (&json!(false), &json!(1)), "{r}");
    let st = node.rpc("status", json!({}));
    assert_eq!(
        (&st["data"]["running_slot"], &st["data"]["last_outcome"]),
        (&json!("a"), &json!("rolled_back"))
    );
}

#[test]
fn install_downloads_an_http_url_and_a_missing_file_is_invalid_data() {
    let d = Device::new(Backend::Dir);
    let node = node_for(&d);
    d.archive_bundle("v2.perch", 2, &[("app", "from the web\n")]);
    let url = serve_once(std::fs::read(d.path("v2.perch")).unwrap());
    let installed = node.rpc("install", json!({ "bundle": url }));
    assert_eq!(
        (&installed["statuscode"], &installed["data"]["outcome"]),
        (&json!(0), &json!("committed")),
        "{installed}"
    );
    assert_eq!(std::fs::read_to_string(d.path("root/b/app")).unwrap(), "from the web\n");
    // The download is not left behind.
    let left: Vec<_> = std::fs::read_dir(d.path("state/choria")).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");

    // No such bundle file: InvalidData, found before perch-agent runs.
    let missing = node.rpc("install", json!({ "bundle": "/nowhere/v9.perch" }));
    assert_eq!((&missing["statuscode"], missing["data"].get("exit_code")), (&json!(4), None), "{missing}");
    assert!(missing["statusmsg"].as_str().unwrap().contains("/nowhere/v9.perch"), "{missing}");
    // A URL nobody answers: the download's own error.
    let gone =
        node.rpc("install", json!({ "bundle": format!("http://127.0.0.1:{}/v9.perch", closed_port()) }));
    assert_eq!(gone["statuscode"], 1, "{gone}");
    assert!(gone["statusmsg"].as_str().unwrap().starts_with("downloading http://"), "{gone}");
}

#[test]
fn bad_requests_get_their_status_codes_and_start_nothing() {
    let d = Device::new(Backend::Dir);
    let node = node_for(&d);
    let code = |action: &str, data: Value| {
        let r = node.rpc(action, data);
        (r["statuscode"].as_u64().unwrap(), r["statusmsg"].as_str().unwrap().to_string())
    };
    let (c, msg) = code("reboot", json!({}));
    assert_eq!(c, 2, "{msg}");
    assert!(msg.contains("unknown action 'reboot'"), "{msg}");
    assert_eq!(code("install", json!({})).0, 3);
    assert_eq!(code("enroll", json!({ "device_id": "desk-1" })).0, 3);
    assert_eq!(code("install", json!({ "bundle": 7 })).0, 4);
    assert_eq!(code("install", json!({ "bundle": "" })).0, 4);
    assert_eq!(code("install", json!({ "bundle": "relative.perch" })).0, 4);
    assert_eq!(code("install", json!({ "bundle": "/a\n/b" })).0, 4);
    assert_eq!(code("install", json!({ "bundle": "ftp://host/x.perch" })).0, 4);
    assert_eq!(code("status", json!({ "colour": "blue" })).0, 4);
    assert_eq!(code("status", json!([1, 2])).0, 4);
    // Nothing was started: perch-agent never ran, so it made no state at all.
    let made: Vec<_> = std::fs::read_dir(d.path("state")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(made.is_empty(), "{made:?}");
    // Choria's own key is passed through and ignored.
    assert_eq!(code("status", json!({ "process_results": true })).0, 0);

    // A request that is not JSON, or not for this agent: Aborted, and still a reply.
    let dir = node.agent_dir.parent().unwrap();
    for (i, text) in ["{not json", "[]", &"x".repeat(2 << 20)].iter().enumerate() {
        let req = dir.join(format!("bad-{i}"));
        std::fs::write(&req, text).unwrap();
        let reply = dir.join(format!("bad-reply-{i}"));
        let out = Command::new(node.agent_dir.join("perch"))
            .args([&req, &reply])
            .arg(RPC)
            .env_clear()
            .env("CHORIA_EXTERNAL_PROTOCOL", RPC)
            .env("CHORIA_EXTERNAL_CONFIG", &node.plugin_config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&reply).unwrap()).unwrap();
        assert_reply_shape(&v);
        assert_eq!(v["statuscode"], 1, "{v}");
    }
    let other =
        node.call(RPC, &json!({ "protocol": RPC, "agent": "package", "action": "status", "data": {} }));
    assert_eq!(other.1["statuscode"], 1, "{other:?}");
}

#[test]
fn a_forged_token_is_refused_and_nothing_is_stored() {
    let d = Device::new(Backend::Dir);
    let node = node_for(&d);
    let forged = format!("PERCH1-{}", "A".repeat(120));
    let r = node.rpc("enroll", json!({ "token": forged, "device_id": "desk-1" }));
    assert_eq!(r["statuscode"], 1, "{r}");
    assert!(r["statusmsg"].as_str().unwrap().starts_with("refused: "), "{r}");
    assert_eq!(r["data"]["exit_code"], 3, "{r}");
    assert!(!d.path("state/identity/enrollment").exists());
    // The token file the call wrote is gone.
    let left: Vec<_> =
        std::fs::read_dir(d.path("state/choria")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_desktop_enrolls_through_choria() {
    let f = perch_tests::fleet::Fleet::start(1);
    let d = f.device("desk-7");
    std::fs::copy(f.s.path("org/trust.doc"), d.trust()).unwrap();
    let node = Node::new(&d.dir, &d.config(), &d.state());
    let token = f.token(&["--group", "desktops"]);
    let r = node.rpc("enroll", json!({ "token": token, "device_id": "desk-7", "groups": "desktops" }));
    assert_eq!(r["statuscode"], 0, "{r}\n{}", f.all_logs());
    assert_eq!(
        (&r["data"]["device_id"], &r["data"]["groups"]),
        (&json!("desk-7"), &json!(["desktops"])),
        "{r}"
    );
    let st = node.rpc("status", json!({}));
    assert_eq!((&st["data"]["enrolled"], &st["data"]["device_id"]), (&json!(true), &json!("desk-7")), "{st}");
}

/// Serves `body` once over HTTP on a free port; the URL.
fn serve_once(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        // The request line and headers, up to the blank line.
        while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        let _ = s.write_all(&body);
        let _ = r.read(&mut [0; 1]);
    });
    format!("http://127.0.0.1:{port}/v2.perch")
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
