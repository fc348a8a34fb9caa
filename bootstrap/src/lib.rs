//! Trust and enrollment for perch.
//!
//! - [`org`]: the org directory (root key, trust document) and `init`.
//! - [`nats`]: the NATS operator, accounts and JWTs; [`tls`]: the fleet CA.
//! - [`token`]: enrollment tokens.
//! - [`registry`]: the device registry and token use counters in JetStream KV.
//! - [`issue`]: what an enrolled device gets (credential, user JWT, CA).
//! - [`provisioner`]: the NATS service that answers enrollment requests.
//! - [`drop_log`]: its counts of dropped garbage, logged within a budget.
//! - [`admin`]: operator commands against a running fleet (approve, revoke...).
//! - [`trust_push`]: the trust document into `PERCH_TRUST`, for devices to take.
//! - [`cluster`]: the configuration of an N-server nats-server cluster.
//! - [`site`]: the configuration of a field site's server (a leaf node).
//! - [`server_conf`]: name checks and config pieces both of them use.
//! - [`site_run`]: the daemon of a field site (a leaf node of the hub).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cluster;
pub mod drop_log;
pub mod issue;
pub mod nats;
pub mod org;
pub mod provisioner;
pub mod registry;
pub mod server_conf;
pub mod site;
pub mod site_run;
pub mod tls;
pub mod token;
pub mod trust_push;

/// Finds the exit class of this crate's errors (see `perch_support::exit`).
pub const CLASSIFY: perch_support::exit::Classifier = perch_support::classifier![
    admin::AdminError,
    cluster::ClusterError,
    issue::IssuerError,
    nats::NatsError,
    org::OrgError,
    provisioner::ProvisionerError,
    registry::RegistryError,
    site::SiteError,
    site::SiteConfigError,
    site_run::SiteError,
    tls::TlsError,
    token::IssueError,
    trust_push::PushError,
    perch_net::LinkError,
    perch_net::operator::ConnectError,
];
