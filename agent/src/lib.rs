//! The perch device agent.
//!
//! Today it checks bundles offline against the org trust document, with the
//! same streaming verifier the installer will use: nothing unauthenticated
//! is ever handed on. The A/B deploy engine builds on this.
#![forbid(unsafe_code)]

pub mod check;
