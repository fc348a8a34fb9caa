//! The operator side of perch: building, signing, checking and publishing
//! bundles, and the fleet's status view.
//!
//! The `perch` binary is a thin clap layer over these modules.
#![forbid(unsafe_code)]

pub mod archive;
pub mod build;
pub mod catalog;
pub mod context;
pub mod desired;
pub mod diff;
pub mod link;
pub mod publish;
pub mod rollout;
pub mod rollouts;
pub mod sign;
pub mod status;
pub mod streams;
pub mod table;
pub mod verify;
pub mod view;
