//! The operator side of perch: building, signing and checking bundles.
//!
//! The `perch` binary is a thin clap layer over these modules.
#![forbid(unsafe_code)]

pub mod archive;
pub mod build;
pub mod publish;
pub mod sign;
pub mod verify;
