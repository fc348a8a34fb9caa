//! The agent's command line.
//!
//! Parsed with lexopt and written out by hand, as ripgrep does: clap cost
//! the agent about 130 KB of its 3 MB budget (docs: operations/benchmarks).
//! Every error is one line and exit code 2 (the CLI contract); `--help`
//! and `--version` print to stdout and exit 0.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

pub const DEFAULT_CONFIG: &str = "/etc/perch/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/perch";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    /// The agent config (agent.toml).
    pub config: PathBuf,
    /// Where the agent keeps its journal.
    pub state_dir: PathBuf,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Install {
        bundle: PathBuf,
        json: bool,
    },
    Status {
        json: bool,
    },
    Commit,
    Rollback,
    Run {
        once: bool,
    },
    Enroll(EnrollArgs),
    /// `trust`: the file given, or (None) the config's, whose target is
    /// then checked too unless `target` is given.
    Check {
        trust: Option<PathBuf>,
        target: Option<String>,
        bundle: PathBuf,
        json: bool,
    },
    /// `trust update FILE`: take a newer trust document by its rotation chain.
    TrustUpdate {
        file: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollArgs {
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub wait: bool,
    pub timeout: Duration,
    pub device_id: Option<String>,
    pub groups: Vec<String>,
    pub request_out: Option<PathBuf>,
    pub import: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Run(Cli),
    /// Print this help text and exit 0.
    Help(&'static str),
    /// Print the version and exit 0.
    Version,
}

/// A command line that cannot be run (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Lex(#[from] lexopt::Error),
    #[error("unknown command '{0}'{suggestion}", suggestion = suggest(.0))]
    UnknownCommand(String),
    #[error("no command given")]
    NoCommand,
    #[error("'{command}' needs {what}")]
    Missing { command: &'static str, what: &'static str },
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{0} given twice")]
    Twice(&'static str),
    #[error("{0} cannot be used with {1}")]
    Conflict(&'static str, &'static str),
    #[error("--timeout: '{0}' is not a duration ({1})")]
    Duration(String, humantime::DurationError),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Name {
    Install,
    Status,
    Commit,
    Rollback,
    Run,
    Enroll,
    Check,
    Trust,
}

/// The commands, for suggestions.
const COMMANDS: [&str; 8] = ["install", "status", "commit", "rollback", "run", "enroll", "check", "trust"];

/// `" (did you mean 'install'?)"` for a command one or two edits from a
/// real one (`instal`, `stauts`), else nothing (`trust bogus` too).
fn suggest(given: &str) -> String {
    COMMANDS
        .iter()
        .map(|c| (edits(given, c), c))
        .filter(|(d, _)| *d <= 2 && !given.contains(' '))
        .min()
        .map(|(_, c)| format!(" (did you mean '{c}'?)"))
        .unwrap_or_default()
}

/// Levenshtein distance (the command names are short).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

impl Name {
    fn from(s: &str) -> Option<Name> {
        Some(match s {
            "install" => Name::Install,
            "status" => Name::Status,
            "commit" => Name::Commit,
            "rollback" => Name::Rollback,
            "run" => Name::Run,
            "enroll" => Name::Enroll,
            "check" => Name::Check,
            "trust" => Name::Trust,
            _ => return None,
        })
    }

    fn help(self) -> &'static str {
        match self {
            Name::Install => HELP_INSTALL,
            Name::Status => HELP_STATUS,
            Name::Commit => HELP_COMMIT,
            Name::Rollback => HELP_ROLLBACK,
            Name::Run => HELP_RUN,
            Name::Enroll => HELP_ENROLL,
            Name::Check => HELP_CHECK,
            Name::Trust => HELP_TRUST,
        }
    }
}

/// An option's value: attached (`--opt=VALUE`) or the next argument, which
/// must not look like an option (`--request-out --wait` is a mistake, not a
/// file named `--wait`).
fn value(p: &mut lexopt::Parser, name: &'static str) -> Result<OsString, CliError> {
    if let Some(v) = p.optional_value() {
        return Ok(v);
    }
    let v = p.value()?;
    if v.to_str().is_some_and(|s| s.len() > 1 && s.starts_with('-')) {
        return Err(CliError::MissingValue(name));
    }
    Ok(v)
}

fn string(p: &mut lexopt::Parser, name: &'static str) -> Result<String, CliError> {
    Ok(value(p, name)?.string()?)
}

/// Sets an option that may be given once.
fn once<T>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), CliError> {
    if slot.is_some() {
        return Err(CliError::Twice(name));
    }
    *slot = Some(value);
    Ok(())
}

/// Parses `args` (the program name first); `env` looks up PERCH_CONFIG
/// and PERCH_STATE_DIR, which stand in for the options when they are not
/// given (an empty variable counts as unset).
pub fn parse<I>(args: I, env: impl Fn(&str) -> Option<OsString>) -> Result<Parsed, CliError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut p = lexopt::Parser::from_iter(args);
    let (mut config, mut state_dir) = (None::<PathBuf>, None::<PathBuf>);
    let mut name = None::<Name>;
    let mut positional = Vec::<OsString>::new();
    let (mut json, mut once_flag, mut wait) = (false, false, false);
    let (mut token, mut token_file, mut timeout) = (None, None, None);
    let (mut device_id, mut request_out, mut import) = (None, None, None);
    let mut groups = Vec::new();
    let (mut trust, mut target) = (None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(name.map_or(HELP, Name::help))),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            // Global: before or after the command.
            Long("config") => once(&mut config, value(&mut p, "--config")?.into(), "--config")?,
            Long("state-dir") => once(&mut state_dir, value(&mut p, "--state-dir")?.into(), "--state-dir")?,
            Value(v) if name.is_none() => {
                let v = v.string()?;
                if v == "help" {
                    // `perch-agent help [COMMAND]`
                    return match p.next()? {
                        None => Ok(Parsed::Help(HELP)),
                        Some(Value(c)) => {
                            let c = c.string()?;
                            Name::from(&c).map(|n| Parsed::Help(n.help())).ok_or(CliError::UnknownCommand(c))
                        }
                        Some(other) => Err(other.unexpected().into()),
                    };
                }
                name = Some(Name::from(&v).ok_or(CliError::UnknownCommand(v))?);
            }
            Long("json") if matches!(name, Some(Name::Status | Name::Install | Name::Check)) => json = true,
            Long("once") if name == Some(Name::Run) => once_flag = true,
            Long("token") if name == Some(Name::Enroll) => {
                once(&mut token, string(&mut p, "--token")?, "--token")?
            }
            Long("token-file") if name == Some(Name::Enroll) => {
                once(&mut token_file, value(&mut p, "--token-file")?.into(), "--token-file")?
            }
            Long("wait") if name == Some(Name::Enroll) => wait = true,
            Long("timeout") if name == Some(Name::Enroll) => {
                let v = string(&mut p, "--timeout")?;
                let d = humantime::parse_duration(&v).map_err(|e| CliError::Duration(v, e))?;
                once(&mut timeout, d, "--timeout")?
            }
            Long("device-id") if name == Some(Name::Enroll) => {
                once(&mut device_id, string(&mut p, "--device-id")?, "--device-id")?
            }
            Long("group") if name == Some(Name::Enroll) => groups.push(string(&mut p, "--group")?),
            Long("request-out") if name == Some(Name::Enroll) => {
                once(&mut request_out, value(&mut p, "--request-out")?.into(), "--request-out")?
            }
            Long("import") if name == Some(Name::Enroll) => {
                once(&mut import, value(&mut p, "--import")?.into(), "--import")?
            }
            Long("trust") if name == Some(Name::Check) => {
                once(&mut trust, PathBuf::from(value(&mut p, "--trust")?), "--trust")?
            }
            Long("target") if name == Some(Name::Check) => {
                once(&mut target, string(&mut p, "--target")?, "--target")?
            }
            Value(v) if matches!(name, Some(Name::Install | Name::Check | Name::Trust)) => positional.push(v),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let Some(name) = name else { return Err(CliError::NoCommand) };
    let one_file = |command: &'static str, positional: Vec<OsString>| -> Result<PathBuf, CliError> {
        let mut it = positional.into_iter();
        match (it.next(), it.next()) {
            (Some(f), None) => Ok(f.into()),
            (None, _) => Err(CliError::Missing { command, what: "a BUNDLE file" }),
            (Some(_), Some(extra)) => Err(lexopt::Error::UnexpectedArgument(extra).into()),
        }
    };
    let command = match name {
        Name::Install => Command::Install { bundle: one_file("install", positional)?, json },
        Name::Status => Command::Status { json },
        Name::Commit => Command::Commit,
        Name::Rollback => Command::Rollback,
        Name::Run => Command::Run { once: once_flag },
        Name::Check => Command::Check { trust, target, bundle: one_file("check", positional)?, json },
        Name::Trust => {
            let mut it = positional.into_iter();
            match (it.next().map(|v| v.string()).transpose()?.as_deref(), it.next(), it.next()) {
                (Some("update"), Some(file), None) => Command::TrustUpdate { file: file.into() },
                (Some("update"), None, _) => {
                    return Err(CliError::Missing { command: "trust update", what: "a FILE" })
                }
                (Some("update"), Some(_), Some(extra)) => {
                    return Err(lexopt::Error::UnexpectedArgument(extra).into())
                }
                (Some(other), _, _) => return Err(CliError::UnknownCommand(format!("trust {other}"))),
                (None, _, _) => {
                    return Err(CliError::Missing { command: "trust", what: "a subcommand (update)" })
                }
            }
        }
        Name::Enroll => {
            let given = [
                ("--token", token.is_some()),
                ("--token-file", token_file.is_some()),
                ("--import", import.is_some()),
                ("--request-out", request_out.is_some()),
                ("--wait", wait),
            ];
            // Pairs that cannot go together: the token is read from one
            // place; an import or a request file is the offline path,
            // which neither carries a token to import nor waits.
            const CONFLICTS: [(&str, &str); 6] = [
                ("--token", "--token-file"),
                ("--token", "--import"),
                ("--token-file", "--import"),
                ("--request-out", "--import"),
                ("--request-out", "--wait"),
                ("--import", "--wait"),
            ];
            let on = |n: &str| given.iter().any(|(g, set)| *g == n && *set);
            if let Some((a, b)) = CONFLICTS.into_iter().find(|(a, b)| on(a) && on(b)) {
                return Err(CliError::Conflict(a, b));
            }
            Command::Enroll(EnrollArgs {
                token,
                token_file,
                wait,
                timeout: timeout.unwrap_or(Duration::from_secs(120)),
                device_id,
                groups,
                request_out,
                import,
            })
        }
    };
    let from_env = |var: &str, default: &str| {
        env(var).filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    Ok(Parsed::Run(Cli {
        config: config.unwrap_or_else(|| from_env("PERCH_CONFIG", DEFAULT_CONFIG)),
        state_dir: state_dir.unwrap_or_else(|| from_env("PERCH_STATE_DIR", DEFAULT_STATE_DIR)),
        command,
    }))
}

const HELP: &str = "\
perch-agent: the perch device agent. A/B installs with trial and rollback.

Usage: perch-agent [--config FILE] [--state-dir DIR] COMMAND [OPTIONS]

Commands:
  install BUNDLE   Install a bundle into the inactive slot, activate it and run its trial
  status           Show the running slot, each slot's bundle, the deploy state and the last outcome
  commit           Commit the slot on trial now
  rollback         Roll back the trial (or the last committed deploy) to the other slot
  run              Finish whatever the journal says is in flight (run at every boot), then stay up
  enroll           Enroll this device: online with a token, or offline with files
  check BUNDLE     Check a bundle offline against the trust document. Writes nothing
  trust update FILE  Take a newer trust document (root-signed and signed by a threshold of the current release keys)
  help [COMMAND]   Print this help, or one command's
  choria-external REQUEST REPLY PROTOCOL
                   Answer a Choria server's call (the `perch` external agent; it runs
                   perch-agent as `perch` from its agent directory)

Options (before or after the command):
  --config FILE    The agent config [env: PERCH_CONFIG] [default: /etc/perch/agent.toml]
  --state-dir DIR  Where the agent keeps its journal [env: PERCH_STATE_DIR] [default: /var/lib/perch]
  -h, --help       Print help
  -V, --version    Print the version

Exit codes: 0 success, 1 runtime failure, 2 usage or config error, 3 refused for security.
";

const HELP_TRUST: &str = "\
Take a newer trust document: it must be root-signed and signed by a threshold
of the accepted document's release keys (`perch-bootstrap trust sign`).
Installs it at the config's `trust` path and records its version: older
versions are refused from then on (exit 3).

Usage: perch-agent trust update FILE
";

const HELP_INSTALL: &str = "\
Install a bundle into the inactive slot, activate it and run its trial.

Usage: perch-agent install [--json] BUNDLE

Resumes a staging that a crash interrupted. Exit code 1 if the trial failed and the device rolled back.

Options:
  --json  Say nothing while it works; print how it ended as one JSON document
";

const HELP_STATUS: &str = "\
Show the running slot, each slot's bundle, the deploy state and the last outcome.

Usage: perch-agent status [--json]

Options:
  --json  Print one JSON document
";

const HELP_COMMIT: &str = "\
Commit the slot on trial now.

Usage: perch-agent commit
";

const HELP_ROLLBACK: &str = "\
Roll back the trial (or the last committed deploy) to the other slot.

Usage: perch-agent rollback
";

const HELP_RUN: &str = "\
Finish whatever the journal says is in flight (run at every boot), then stay up:
follow the desired state, fetch and install bundles, send reports.

Usage: perch-agent run [--once]

Options:
  --once  Do the pending work, then exit instead of staying up
";

const HELP_ENROLL: &str = "\
Enroll this device: online with a token, or offline with files.

Usage: perch-agent enroll [OPTIONS]

Options:
  --token TOKEN        The enrollment token text (prefer --token-file: command lines are visible to other users)
  --token-file FILE    A file holding the enrollment token [default: enroll.token_file from the config]
  --wait               Keep trying until enrolled: through outages and pending approval
  --timeout DURATION   Without --wait, give up after this long [default: 2m]
  --device-id ID       This device's id [default: device.id, device.id_file or the hostname]
  --group G            A group to ask for; repeat for several [default: enroll.groups, else all the token allows]
  --request-out FILE   Offline: write a signed enrollment request to FILE for a technician
                       (with --token or --token-file, the request carries the token)
  --import FILE        Offline: import the enrollment a technician made with `perch-bootstrap sign-request`
";

const HELP_CHECK: &str = "\
Check a bundle offline against the trust document. Writes nothing.

Usage: perch-agent check [--trust TRUST] [--target TARGET] [--json] BUNDLE

Options:
  --trust TRUST      The org trust document (default: the config's `trust`,
                     and then the config's `target` is checked too)
  --target TARGET    The device target to check compatibility with
  --json             Print what was checked as one JSON document
";

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<OsString> {
        (var == "PERCH_STATE_DIR").then(|| "/env/state".into())
    }

    fn run(args: &[&str]) -> Result<Cli, String> {
        match parse(std::iter::once("perch-agent").chain(args.iter().copied()), env) {
            Ok(Parsed::Run(c)) => Ok(c),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn a_mistyped_command_gets_a_suggestion() {
        assert_eq!(run(&["instal", "x"]).unwrap_err(), "unknown command 'instal' (did you mean 'install'?)");
        assert_eq!(run(&["stauts"]).unwrap_err(), "unknown command 'stauts' (did you mean 'status'?)");
        assert_eq!(run(&["frobnicate"]).unwrap_err(), "unknown command 'frobnicate'");
        assert_eq!(run(&["trust", "updat", "f"]).unwrap_err(), "unknown command 'trust updat'");
    }

    #[test]
    fn globals_go_before_or_after_the_command_and_env_fills_in() {
        let c = run(&["--config", "a.toml", "status", "--json"]).unwrap();
        assert_eq!(c.config, PathBuf::from("a.toml"));
        assert_eq!(c.state_dir, PathBuf::from("/env/state"));
        assert_eq!(c.command, Command::Status { json: true });
        let c = run(&["install", "-", "--state-dir=/s"]).unwrap();
        assert_eq!(c.config, PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.command, Command::Install { bundle: "-".into(), json: false });
        let c = run(&["trust", "update", "new.doc"]).unwrap();
        assert_eq!(c.command, Command::TrustUpdate { file: "new.doc".into() });
        let c = run(&["enroll", "--device-id=-odd"]).unwrap();
        let Command::Enroll(e) = c.command else { panic!() };
        assert_eq!(e.device_id.as_deref(), Some("-odd"), "an attached value may start with -");
    }

    #[test]
    fn enroll_takes_its_options_and_refuses_conflicts() {
        let c =
            run(&["enroll", "--token-file", "t", "--group", "a", "--group", "b", "--timeout", "5s"]).unwrap();
        let Command::Enroll(e) = c.command else { panic!() };
        assert_eq!(e.groups, ["a", "b"]);
        assert_eq!(e.timeout, Duration::from_secs(5));
        assert_eq!(e.token_file, Some("t".into()));
        assert_eq!(
            run(&["enroll"]).map(|c| c.command),
            run(&["enroll", "--timeout", "2m"]).map(|c| c.command)
        );
        let e = run(&["enroll", "--import", "r", "--wait"]).unwrap_err();
        assert_eq!(e, "--import cannot be used with --wait");
        let e = run(&["enroll", "--token", "x", "--token", "y"]).unwrap_err();
        assert_eq!(e, "--token given twice");
        assert!(run(&["enroll", "--timeout", "soon"]).unwrap_err().contains("'soon' is not a duration"));
    }

    #[test]
    fn mistakes_are_one_line_errors() {
        for (args, want) in [
            (&[][..], "no command given"),
            (&["fly"][..], "unknown command 'fly'"),
            (&["status", "--once"][..], "invalid option '--once'"),
            (&["install"][..], "'install' needs a BUNDLE file"),
            (&["install", "a", "b"][..], "unexpected argument \"b\""),
            (&["check"][..], "'check' needs a BUNDLE file"),
            (&["--config"][..], "missing argument for option '--config'"),
            (&["commit", "--json"][..], "invalid option '--json'"),
            (&["enroll", "--request-out", "--wait"][..], "--request-out needs a value"),
            (&["--config", "--state-dir", "/s", "status"][..], "--config needs a value"),
            (&["help", "fly"][..], "unknown command 'fly'"),
            (&["trust"][..], "'trust' needs a subcommand (update)"),
            (&["trust", "update"][..], "'trust update' needs a FILE"),
            (&["trust", "push", "f"][..], "unknown command 'trust push'"),
            (&["trust", "update", "a", "b"][..], "unexpected argument \"b\""),
        ] {
            let e = run(args).unwrap_err();
            assert_eq!(e, want, "{args:?}");
        }
    }

    #[test]
    fn help_and_version() {
        let p =
            |args: &[&str]| parse(std::iter::once("perch-agent").chain(args.iter().copied()), env).unwrap();
        assert_eq!(p(&["--help"]), Parsed::Help(HELP));
        assert_eq!(p(&["enroll", "-h"]), Parsed::Help(HELP_ENROLL));
        assert_eq!(p(&["help", "check"]), Parsed::Help(HELP_CHECK));
        assert_eq!(p(&["status", "--json", "-V"]), Parsed::Version);
    }

    proptest::proptest! {
        #[test]
        fn any_arguments_parse_or_fail_cleanly(args in proptest::collection::vec("\\PC{0,12}", 0..6)) {
            let _ = parse(std::iter::once("perch-agent".to_string()).chain(args), |_| None);
        }
    }
}
