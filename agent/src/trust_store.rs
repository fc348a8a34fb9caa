//! The trust document the device verifies bundles against, and the highest
//! trust version it has accepted (as TUF clients keep it).
//!
//! Two records in the state directory, so the floor survives the loss of
//! either:
//!
//! - `STATE/trust.accepted`: a copy of the highest accepted document;
//! - `STATE/trust-version`: its version, fingerprint and root key id.
//!
//! The configured `trust.doc` is used only if it is that version (the same
//! document), or a newer one that a valid rotation chain leads to: root
//! signed *and* signed by a threshold of the accepted version's release
//! keys. An older document (one that would bring retired release keys back)
//! or another document with the accepted version is refused. A damaged record
//! is moved aside (`*.corrupt-<time>`) and named in a warning; if both are
//! gone the agent says so and takes the configured document as the floor.
//!
//! An update writes `trust.doc` first and the records after it, so a crash
//! in between leaves `trust.doc` one valid step ahead of the records, which
//! the next use catches up on; the records are never ahead of `trust.doc`.

use std::path::{Path, PathBuf};

use perch_protocol::trust::{
    SignedTrust, TrustError, TrustFloor, VerifiedTrust, MAX_FLOOR_TEXT, MAX_TRUST_FILE_LEN,
};
use perch_support::durable::{self, read_bounded, ReadError, Replace, WriteError};
use perch_support::exit::{Class, Classify};
use perch_support::trustfile::LoadTrustError;

use crate::statefile::{self, StateFile};

const ACCEPTED: &str = "trust.accepted";
const FLOOR: &str = "trust-version";

/// Why the trust document could not be used or updated.
#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    /// The configured document itself (missing, unreadable, bad signature).
    #[error(transparent)]
    Load(#[from] LoadTrustError),
    #[error("{}: trust document version {found} is older than version {floor}, which this device already accepted; refusing to go back (retired release keys would count again)", path.display())]
    Rollback { path: PathBuf, found: u64, floor: u64 },
    #[error("{}: trust document version {version} is not the version {version} this device accepted (fingerprint {found}, accepted {accepted})", path.display())]
    Fork { path: PathBuf, version: u64, found: String, accepted: String },
    #[error("{}: trust document version {found} does not follow the accepted version {floor}: {err}", path.display())]
    Chain { path: PathBuf, found: u64, floor: u64, err: TrustError },
    /// An update with nothing to check it against: the first document
    /// comes with the enrollment or the image, never from an update.
    #[error("{}: this device has accepted no trust document to check it against; the first one comes with its enrollment or is installed at {} with its image", path.display(), configured.display())]
    NoFloor { path: PathBuf, configured: PathBuf },
    /// A record could not be read for a reason that is not its own damage.
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl TrustStoreError {
    pub fn is_security(&self) -> bool {
        matches!(self, Self::Rollback { .. } | Self::Fork { .. } | Self::Chain { .. } | Self::NoFloor { .. })
    }
}

impl Classify for TrustStoreError {
    fn class(&self) -> Option<Class> {
        match self {
            _ if self.is_security() => Some(Class::Security),
            Self::Load(e) => e.class(),
            Self::Read(e) => e.class(),
            Self::Write(e) => e.class(),
            _ => Some(Class::Runtime),
        }
    }
}

/// The document to verify with, and what the agent should say about its records.
pub struct Current {
    pub trust: VerifiedTrust,
    /// Loud: a record was damaged or lost. One line each.
    pub warnings: Vec<String>,
}

/// What loading the records does with a damaged one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// Moves it aside, so the next write can replace it.
    MoveAside,
    /// Only names it: for readers that must write nothing (`status`).
    Leave,
}

/// The records of one state directory.
struct Records {
    accepted: Option<VerifiedTrust>,
    floor: Option<TrustFloor>,
    warnings: Vec<String>,
}

/// The configured trust document at `path`, if the records allow it; a
/// newer one (reached by a valid chain) becomes the new floor.
pub fn current(path: &Path, state_dir: &Path, now: u64) -> Result<Current, TrustStoreError> {
    // Records first: an update writes trust.doc before them, so whatever
    // version they are read at, trust.doc read after is at least that one
    // (an update running meanwhile is a catch-up here, not a rollback).
    let mut rec = Records::load(state_dir)?;
    let bytes = read_bounded(path, MAX_TRUST_FILE_LEN).map_err(LoadTrustError::from)?;
    let trust = check(path, &bytes, &mut rec, state_dir, now)?;
    rec.store(state_dir, &bytes, &trust)?;
    Ok(Current { trust, warnings: rec.warnings })
}

/// `perch-agent trust update FILE`: checks `bytes` against the records
/// like [`current`], then installs it at `path` (the configured location)
/// and records it. Installing the accepted version again changes nothing.
pub fn update(path: &Path, file: &Path, state_dir: &Path, now: u64) -> Result<Current, TrustStoreError> {
    let bytes = read_bounded(file, MAX_TRUST_FILE_LEN).map_err(LoadTrustError::from)?;
    update_bytes(path, file, &bytes, state_dir, now)
}

/// [`update`] with the document in memory (pushed by the fleet); `from`
/// names where it came from in errors.
pub fn update_bytes(
    path: &Path,
    from: &Path,
    bytes: &[u8],
    state_dir: &Path,
    now: u64,
) -> Result<Current, TrustStoreError> {
    let mut rec = Records::load(state_dir)?;
    // With no record yet, the installed document is the floor, so that the
    // new one is checked against it and not taken on first use. With one,
    // the records decide: a damaged trust.doc can still be replaced.
    if rec.floor_version().is_none() && path.exists() {
        let installed = read_bounded(path, MAX_TRUST_FILE_LEN).map_err(LoadTrustError::from)?;
        let t = check(path, &installed, &mut rec, state_dir, now)?;
        rec.store(state_dir, &installed, &t)?;
    }
    // Never taken on first use: anyone who can write the fleet's trust
    // bucket could make their own org this device's.
    if rec.floor_version().is_none() {
        return Err(TrustStoreError::NoFloor { path: from.into(), configured: path.into() });
    }
    let trust = check(from, bytes, &mut rec, state_dir, now)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| WriteError::Io { path: parent.into(), source })?;
    }
    // trust.doc first: a crash before the records leaves it one checked
    // step ahead (caught up on next use), never behind them (a refusal).
    durable::write_bytes(path, 0o644, Replace::Allow, bytes)?;
    rec.store(state_dir, bytes, &trust)?;
    Ok(Current { trust, warnings: rec.warnings })
}

/// The trust document of a new enrollment (`bytes`), installed at `path`
/// unless it is there already and recorded: the one place besides the
/// image's `trust.doc` a first floor comes from. Refused, writing nothing,
/// if the records are at a later version (or another document).
pub fn install_enrolled(
    path: &Path,
    bytes: &[u8],
    state_dir: &Path,
    now: u64,
) -> Result<Current, TrustStoreError> {
    let mut rec = Records::load(state_dir)?;
    let trust = check(path, bytes, &mut rec, state_dir, now)?;
    if !read_bounded(path, MAX_TRUST_FILE_LEN).is_ok_and(|b| b == bytes) {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|source| WriteError::Io { path: parent.into(), source })?;
        }
        durable::write_bytes(path, 0o644, Replace::Allow, bytes)?;
    }
    rec.store(state_dir, bytes, &trust)?;
    Ok(Current { trust, warnings: rec.warnings })
}

/// [`current`] for the deploy engine: warnings go to the log (or stderr,
/// for a local command with no logger).
pub fn for_engine(path: &Path, state_dir: &Path, now: u64) -> Result<VerifiedTrust, TrustStoreError> {
    let c = current(path, state_dir, now)?;
    say(&c.warnings);
    Ok(c.trust)
}

/// Warnings to the log, or to stderr for a local command with no logger.
pub fn say(warnings: &[String]) {
    for w in warnings {
        if tracing::dispatcher::has_been_set() {
            tracing::warn!("{w}");
        } else {
            eprintln!("perch-agent: {w}");
        }
    }
}

/// [`current`] without writing anything (no record repaired, no damaged
/// one moved aside): whether the configured document is the one the
/// records allow, for readers such as `status`.
pub fn peek(path: &Path, state_dir: &Path, now: u64) -> Result<Current, TrustStoreError> {
    let mut rec = Records::load_with(state_dir, Damage::Leave)?;
    let bytes = read_bounded(path, MAX_TRUST_FILE_LEN).map_err(LoadTrustError::from)?;
    let trust = check(path, &bytes, &mut rec, state_dir, now)?;
    Ok(Current { trust, warnings: rec.warnings })
}

impl From<TrustStoreError> for crate::deploy::DeployError {
    fn from(e: TrustStoreError) -> Self {
        use crate::deploy::DeployError;
        match e {
            TrustStoreError::Load(l) => DeployError::Trust(l),
            TrustStoreError::Read(r) => DeployError::Trust(r.into()),
            TrustStoreError::Write(w) => DeployError::Journal(w.into()),
            refused => DeployError::Refused(refused.to_string()),
        }
    }
}

/// Whether the records allow `bytes` (named `path` in errors); writes nothing.
fn check(
    path: &Path,
    bytes: &[u8],
    rec: &mut Records,
    state_dir: &Path,
    now: u64,
) -> Result<VerifiedTrust, TrustStoreError> {
    let load_err = |source| LoadTrustError::Trust { path: path.into(), source };
    let signed = SignedTrust::parse(bytes).map_err(load_err)?;
    let found = signed.unverified_body().version;
    let floor_version = rec.floor_version();
    let trust = match floor_version {
        None => {
            let t = signed.verify_anchor(now, None).map_err(load_err)?;
            if rec.lost_both(state_dir) {
                rec.warnings.push(format!(
                    "no record of an accepted trust version in {}: taking {} (version {found}) as the floor",
                    state_dir.display(),
                    path.display()
                ));
            }
            t
        }
        Some(floor) if found < floor => {
            return Err(TrustStoreError::Rollback { path: path.into(), found, floor });
        }
        Some(floor) if found == floor => {
            let accepted = rec.fingerprint_of(floor);
            if accepted.is_some_and(|fp| fp != signed.fingerprint()) {
                return Err(TrustStoreError::Fork {
                    path: path.into(),
                    version: found,
                    found: hex::encode(&signed.fingerprint()[..8]),
                    accepted: hex::encode(&accepted.unwrap_or_default()[..8]),
                });
            }
            signed.verify_anchor(now, None).map_err(load_err)?
        }
        Some(floor) => match &rec.accepted {
            Some(prev) if prev.body().version == floor => signed
                .verify_rotation(prev, now)
                .map_err(|err| TrustStoreError::Chain { path: path.into(), found, floor, err })?,
            // The copy is lost: the chain cannot be checked, but the floor
            // holds and the root key is still pinned.
            _ => {
                let root = rec.floor.map(|f| f.root);
                let t = signed.verify_anchor(now, None).map_err(load_err)?;
                if root.is_some_and(|r| r != t.body().root_key.id()) {
                    return Err(TrustStoreError::Chain {
                        path: path.into(),
                        found,
                        floor,
                        err: TrustError::Invalid("its root key is not the accepted document's".into()),
                    });
                }
                rec.warnings.push(format!(
                    "{}: no copy of accepted trust version {floor} to check the rotation to version {found} against; took it on the root signature alone",
                    path.display()
                ));
                t
            }
        },
    };
    Ok(trust)
}

impl Records {
    /// Damaged records are moved aside (a warning each); only an I/O error
    /// that is not the record's own fault (permissions, a failing disk) is
    /// an error, since taking the records as lost could lower the floor.
    fn load(state_dir: &Path) -> Result<Self, ReadError> {
        Self::load_with(state_dir, Damage::MoveAside)
    }

    fn load_with(state_dir: &Path, damage: Damage) -> Result<Self, ReadError> {
        let mut warnings = Vec::new();
        let accepted = match record(&state_dir.join(ACCEPTED), MAX_TRUST_FILE_LEN, damage, &mut warnings)? {
            Some(b) => match SignedTrust::parse(&b).and_then(|t| t.verify_record(None)) {
                Ok(t) => Some(t),
                Err(e) => {
                    warnings.push(set_aside(&state_dir.join(ACCEPTED), &e.to_string(), damage));
                    None
                }
            },
            None => None,
        };
        let floor = match record(&state_dir.join(FLOOR), MAX_FLOOR_TEXT, damage, &mut warnings)? {
            Some(b) => match TrustFloor::parse(&b) {
                Ok(f) => Some(f),
                Err(e) => {
                    warnings.push(set_aside(&state_dir.join(FLOOR), &e.to_string(), damage));
                    None
                }
            },
            None => None,
        };
        // A copy from another org's root is not this device's record.
        let accepted = match (accepted, floor) {
            (Some(a), Some(f)) if a.body().root_key.id() != f.root => {
                warnings.push(set_aside(
                    &state_dir.join(ACCEPTED),
                    "its root key is not the recorded one",
                    damage,
                ));
                None
            }
            (a, _) => a,
        };
        Ok(Records { accepted, floor, warnings })
    }

    /// The highest version either record holds.
    fn floor_version(&self) -> Option<u64> {
        let a = self.accepted.as_ref().map(|t| t.body().version);
        let f = self.floor.map(|f| f.version);
        a.max(f)
    }

    /// The accepted fingerprint of `version`, if a record knows it.
    fn fingerprint_of(&self, version: u64) -> Option<[u8; 32]> {
        let a =
            self.accepted.as_ref().filter(|t| t.body().version == version).map(VerifiedTrust::fingerprint);
        a.or(self.floor.filter(|f| f.version == version).map(|f| f.fingerprint))
    }

    /// Neither record exists, but the device has run before (a journal or
    /// a set-aside record): the floor was lost, not never made.
    fn lost_both(&self, state_dir: &Path) -> bool {
        !self.warnings.is_empty() || state_dir.join("journal").exists()
    }

    /// Writes whichever record is missing or older than `trust`: the copy
    /// first, so a crash between the two leaves the copy ahead (the floor
    /// is the higher of the two). Then they are `trust`'s.
    fn store(&mut self, state_dir: &Path, bytes: &[u8], trust: &VerifiedTrust) -> Result<(), WriteError> {
        let floor = TrustFloor::of(trust);
        let copy_current = self.accepted.as_ref().is_some_and(|a| a.fingerprint() == trust.fingerprint());
        if !copy_current {
            std::fs::create_dir_all(state_dir)
                .map_err(|source| WriteError::Io { path: state_dir.into(), source })?;
            durable::write_bytes(&state_dir.join(ACCEPTED), 0o644, Replace::Allow, bytes)?;
            self.accepted = Some(trust.clone());
        }
        if self.floor != Some(floor) {
            durable::write_bytes(&state_dir.join(FLOOR), 0o644, Replace::Allow, floor.to_text().as_bytes())?;
            self.floor = Some(floor);
        }
        Ok(())
    }
}

/// The bytes of the record at `path`, None if it is missing or damaged
/// (moved aside, with a warning): a FIFO or a directory is damage, not a
/// read that blocks or fails every install.
fn record(
    path: &Path,
    max: usize,
    damage: Damage,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<u8>>, ReadError> {
    match statefile::read(path, max)? {
        StateFile::Missing => Ok(None),
        StateFile::Bytes(b) => Ok(Some(b)),
        StateFile::Damaged(why) => {
            warnings.push(set_aside(path, &why, damage));
            Ok(None)
        }
    }
}

/// Moves a damaged record aside; the warning line that says so.
fn set_aside(path: &Path, why: &str, damage: Damage) -> String {
    if damage == Damage::Leave {
        return format!("{}: {why}", path.display());
    }
    match statefile::move_aside(path, perch_support::now_unix()) {
        Ok(aside) => format!("{}: {why}; moved aside to {}", path.display(), aside.display()),
        Err(e) => format!("{}: {why}; could not move it aside: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perch_protocol::trust::TrustBody;
    use perch_protocol::SecretKey;

    const NOW: u64 = 2000;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    /// Version `v` of org "acme" (root key 1) with `release` at threshold 1,
    /// rotation-signed by `by`.
    fn doc(v: u64, release: &[&SecretKey], by: &[&SecretKey]) -> Vec<u8> {
        let root = key(1);
        let body = TrustBody {
            org: "acme".into(),
            version: v,
            issued_at: 1000,
            expires_at: None,
            root_key: root.public(),
            release_keys: release.iter().map(|k| k.public()).collect(),
            threshold: 1,
            issuing_keys: vec![],
        };
        let mut d = SignedTrust::create(body, &root).unwrap();
        for k in by {
            d.add_rotation_signature(k);
        }
        d.to_bytes()
    }

    struct Dev {
        _t: tempfile::TempDir,
        trust: PathBuf,
        state: PathBuf,
    }

    fn dev() -> Dev {
        let t = tempfile::tempdir().unwrap();
        Dev { trust: t.path().join("trust.doc"), state: t.path().join("state"), _t: t }
    }

    impl Dev {
        fn put(&self, bytes: &[u8]) -> Result<Current, TrustStoreError> {
            std::fs::write(&self.trust, bytes).unwrap();
            current(&self.trust, &self.state, NOW)
        }
    }

    #[test]
    fn a_rotation_that_retires_a_key_is_taken_and_the_old_document_is_refused_after() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        let v1 = doc(1, &[&a, &b], &[]);
        assert!(d.put(&v1).unwrap().warnings.is_empty(), "first use is quiet");
        // v2 retires a; a signs the rotation (threshold 1 of v1's keys).
        let v2 = doc(2, &[&b], &[&a]);
        let c = d.put(&v2).unwrap();
        assert_eq!(c.trust.body().version, 2);
        assert_eq!(c.trust.release_keys(), &[b.public()]);
        let r = d.put(&v1);
        assert!(matches!(r, Err(TrustStoreError::Rollback { found: 1, floor: 2, .. })), "{:?}", r.err());
        assert!(r.err().is_some_and(|e| e.is_security()));
        // The accepted one still works.
        assert_eq!(d.put(&v2).unwrap().trust.body().version, 2);
    }

    #[test]
    fn a_newer_document_without_a_valid_rotation_chain_is_refused() {
        let (a, b, x) = (key(2), key(3), key(9));
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        // Root-signed only, or co-signed by a key v1 does not list.
        for v2 in [doc(2, &[&b], &[]), doc(2, &[&b], &[&x])] {
            let r = d.put(&v2);
            assert!(matches!(r, Err(TrustStoreError::Chain { found: 2, floor: 1, .. })), "{:?}", r.err());
        }
        // And the floor did not move.
        assert_eq!(d.put(&doc(1, &[&a], &[])).unwrap().trust.body().version, 1);
    }

    #[test]
    fn another_document_with_the_accepted_version_is_refused() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        d.put(&doc(3, &[&a], &[])).unwrap();
        let r = d.put(&doc(3, &[&b], &[]));
        assert!(matches!(r, Err(TrustStoreError::Fork { version: 3, .. })), "{:?}", r.err());
    }

    #[test]
    fn the_floor_survives_the_loss_or_damage_of_either_record() {
        let (a, b) = (key(2), key(3));
        let (v1, v2) = (doc(1, &[&a], &[]), doc(2, &[&b], &[&a]));
        // Lost, damaged (a bit flip), or a directory in its place.
        for (lost, damage) in
            [(ACCEPTED, 0), (FLOOR, 0), (ACCEPTED, 1), (FLOOR, 1), (ACCEPTED, 2), (FLOOR, 2)]
        {
            let d = dev();
            d.put(&v1).unwrap();
            d.put(&v2).unwrap();
            let f = d.state.join(lost);
            if damage == 1 {
                let mut bytes = std::fs::read(&f).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x04;
                std::fs::write(&f, bytes).unwrap();
            } else {
                std::fs::remove_file(&f).unwrap();
            }
            if damage == 2 {
                std::fs::create_dir(&f).unwrap();
            }
            let r = d.put(&v1);
            assert!(
                matches!(r, Err(TrustStoreError::Rollback { floor: 2, .. })),
                "{lost} {damage}: {:?}",
                r.err()
            );
            if damage > 0 {
                let aside = std::fs::read_dir(&d.state)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&format!("{lost}.corrupt-")));
                assert!(aside, "{lost} was not moved aside");
            }
            // The accepted document repairs the missing record, with a warning
            // only if something was damaged (it was moved aside above).
            let c = d.put(&v2).unwrap();
            assert_eq!(c.trust.body().version, 2);
            assert!(d.state.join(ACCEPTED).is_file() && d.state.join(FLOOR).is_file());
        }
    }

    #[test]
    fn losing_both_records_is_said_loudly() {
        let a = key(2);
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        std::fs::write(d.state.join("journal"), b"x").unwrap();
        std::fs::remove_file(d.state.join(ACCEPTED)).unwrap();
        std::fs::remove_file(d.state.join(FLOOR)).unwrap();
        let c = d.put(&doc(1, &[&a], &[])).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("no record of an accepted trust version"), "{:?}", c.warnings);
    }

    #[test]
    fn update_installs_only_what_the_chain_allows() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        // No record yet: the installed document is still what the new one is checked against.
        std::fs::write(&d.trust, doc(1, &[&a], &[])).unwrap();
        let new = d.trust.with_file_name("new.doc");
        std::fs::write(&new, doc(2, &[&b], &[])).unwrap();
        assert!(update(&d.trust, &new, &d.state, NOW).is_err());
        assert_eq!(
            std::fs::read(&d.trust).unwrap(),
            doc(1, &[&a], &[]),
            "a refused update wrote the trust file"
        );
        std::fs::write(&new, doc(2, &[&b], &[&a])).unwrap();
        update(&d.trust, &new, &d.state, NOW).unwrap();
        assert_eq!(std::fs::read(&d.trust).unwrap(), doc(2, &[&b], &[&a]));
        // A damaged trust.doc does not stand in the way of the next version.
        std::fs::write(&d.trust, b"garbage").unwrap();
        std::fs::write(&new, doc(3, &[&a], &[&b])).unwrap();
        assert_eq!(update(&d.trust, &new, &d.state, NOW).unwrap().trust.body().version, 3);
    }

    #[test]
    fn an_update_that_fails_after_its_checks_never_leaves_the_records_ahead_of_trust_doc() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        // trust.doc cannot be written (its directory is a file): the crash
        // between the two writes, as far as what is on disk goes.
        let blocked = d.trust.with_file_name("blocker").join("trust.doc");
        std::fs::write(blocked.parent().unwrap(), b"").unwrap();
        let from = Path::new("push");
        assert!(update_bytes(&blocked, from, &doc(2, &[&b], &[&a]), &d.state, NOW).is_err());
        // The installed v1 is still what installs verify with.
        assert_eq!(current(&d.trust, &d.state, NOW).unwrap().trust.body().version, 1);
    }

    #[test]
    fn trust_doc_one_step_ahead_of_the_records_is_caught_up_and_behind_them_is_refused() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        // Crash after trust.doc (v2), before the records (v1).
        std::fs::write(&d.trust, doc(2, &[&b], &[&a])).unwrap();
        let c = current(&d.trust, &d.state, NOW).unwrap();
        assert_eq!(c.trust.body().version, 2);
        assert_eq!(Records::load(&d.state).unwrap().floor_version(), Some(2));
        // Records at v2, trust.doc at v1: our own writes never leave this; it
        // is someone putting back an old document.
        let r = d.put(&doc(1, &[&a], &[]));
        assert!(matches!(r, Err(TrustStoreError::Rollback { found: 1, floor: 2, .. })), "{:?}", r.err());
    }

    #[test]
    fn a_pushed_document_is_refused_on_a_device_with_no_floor() {
        let d = dev();
        let other_root = key(7);
        let mut body = SignedTrust::parse(&doc(5, &[&key(8)], &[])).unwrap().unverified_body().clone();
        (body.org, body.root_key) = ("evil".into(), other_root.public());
        let evil = SignedTrust::create(body, &other_root).unwrap().to_bytes();
        let r = update_bytes(&d.trust, Path::new("push"), &evil, &d.state, NOW);
        assert!(matches!(r, Err(TrustStoreError::NoFloor { .. })), "{:?}", r.err());
        assert!(r.err().is_some_and(|e| e.is_security()));
        assert!(!d.trust.exists() && !d.state.join(ACCEPTED).exists() && !d.state.join(FLOOR).exists());
    }

    #[test]
    fn a_fifo_at_a_record_is_moved_aside_not_read() {
        let a = key(2);
        for name in [ACCEPTED, FLOOR] {
            let d = dev();
            d.put(&doc(1, &[&a], &[])).unwrap();
            let f = d.state.join(name);
            std::fs::remove_file(&f).unwrap();
            nix::unistd::mkfifo(&f, nix::sys::stat::Mode::S_IRWXU).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let (trust, state) = (d.trust.clone(), d.state.clone());
            std::thread::spawn(move || tx.send(current(&trust, &state, NOW).map(|c| c.warnings)));
            let r = rx.recv_timeout(std::time::Duration::from_secs(10));
            let warnings = r.expect("reading a FIFO record hung").unwrap();
            assert!(warnings.iter().any(|w| w.contains("moved aside")), "{name}: {warnings:?}");
            assert!(std::fs::symlink_metadata(&f).unwrap().is_file(), "{name} rewritten");
        }
    }

    #[test]
    fn an_install_reading_the_trust_document_during_updates_is_never_refused() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        use std::sync::Arc;
        let a = key(2);
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        let versions: Vec<Vec<u8>> = (2..=60).map(|v| doc(v, &[&a], &[&a])).collect();
        let (done, reads) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (trust, state, stop, count) = (d.trust.clone(), d.state.clone(), done.clone(), reads.clone());
        let reader = std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                current(&trust, &state, NOW)
                    .map_err(|e| format!("after {} reads: {e}", count.load(SeqCst)))?;
                count.fetch_add(1, SeqCst);
            }
            Ok::<(), String>(())
        });
        for v in &versions {
            // Each update lands while the reader is in the middle of reads.
            let seen = reads.load(SeqCst);
            while reads.load(SeqCst) == seen && !reader.is_finished() {
                std::thread::yield_now();
            }
            update_bytes(&d.trust, Path::new("push"), v, &d.state, NOW).unwrap();
        }
        done.store(true, SeqCst);
        reader.join().unwrap().unwrap();
    }

    #[test]
    fn an_update_reports_the_records_it_moved_aside() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        std::fs::write(d.state.join(FLOOR), b"garbage\n").unwrap();
        let c = update_bytes(&d.trust, Path::new("push"), &doc(2, &[&b], &[&a]), &d.state, NOW).unwrap();
        assert_eq!(c.trust.body().version, 2);
        assert!(
            c.warnings.iter().any(|w| w.contains(FLOOR) && w.contains("moved aside")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn peeking_at_the_trust_document_writes_nothing() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        std::fs::write(&d.trust, doc(2, &[&b], &[&a])).unwrap();
        std::fs::write(d.state.join(FLOOR), b"garbage\n").unwrap();
        let snapshot = || {
            let mut files: Vec<_> = std::fs::read_dir(&d.state)
                .unwrap()
                .flatten()
                .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
                .collect();
            files.sort();
            files
        };
        let before = snapshot();
        let c = peek(&d.trust, &d.state, NOW).unwrap();
        assert_eq!(c.trust.body().version, 2);
        assert!(c.warnings.iter().any(|w| w.contains(FLOOR)), "{:?}", c.warnings);
        assert_eq!(snapshot(), before);
        // And an older document is refused all the same.
        std::fs::write(&d.trust, doc(1, &[&b], &[])).unwrap();
        assert!(peek(&d.trust, &d.state, NOW).is_err_and(|e| e.is_security()));
    }

    #[test]
    fn an_enrollment_document_older_than_the_floor_is_refused_and_not_installed() {
        let (a, b) = (key(2), key(3));
        let d = dev();
        d.put(&doc(1, &[&a], &[])).unwrap();
        d.put(&doc(2, &[&b], &[&a])).unwrap();
        std::fs::remove_file(&d.trust).unwrap();
        let r = install_enrolled(&d.trust, &doc(1, &[&a], &[]), &d.state, NOW);
        assert!(matches!(r, Err(TrustStoreError::Rollback { .. })), "{:?}", r.err());
        assert!(!d.trust.exists(), "a refused enrollment document was installed");
        // On a new device it is the floor, and a push is checked against it.
        let d = dev();
        install_enrolled(&d.trust, &doc(1, &[&a], &[]), &d.state, NOW).unwrap();
        assert_eq!(Records::load(&d.state).unwrap().floor_version(), Some(1));
        let r = update_bytes(&d.trust, Path::new("push"), &doc(2, &[&b], &[]), &d.state, NOW);
        assert!(matches!(r, Err(TrustStoreError::Chain { .. })), "{:?}", r.err());
    }
}
