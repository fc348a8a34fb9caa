//! `perch context add|use|ls|show|rm`, and the connection flags every
//! networked command takes (`Conn`). (A module of the `perch` binary; where
//! each setting comes from is `perch_fleet::context`.)

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use perch_fleet::context;
use serde_json::json;

/// The three connection settings.
#[derive(Args)]
pub struct Settings {
    /// NATS URL; repeat for several.
    #[arg(long = "url", value_name = "URL")]
    urls: Vec<String>,
    /// A FLEET user credential (`perch-bootstrap nats creds --account fleet`).
    #[arg(long, value_name = "FILE")]
    creds: Option<PathBuf>,
    /// The fleet CA certificate (ORG/tls/ca.pem).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

/// How the operator reaches the fleet's NATS.
#[derive(Args)]
pub struct Conn {
    #[command(flatten)]
    settings: Settings,
    /// The saved context for the settings not given as flags or in
    /// PERCH_URL, PERCH_CREDS, PERCH_CA (default: PERCH_CONTEXT, else the
    /// one `perch context use` selected).
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
}

impl Conn {
    /// The settings, resolved against the environment and the context.
    pub fn resolve(self) -> Result<context::Resolved> {
        let Settings { urls, creds, ca } = self.settings;
        let flags = context::Flags { urls, creds, ca, context: self.context };
        Ok(context::resolve(flags, &env_var)?)
    }

    pub fn target(self) -> Result<perch_fleet::link::Target> {
        Ok(self.resolve()?.target)
    }
}

pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[derive(Subcommand)]
pub enum ContextCommand {
    /// Save a context (replacing one of that name): the settings given,
    /// file paths made absolute.
    Add {
        /// The context's name (letters, digits, '-', '_', '.').
        name: String,
        #[command(flatten)]
        settings: Settings,
        /// A line saying what the context is for.
        #[arg(long)]
        description: Option<String>,
        /// Also select it.
        #[arg(long = "use")]
        select: bool,
    },
    /// Select the context networked commands use.
    Use {
        /// The context's name.
        name: String,
    },
    /// List the saved contexts; `*` marks the selected one.
    Ls {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// What a networked command would connect with now, and where each
    /// setting comes from.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Delete a saved context.
    Rm {
        /// The context's name.
        name: String,
    },
}

pub fn run(cmd: ContextCommand) -> Result<()> {
    let store = context::Store::from_env(&env_var)?;
    match cmd {
        ContextCommand::Add { name, settings: Settings { urls, creds, ca }, description, select } => {
            let c = context::made(description, urls, creds, ca)?;
            store.save(&name, &c)?;
            if select {
                store.select(&name)?;
            }
            println!(
                "saved context '{name}' in {}{}",
                store.dir().display(),
                if select { " and selected it" } else { "" }
            );
        }
        ContextCommand::Use { name } => {
            store.select(&name)?;
            println!("selected context '{name}'");
        }
        ContextCommand::Ls { json } => {
            let selected = store.selected()?;
            let mut rows = vec![];
            for name in store.names()? {
                let c = store.load(&name)?;
                rows.push((selected.as_deref() == Some(name.as_str()), name, c));
            }
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(sel, name, c)| {
                        json!({"name": name, "selected": sel, "description": c.description,
                               "urls": c.urls, "creds": c.creds, "ca": c.ca})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&json!({ "contexts": list }))?);
            } else if rows.is_empty() {
                println!(
                    "no contexts in {} (perch context add NAME --url .. --creds .. --ca ..)",
                    store.dir().display()
                );
            } else {
                let width = rows.iter().map(|(_, n, _)| n.len()).max().unwrap_or(0);
                for (sel, name, c) in rows {
                    let mark = if sel { '*' } else { ' ' };
                    println!("{mark} {name:<width$}  {}  {}", c.urls.join(","), c.description);
                }
            }
        }
        ContextCommand::Show { conn, json } => {
            let r = conn.resolve()?;
            let t = &r.target;
            if json {
                let v = json!({
                    "context": r.context,
                    "urls": t.urls, "urls_from": r.urls_from.to_string(),
                    "creds": t.creds, "creds_from": r.creds_from.to_string(),
                    "ca": t.ca, "ca_from": r.ca_from.to_string(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("context  {}", r.context.as_deref().unwrap_or("(none)"));
                println!("url      {}  ({})", t.urls.join(","), r.urls_from);
                println!("creds    {}  ({})", t.creds.display(), r.creds_from);
                println!("ca       {}  ({})", t.ca.display(), r.ca_from);
            }
        }
        ContextCommand::Rm { name } => {
            store.remove(&name)?;
            println!("removed context '{name}'");
        }
    }
    Ok(())
}
