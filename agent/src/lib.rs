//! The perch device agent.
//!
//! - [`deploy`]: the A/B engine (stage → activate → trial → commit/rollback),
//!   driven by the crash-safe [`journal`].
//! - [`slots`]: the `dir`, `uboot`, `grub` and `hook` backends.
//! - [`health`] and [`inhibit`]: what decides a trial, and what defers activation.
//! - [`check`]: the offline verification an install starts with.
//! - [`identity`], [`enroll`] and [`link`]: the device key, enrollment
//!   (online with a token, or offline with files) and the FLEET link.
#![forbid(unsafe_code)]

pub mod check;
pub mod checksum;
pub mod cli;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod decision;
pub mod delta;
pub mod deploy;
pub mod desired;
pub mod engine_lock;
pub mod enroll;
pub mod failpoint;
pub mod fetch;
pub mod health;
pub mod identity;
pub mod inhibit;
pub mod journal;
pub mod link;
pub mod outbox;
pub mod progress;
pub mod recovery;
pub mod reports;
pub mod sequencer;
pub mod service;
pub mod slots;
pub mod statefile;
pub mod status;
pub mod trust_store;
pub mod trust_update;

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
];
