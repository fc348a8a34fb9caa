//! `perch-agent`: the device daemon and its local CLI.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use perch_agent::check::check_bundle;
use perch_agent::config::Config;
use perch_agent::deploy::{DeployError, Engine, Finished};
use perch_agent::journal::JournalError;
use perch_agent::status;
use perch_support::exit::{self, SecurityError, UsageError};
use perch_support::now_unix;
use perch_support::trustfile::load_trust;

#[derive(Parser)]
#[command(name = "perch-agent", version, about = "perch device agent: A/B installs with trial and rollback")]
struct Cli {
    /// The agent config (agent.toml).
    #[arg(long, env = "PERCH_CONFIG", global = true, default_value = "/etc/perch/agent.toml")]
    config: PathBuf,
    /// Where the agent keeps its journal.
    #[arg(long, env = "PERCH_STATE_DIR", global = true, default_value = "/var/lib/perch")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install a bundle into the inactive slot, activate it and run its trial.
    Install { bundle: PathBuf },
    /// Show the running slot, each slot's bundle, the deploy state and the last outcome.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Commit the slot on trial now.
    Commit,
    /// Roll back the trial (or the last committed deploy) to the other slot.
    Rollback,
    /// Finish whatever the journal says is in flight (run at every boot).
    Run {
        /// Do the pending work, then exit instead of staying up.
        #[arg(long)]
        once: bool,
    },
    /// Check a bundle offline against the trust document. Writes nothing.
    Check {
        #[arg(long)]
        trust: PathBuf,
        /// The device target to check compatibility with.
        #[arg(long)]
        target: Option<String>,
        bundle: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("perch-agent: {e:#}");
            ExitCode::from(code_for(&e) as u8)
        }
    }
}

fn code_for(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(d) = cause.downcast_ref::<DeployError>() {
            return match d {
                _ if d.is_security() => exit::SECURITY,
                DeployError::Trust(_) => exit::code_for(e.chain().skip(1)),
                _ => exit::RUNTIME,
            };
        }
        if cause.is::<perch_agent::config::ConfigError>() {
            return exit::USAGE;
        }
    }
    exit::code_for(e.chain())
}

fn open(cli: &Cli) -> Result<(Engine, Option<JournalError>)> {
    let cfg = Config::load(&cli.config)?;
    Ok(Engine::open(cfg, &cli.state_dir)?)
}

fn report(engine: &Engine, f: &Finished) -> u8 {
    let line = match f {
        Finished::Committed(b) => format!("committed {b}"),
        Finished::RolledBack(b, r) => format!("rolled back {b}: {r}"),
        Finished::AwaitingReboot(s) => format!("waiting for a reboot into slot {s}"),
        Finished::Idle => format!("nothing in flight ({})", engine.journal.state.name()),
        Finished::AlreadyRunning(b) => format!("{b} is already running; nothing to do"),
        Finished::NeedsBundle(b) => format!(
            "staging of {b} was interrupted; run `perch-agent install` with the bundle again to resume"
        ),
    };
    println!("{line}");
    // A rolled-back deploy is a failed deploy for scripts.
    if matches!(f, Finished::RolledBack(..)) {
        1
    } else {
        0
    }
}

fn run(cli: Cli) -> Result<u8> {
    match &cli.command {
        Command::Check { trust, target, bundle } => {
            check(trust, target.as_deref(), bundle)?;
            Ok(0)
        }
        Command::Install { bundle } => {
            if !bundle.is_file() {
                return Err(UsageError(format!("{}: no such bundle file", bundle.display())).into());
            }
            let (mut engine, problem) = open(&cli)?;
            warn(problem);
            // Finish anything a crash interrupted before starting something new;
            // if it cannot finish yet (it awaits a reboot), say so and stop.
            if engine.journal.state.is_switching() {
                let f = engine.resume()?;
                if engine.journal.state.is_switching() {
                    return Ok(report(&engine, &f));
                }
            }
            let f = engine.install(bundle)?;
            Ok(report(&engine, &f))
        }
        Command::Status { json } => {
            let (engine, problem) = open(&cli)?;
            let b = engine.backend();
            let doc = status::to_json(
                &engine.journal,
                b.name(),
                b.booted().ok(),
                b.next_boot().ok().flatten(),
                problem.map(|p| p.to_string()).as_deref(),
            );
            if *json {
                println!("{doc}");
            } else {
                print!("{}", status::to_text(&doc));
            }
            Ok(0)
        }
        Command::Commit => {
            let (mut engine, problem) = open(&cli)?;
            warn(problem);
            let f = engine.commit()?;
            Ok(report(&engine, &f))
        }
        Command::Rollback => {
            let (mut engine, problem) = open(&cli)?;
            warn(problem);
            let f = engine.rollback()?;
            Ok(report(&engine, &f))
        }
        Command::Run { once } => {
            let (mut engine, problem) = open(&cli)?;
            warn(problem);
            let f = engine.resume()?;
            let code = report(&engine, &f);
            if *once {
                return Ok(code);
            }
            // No link yet: stay up so the service manager sees a healthy
            // agent; pending work was finished above.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn warn(problem: Option<JournalError>) {
    if let Some(p) = problem {
        eprintln!("perch-agent: {p}; moved aside, kept the running slot and started a fresh journal");
    }
}

fn check(trust: &Path, target: Option<&str>, bundle: &Path) -> Result<()> {
    if !bundle.is_file() {
        return Err(UsageError(format!("{}: no such bundle file", bundle.display())).into());
    }
    let now = now_unix();
    let trust = load_trust(trust, now)?;
    let verified = check_bundle(&trust, bundle, now)?;
    let m = verified.manifest();
    if let Some(t) = target {
        if !m.allows_target(t) {
            return Err(SecurityError(format!(
                "{}: bundle is for targets [{}], not '{t}'",
                bundle.display(),
                m.targets.join(", ")
            ))
            .into());
        }
    }
    println!("OK {} {} counter {} ({} chunks)", bundle.display(), m.name, m.counter, m.chunk_count());
    Ok(())
}
