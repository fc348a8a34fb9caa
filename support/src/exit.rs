//! The exit codes of the CLI contract, and the one mapping from errors to
//! them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | runtime failure |
//! | 2 | usage or config error |
//! | 3 | rejected for security (signature, threshold, hash, downgrade, expired, token, corrupt input) |
//!
//! Each error type says its own [`Class`] by implementing [`Classify`],
//! next to its definition. [`code_for`] is the only place that turns an
//! error into an exit code: it walks the error's chain and asks each
//! cause, through the classifiers of the crates whose types can appear in
//! it. A binary passes its crate's classifier (made by [`classifier!`]).

use perch_protocol::bundle::{ArchiveError, BundleError};
use perch_protocol::trust::TrustError;

use crate::durable::{ReadError, WriteError};
use crate::keyfile::KeyFileError;
use crate::trustfile::LoadTrustError;

pub const SUCCESS: i32 = 0;
pub const RUNTIME: i32 = 1;
pub const USAGE: i32 = 2;
pub const SECURITY: i32 = 3;

/// What kind of failure an error is, as the exit code tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Exit 1: I/O, a server that did not answer, a step that failed.
    Runtime,
    /// Exit 2: a bad flag or value, a missing or unusable file.
    Usage,
    /// Exit 3: refused for security.
    Security,
}

impl Class {
    pub const fn code(self) -> i32 {
        match self {
            Class::Runtime => RUNTIME,
            Class::Usage => USAGE,
            Class::Security => SECURITY,
        }
    }
}

/// An error type that knows its exit class. `None` means "whatever the
/// error under me is" ([`std::error::Error::source`]); an error with no
/// class anywhere in its chain is a runtime failure.
pub trait Classify {
    fn class(&self) -> Option<Class>;
}

/// Asks one error (not its chain) for its class, if it is one of a
/// crate's error types: `Some(None)` is a type that defers to its source.
pub type Classifier = fn(&(dyn std::error::Error + 'static)) -> Option<Option<Class>>;

/// A [`Classifier`] for the listed error types, each of which implements
/// [`Classify`].
#[macro_export]
macro_rules! classifier {
    ($($t:ty),+ $(,)?) => {
        |e: &(dyn ::std::error::Error + 'static)| -> Option<Option<$crate::exit::Class>> {
            $(
                if let Some(x) = e.downcast_ref::<$t>() {
                    return Some($crate::exit::Classify::class(x));
                }
            )+
            None
        }
    };
}

/// This crate's error types and the protocol's.
pub const CLASSIFY: Classifier = classifier![
    UsageError,
    SecurityError,
    BundleError,
    ArchiveError,
    TrustError,
    perch_protocol::token::TokenError,
    KeyFileError,
    WriteError,
    ReadError,
    LoadTrustError,
];

/// The exit code for an error chain (outermost first): the class of the
/// first cause that has one, asking [`CLASSIFY`] and then `crates`' own
/// classifiers; a runtime failure if none has.
pub fn code_for<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
    crates: &[Classifier],
) -> i32 {
    for e in chain {
        for classify in std::iter::once(&CLASSIFY).chain(crates) {
            if let Some(class) = classify(e) {
                match class {
                    Some(c) => return c.code(),
                    None => break,
                }
            }
        }
    }
    RUNTIME
}

/// An error in how the command was invoked or configured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Classify for UsageError {
    fn class(&self) -> Option<Class> {
        Some(Class::Usage)
    }
}

/// A refusal for security reasons that is not a bundle or trust error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecurityError(pub String);

impl Classify for SecurityError {
    fn class(&self) -> Option<Class> {
        Some(Class::Security)
    }
}

/// Security for what a device refuses, runtime for I/O trouble: the class
/// of an error type with an `is_security()`.
pub fn security_if(refused: bool) -> Option<Class> {
    Some(if refused { Class::Security } else { Class::Runtime })
}

impl Classify for BundleError {
    fn class(&self) -> Option<Class> {
        security_if(self.is_security())
    }
}

impl Classify for ArchiveError {
    fn class(&self) -> Option<Class> {
        security_if(self.is_security())
    }
}

impl Classify for TrustError {
    fn class(&self) -> Option<Class> {
        Some(Class::Security)
    }
}

impl Classify for perch_protocol::token::TokenError {
    fn class(&self) -> Option<Class> {
        Some(Class::Security)
    }
}

impl Classify for KeyFileError {
    fn class(&self) -> Option<Class> {
        match self {
            KeyFileError::Read(r) => r.class(),
            KeyFileError::Write(w) => w.class(),
            // Wrong mode, wrong kind of key, not a key: the operator's to fix.
            _ => Some(Class::Usage),
        }
    }
}

impl Classify for WriteError {
    fn class(&self) -> Option<Class> {
        match self {
            WriteError::Exists(_) => Some(Class::Usage),
            _ => Some(Class::Runtime),
        }
    }
}

impl Classify for ReadError {
    /// A named file that is missing or too large is the operator's to fix.
    fn class(&self) -> Option<Class> {
        match self {
            ReadError::Io { source, .. } if !is_missing(source) => Some(Class::Runtime),
            _ => Some(Class::Usage),
        }
    }
}

impl Classify for LoadTrustError {
    fn class(&self) -> Option<Class> {
        match self {
            // An oversized trust document is hostile input, not a typo.
            LoadTrustError::Read(ReadError::TooLarge { .. }) => Some(Class::Security),
            LoadTrustError::Read(r) => r.class(),
            LoadTrustError::Trust { .. } => Some(Class::Security),
        }
    }
}

/// A command-line parser's error text (clap's: an `error:` line, a
/// `tip:`, the usage, a pointer to `--help`) as the one line the contract
/// wants: `BIN: ERROR; TIP (see `COMMAND --help`)`.
pub fn one_line_usage(bin: &str, text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("bad command line");
    let mut out = format!("{bin}: {}", first.strip_prefix("error: ").unwrap_or(first));
    let (mut details, mut tips, mut command) = (vec![], vec![], bin.to_string());
    for l in lines {
        if let Some(tip) = l.strip_prefix("tip: ") {
            tips.push(tip);
        } else if let Some(usage) = l.strip_prefix("Usage: ") {
            let words = usage.split(' ').take_while(|w| !w.starts_with(['[', '<', '-']));
            command = words.collect::<Vec<_>>().join(" ");
        } else if !l.starts_with("For more information") {
            // What the first line announces (the missing arguments, say).
            details.push(l);
        }
    }
    if !details.is_empty() {
        out = format!("{out} {}", details.join(", "));
    }
    for tip in tips {
        out = format!("{out}; {tip}");
    }
    format!("{out} (see `{command} --help`)")
}

/// A file that is not there (or is a directory where a file belongs).
pub fn is_missing(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("wrapped")]
        Wrapped(#[source] UsageError),
        #[error("io")]
        Io(#[source] std::io::Error),
    }

    impl Classify for Outer {
        fn class(&self) -> Option<Class> {
            match self {
                Outer::Wrapped(_) => None,
                Outer::Io(_) => Some(Class::Runtime),
            }
        }
    }

    fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Vec<&'a (dyn std::error::Error + 'static)> {
        std::iter::successors(Some(e), |e| e.source()).collect()
    }

    #[test]
    fn a_usage_error_is_one_line_naming_the_command() {
        let clap = "error: unexpected argument '--x' found\n\n  tip: to pass '--x' as a value, use '-- --x'\n\nUsage: perch bundle inspect [OPTIONS] <FILE>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_usage("perch", clap),
            "perch: unexpected argument '--x' found; to pass '--x' as a value, use '-- --x' (see `perch bundle inspect --help`)"
        );
        assert_eq!(one_line_usage("perch", ""), "perch: bad command line (see `perch --help`)");
        let missing = "error: the following required arguments were not provided:\n  --release-key <KEYS>\n  --org <ORG>\n\nUsage: perch-bootstrap init --dir <DIR>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_usage("perch-bootstrap", missing),
            "perch-bootstrap: the following required arguments were not provided: --release-key <KEYS>, --org <ORG> (see `perch-bootstrap init --help`)"
        );
    }

    #[test]
    fn the_first_cause_with_a_class_decides() {
        let outer: Classifier = classifier![Outer];
        let e = Outer::Wrapped(UsageError("x".into()));
        assert_eq!(code_for(chain(&e), &[outer]), USAGE, "deferred to the source");
        let e = Outer::Io(std::io::Error::new(std::io::ErrorKind::NotFound, "gone"));
        assert_eq!(code_for(chain(&e), &[outer]), RUNTIME);
        let e = std::io::Error::other("unclassified");
        assert_eq!(code_for(chain(&e), &[outer]), RUNTIME, "no class anywhere: runtime");
        let e = SecurityError("no".into());
        assert_eq!(code_for(chain(&e), &[]), SECURITY);
    }
}
