//! `perch deploy`: start a rollout and drive it; pause, resume, abort, list.
//! (A module of the `perch` binary; the rollout logic is in the library.)
//!
//! `perch deploy start ...` starts one; `perch deploy --bundle ...` (the
//! first form) still does. With `--json`, starting and driving print JSON
//! lines: one event per line, as it happens.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use perch_fleet::link::Target;
use perch_fleet::rollout::{self, Limit, Rollout, State};
use perch_fleet::rollout_store::{self, Plan};
use perch_fleet::view::FleetView;
use perch_support::exit::UsageError;
use perch_support::now_unix;

use crate::Conn;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DeployArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    start: StartArgs,
}

/// A new rollout.
#[derive(Args)]
struct StartArgs {
    #[command(flatten)]
    conn: Conn,
    /// The published bundle: NAME@COUNTER, or its bundle file.
    #[arg(long, required = true, value_name = "NAME@COUNTER|FILE")]
    bundle: Option<String>,
    /// Every enrolled device of this group.
    #[arg(long, conflicts_with = "device", required_unless_present = "device")]
    group: Option<String>,
    /// These devices (repeat).
    #[arg(long)]
    device: Vec<String>,
    /// Cumulative share of the devices per wave.
    #[arg(long, default_value = "100%")]
    waves: String,
    /// Failures a wave may have before the rollout pauses: a count or a percentage.
    #[arg(long, default_value = "0")]
    max_failures: String,
    /// How long a committed wave soaks before the next one starts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    wave_wait: Duration,
    /// Create the rollout and return; `perch deploy resume ID` drives it.
    #[arg(long)]
    detach: bool,
    /// JSON lines: the rollout created, each change, and how it ended.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Action {
    /// Start a rollout and drive it until it ends or pauses (`perch deploy
    /// --bundle ...` without `start` is the same).
    Start(StartArgs),
    /// Stop starting new waves (devices already told finish their install).
    Pause {
        #[command(flatten)]
        conn: Conn,
        /// The rollout id (`perch deploy list`).
        id: String,
        /// The rollout as it now stands, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused rollout (its failures so far are accepted), or take
    /// over driving a running one; drives it until it ends or pauses.
    Resume {
        #[command(flatten)]
        conn: Conn,
        /// The rollout id (`perch deploy list`).
        id: String,
        /// Resume it and return, without driving it.
        #[arg(long)]
        detach: bool,
        /// JSON lines, as `start --json` prints them.
        #[arg(long)]
        json: bool,
    },
    /// Stop the rollout and point every device it reached back at the
    /// bundle it ran before.
    Abort {
        #[command(flatten)]
        conn: Conn,
        /// The rollout id (`perch deploy list`).
        id: String,
        /// The rollout as it now stands, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every rollout and its state.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Every rollout as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// How often a driver looks at the fleet.
const TICK: Duration = Duration::from_secs(2);

pub fn run(args: DeployArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match args.action {
            None => start(args.start).await,
            Some(Action::Start(a)) => start(a).await,
            Some(Action::Pause { conn, id, json }) => {
                let c = connect(conn.target()?).await?;
                let r = rollout_store::pause(&c, &id, now_unix()).await?;
                if json {
                    return print_json(&r);
                }
                println!(
                    "rollout {} paused: no new wave starts; devices already told finish their install",
                    r.id
                );
                Ok(())
            }
            Some(Action::Resume { conn, id, detach, json }) => {
                let c = connect(conn.target()?).await?;
                let r = rollout_store::resume(&c, &id, now_unix()).await?;
                if json {
                    event("resumed", &r)?;
                } else {
                    println!("rollout {} running", r.id);
                }
                if detach {
                    return Ok(());
                }
                drive(&c, &r.id, json).await
            }
            Some(Action::Abort { conn, id, json }) => {
                let c = connect(conn.target()?).await?;
                let (r, notes) = rollout_store::abort(&c, &id, now_unix()).await?;
                for n in notes {
                    eprintln!("perch: {n}");
                }
                if json {
                    return print_json(&r);
                }
                let reached = r.waves.iter().rfind(|w| w.started_at.is_some()).map_or(0, |w| w.upto);
                println!("rollout {} aborted: {reached} devices pointed back at what they ran before", r.id);
                Ok(())
            }
            Some(Action::List { conn, json }) => {
                let c = connect(conn.target()?).await?;
                let js = async_nats::jetstream::new(c);
                let all = rollout_store::list(&js).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else if all.is_empty() {
                    println!("(no rollouts)");
                }
                for r in all.iter().filter(|_| !json) {
                    println!(
                        "{:<24} {}@{:<6} {:<16} {} waves  {}",
                        r.id,
                        r.release.name,
                        r.release.counter,
                        r.scope,
                        r.waves.len(),
                        r.state.name()
                    );
                }
                Ok(())
            }
        }
    })
}

async fn connect(t: Target) -> Result<async_nats::Client> {
    Ok(t.connect("perch deploy").await?)
}

async fn start(a: StartArgs) -> Result<()> {
    let (conn, Some(bundle)) = (a.conn, a.bundle) else {
        return Err(UsageError("perch deploy needs --bundle".into()).into());
    };
    let bundle = perch_fleet::catalog::BundleArg::parse(&bundle)?;
    let target = match a.group {
        Some(g) => rollout_store::Target::Group(g),
        None => rollout_store::Target::Devices(a.device),
    };
    let waves = rollout::parse_waves(&a.waves).map_err(UsageError)?;
    let max_failures = Limit::parse(&a.max_failures).map_err(UsageError)?;
    let c = connect(conn.target()?).await?;
    let published = bundle.published(&async_nats::jetstream::new(c.clone())).await?;
    let plan = Plan {
        bundle: (published.name, published.counter),
        target,
        waves,
        max_failures,
        wave_wait: a.wave_wait,
    };
    let r = rollout_store::create(&c, &plan, now_unix()).await?;
    if a.json {
        event("created", &r)?;
    } else {
        let sizes: Vec<String> = (0..r.waves.len())
            .map(|i| format!("{} ({}%)", r.wave_devices(i).len(), r.waves[i].percent))
            .collect();
        println!(
            "rollout {}: {}@{} to {} in {} waves of {} devices; pauses past {} failures per wave",
            r.id,
            r.release.name,
            r.release.counter,
            r.scope,
            r.waves.len(),
            sizes.join(", "),
            r.max_failures
        );
    }
    if a.detach {
        if !a.json {
            println!("detached: `perch deploy resume {}` drives it", r.id);
        }
        return Ok(());
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    drive(&c, &r.id, a.json).await
}

fn print_json(r: &Rollout) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(r)?);
    Ok(())
}

/// One JSON line: `{"event": EVENT, "rollout": {...}}`, flushed at once.
fn event(name: &str, r: &Rollout) -> Result<()> {
    println!("{}", serde_json::json!({ "event": name, "rollout": r }));
    let _ = std::io::Write::flush(&mut std::io::stdout());
    Ok(())
}

/// Drives until the rollout ends or pauses, printing each change: as a
/// table, or (`json`) as a `changed` event per change and a last `done`,
/// `paused` or `aborted` event.
async fn drive(c: &async_nats::Client, id: &str, json: bool) -> Result<()> {
    let mut last = String::new();
    let show = |r: &Rollout, view: &FleetView, notes: &[String]| {
        for n in notes {
            eprintln!("perch: {n}");
        }
        let now = perch_fleet::table::render_rollout(r, view);
        if now != last {
            if json {
                let _ = event("changed", r);
            } else {
                print!("{now}");
                // Seen as it happens, also through a pipe.
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            last = now;
        }
    };
    let r = rollout_store::drive(c, id, TICK, now_unix, show).await?;
    if json {
        let name = match r.state {
            State::Done => "done",
            State::Paused { .. } => "paused",
            State::Aborted => "aborted",
            State::Running => "running",
        };
        event(name, &r)?;
    }
    match r.state {
        State::Done => {
            if !json {
                println!("rollout {} done: every wave committed", r.id);
            }
            Ok(())
        }
        State::Paused { reason } => {
            anyhow::bail!("rollout {} paused: {reason} (`perch deploy resume` or `perch deploy abort`)", r.id)
        }
        State::Aborted => anyhow::bail!("rollout {} was aborted", r.id),
        State::Running => Ok(()),
    }
}
