//! The perch device agent.
//!
//! - [`deploy`]: the A/B engine (stage → activate → trial → commit/rollback),
//!   driven by the crash-safe [`journal`].
//! - [`slots`]: the `dir`, `uboot`, `grub` and `hook` backends.
//! - `health` and `inhibit` (crate-private): what decides a trial, and what defers activation.
//! - [`check`]: the offline verification an install starts with.
//! - [`identity`], [`enroll`] and [`link`]: the device key, enrollment
//!   (online with a token, or offline with files) and the FLEET link.
//!
//! The `pub` modules are what the `perch-agent` binary, the end-to-end tests
//! and the simulated devices use (the architecture page lists the API);
//! the `pub(crate)` ones are the engine's insides.
#![forbid(unsafe_code)]

pub(crate) mod announce;
pub mod check;
pub mod checksum;
pub mod choria_external;
pub mod cli;
pub mod config;
pub(crate) mod counters;
pub mod daemon;
pub mod decision;
pub(crate) mod delta;
pub mod deploy;
pub mod desired;
pub(crate) mod engine_lock;
pub mod enroll;
pub(crate) mod failpoint;
pub mod fetch;
pub(crate) mod health;
pub mod identity;
pub(crate) mod inhibit;
pub mod journal;
pub mod link;
pub mod outbox;
pub mod progress;
pub mod recovery;
pub mod reports;
pub(crate) mod sequencer;
pub mod service;
pub mod slots;
pub(crate) mod spares;
pub(crate) mod statefile;
pub mod status;
pub mod trust_store;
pub(crate) mod trust_update;
pub(crate) mod written;

/// Finds the exit class of this crate's errors (see `perch_support::exit`).
pub const CLASSIFY: perch_support::exit::Classifier = perch_support::classifier![
    deploy::DeployError,
    config::ConfigError,
    enroll::EnrollFailure,
    identity::IdentityError,
    trust_store::TrustStoreError,
    slots::SlotError,
    fetch::OpenError,
    check::CheckError,
    daemon::DaemonError,
];
