//! Operator contexts: the NATS URLs, FLEET credential and CA a networked
//! `perch` command uses, saved under a name (`perch context add|use|ls|show|rm`),
//! as `nats context` does.
//!
//! Each setting comes from, in order: its flag (`--url`, `--creds`,
//! `--ca`); the environment (`PERCH_URL`, comma-separated, `PERCH_CREDS`,
//! `PERCH_CA`); the context named by `--context` or `PERCH_CONTEXT`, or
//! else the one selected with `perch context use`; and, for the URL only,
//! `tls://127.0.0.1:4222`.
//!
//! Contexts live in `$PERCH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/perch`, else
//! `~/.config/perch`: `context/NAME.json` (mode 0600) and `context.txt`, the
//! selected name.

use std::path::{Path, PathBuf};

use perch_support::durable::{self, ReadError, Replace, WriteError};
use perch_support::exit::{Class, Classify};
use serde::{Deserialize, Serialize};

use crate::link::Target;

/// The URL when nothing names one: a nats-server on this machine.
pub const DEFAULT_URL: &str = "tls://127.0.0.1:4222";
/// Longest context file read.
const MAX_CONTEXT_LEN: usize = 64 * 1024;
/// Longest context name.
const MAX_NAME_LEN: usize = 64;

/// One saved context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// Why a context could not be read, saved or used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("context name '{0}': use letters, digits, '-', '_' and '.' (not first), at most {MAX_NAME_LEN}")]
    BadName(String),
    #[error("no context '{name}' in {} (see `perch context ls`)", dir.display())]
    NotFound { name: String, dir: PathBuf },
    #[error("context file {}: {detail}", path.display())]
    Damaged { path: PathBuf, detail: String },
    #[error("no {what}: pass --{flag}, set {env}, or save it in a context (`perch context add`)")]
    Missing { what: &'static str, flag: &'static str, env: &'static str },
    #[error("no directory for contexts: set PERCH_CONFIG_DIR or HOME")]
    NoDir,
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for ContextError {
    fn class(&self) -> Option<Class> {
        match self {
            ContextError::Write(e) => e.class(),
            e if e.is_usage() => Some(Class::Usage),
            _ => Some(Class::Runtime),
        }
    }
}

impl ContextError {
    /// True when the operator has to fix how the command was called or
    /// configured (exit 2), false for I/O trouble.
    pub fn is_usage(&self) -> bool {
        !matches!(self, ContextError::Io { .. } | ContextError::Write(WriteError::Io { .. }))
    }
}

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(&'static str),
    Context(String),
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(var) => write!(f, "environment ({var})"),
            Source::Context(name) => write!(f, "context '{name}'"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The settings given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub urls: Vec<String>,
    pub creds: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub context: Option<String>,
}

/// What a networked command connects with, and where each part came from.
#[derive(Debug)]
pub struct Resolved {
    pub target: Target,
    pub context: Option<String>,
    pub urls_from: Source,
    pub creds_from: Source,
    pub ca_from: Source,
}

/// The contexts in one directory.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The operator's store (see the module docs), from `env`.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Store, ContextError> {
        let dir = match (env("PERCH_CONFIG_DIR"), env("XDG_CONFIG_HOME"), env("HOME")) {
            (Some(d), _, _) if !d.is_empty() => PathBuf::from(d),
            (_, Some(x), _) if !x.is_empty() => PathBuf::from(x).join("perch"),
            (_, _, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".config/perch"),
            _ => return Err(ContextError::NoDir),
        };
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Result<PathBuf, ContextError> {
        check_name(name)?;
        Ok(self.dir.join("context").join(format!("{name}.json")))
    }

    /// Context `name`.
    pub fn load(&self, name: &str) -> Result<Context, ContextError> {
        let path = self.path(name)?;
        let bytes = durable::read_bounded(&path, MAX_CONTEXT_LEN).map_err(|e| match e {
            ReadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ContextError::NotFound { name: name.into(), dir: self.dir.join("context") }
            }
            other => ContextError::Damaged { path: path.clone(), detail: other.to_string() },
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ContextError::Damaged { path, detail: e.to_string() })
    }

    /// Saves `context` as `name` (replacing one of that name).
    pub fn save(&self, name: &str, context: &Context) -> Result<(), ContextError> {
        let path = self.path(name)?;
        let dir = self.dir.join("context");
        std::fs::create_dir_all(&dir).map_err(|source| ContextError::Io { path: dir, source })?;
        let mut bytes = serde_json::to_vec_pretty(context)
            .map_err(|e| ContextError::Damaged { path: path.clone(), detail: e.to_string() })?;
        bytes.push(b'\n');
        durable::write_bytes(&path, 0o600, Replace::Allow, &bytes)?;
        Ok(())
    }

    /// Deletes context `name`, and unselects it if it was selected.
    pub fn remove(&self, name: &str) -> Result<(), ContextError> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ContextError::NotFound { name: name.into(), dir: self.dir.join("context") })
            }
            Err(source) => return Err(ContextError::Io { path, source }),
        }
        if self.selected()?.as_deref() == Some(name) {
            let txt = self.dir.join("context.txt");
            std::fs::remove_file(&txt).map_err(|source| ContextError::Io { path: txt, source })?;
        }
        Ok(())
    }

    /// The saved contexts' names, sorted.
    pub fn names(&self) -> Result<Vec<String>, ContextError> {
        let dir = self.dir.join("context");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => return Err(ContextError::Io { path: dir, source }),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The name `perch context use` selected, if any.
    pub fn selected(&self) -> Result<Option<String>, ContextError> {
        let path = self.dir.join("context.txt");
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => Ok(None),
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ContextError::Io { path, source }),
        }
    }

    /// Selects context `name` (which must exist).
    pub fn select(&self, name: &str) -> Result<(), ContextError> {
        self.load(name)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| ContextError::Io { path: self.dir.clone(), source })?;
        durable::write_bytes(
            &self.dir.join("context.txt"),
            0o644,
            Replace::Allow,
            format!("{name}\n").as_bytes(),
        )?;
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), ContextError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ContextError::BadName(name.into()))
    }
}

/// Resolves the connection settings: `flags`, then `env`, then the
/// context, then the default URL (see the module docs).
pub fn resolve(flags: Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Resolved, ContextError> {
    let env_set = |var: &str| env(var).filter(|v| !v.is_empty());
    let named = flags.context.clone().or_else(|| env_set("PERCH_CONTEXT"));
    // The store is only needed when a context may be asked for.
    let store = Store::from_env(env);
    let (context, saved) = match (named, &store) {
        (Some(name), Ok(store)) => (Some(name.clone()), store.load(&name)?),
        (Some(_), Err(_)) => return Err(ContextError::NoDir),
        // Everything given by flags and the environment: the selected
        // context is not read (a damaged one must not stop such a command).
        (None, _) if complete(&flags, &env_set) => (None, Context::default()),
        (None, Ok(store)) => match store.selected()? {
            Some(name) => (Some(name.clone()), store.load(&name)?),
            None => (None, Context::default()),
        },
        (None, Err(_)) => (None, Context::default()),
    };
    let from_context = || Source::Context(context.clone().unwrap_or_default());
    let (urls, urls_from) = if !flags.urls.is_empty() {
        (flags.urls, Source::Flag)
    } else if let Some(v) = env_set("PERCH_URL") {
        (
            v.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect(),
            Source::Env("PERCH_URL"),
        )
    } else if !saved.urls.is_empty() {
        (saved.urls, from_context())
    } else {
        (vec![DEFAULT_URL.to_string()], Source::Default)
    };
    let path = |flag: Option<PathBuf>, var: &'static str, saved: Option<PathBuf>, what, name| {
        if let Some(p) = flag {
            Ok((p, Source::Flag))
        } else if let Some(v) = env_set(var) {
            Ok((PathBuf::from(v), Source::Env(var)))
        } else if let Some(p) = saved {
            Ok((p, from_context()))
        } else {
            Err(ContextError::Missing { what, flag: name, env: var })
        }
    };
    let (creds, creds_from) = path(flags.creds, "PERCH_CREDS", saved.creds, "FLEET credential", "creds")?;
    let (ca, ca_from) = path(flags.ca, "PERCH_CA", saved.ca, "fleet CA certificate", "ca")?;
    Ok(Resolved { target: Target { urls, creds, ca }, context, urls_from, creds_from, ca_from })
}

/// Whether the flags and the environment give every setting.
fn complete(flags: &Flags, env_set: &dyn Fn(&str) -> Option<String>) -> bool {
    let given = |flag: bool, var: &str| flag || env_set(var).is_some();
    given(!flags.urls.is_empty(), "PERCH_URL")
        && given(flags.creds.is_some(), "PERCH_CREDS")
        && given(flags.ca.is_some(), "PERCH_CA")
}

/// A context made from `add`'s flags: each file must exist, and is saved
/// as an absolute path, so the context works from any directory.
pub fn made(
    description: Option<String>,
    urls: Vec<String>,
    creds: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> Result<Context, ContextError> {
    perch_net::server_addrs(&urls)
        .map_err(|e| ContextError::File { path: PathBuf::from("--url"), detail: e.to_string() })?;
    let absolute = |p: Option<PathBuf>| -> Result<Option<PathBuf>, ContextError> {
        p.map(|p| {
            std::fs::canonicalize(&p)
                .map_err(|e| ContextError::File { path: p.clone(), detail: e.to_string() })
        })
        .transpose()
    };
    Ok(Context {
        description: description.unwrap_or_default(),
        urls,
        creds: absolute(creds)?,
        ca: absolute(ca)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().display().to_string();
        let store = Store::from_env(&env_of(&[("PERCH_CONFIG_DIR", cfg.clone())])).unwrap();
        let saved = Context {
            description: "lab".into(),
            urls: vec!["tls://lab:4222".into()],
            creds: Some("/lab/op.creds".into()),
            ca: Some("/lab/ca.pem".into()),
        };
        store.save("lab", &saved).unwrap();
        assert_eq!(store.load("lab").unwrap(), saved);
        // Nothing selected: no context, the default URL, and a clear error.
        let e = resolve(Flags::default(), &env_of(&[("PERCH_CONFIG_DIR", cfg.clone())])).unwrap_err();
        assert!(e.to_string().contains("--creds") && e.to_string().contains("PERCH_CREDS"), "{e}");
        store.select("lab").unwrap();
        let r = resolve(Flags::default(), &env_of(&[("PERCH_CONFIG_DIR", cfg.clone())])).unwrap();
        assert_eq!(r.target.urls, ["tls://lab:4222"]);
        assert_eq!(r.creds_from, Source::Context("lab".into()));
        // The environment beats the context; a flag beats both.
        let env = env_of(&[
            ("PERCH_CONFIG_DIR", cfg.clone()),
            ("PERCH_URL", "tls://a:1, tls://b:2".into()),
            ("PERCH_CA", "/env/ca.pem".into()),
        ]);
        let flags = Flags { creds: Some("/flag.creds".into()), ..Flags::default() };
        let r = resolve(flags, &env).unwrap();
        assert_eq!(r.target.urls, ["tls://a:1", "tls://b:2"]);
        assert_eq!(
            (r.urls_from, r.ca_from, r.creds_from),
            (Source::Env("PERCH_URL"), Source::Env("PERCH_CA"), Source::Flag)
        );
        assert_eq!(r.target.creds, PathBuf::from("/flag.creds"));
        // A named context that does not exist is an error, not nothing.
        let env = env_of(&[("PERCH_CONFIG_DIR", cfg.clone()), ("PERCH_CONTEXT", "prod".into())]);
        assert!(matches!(resolve(Flags::default(), &env), Err(ContextError::NotFound { .. })));
        // Names are checked; removing the selected context unselects it.
        assert!(matches!(store.save("../x", &saved), Err(ContextError::BadName(_))));
        assert_eq!(store.names().unwrap(), ["lab"]);
        store.remove("lab").unwrap();
        assert_eq!(store.selected().unwrap(), None);
        assert!(matches!(store.load("lab"), Err(ContextError::NotFound { .. })));
        // A damaged file says which.
        std::fs::write(dir.path().join("context/bad.json"), "{").unwrap();
        assert!(matches!(store.load("bad"), Err(ContextError::Damaged { .. })));
        // ...but only when it is needed: with every setting given, the
        // selected context is not read.
        // (As if it was damaged after it was selected.)
        std::fs::write(dir.path().join("context.txt"), "bad\n").unwrap();
        let env = env_of(&[("PERCH_CONFIG_DIR", cfg.clone())]);
        assert!(matches!(resolve(Flags::default(), &env), Err(ContextError::Damaged { .. })));
        let all = Flags {
            urls: vec!["tls://x:1".into()],
            creds: Some("/f.creds".into()),
            ca: Some("/ca.pem".into()),
            ..Flags::default()
        };
        let r = resolve(all, &env).unwrap();
        assert_eq!((r.context, r.creds_from), (None, Source::Flag));
    }
}
