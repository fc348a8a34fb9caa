//! The operator side of perch: building, signing, checking and publishing
//! bundles, and the fleet's status view.
//!
//! The `perch` binary is a thin clap layer over these modules.
#![forbid(unsafe_code)]

pub mod archive;
pub mod build;
pub mod catalog;
pub mod console;
pub mod context;
pub mod desired;
pub mod diff;
pub mod link;
pub mod presence;
pub mod publish;
pub mod rollout;
pub mod rollout_store;
pub mod sign;
pub mod status;
pub mod streams;
pub mod table;
pub mod verify;
pub mod view;
pub mod watch;

/// Finds the exit class of this crate's errors (see `perch_support::exit`).
pub const CLASSIFY: perch_support::exit::Classifier = perch_support::classifier![
    archive::ArchiveError,
    build::BuildError,
    catalog::CatalogError,
    console::ConsoleError,
    context::ContextError,
    desired::DesiredError,
    link::ConnectError,
    publish::PublishError,
    rollout_store::RolloutError,
    sign::SignError,
    status::StatusError,
    verify::VerifyError,
    watch::WatchError,
];
