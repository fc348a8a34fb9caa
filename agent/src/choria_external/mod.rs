//! perch as a Choria external agent: `choria req perch ACTION` on a node
//! whose Choria server runs next to perch-agent.
//!
//! The Choria server finds `perch.json` (the DDL, [`DDL`]) and the
//! executable `perch` beside it in its agent directory. It runs the
//! executable as `perch REQUEST_FILE REPLY_FILE PROTOCOL` with only
//! `CHORIA_EXTERNAL_*` and `PATH` in the environment; `perch` is a
//! symlink to perch-agent, which answers when it is called by that name
//! (or as `perch-agent choria-external ...`).
//!
//! Each action runs perch-agent's own command (`status --json`,
//! `install --json`, `commit`, `rollback`, `enroll`) as a child process, so
//! a Choria call takes the engine lock, refuses and fails exactly as the
//! command line does; its exit code becomes the mcorpc status code
//! ([`StatusCode::from_exit`]). A request is checked here before anything
//! runs: an unknown action, a missing input and an input of the wrong
//! type or shape get their own codes, and nothing is started.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Map, Value};

mod scratch;

/// The DDL the Choria server and `choria req` read (`perch.json`).
pub const DDL: &str = include_str!("../../choria/perch.json");

pub const RPC_REQUEST: &str = "io.choria.mcorpc.external.v1.rpc_request";
pub const ACTIVATION_REQUEST: &str = "io.choria.mcorpc.external.v1.activation_request";
const AGENT: &str = "perch";
/// A request is a few KB; the server writes it, but it is still input.
const MAX_REQUEST: usize = 1 << 20;
/// The largest bundle an `install` downloads, unless the plugin config
/// says otherwise (`download_max_bytes`): the state directory's disk is
/// the journal's too.
const DEFAULT_DOWNLOAD_MAX: u64 = 4 << 30;

/// The mcorpc status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Ok = 0,
    Aborted = 1,
    UnknownAction = 2,
    MissingData = 3,
    InvalidData = 4,
    UnknownError = 5,
}

impl StatusCode {
    /// perch-agent's exit code as a status code: 0 is OK; 1 (the action
    /// failed), 2 (a usage or config error: the request was checked here
    /// first, so it is the node's config) and 3 (the device refused: a
    /// security rejection, which the reply also says in `refused` and its
    /// message) are Aborted; a child killed by a signal is UnknownError.
    pub fn from_exit(code: Option<i32>) -> StatusCode {
        match code {
            Some(0) => StatusCode::Ok,
            Some(_) => StatusCode::Aborted,
            None => StatusCode::UnknownError,
        }
    }
}

/// One reply: `{"statuscode": N, "statusmsg": "...", "data": {...}}`.
#[derive(Debug)]
pub struct Reply {
    pub code: StatusCode,
    pub message: String,
    pub data: Map<String, Value>,
}

impl Reply {
    fn ok(data: Map<String, Value>) -> Reply {
        Reply { code: StatusCode::Ok, message: "OK".into(), data }
    }

    fn error(code: StatusCode, message: impl Into<String>) -> Reply {
        Reply { code, message: message.into(), data: Map::new() }
    }

    pub fn to_json(&self) -> Value {
        json!({ "statuscode": self.code as u8, "statusmsg": self.message, "data": self.data })
    }
}

/// How the Choria server called the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub request: PathBuf,
    pub reply: PathBuf,
    pub protocol: String,
    /// `CHORIA_EXTERNAL_CONFIG`: the agent's file in the server's
    /// `plugin.d/` (it may not exist).
    pub plugin_config: Option<PathBuf>,
}

/// Whether `args` (the program name first) are a Choria server's call:
/// the program is called `perch` (the symlink in the agent directory),
/// or the first argument is `choria-external`. The rest of the arguments.
pub fn invoked_as(args: &[OsString]) -> Option<&[OsString]> {
    let name = args.first().map(Path::new).and_then(Path::file_name);
    if name.is_some_and(|n| n == AGENT) {
        return args.get(1..);
    }
    match args.get(1) {
        Some(a) if a == "choria-external" => args.get(2..),
        _ => None,
    }
}

impl Call {
    /// The call from the arguments after the program name and the
    /// environment. The environment wins where both say: the server
    /// passes the RPC protocol as the third argument even for an
    /// activation check.
    pub fn from(args: &[OsString], env: impl Fn(&str) -> Option<OsString>) -> Result<Call, String> {
        let pick = |i: usize, var: &str| env(var).filter(|v| !v.is_empty()).or_else(|| args.get(i).cloned());
        let usage =
            "usage: perch REQUEST_FILE REPLY_FILE PROTOCOL (as a Choria server runs its external agents)";
        let request = pick(0, "CHORIA_EXTERNAL_REQUEST").ok_or(usage)?;
        let reply = pick(1, "CHORIA_EXTERNAL_REPLY").ok_or(usage)?;
        let protocol = pick(2, "CHORIA_EXTERNAL_PROTOCOL").ok_or(usage)?;
        Ok(Call {
            request: request.into(),
            reply: reply.into(),
            protocol: protocol.to_string_lossy().into_owned(),
            plugin_config: env("CHORIA_EXTERNAL_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from),
        })
    }
}

/// Where perch-agent's files are, from the plugin config's `key = value`
/// lines (`config`, `state_dir`, `download_max_bytes`); perch-agent's
/// defaults for what it does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub download_max: u64,
}

impl Settings {
    /// A missing file is all defaults; an unreadable one, or a line that is
    /// not `key = value` with a known key, is an error naming it.
    pub fn read(path: Option<&Path>) -> Result<Settings, String> {
        let mut s = Settings {
            config: crate::cli::DEFAULT_CONFIG.into(),
            state_dir: crate::cli::DEFAULT_STATE_DIR.into(),
            download_max: DEFAULT_DOWNLOAD_MAX,
        };
        let Some(path) = path else { return Ok(s) };
        let text = match perch_support::durable::read_bounded(path, 64 * 1024) {
            Ok(b) => String::from_utf8(b).map_err(|_| format!("{}: not UTF-8", path.display()))?,
            Err(e) if e.is_not_found() => return Ok(s),
            Err(e) => return Err(format!("{e}")),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", path.display(), n + 1);
            let (key, value) =
                line.split_once('=').ok_or_else(|| format!("{}: not `key = value`: {line}", at()))?;
            let value = value.trim();
            match key.trim() {
                "config" => s.config = value.into(),
                "state_dir" => s.state_dir = value.into(),
                "download_max_bytes" => {
                    s.download_max = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("{}: download_max_bytes is a number above 0", at()))?
                }
                other => {
                    return Err(format!(
                        "{}: unknown key '{other}' (config, state_dir, download_max_bytes)",
                        at()
                    ))
                }
            }
        }
        Ok(s)
    }
}

/// Answers `call`: reads its request, writes its reply. `agent` is the
/// perch-agent executable the actions run. An error only if no reply
/// could be written (the server then reports the call Aborted).
pub fn answer(call: &Call, agent: &Path) -> Result<(), String> {
    let reply = match Settings::read(call.plugin_config.as_deref()) {
        Err(e) if call.protocol == ACTIVATION_REQUEST => json!({ "activate": false, "reason": e }),
        Err(e) => Reply::error(StatusCode::Aborted, format!("perch's Choria plugin config: {e}")).to_json(),
        Ok(settings) => match read_request(&call.request) {
            Err(e) if call.protocol == ACTIVATION_REQUEST => json!({ "activate": false, "reason": e }),
            Err(e) => Reply::error(StatusCode::Aborted, e).to_json(),
            Ok(request) if call.protocol == ACTIVATION_REQUEST => activation(&request, &settings),
            Ok(request) if call.protocol == RPC_REQUEST => {
                Runner { agent, settings: &settings }.rpc(&request).to_json()
            }
            Ok(_) => {
                Reply::error(StatusCode::Aborted, format!("unknown protocol '{}'", call.protocol)).to_json()
            }
        },
    };
    write_reply(&call.reply, &reply).map_err(|e| format!("{}: {e}", call.reply.display()))
}

fn read_request(path: &Path) -> Result<Value, String> {
    let bytes =
        perch_support::durable::read_bounded(path, MAX_REQUEST).map_err(|e| format!("request: {e}"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("request is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("request is not a JSON object".into());
    }
    Ok(v)
}

/// The server pre-creates the reply file; it is written in place.
fn write_reply(path: &Path, reply: &Value) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(reply.to_string().as_bytes())?;
    f.sync_all()
}

/// Active only where perch-agent is installed and configured: its config
/// loads.
fn activation(request: &Value, settings: &Settings) -> Value {
    if request["agent"] != AGENT {
        return json!({ "activate": false, "reason": format!("this executable is the {AGENT} agent") });
    }
    match crate::config::Config::load(&settings.config) {
        Ok(_) => json!({ "activate": true }),
        Err(e) => json!({ "activate": false, "reason": e.to_string() }),
    }
}

/// Runs perch-agent's commands for the actions.
struct Runner<'a> {
    agent: &'a Path,
    settings: &'a Settings,
}

/// An action's inputs, checked: what the DDL says, no more.
struct Inputs<'a> {
    /// `None`: no inputs at all (`null`, which the server sends as `{}`).
    data: Option<&'a Map<String, Value>>,
}

impl<'a> Inputs<'a> {
    /// `allowed`: the action's inputs. `process_results` is the client's,
    /// which the server passes on.
    fn new(data: &'a Value, allowed: &[&str]) -> Result<Inputs<'a>, Reply> {
        let data = match data {
            Value::Object(m) => m,
            Value::Null => return Ok(Inputs { data: None }),
            _ => return Err(Reply::error(StatusCode::InvalidData, "data is not an object")),
        };
        if let Some(k) = data.keys().find(|k| !allowed.contains(&k.as_str()) && *k != "process_results") {
            let valid = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
            return Err(Reply::error(
                StatusCode::InvalidData,
                format!("unknown input '{k}' (inputs: {valid})"),
            ));
        }
        Ok(Inputs { data: Some(data) })
    }

    /// A string input: `None` if absent, InvalidData if not a string, or
    /// empty, or with a control character.
    fn string(&self, key: &str, max: usize) -> Result<Option<&'a str>, Reply> {
        match self.data.and_then(|d| d.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => {
                Err(Reply::error(StatusCode::InvalidData, format!("input '{key}' is empty")))
            }
            Some(Value::String(s)) if s.len() > max => Err(Reply::error(
                StatusCode::InvalidData,
                format!("input '{key}' is longer than {max} bytes"),
            )),
            Some(Value::String(s)) if s.chars().any(char::is_control) => {
                Err(Reply::error(StatusCode::InvalidData, format!("input '{key}' holds a control character")))
            }
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Reply::error(StatusCode::InvalidData, format!("input '{key}' is not a string"))),
        }
    }

    fn required(&self, key: &str, max: usize) -> Result<&'a str, Reply> {
        self.string(key, max)?
            .ok_or_else(|| Reply::error(StatusCode::MissingData, format!("input '{key}' is required")))
    }
}

impl Runner<'_> {
    fn rpc(&self, request: &Value) -> Reply {
        if request["agent"] != AGENT {
            return Reply::error(StatusCode::Aborted, format!("this executable is the {AGENT} agent"));
        }
        let Some(action) = request["action"].as_str() else {
            return Reply::error(StatusCode::InvalidData, "the request names no action");
        };
        let data = &request["data"];
        let done = match action {
            "status" => Inputs::new(data, &[]).and_then(|_| self.status()),
            "install" => Inputs::new(data, &["bundle"]).and_then(|i| self.install(&i, request)),
            "commit" | "rollback" => Inputs::new(data, &[]).and_then(|_| self.decide(action)),
            "enroll" => {
                Inputs::new(data, &["token", "device_id", "groups"]).and_then(|i| self.enroll(&i, request))
            }
            other => Err(Reply::error(
                StatusCode::UnknownAction,
                format!(
                    "unknown action '{other}' for agent {AGENT} (status, install, commit, rollback, enroll)"
                ),
            )),
        };
        done.unwrap_or_else(|r| r)
    }

    /// perch-agent with the settings' config and state directory.
    fn agent<A: AsRef<std::ffi::OsStr>>(&self, args: impl IntoIterator<Item = A>) -> Result<Output, Reply> {
        Command::new(self.agent)
            .arg("--config")
            .arg(&self.settings.config)
            .arg("--state-dir")
            .arg(&self.settings.state_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Reply::error(StatusCode::Aborted, format!("running {}: {e}", self.agent.display())))
    }

    fn status(&self) -> Result<Reply, Reply> {
        let out = self.agent(["status", "--json"])?;
        let doc = failed(&out).map_or_else(|| last_json(&out), Err)?;
        Ok(Reply::ok(status_data(&doc)))
    }

    fn install(&self, inputs: &Inputs, request: &Value) -> Result<Reply, Reply> {
        let bundle = inputs.required("bundle", 4096)?;
        let (path, downloaded) = self.bundle_path(bundle, request)?;
        let out = self.agent([OsString::from("install"), "--json".into(), path.clone().into()]);
        if downloaded {
            let _ = std::fs::remove_file(&path);
        }
        let out = out?;
        let mut data = Map::new();
        data.insert("exit_code".into(), json!(out.status.code()));
        data.insert("refused".into(), json!(out.status.code() == Some(3)));
        let finished = last_json(&out).ok();
        if let Some(f) = &finished {
            data.insert("outcome".into(), f["outcome"].clone());
            data.insert("bundle".into(), json!(bundle_name(&f["bundle"])));
            data.insert("deploy_state".into(), f["deploy"]["state"].clone());
            data.insert("reason".into(), json!(f["reason"].as_str().unwrap_or("")));
        }
        if let Some(mut r) = failed(&out) {
            match &finished {
                // It ran and rolled back: the reason is in its JSON, and
                // perch-agent says nothing on stderr.
                Some(f) => {
                    let reason = f["reason"].as_str().unwrap_or("");
                    r.message = format!(
                        "{} {}: {reason}",
                        f["outcome"].as_str().unwrap_or("failed"),
                        bundle_name(&f["bundle"])
                    );
                }
                None => {
                    data.insert(
                        "outcome".into(),
                        json!(if out.status.code() == Some(3) { "refused" } else { "failed" }),
                    );
                    let reason = r.message.strip_prefix("refused: ").unwrap_or(&r.message);
                    data.insert("reason".into(), json!(reason));
                }
            }
            r.data = data;
            return Err(r);
        }
        Ok(Reply::ok(data))
    }

    /// The local file an `install` input names: a path, a `file://` URL,
    /// or an http(s) URL downloaded into the state directory (`true`: the
    /// caller removes it). The bundle's signatures decide whether it is
    /// installed, not where it came from.
    fn bundle_path(&self, bundle: &str, request: &Value) -> Result<(PathBuf, bool), Reply> {
        if let Some(path) = bundle.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Reply::error(StatusCode::InvalidData, "a file:// URL names an absolute path"));
            }
            return self.bundle_path(path, request);
        }
        if bundle.starts_with('/') {
            if !Path::new(bundle).is_file() {
                return Err(Reply::error(StatusCode::InvalidData, format!("{bundle}: no such bundle file")));
            }
            return Ok((bundle.into(), false));
        }
        if !(bundle.starts_with("https://") || bundle.starts_with("http://")) {
            return Err(Reply::error(
                StatusCode::InvalidData,
                "input 'bundle' is an absolute path, a file:// URL or an http(s):// URL",
            ));
        }
        // A killed call (the DDL timeout) leaves its download behind: the
        // next install clears them.
        scratch::clear(&self.settings.state_dir, "download");
        let file = self.scratch(request, "download", "perch")?;
        scratch::download(bundle, &file, self.settings.download_max).map(|()| (file.clone(), true)).map_err(
            |e| {
                let _ = std::fs::remove_file(&file);
                Reply::error(StatusCode::Aborted, format!("downloading {bundle}: {e}"))
            },
        )
    }

    fn scratch(&self, request: &Value, kind: &str, ext: &str) -> Result<PathBuf, Reply> {
        scratch::path(&self.settings.state_dir, request["requestid"].as_str().unwrap_or(""), kind, ext)
            .map_err(|e| Reply::error(StatusCode::Aborted, e))
    }

    fn decide(&self, action: &str) -> Result<Reply, Reply> {
        let out = self.agent([action])?;
        let mut data = Map::new();
        data.insert("exit_code".into(), json!(out.status.code()));
        data.insert("message".into(), json!(last_line(&out.stdout)));
        if let Ok(doc) = self.agent(["status", "--json"]).and_then(|o| last_json(&o)) {
            data.insert("deploy_state".into(), doc["deploy"]["state"].clone());
        }
        if let Some(mut r) = failed(&out) {
            r.data = data;
            return Err(r);
        }
        Ok(Reply::ok(data))
    }

    fn enroll(&self, inputs: &Inputs, request: &Value) -> Result<Reply, Reply> {
        let token = inputs.required("token", perch_protocol::token::MAX_TOKEN_TEXT)?;
        let device_id = inputs.string("device_id", 64)?;
        let groups = inputs.string("groups", 1024)?;
        // On argv, the token would show in `ps`: a file only this user
        // reads, made new (never an old file's mode), one per request.
        let token_file = self.scratch(request, "enroll", "token")?;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .and_then(|mut f| f.write_all(token.as_bytes()));
        written.map_err(|e| Reply::error(StatusCode::Aborted, format!("{}: {e}", token_file.display())))?;
        let mut args: Vec<OsString> = vec!["enroll".into(), "--token-file".into(), token_file.clone().into()];
        // Attached (`--opt=value`): a value is never read as an option.
        if let Some(id) = device_id {
            args.push(format!("--device-id={id}").into());
        }
        for g in groups.iter().flat_map(|g| g.split(',')).filter(|g| !g.is_empty()) {
            args.push(format!("--group={g}").into());
        }
        let out = self.agent(&args);
        let _ = std::fs::remove_file(&token_file);
        let out = out?;
        let mut data = Map::new();
        data.insert("exit_code".into(), json!(out.status.code()));
        data.insert("message".into(), json!(last_line(&out.stdout)));
        if let Ok(doc) = self.agent(["status", "--json"]).and_then(|o| last_json(&o)) {
            let e = &doc["enrollment"];
            data.insert("device_id".into(), json!(e["device_id"].as_str().unwrap_or("-")));
            data.insert("groups".into(), e["groups"].clone());
        }
        if let Some(mut r) = failed(&out) {
            r.data = data;
            return Err(r);
        }
        Ok(Reply::ok(data))
    }
}

/// The reply for a command that did not exit 0: its one-line error (the
/// CLI contract), with `refused:` before a security rejection.
fn failed(out: &Output) -> Option<Reply> {
    if out.status.success() {
        return None;
    }
    let code = out.status.code();
    let line = last_line(&out.stderr);
    let line = line.strip_prefix("perch-agent: ").unwrap_or(&line).to_string();
    let message = match code {
        Some(3) => format!("refused: {line}"),
        None => format!("perch-agent was killed: {line}"),
        _ => line,
    };
    Some(Reply::error(StatusCode::from_exit(code), message))
}

pub(super) fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The last line of the command's stdout that is a JSON document.
fn last_json(out: &Output) -> Result<Value, Reply> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .ok_or_else(|| Reply::error(StatusCode::UnknownError, "perch-agent printed no JSON"))
}

/// `NAME@COUNTER` (as `--bundle` names it) of a bundle in a status
/// document, or `-`.
fn bundle_name(b: &Value) -> String {
    match (b["name"].as_str(), b["counter"].as_u64()) {
        (Some(name), Some(counter)) => format!("{name}@{counter}"),
        _ => "-".to_string(),
    }
}

/// The `status` action's outputs, from `perch-agent status --json`.
fn status_data(doc: &Value) -> Map<String, Value> {
    let running = doc["booted_slot"].as_str();
    let slot = running.map_or(&Value::Null, |s| &doc["slots"][s]);
    let mut d = Map::new();
    d.insert("bundle".into(), json!(bundle_name(slot)));
    d.insert("version".into(), json!(slot["version"].as_str().unwrap_or("-")));
    d.insert("deploy_state".into(), doc["deploy"]["state"].clone());
    d.insert("running_slot".into(), json!(running.unwrap_or("-")));
    d.insert("last_outcome".into(), json!(doc["last_outcome"]["outcome"].as_str().unwrap_or("-")));
    d.insert("enrolled".into(), json!(doc["enrollment"]["enrolled"] == true));
    d.insert("device_id".into(), json!(doc["enrollment"]["device_id"].as_str().unwrap_or("-")));
    d.insert("link".into(), json!(doc["link"]["state"].as_str().unwrap_or("none")));
    d.insert("outbox".into(), json!(doc["outbox"]["waiting"].as_u64().unwrap_or(0)));
    d.insert("status".into(), doc.clone());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn called_by_the_symlinks_name_or_the_subcommand() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let a = os(&["/opt/choria/agent/perch", "req", "rep", RPC_REQUEST]);
        assert_eq!(invoked_as(&a).map(<[_]>::len), Some(3));
        let b = os(&["perch-agent", "choria-external", "req", "rep", RPC_REQUEST]);
        assert_eq!(invoked_as(&b).map(<[_]>::len), Some(3));
        assert!(invoked_as(&os(&["perch-agent", "status"])).is_none());
        assert!(invoked_as(&os(&["/usr/bin/perch-agent"])).is_none());
    }

    #[test]
    fn the_environment_says_which_protocol() {
        let args: Vec<OsString> = ["r", "p", RPC_REQUEST].iter().map(OsString::from).collect();
        let env = |v: &str| (v == "CHORIA_EXTERNAL_PROTOCOL").then(|| OsString::from(ACTIVATION_REQUEST));
        let call = Call::from(&args, env).unwrap();
        assert_eq!(call.protocol, ACTIVATION_REQUEST);
        assert_eq!(call.request, PathBuf::from("r"));
        assert!(Call::from(&[], |_| None).is_err());
    }

    #[test]
    fn exit_codes_become_status_codes() {
        assert_eq!(StatusCode::from_exit(Some(0)), StatusCode::Ok);
        assert_eq!(StatusCode::from_exit(Some(1)), StatusCode::Aborted);
        assert_eq!(StatusCode::from_exit(Some(2)), StatusCode::Aborted);
        assert_eq!(StatusCode::from_exit(Some(3)), StatusCode::Aborted);
        assert_eq!(StatusCode::from_exit(None), StatusCode::UnknownError);
    }

    #[test]
    fn plugin_config_lines_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("perch");
        assert_eq!(Settings::read(Some(&p)).unwrap().config, PathBuf::from(crate::cli::DEFAULT_CONFIG));
        std::fs::write(
            &p,
            "# perch\nconfig = /x/agent.toml\n\nstate_dir=/x/state\ndownload_max_bytes = 10\n",
        )
        .unwrap();
        let s = Settings::read(Some(&p)).unwrap();
        assert_eq!((s.config, s.state_dir, s.download_max), ("/x/agent.toml".into(), "/x/state".into(), 10));
        std::fs::write(&p, "colour = blue\n").unwrap();
        assert!(Settings::read(Some(&p)).unwrap_err().contains(":1: unknown key 'colour'"));
        std::fs::write(&p, "just words\n").unwrap();
        assert!(Settings::read(Some(&p)).unwrap_err().contains("not `key = value`"));
    }

    #[test]
    fn inputs_are_checked_before_anything_runs() {
        let data = json!({ "bundle": 7 });
        let i = Inputs::new(&data, &["bundle"]).unwrap();
        assert_eq!(i.required("bundle", 10).unwrap_err().code, StatusCode::InvalidData);
        let data = json!({});
        let i = Inputs::new(&data, &["bundle"]).unwrap();
        assert_eq!(i.required("bundle", 10).unwrap_err().code, StatusCode::MissingData);
        let data = json!({ "bundle": "/a", "colour": "blue" });
        assert_eq!(Inputs::new(&data, &["bundle"]).err().unwrap().code, StatusCode::InvalidData);
        let data = json!({ "bundle": "/a\n/b", "process_results": true });
        let i = Inputs::new(&data, &["bundle"]).unwrap();
        assert_eq!(i.required("bundle", 10).unwrap_err().code, StatusCode::InvalidData);
        assert_eq!(Inputs::new(&json!([1]), &[]).err().unwrap().code, StatusCode::InvalidData);
    }

    #[test]
    fn the_ddl_names_every_action_this_agent_answers() {
        let ddl: Value = serde_json::from_str(DDL).unwrap();
        assert_eq!(ddl["metadata"]["name"], AGENT);
        assert_eq!(ddl["metadata"]["provider"], "external");
        let actions: Vec<&str> =
            ddl["actions"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
        assert_eq!(actions, ["status", "install", "commit", "rollback", "enroll"]);
    }
}
