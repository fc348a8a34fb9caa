//! The perch device agent.
//!
//! - [`deploy`]: the A/B engine (stage → activate → trial → commit/rollback),
//!   driven by the crash-safe [`journal`].
//! - [`slots`]: the `dir`, `uboot`, `grub` and `hook` backends.
//! - [`health`] and [`inhibit`]: what decides a trial, and what defers activation.
//! - [`check`]: the offline verification an install starts with.
#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod counters;
pub mod deploy;
pub mod failpoint;
pub mod health;
pub mod inhibit;
pub mod journal;
pub mod progress;
pub mod slots;
pub mod status;
