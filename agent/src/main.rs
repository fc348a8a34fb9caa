//! `perch-agent`: the device daemon and its local CLI.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use perch_agent::check::check_bundle;
use perch_agent::choria_external;
use perch_agent::cli::{self, Cli, Command, EnrollArgs, Parsed};
use perch_agent::config::Config;
use perch_agent::decision::Decision;
use perch_agent::deploy::{DeployError, Engine, Finished};
use perch_agent::enroll::{self as enrolling, Plan};
use perch_agent::identity::{self, Identity};
use perch_agent::journal::{DeployState, Journal};
use perch_agent::recovery::Recovered;
use perch_agent::status;
use perch_support::exit::{self, SecurityError, UsageError};
use perch_support::now_unix;
use perch_support::trustfile::load_trust;

fn main() -> ExitCode {
    // The static ARM build carries no unwind tables (`cargo xtask cross`
    // takes them out: with panic = "abort" nothing unwinds), so a panic is
    // reported by its message and location alone, whatever
    // RUST_BACKTRACE says; the default hook would try to walk the stack.
    #[cfg(target_feature = "crt-static")]
    std::panic::set_hook(Box::new(|info| eprintln!("perch-agent: {info}")));
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(rest) = choria_external::invoked_as(&args) {
        return choria(rest);
    }
    let cli = match cli::parse(args, |var| std::env::var_os(var)) {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("perch-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("perch-agent: {e} (see `perch-agent --help`)");
            return ExitCode::from(exit::USAGE as u8);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("perch-agent: {}", perch_support::chain_line(e.chain()));
            ExitCode::from(code_for(&e) as u8)
        }
    }
}

/// A Choria server's call (`perch REQUEST REPLY PROTOCOL`): the reply goes
/// to its file; exit 1 only if it could not be written.
fn choria(args: &[std::ffi::OsString]) -> ExitCode {
    let answered = choria_external::Call::from(args, |var| std::env::var_os(var)).and_then(|call| {
        let agent = std::env::current_exe().map_err(|e| format!("finding perch-agent: {e}"))?;
        choria_external::answer(&call, &agent)
    });
    match answered {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perch-agent: {e}");
            ExitCode::from(1)
        }
    }
}

/// The one mapping from an error to an exit code (`perch_support::exit`).
fn code_for(e: &anyhow::Error) -> i32 {
    exit::code_for(e.chain(), &[perch_agent::CLASSIFY])
}

fn open(cli: &Cli) -> Result<(Engine, Option<Recovered>)> {
    let cfg = Config::load(&cli.config)?;
    Ok(Engine::open(cfg, &cli.state_dir)?)
}

/// `commit` / `rollback`: with the engine if it is free; else, if another
/// process's engine is running a trial, hands it the decision and waits
/// for the trial to end.
fn decide(cli: &Cli, d: Decision) -> Result<u8> {
    let cfg = Config::load(&cli.config)?;
    let held = match Engine::open(cfg.clone(), &cli.state_dir) {
        Ok((mut engine, problem)) => {
            warn(problem);
            let f = match d {
                Decision::Commit => engine.commit()?,
                Decision::Rollback => engine.rollback()?,
            };
            return Ok(decided(d, report(&engine.journal.state, &f), &f));
        }
        Err(DeployError::Lock(l)) if l.is_held() => l,
        Err(e) => return Err(e.into()),
    };
    let on_trial = |j: &Journal| match &j.state {
        DeployState::Trial { bundle, deadline, .. } => Some((bundle.clone(), *deadline)),
        _ => None,
    };
    let (journal, _, _) = Engine::inspect(&cfg, &cli.state_dir);
    let Some((bundle, deadline)) = on_trial(&journal) else { return Err(DeployError::Lock(held).into()) };
    perch_agent::decision::request(&cli.state_dir, d, &bundle.digest)?;
    println!("the trial of {bundle} runs in another process ({held}); asked it to {}", d.as_str());
    // The trial's deadline bounds the wait; a round of checks may run past it.
    let deadline = deadline.unwrap_or_else(|| now_unix() + cfg.health.trial.as_secs());
    let give_up = deadline.max(now_unix()) + cfg.health.timeout.as_secs() * 2 + 30;
    let journal = loop {
        std::thread::sleep(Duration::from_millis(200));
        let (j, _, _) = Engine::inspect(&cfg, &cli.state_dir);
        if on_trial(&j).is_none_or(|(b, _)| b.digest != bundle.digest) {
            break j;
        }
        if now_unix() > give_up {
            perch_agent::decision::withdraw(&cli.state_dir);
            return Err(DeployError::Nothing(format!(
                "the trial of {bundle} did not end; nothing was decided"
            ))
            .into());
        }
    };
    // Whoever ended the trial, it is over: a decision left unread is void.
    perch_agent::decision::withdraw(&cli.state_dir);
    // A rollback that needs no reboot passes through RollingBack on its way
    // to RolledBack; give the other process a moment to get there before
    // reporting a wait for a reboot.
    let mut journal = journal;
    let settle = std::time::Instant::now();
    while matches!(journal.state, DeployState::RollingBack { .. })
        && settle.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(100));
        journal = Engine::inspect(&cfg, &cli.state_dir).0;
    }
    let f = match &journal.state {
        DeployState::Committed { bundle, .. } => Finished::Committed(bundle.clone()),
        DeployState::RolledBack { bundle, reason, .. } => {
            Finished::RolledBack(bundle.clone(), reason.clone())
        }
        DeployState::RollingBack { from, .. } => Finished::AwaitingReboot(*from),
        _ => Finished::Idle,
    };
    Ok(decided(d, report(&journal.state, &f), &f))
}

/// A `rollback` that rolled back did what it was asked: success, though a
/// rollback is a failed deploy for `install` and `run`.
fn decided(d: Decision, code: u8, f: &Finished) -> u8 {
    match (d, f) {
        (Decision::Rollback, Finished::RolledBack(..)) => 0,
        _ => code,
    }
}

/// Prints how a command left the device; its exit code. `state` is the
/// journal's state now.
fn report(state: &DeployState, f: &Finished) -> u8 {
    println!("{}", status::finished_text(state, f));
    status::finished_code(f)
}

fn run(cli: Cli) -> Result<u8> {
    // Only the commands that just print: an install or a trial goes on
    // (quietly) when its output pipe closes. See perch_support::sigpipe.
    if matches!(cli.command, Command::Status { .. } | Command::Check { .. }) {
        perch_support::sigpipe::die_on_closed_pipe();
    }
    match &cli.command {
        Command::Check { trust, target, bundle, json } => {
            check(&cli, trust.as_deref(), target.as_deref(), bundle, *json)?;
            Ok(0)
        }
        Command::Install { bundle, json } => {
            if !bundle.is_file() {
                return Err(UsageError(format!("{}: no such bundle file", bundle.display())).into());
            }
            let (mut engine, problem) = open(&cli)?;
            warn(problem);
            let report = |state: &DeployState, f: &Finished| {
                if *json {
                    println!("{}", status::finished_json(state, f));
                    status::finished_code(f)
                } else {
                    report(state, f)
                }
            };
            if *json {
                engine.progress = perch_agent::progress::Progress::quiet();
            }
            // Finish anything a crash interrupted before starting something new;
            // if it cannot finish yet (it awaits a reboot), say so and stop.
            if engine.journal.state.is_switching() {
                let f = engine.resume()?;
                if engine.journal.state.is_switching() {
                    return Ok(report(&engine.journal.state, &f));
                }
            }
            let f = engine.install(bundle)?;
            Ok(report(&engine.journal.state, &f))
        }
        Command::Status { json } => {
            let cfg = Config::load(&cli.config)?;
            let st = status::DeviceStatus::gather(&cfg, &cli.state_dir, now_unix());
            if *json {
                println!("{}", st.to_json());
            } else {
                print!("{}", st.to_text());
            }
            Ok(0)
        }
        Command::Commit => decide(&cli, Decision::Commit),
        Command::Rollback => decide(&cli, Decision::Rollback),
        Command::Run { once } => {
            if *once {
                let (mut engine, problem) = open(&cli)?;
                warn(problem);
                let f = engine.resume()?;
                return Ok(report(&engine.journal.state, &f));
            }
            perch_agent::daemon::serve(&cli.config, &cli.state_dir)?;
            Ok(0)
        }
        Command::Enroll(args) => enroll_cmd(&cli, args),
        Command::TrustUpdate { file } => trust_update(&cli, file),
    }
}

/// One line per state file recovered from (they are also kept for `status`).
fn warn(recovered: Option<Recovered>) {
    for line in recovered.iter().flat_map(|r| &r.0) {
        eprintln!("perch-agent: {line}");
    }
}

fn check(cli: &Cli, trust: Option<&Path>, target: Option<&str>, bundle: &Path, json: bool) -> Result<()> {
    if !bundle.is_file() {
        return Err(UsageError(format!("{}: no such bundle file", bundle.display())).into());
    }
    let now = now_unix();
    // Without --trust, check as this device would: its trust file and target.
    let (trust, target) = match trust {
        Some(t) => (t.to_path_buf(), target.map(String::from)),
        None => {
            let cfg = Config::load(&cli.config)?;
            let target = target.map(String::from).unwrap_or(cfg.target.clone());
            (cfg.trust, Some(target))
        }
    };
    let target = target.as_deref();
    let trust = load_trust(&trust, now)?;
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
    if json {
        let doc = serde_json::json!({
            "file": bundle, "verified": true, "name": m.name, "counter": m.counter, "version": m.version,
            "kind": m.kind.as_str(), "digest": verified.digest().to_string(), "chunk_count": m.chunk_count(),
            "payload_len": m.payload_len(), "targets": m.targets, "target_checked": target,
        });
        println!("{doc}");
        return Ok(());
    }
    println!("OK {} {} counter {} ({} chunks)", bundle.display(), m.name, m.counter, m.chunk_count());
    Ok(())
}

/// `perch-agent trust update FILE`: only the accepted version again, or a
/// newer one by a valid rotation chain (see trust_store).
fn trust_update(cli: &Cli, file: &Path) -> Result<u8> {
    use perch_agent::trust_store;
    if !file.is_file() {
        return Err(UsageError(format!("{}: no such trust document file", file.display())).into());
    }
    let cfg = Config::load(&cli.config)?;
    let c = trust_store::update(&cfg.trust, file, &cli.state_dir, now_unix())?;
    for w in &c.warnings {
        eprintln!("perch-agent: {w}");
    }
    let b = c.trust.body();
    println!(
        "trust document version {} of org '{}' ({} of {} release keys) is the accepted one; installed at {}",
        b.version,
        b.org,
        b.threshold,
        b.release_keys.len(),
        cfg.trust.display()
    );
    Ok(0)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn plan(cfg: &Config, args: &EnrollArgs) -> Result<Plan> {
    let groups = if args.groups.is_empty() { cfg.enroll.groups.clone() } else { args.groups.clone() };
    if let Some(g) = groups.iter().find(|g| !perch_protocol::subjects::is_token(g)) {
        return Err(UsageError(format!("--group '{g}': use 1 to 64 of A-Z a-z 0-9 - _")).into());
    }
    Ok(Plan {
        device_id: identity::device_id(cfg, args.device_id.as_deref())?,
        groups,
        target: cfg.target.clone(),
        wait: args.wait,
        timeout: args.timeout,
        max_backoff: cfg.enroll.max_backoff,
    })
}

fn read_text_file(path: &Path, what: &str) -> Result<String> {
    if !path.is_file() {
        return Err(UsageError(format!("{}: no such {what} file", path.display())).into());
    }
    let max = if what == "token" {
        perch_protocol::token::MAX_TOKEN_TEXT + 64
    } else {
        perch_protocol::enroll::MAX_MESSAGE * 2
    };
    // No real token or enrollment is that large: hostile input, not a typo.
    let bytes = match perch_support::durable::read_bounded(path, max) {
        Err(perch_support::durable::ReadError::TooLarge { .. }) => {
            return Err(SecurityError(format!("{}: {what} file is over {max} bytes", path.display())).into())
        }
        r => r?,
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn enroll_cmd(cli: &Cli, args: &EnrollArgs) -> Result<u8> {
    let cfg = Config::load(&cli.config)?;
    let plan = plan(&cfg, args)?;
    if let Some(out) = &args.request_out {
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => Some(read_text_file(f, "token")?.trim().to_string()),
            (None, None) => None,
        };
        let text = enrolling::request_text(&cli.state_dir, &plan, token.as_deref())?;
        perch_support::durable::write_bytes(
            out,
            0o644,
            perch_support::durable::Replace::Allow,
            text.as_bytes(),
        )?;
        println!(
            "wrote {} for device {}; on a machine with the org's issuing key run `perch-bootstrap sign-request --dir ORG {} --out RESPONSE --group G`, then `perch-agent enroll --import RESPONSE` here",
            out.display(),
            plan.device_id,
            out.display()
        );
        return Ok(0);
    }
    if let Some(file) = &args.import {
        let text = read_text_file(file, "enrollment")?;
        let v = enrolling::import(&cfg, &cli.state_dir, &text, &plan.device_id)?;
        print_enrolled(&v);
        return Ok(0);
    }
    // At a terminal, warnings (retries) are enough; PERCH_LOG raises it.
    perch_net::init_logging(tracing::Level::WARN);
    let identity = Identity::new(&cli.state_dir);
    if let Some(v) = identity.enrollment(&cfg, now_unix())? {
        if v.credential.device_id == plan.device_id {
            println!(
                "already enrolled as {} (groups {}); nothing to do",
                plan.device_id,
                v.credential.groups.join(",")
            );
            return Ok(0);
        }
    }
    let token = match (&args.token, &args.token_file, &cfg.enroll.token_file) {
        (Some(t), _, _) => t.clone(),
        (None, Some(f), _) | (None, None, Some(f)) => read_text_file(f, "token")?,
        (None, None, None) => {
            return Err(UsageError(
                "give --token, --token-file, --request-out or --import (or set enroll.token_file)".into(),
            )
            .into())
        }
    };
    let v = runtime()?.block_on(async {
        let v = enrolling::online(&cfg, &cli.state_dir, &token, &plan).await?;
        // Prove the new credential works: connect to FLEET and say hello.
        let key = std::sync::Arc::new(identity.key()?);
        match tokio::time::timeout(
            Duration::from_secs(15),
            perch_agent::link::connect_once(&v, perch_agent::link::fleet_urls(&v, &cfg.link.urls), key),
        )
        .await
        {
            Ok(Ok(c)) => drop(c),
            Ok(Err(e)) => eprintln!("perch-agent: enrolled, but the first FLEET connection failed: {e}"),
            Err(_) => eprintln!("perch-agent: enrolled, but the first FLEET connection timed out"),
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    print_enrolled(&v);
    Ok(0)
}

fn print_enrolled(v: &perch_protocol::enroll::VerifiedEnrollment) {
    println!(
        "enrolled as {} in org '{}', groups [{}]; credential valid until {}",
        v.credential.device_id,
        v.trust.body().org,
        v.credential.groups.join(", "),
        v.credential.expires_at
    );
}
