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

/// `PERCH_DESIRED`: the KV bucket of desired state (`device.<id>`,
/// `group.<g>`), five revisions kept per key for the operator's history.
pub async fn desired(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    crate::ensure_kv(js, subjects::DESIRED_BUCKET, "perch desired state: device.<id> and group.<g>", 5).await
}

/// `PERCH_BUNDLES`: what `perch publish` published, by `<name>.<counter>`.
pub async fn bundles(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    crate::ensure_kv(js, subjects::BUNDLES_BUCKET, "perch published bundles: <name>.<counter>", 1).await
}

/// `PERCH_ROLLOUTS`: rollouts and their waves, changed only by
/// compare-and-swap so several operators can drive and take over.
pub async fn rollouts(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    crate::ensure_kv(js, subjects::ROLLOUTS_BUCKET, "perch rollouts", 5).await
}
