//! `agent.toml`: what device this is, which trust document it believes, and
//! how its slots, health checks and inhibit gate work.
//!
//! Unknown keys and bad values are errors that name the key and the line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Largest config file read.
const MAX_CONFIG_LEN: usize = 256 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device target; a bundle must list it (or list none).
    pub target: String,
    /// Path of the org trust document.
    pub trust: PathBuf,
    pub slots: Slots,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub inhibit: Inhibit,
    /// File holding this boot's unique id; it changes on every boot.
    #[serde(default = "default_boot_id")]
    pub boot_id: PathBuf,
    /// Write the slot to disk and record progress every this many bytes.
    #[serde(default = "default_checkpoint")]
    pub checkpoint_bytes: u64,
    #[serde(default)]
    pub device: DeviceConfig,
    #[serde(default)]
    pub enroll: EnrollConfig,
    #[serde(default)]
    pub link: LinkConfig,
    #[serde(default)]
    pub reports: ReportsConfig,
    #[serde(default)]
    pub fetch: FetchConfig,
}

/// Desired state and bundle fetching over the link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// How often the desired state is read again in full.
    #[serde(deserialize_with = "duration")]
    pub resync: Duration,
    /// Chunk requests in flight ahead of the install.
    pub window: usize,
    /// Bytes one bundle may pull over the link; 0 = no limit.
    pub budget: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self { resync: Duration::from_secs(30), window: 4, budget: 0 }
    }
}

/// The FLEET link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// How often the agent pings the server; a dead link is noticed after
    /// two unanswered pings, so within about three of these.
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// Longest pause between reconnect attempts (they back off with jitter).
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self { ping_interval: Duration::from_secs(10), max_backoff: Duration::from_secs(30) }
    }
}

/// Reports and the outbox they wait in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// How often a heartbeat (telemetry lane) is queued.
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Duration,
    /// Bytes of telemetry kept while the link is down; the oldest go first.
    pub telemetry_budget: u64,
    /// Reports sent and not yet acked by JetStream, at most.
    pub ack_window: usize,
    /// How long to wait for one JetStream ack before resending.
    #[serde(deserialize_with = "duration")]
    pub ack_timeout: Duration,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(60),
            telemetry_budget: 4 << 20,
            ack_window: 64,
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// Who this device is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// The device id (1 to 64 of A-Z a-z 0-9 - _).
    pub id: Option<String>,
    /// Else the first line of this file (e.g. /etc/machine-id); else the hostname.
    pub id_file: Option<PathBuf>,
}

/// How the device enrolls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollConfig {
    /// A file holding an enrollment token: with it, `run` enrolls in the
    /// background until it succeeds (zero-touch first boot).
    pub token_file: Option<PathBuf>,
    /// Groups to ask for; empty means every group the token allows.
    pub groups: Vec<String>,
    /// Longest pause between enrollment attempts (they back off with jitter).
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl Default for EnrollConfig {
    fn default() -> Self {
        Self { token_file: None, groups: vec![], max_backoff: Duration::from_secs(60) }
    }
}

fn default_boot_id() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}

fn default_checkpoint() -> u64 {
    32 << 20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum Slots {
    Dir(DirSlots),
    Uboot(UbootSlots),
    Grub(GrubSlots),
    Hook(HookSlots),
}

impl Slots {
    pub fn backend_name(&self) -> &'static str {
        match self {
            Slots::Dir(_) => "dir",
            Slots::Uboot(_) => "uboot",
            Slots::Grub(_) => "grub",
            Slots::Hook(_) => "hook",
        }
    }
}

/// Directory slots: `ROOT/a`, `ROOT/b`, and the `ROOT/current` symlink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSlots {
    pub root: PathBuf,
    /// Run (via `sh -c`) after `current` changes, e.g. `systemctl restart app`.
    pub restart: Option<String>,
}

/// The two block slots (devices, or plain files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotPaths {
    pub a: PathBuf,
    pub b: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UbootSlots {
    pub devices: SlotPaths,
    /// `fw_env.config` for fw_printenv / fw_setenv.
    pub fw_env_config: PathBuf,
    /// File whose `perch.slot=a|b` token says which slot booted.
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Boots to try the new slot before U-Boot falls back.
    #[serde(default = "default_bootlimit")]
    pub bootlimit: u32,
    /// Run (via `sh -c`) to reboot into the new or old slot; none = tell the operator.
    pub reboot: Option<String>,
    #[serde(default)]
    pub vars: UbootVars,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UbootVars {
    pub slot: String,
    pub upgrade_available: String,
    pub bootcount: String,
    pub bootlimit: String,
}

impl Default for UbootVars {
    fn default() -> Self {
        Self {
            slot: "perch_slot".into(),
            upgrade_available: "upgrade_available".into(),
            bootcount: "bootcount".into(),
            bootlimit: "bootlimit".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrubSlots {
    pub devices: SlotPaths,
    /// The grubenv file edited with `grub-editenv`.
    pub envfile: PathBuf,
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Menu entry ids for slot a and b.
    #[serde(default = "default_entries")]
    pub entries: SlotNames,
    pub reboot: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotNames {
    pub a: String,
    pub b: String,
}

fn default_entries() -> SlotNames {
    SlotNames { a: "perch-a".into(), b: "perch-b".into() }
}

/// User commands, run via `sh -c` with `PERCH_SLOT` (and `PERCH_PAYLOAD` for write) set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSlots {
    pub write: String,
    pub activate: String,
    pub confirm: String,
    pub rollback: String,
    /// Prints `a` or `b`: the slot running now.
    pub booted: String,
    /// Whether `activate` / `rollback` need a reboot to take effect.
    #[serde(default)]
    pub reboot_required: bool,
    pub reboot: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Shell commands (via `sh -c`) that must exit 0.
    pub commands: Vec<String>,
    /// systemd units that must be active.
    pub units: Vec<String>,
    /// `http://` URLs that must answer 2xx.
    pub urls: Vec<String>,
    /// Time limit for one check.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// The whole trial: checks are retried until they all pass or this runs out.
    #[serde(deserialize_with = "duration")]
    pub trial: Duration,
    /// Pause between rounds of checks.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            commands: vec![],
            units: vec![],
            urls: vec![],
            timeout: Duration::from_secs(10),
            trial: Duration::from_secs(120),
            interval: Duration::from_secs(2),
        }
    }
}

/// "Not now": while the file exists, or the command does not exit 0,
/// activation waits. Staging does not.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Inhibit {
    pub file: Option<PathBuf>,
    pub command: Option<String>,
    /// How often to look again.
    #[serde(deserialize_with = "duration")]
    pub poll: Duration,
}

impl Default for Inhibit {
    fn default() -> Self {
        Self { file: None, command: None, poll: Duration::from_secs(5) }
    }
}

fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

fn default_bootlimit() -> u32 {
    3
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("'{s}' is not a duration ({e})")))
}

/// Why the config could not be used. Always a config error (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Read(#[from] perch_support::durable::ReadError),
    #[error("{path}: not UTF-8")]
    NotText { path: String },
    #[error("{path}:{line}: {message}")]
    Parse { path: String, line: usize, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = perch_support::durable::read_bounded(path, MAX_CONFIG_LEN)?;
        let shown = path.display().to_string();
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::NotText { path: shown.clone() })?;
        Self::parse(&text, &shown)
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let start = e.span().map(|s| s.start.min(text.len())).unwrap_or(0);
            let mut line = text[..start].lines().count().max(1);
            // toml points an unknown key at its table; point at the key itself.
            if let Some(key) = e.message().strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                if let Some(n) = text.lines().enumerate().skip(line - 1).find_map(|(i, l)| {
                    let k = l.split('=').next().unwrap_or("").trim();
                    (k == key).then_some(i + 1)
                }) {
                    line = n;
                }
            }
            ConfigError::Parse { path: path.into(), line, message: one_line(e.message()) }
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.target.is_empty() {
            return Err("target: must not be empty".into());
        }
        if self.checkpoint_bytes == 0 {
            return Err("checkpoint_bytes: must be above 0".into());
        }
        let h = &self.health;
        if h.timeout.is_zero() || h.trial.is_zero() {
            return Err("health.timeout and health.trial must be above 0".into());
        }
        for u in &h.urls {
            if !u.starts_with("http://") {
                return Err(format!("health.urls: '{u}' must start with http:// (health checks are local)"));
            }
        }
        if let Some(id) = &self.device.id {
            if !perch_protocol::subjects::is_token(id) {
                return Err(format!("device.id: '{id}' must be 1 to 64 of A-Z a-z 0-9 - _"));
            }
        }
        if let Some(g) = self.enroll.groups.iter().find(|g| !perch_protocol::subjects::is_token(g)) {
            return Err(format!("enroll.groups: '{g}' must be 1 to 64 of A-Z a-z 0-9 - _"));
        }
        if self.enroll.max_backoff.is_zero() {
            return Err("enroll.max_backoff must be above 0".into());
        }
        if self.link.ping_interval < Duration::from_millis(100) || self.link.max_backoff.is_zero() {
            return Err("link.ping_interval must be at least 100ms and link.max_backoff above 0".into());
        }
        if self.fetch.resync < Duration::from_millis(100) || self.fetch.window == 0 {
            return Err("fetch.resync must be at least 100ms and fetch.window above 0".into());
        }
        let r = &self.reports;
        if r.heartbeat < Duration::from_millis(1) || r.ack_window == 0 || r.ack_timeout.is_zero() {
            return Err(
                "reports.heartbeat, reports.ack_window and reports.ack_timeout must be above 0".into()
            );
        }
        if let Slots::Uboot(u) = &self.slots {
            if u.bootlimit == 0 {
                return Err("slots.bootlimit: must be at least 1".into());
            }
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
target = "aarch64-drone"
trust = "/etc/perch/trust.doc"

[slots]
backend = "uboot"
devices = { a = "/dev/mmcblk0p2", b = "/dev/mmcblk0p3" }
fw_env_config = "/etc/fw_env.config"

[health]
commands = ["true"]
timeout = "3s"
trial = "1m"
"#;

    #[test]
    fn parses_a_good_config() {
        let c = Config::parse(GOOD, "agent.toml").unwrap();
        assert_eq!(c.health.trial, Duration::from_secs(60));
        let Slots::Uboot(u) = c.slots else { panic!() };
        assert_eq!(u.bootlimit, 3);
        assert_eq!(u.vars.slot, "perch_slot");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let e = Config::parse(&GOOD.replace("timeout = \"3s\"", "timeout = \"3 parsecs\""), "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.toml:12:"), "{e}");
        assert!(e.contains("3 parsecs"), "{e}");
        let e = Config::parse(&GOOD.replace("[health]", "[health]\ncolour = 1"), "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.starts_with("agent.toml:11:"), "{e}");
        let e = Config::parse(&GOOD.replace("uboot", "floppy"), "agent.toml").unwrap_err().to_string();
        assert!(e.contains("floppy"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn the_shipped_templates_parse() {
        let desktop = include_str!("../../targets/x86_64-desktop/agent.toml");
        let c = Config::parse(desktop, "x86_64-desktop/agent.toml").unwrap();
        assert_eq!(c.enroll.max_backoff, Duration::from_secs(300));
        assert!(c.device.id_file.is_some());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
            let _ = Config::parse(&s, "x.toml");
        }
    }
}
