//! The fleet's JetStream streams, configured in one place: whoever creates
//! them first (the provisioner, or `perch publish`) creates the same thing.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, StorageType};
use perch_protocol::subjects;

/// `PERCH_REPORTS`: device reports, deduplicated by `Nats-Msg-Id` for
/// [`subjects::REPORTS_DUPLICATE_WINDOW_SECS`], kept 30 days.
pub fn reports() -> Config {
    Config {
        name: subjects::REPORTS_STREAM.into(),
        description: Some("perch device reports".into()),
        subjects: vec![subjects::REPORTS_ALL.into()],
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(subjects::REPORTS_DUPLICATE_WINDOW_SECS),
        max_age: Duration::from_secs(30 * 24 * 3600),
        allow_direct: true,
        ..Default::default()
    }
}

/// `PERCH_CHUNKS`: bundle heads and chunks, one message per subject, read
/// by devices with direct gets.
pub fn chunks() -> Config {
    Config {
        name: subjects::CHUNKS_STREAM.into(),
        description: Some("perch bundle chunks".into()),
        subjects: vec![subjects::CHUNKS_ALL.into()],
        storage: StorageType::File,
        max_messages_per_subject: 1,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// A KV bucket of the fleet.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    pub name: &'static str,
    pub description: &'static str,
    /// Revisions kept per key.
    pub history: i64,
}

impl Bucket {
    /// Opens the bucket, creating it first if need be ([`crate::Replicas::Auto`]).
    pub async fn open(
        self,
        js: &async_nats::jetstream::Context,
    ) -> Result<async_nats::jetstream::kv::Store, String> {
        crate::ensure_kv(js, self.name, self.description, self.history).await
    }
}

/// `PERCH_DESIRED`: desired state (`device.<id>`, `group.<g>`), five
/// revisions kept per key for the operator's history.
pub const DESIRED: Bucket = Bucket {
    name: subjects::DESIRED_BUCKET,
    description: "perch desired state: device.<id> and group.<g>",
    history: 5,
};
/// `PERCH_BUNDLES`: what `perch publish` published, by `<name>.<counter>`.
pub const BUNDLES: Bucket = Bucket {
    name: subjects::BUNDLES_BUCKET,
    description: "perch published bundles: <name>.<counter>",
    history: 1,
};
/// `PERCH_ROLLOUTS`: rollouts and their waves, changed only by
/// compare-and-swap so several operators can drive and take over.
pub const ROLLOUTS: Bucket =
    Bucket { name: subjects::ROLLOUTS_BUCKET, description: "perch rollouts", history: 5 };
/// `PERCH_REGISTRY`: the device registry and token use counters.
pub const REGISTRY: Bucket = Bucket {
    name: subjects::REGISTRY_BUCKET,
    description: "perch device registry and token use counters",
    history: 5,
};
/// Every bucket of the fleet.
pub const BUCKETS: [Bucket; 4] = [DESIRED, BUNDLES, ROLLOUTS, REGISTRY];

pub async fn desired(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    DESIRED.open(js).await
}

pub async fn bundles(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    BUNDLES.open(js).await
}

pub async fn rollouts(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    ROLLOUTS.open(js).await
}
