//! `perch-agent`: the device daemon and its local CLI.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use perch_agent::check::check_bundle;
use perch_support::exit::{self, UsageError};
use perch_support::now_unix;
use perch_support::trustfile::load_trust;

#[derive(Parser)]
#[command(name = "perch-agent", version, about = "perch device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a bundle offline against the trust document: signatures,
    /// threshold, expiry, target and every chunk. Writes nothing.
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perch-agent: {e:#}");
            ExitCode::from(exit::code_for(e.chain()) as u8)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check { trust, target, bundle } => {
            if !bundle.is_file() {
                return Err(UsageError(format!("{}: no such bundle file", bundle.display())).into());
            }
            let now = now_unix();
            let trust = load_trust(&trust, now)?;
            let verified = check_bundle(&trust, &bundle, now)?;
            let m = verified.manifest();
            if let Some(t) = target {
                if !m.allows_target(&t) {
                    return Err(exit::SecurityError(format!(
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
    }
}
