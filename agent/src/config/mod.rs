//! `agent.toml`: what device this is, which trust document it believes, and
//! how its slots, health checks and inhibit gate work.
//!
//! Unknown keys and bad values are errors that name the key and the line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use perch_support::exit::{Class, Classify};
use reader::{FieldError, Table};

mod reader;

/// Largest config file read.
const MAX_CONFIG_LEN: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    /// Device target; a bundle must list it (or list none).
    pub target: String,
    /// Path of the org trust document.
    pub trust: PathBuf,
    pub slots: Slots,
    pub health: Health,
    pub inhibit: Inhibit,
    /// File holding this boot's unique id; it changes on every boot.
    pub boot_id: PathBuf,
    /// Write the slot to disk and record progress every this many bytes.
    pub checkpoint_bytes: u64,
    pub device: DeviceConfig,
    pub enroll: EnrollConfig,
    pub link: LinkConfig,
    pub reports: ReportsConfig,
    pub fetch: FetchConfig,
}

/// Desired state and bundle fetching over the link.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// How often the desired state is read again in full.
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
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// How often the agent pings the server; a dead link is noticed after
    /// two unanswered pings, so within about three of these.
    pub ping_interval: Duration,
    /// Longest pause between reconnect attempts (they back off with jitter).
    pub max_backoff: Duration,
    /// Where to connect instead of the URLs the enrollment carries: a
    /// field site's own server, which the provisioner at the hub cannot
    /// know the device will fly from. Empty: the enrollment's.
    pub urls: Vec<String>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self { ping_interval: Duration::from_secs(10), max_backoff: Duration::from_secs(30), urls: vec![] }
    }
}

/// Reports and the outbox they wait in.
#[derive(Debug, Clone)]
pub struct ReportsConfig {
    /// How often a heartbeat (telemetry lane) is queued.
    pub heartbeat: Duration,
    /// Bytes of telemetry kept while the link is down; the oldest go first.
    pub telemetry_budget: u64,
    /// Reports sent and not yet acked by JetStream, at most.
    pub ack_window: usize,
    /// How long to wait for one JetStream ack before resending.
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
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    /// The device id (1 to 64 of A-Z a-z 0-9 - _).
    pub id: Option<String>,
    /// Else the first line of this file (e.g. /etc/machine-id); else the hostname.
    pub id_file: Option<PathBuf>,
}

/// How the device enrolls.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// A file holding an enrollment token: with it, `run` enrolls in the
    /// background until it succeeds (zero-touch first boot).
    pub token_file: Option<PathBuf>,
    /// Groups to ask for; empty means every group the token allows.
    pub groups: Vec<String>,
    /// Longest pause between enrollment attempts (they back off with jitter).
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

#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
pub struct DirSlots {
    pub root: PathBuf,
    /// Run (via `sh -c`) after `current` changes, e.g. `systemctl restart app`.
    pub restart: Option<String>,
}

/// The two block slots (devices, or plain files).
#[derive(Debug, Clone)]
pub struct SlotPaths {
    pub a: PathBuf,
    pub b: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UbootSlots {
    pub devices: SlotPaths,
    /// `fw_env.config` for fw_printenv / fw_setenv.
    pub fw_env_config: PathBuf,
    /// File whose `perch.slot=a|b` token says which slot booted.
    pub cmdline: PathBuf,
    /// Boots to try the new slot before U-Boot falls back.
    pub bootlimit: u32,
    /// Run (via `sh -c`) to reboot into the new or old slot; none = tell the operator.
    pub reboot: Option<String>,
    pub vars: UbootVars,
}

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
pub struct GrubSlots {
    pub devices: SlotPaths,
    /// The grubenv file edited with `grub-editenv`.
    pub envfile: PathBuf,
    pub cmdline: PathBuf,
    /// Menu entry ids for slot a and b.
    pub entries: SlotNames,
    pub reboot: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SlotNames {
    pub a: String,
    pub b: String,
}

fn default_entries() -> SlotNames {
    SlotNames { a: "perch-a".into(), b: "perch-b".into() }
}

/// User commands, run via `sh -c` with `PERCH_SLOT` (and `PERCH_PAYLOAD` for write) set.
#[derive(Debug, Clone)]
pub struct HookSlots {
    pub write: String,
    pub activate: String,
    pub confirm: String,
    pub rollback: String,
    /// Prints `a` or `b`: the slot running now.
    pub booted: String,
    /// Whether `activate` / `rollback` need a reboot to take effect.
    pub reboot_required: bool,
    pub reboot: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Health {
    /// Shell commands (via `sh -c`) that must exit 0.
    pub commands: Vec<String>,
    /// systemd units that must be active.
    pub units: Vec<String>,
    /// `http://` URLs that must answer 2xx.
    pub urls: Vec<String>,
    /// Time limit for one check.
    pub timeout: Duration,
    /// The whole trial: checks are retried until they all pass or this runs out.
    pub trial: Duration,
    /// Pause between rounds of checks.
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
#[derive(Debug, Clone)]
pub struct Inhibit {
    pub file: Option<PathBuf>,
    pub command: Option<String>,
    /// How often to look again.
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

impl Classify for ConfigError {
    fn class(&self) -> Option<Class> {
        Some(Class::Usage)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = perch_support::durable::read_bounded(path, MAX_CONFIG_LEN)?;
        let shown = path.display().to_string();
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::NotText { path: shown.clone() })?;
        Self::parse(&text, &shown)
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let parse_error =
            |e: FieldError| ConfigError::Parse { path: path.into(), line: e.line, message: e.message };
        let doc = reader::parse(text).map_err(parse_error)?;
        let cfg = Self::read(Table::root(text, &doc)).map_err(parse_error)?;
        cfg.validate().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        Ok(cfg)
    }

    fn read(mut t: Table<'_>) -> Result<Config, FieldError> {
        let target = t.string("target")?;
        let trust = t.path("trust")?;
        let slots = t.table("slots")?;
        let cfg = Config {
            target: t.required(target, "target")?,
            trust: t.required(trust, "trust")?,
            slots: Slots::read(t.required(slots, "slots")?)?,
            health: section(&mut t, "health", Health::read)?,
            inhibit: section(&mut t, "inhibit", Inhibit::read)?,
            boot_id: t.path("boot_id")?.unwrap_or_else(default_boot_id),
            checkpoint_bytes: t.number("checkpoint_bytes")?.unwrap_or_else(default_checkpoint),
            device: section(&mut t, "device", DeviceConfig::read)?,
            enroll: section(&mut t, "enroll", EnrollConfig::read)?,
            link: section(&mut t, "link", LinkConfig::read)?,
            reports: section(&mut t, "reports", ReportsConfig::read)?,
            fetch: section(&mut t, "fetch", FetchConfig::read)?,
        };
        t.finish()?;
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
        if let Some(u) = self.link.urls.iter().find(|u| !perch_protocol::token::valid_url(u)) {
            return Err(format!("link.urls: '{}' must be a nats:// or tls:// URL", u.escape_default()));
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
            // The drones' boot script counts with U-Boot's setexpr and
            // itest, which read hex: 10 would mean 16 boots.
            if !(1..=9).contains(&u.bootlimit) {
                return Err("slots.bootlimit: must be 1 to 9 (U-Boot's boot script reads it as hex)".into());
            }
        }
        Ok(())
    }
}

/// An optional section: its defaults, with what the table sets on top.
fn section<'a, T: Default>(
    t: &mut Table<'a>,
    key: &str,
    read: fn(&mut Table<'a>, &mut T) -> Result<(), FieldError>,
) -> Result<T, FieldError> {
    let mut value = T::default();
    if let Some(mut table) = t.table(key)? {
        read(&mut table, &mut value)?;
        table.finish()?;
    }
    Ok(value)
}

impl FetchConfig {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        t.set("resync", &mut c.resync, Table::duration)?;
        t.set("window", &mut c.window, Table::number)?;
        t.set("budget", &mut c.budget, Table::number)
    }
}

impl LinkConfig {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        t.set("ping_interval", &mut c.ping_interval, Table::duration)?;
        t.set("max_backoff", &mut c.max_backoff, Table::duration)?;
        t.set("urls", &mut c.urls, Table::strings)
    }
}

impl ReportsConfig {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        t.set("heartbeat", &mut c.heartbeat, Table::duration)?;
        t.set("telemetry_budget", &mut c.telemetry_budget, Table::number)?;
        t.set("ack_window", &mut c.ack_window, Table::number)?;
        t.set("ack_timeout", &mut c.ack_timeout, Table::duration)
    }
}

impl DeviceConfig {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        c.id = t.string("id")?;
        c.id_file = t.path("id_file")?;
        Ok(())
    }
}

impl EnrollConfig {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        c.token_file = t.path("token_file")?;
        t.set("groups", &mut c.groups, Table::strings)?;
        t.set("max_backoff", &mut c.max_backoff, Table::duration)
    }
}

impl Health {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        t.set("commands", &mut c.commands, Table::strings)?;
        t.set("units", &mut c.units, Table::strings)?;
        t.set("urls", &mut c.urls, Table::strings)?;
        t.set("timeout", &mut c.timeout, Table::duration)?;
        t.set("trial", &mut c.trial, Table::duration)?;
        t.set("interval", &mut c.interval, Table::duration)
    }
}

impl Inhibit {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        c.file = t.path("file")?;
        c.command = t.string("command")?;
        t.set("poll", &mut c.poll, Table::duration)
    }
}

impl UbootVars {
    fn read(t: &mut Table<'_>, c: &mut Self) -> Result<(), FieldError> {
        t.set("slot", &mut c.slot, Table::string)?;
        t.set("upgrade_available", &mut c.upgrade_available, Table::string)?;
        t.set("bootcount", &mut c.bootcount, Table::string)?;
        t.set("bootlimit", &mut c.bootlimit, Table::string)
    }
}

impl SlotPaths {
    fn read(mut t: Table<'_>) -> Result<Self, FieldError> {
        let (a, b) = (t.path("a")?, t.path("b")?);
        let paths = SlotPaths { a: t.required(a, "a")?, b: t.required(b, "b")? };
        t.finish()?;
        Ok(paths)
    }
}

impl SlotNames {
    fn read(mut t: Table<'_>) -> Result<Self, FieldError> {
        let (a, b) = (t.string("a")?, t.string("b")?);
        let names = SlotNames { a: t.required(a, "a")?, b: t.required(b, "b")? };
        t.finish()?;
        Ok(names)
    }
}

impl Slots {
    /// `[slots]`: `backend` picks the variant, whose keys sit beside it.
    fn read(mut t: Table<'_>) -> Result<Self, FieldError> {
        let backend = t.string("backend")?;
        let backend = t.required(backend, "backend")?;
        let devices = |t: &mut Table<'_>| -> Result<SlotPaths, FieldError> {
            let d = t.table("devices")?;
            SlotPaths::read(t.required(d, "devices")?)
        };
        let slots = match backend.as_str() {
            "dir" => {
                let root = t.path("root")?;
                Slots::Dir(DirSlots { root: t.required(root, "root")?, restart: t.string("restart")? })
            }
            "uboot" => {
                let devices = devices(&mut t)?;
                let fw_env_config = t.path("fw_env_config")?;
                Slots::Uboot(UbootSlots {
                    devices,
                    fw_env_config: t.required(fw_env_config, "fw_env_config")?,
                    cmdline: t.path("cmdline")?.unwrap_or_else(default_cmdline),
                    bootlimit: t.number("bootlimit")?.unwrap_or_else(default_bootlimit),
                    reboot: t.string("reboot")?,
                    vars: section(&mut t, "vars", UbootVars::read)?,
                })
            }
            "grub" => {
                let devices = devices(&mut t)?;
                let envfile = t.path("envfile")?;
                Slots::Grub(GrubSlots {
                    devices,
                    envfile: t.required(envfile, "envfile")?,
                    cmdline: t.path("cmdline")?.unwrap_or_else(default_cmdline),
                    entries: match t.table("entries")? {
                        Some(e) => SlotNames::read(e)?,
                        None => default_entries(),
                    },
                    reboot: t.string("reboot")?,
                })
            }
            "hook" => {
                let mut cmd = |key: &str| -> Result<String, FieldError> {
                    let v = t.string(key)?;
                    t.required(v, key)
                };
                let (write, activate, confirm) = (cmd("write")?, cmd("activate")?, cmd("confirm")?);
                let (rollback, booted) = (cmd("rollback")?, cmd("booted")?);
                Slots::Hook(HookSlots {
                    write,
                    activate,
                    confirm,
                    rollback,
                    booted,
                    reboot_required: t.bool("reboot_required")?.unwrap_or(false),
                    reboot: t.string("reboot")?,
                })
            }
            other => {
                return Err(FieldError {
                    line: t.line(),
                    message: format!("slots.backend: '{other}' is not one of dir, uboot, grub, hook"),
                })
            }
        };
        t.finish()?;
        Ok(slots)
    }
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
    fn bootlimit_is_one_digit_because_u_boot_reads_it_as_hex() {
        let with = |n: &str| {
            Config::parse(
                &GOOD.replace("fw_env_config", &format!("bootlimit = {n}\nfw_env_config")),
                "agent.toml",
            )
        };
        for ok in ["1", "9"] {
            with(ok).unwrap();
        }
        for bad in ["0", "10"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("slots.bootlimit: must be 1 to 9"), "{e}");
        }
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
        assert!(e.contains("health: unknown key `colour`"), "{e}");
        assert!(e.starts_with("agent.toml:11:"), "{e}");
        let e = Config::parse(&GOOD.replace("uboot", "floppy"), "agent.toml").unwrap_err().to_string();
        assert!(e.contains("floppy"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn the_shipped_templates_parse() {
        let desktop = include_str!("../../../targets/x86_64-desktop/agent.toml");
        let c = Config::parse(desktop, "x86_64-desktop/agent.toml").unwrap();
        assert_eq!(c.enroll.max_backoff, Duration::from_secs(300));
        assert!(c.device.id_file.is_some());
        for (name, text) in [
            ("aarch64-drone", include_str!("../../../targets/aarch64-drone/agent.toml")),
            ("armv7-drone", include_str!("../../../targets/armv7-drone/agent.toml")),
        ] {
            let c = Config::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(matches!(c.slots, Slots::Uboot(_)), "{name}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
            let _ = Config::parse(&s, "x.toml");
        }
    }
}
