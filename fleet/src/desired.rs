//! `perch desired`: the desired state itself, one key at a time: which
//! bundle a device (`device.<id>`) or a group (`group.<g>`) should run.
//! Devices hear a change the moment it is written (and after an outage, as
//! soon as they are back); the device's own key beats its groups'.
//!
//! Only a bundle whose head is in `PERCH_CHUNKS` can be named: a device
//! told to fetch a bundle nobody published would only fail.

use async_nats::jetstream;
use futures_util::StreamExt;
use perch_protocol::subjects::{self, CHUNKS_STREAM};
use perch_support::exit::{Class, Classify};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("bundle {0} is not published (run `perch publish` first)")]
    NotPublished(String),
    #[error("'{0}' is not a valid device or group name")]
    BadName(String),
    #[error("desired-state key {key} holds something else: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("no device '{0}' in the registry (enroll it first, or see `perch-bootstrap devices`)")]
    UnknownDevice(String),
}

impl Classify for DesiredError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            DesiredError::NotPublished(_) | DesiredError::BadName(_) | DesiredError::UnknownDevice(_) => {
                Class::Usage
            }
            DesiredError::Nats(_) | DesiredError::Corrupt { .. } => Class::Runtime,
        })
    }
}

fn nats(e: impl std::fmt::Display) -> DesiredError {
    DesiredError::Nats(e.to_string())
}

/// Whose desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Device(String),
    Group(String),
}

impl Scope {
    pub fn key(&self) -> Result<String, DesiredError> {
        let (name, key) = match self {
            Scope::Device(d) => (d, subjects::desired_device_key(d)),
            Scope::Group(g) => (g, subjects::desired_group_key(g)),
        };
        if !subjects::is_token(name) {
            return Err(DesiredError::BadName(name.chars().take(80).collect()));
        }
        Ok(key)
    }
}

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub key: String,
    pub bundle: String,
    pub revision: u64,
}

/// Names `digest` for `scope`; the new revision.
pub async fn set(js: &jetstream::Context, scope: &Scope, digest: &[u8; 32]) -> Result<u64, DesiredError> {
    let key = scope.key()?;
    if let Scope::Device(d) = scope {
        let record = perch_net::read::kv_entry(
            js,
            perch_protocol::subjects::REGISTRY_BUCKET,
            &perch_protocol::registry::device_key(d),
        )
        .await
        .map_err(DesiredError::Nats)?;
        if record.is_none() {
            return Err(DesiredError::UnknownDevice(d.clone()));
        }
    }
    check_published(js, digest).await?;
    let kv = perch_net::streams::desired(js).await.map_err(DesiredError::Nats)?;
    kv.put(&key, perch_protocol::desired::encode(digest).into()).await.map_err(nats)
}

/// Whether the head of bundle `digest` is in `PERCH_CHUNKS`.
pub async fn check_published(js: &jetstream::Context, digest: &[u8; 32]) -> Result<(), DesiredError> {
    let hex = hex::encode(digest);
    let chunks = js.get_stream(CHUNKS_STREAM).await.map_err(|_| DesiredError::NotPublished(hex.clone()))?;
    if chunks.get_last_raw_message_by_subject(&subjects::chunk(digest, None)).await.is_err() {
        return Err(DesiredError::NotPublished(hex));
    }
    Ok(())
}

/// [`set`], unless the key already names `digest` (then its revision, and
/// so what devices see, is left alone). The revision written, if any.
pub async fn set_if_changed(
    js: &jetstream::Context,
    scope: &Scope,
    digest: &[u8; 32],
) -> Result<Option<u64>, DesiredError> {
    let key = scope.key()?;
    if let Ok(kv) = js.get_key_value(subjects::DESIRED_BUCKET).await {
        if let Some(e) = kv.entry(&key).await.map_err(nats)? {
            let same = e.operation == jetstream::kv::Operation::Put
                && perch_protocol::desired::decode(&e.value).is_ok_and(|d| d == *digest);
            if same {
                return Ok(None);
            }
        }
    }
    set(js, scope, digest).await.map(Some)
}

/// Removes `scope`'s key: its devices fall back to their groups' keys (or
/// stay as they are, if none).
pub async fn clear(js: &jetstream::Context, scope: &Scope) -> Result<(), DesiredError> {
    let key = scope.key()?;
    let kv = perch_net::streams::desired(js).await.map_err(DesiredError::Nats)?;
    kv.delete(&key).await.map_err(nats)
}

/// Every key in force, sorted: one pass over the bucket's stream.
pub async fn list(js: &jetstream::Context) -> Result<Vec<Entry>, DesiredError> {
    let entries = perch_net::read::kv_entries(js, subjects::DESIRED_BUCKET, "").await.map_err(nats)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let digest = perch_protocol::desired::decode(&e.value)
            .map_err(|err| DesiredError::Corrupt { key: e.key.clone(), detail: err.to_string() })?;
        out.push(Entry { key: e.key, bundle: hex::encode(digest), revision: e.revision });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// One change of the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Set(Scope, [u8; 32]),
    Clear(Scope),
}

/// Writes in flight at once in [`apply`].
const WINDOW: usize = 256;

/// Makes each write, in order, that changes its key (a key already naming
/// the bundle keeps its revision, so no device sees a spurious new
/// intent): the bucket read once, each bundle's publication checked once,
/// device keys written `WINDOW` at a time. A group's key is a barrier:
/// written alone and acknowledged before anything after it is sent, so a
/// device whose own key is cleared next finds the group's new value. The
/// number of keys written.
pub async fn apply(js: &jetstream::Context, writes: &[Write]) -> Result<usize, DesiredError> {
    use futures_util::stream::FuturesUnordered;
    let current: std::collections::HashMap<String, String> =
        list(js).await?.into_iter().map(|e| (e.key, e.bundle)).collect();
    let mut published = std::collections::HashSet::new();
    for w in writes {
        if let Write::Set(_, digest) = w {
            if !published.contains(digest) {
                check_published(js, digest).await?;
                published.insert(*digest);
            }
        }
    }
    // Make sure the bucket exists before publishing into its stream.
    perch_net::streams::desired(js).await.map_err(DesiredError::Nats)?;
    let mut inflight = FuturesUnordered::new();
    let mut written = 0;
    for w in writes {
        let (scope, digest) = match w {
            Write::Set(scope, d) => (scope, Some(d)),
            Write::Clear(scope) => (scope, None),
        };
        let key = scope.key()?;
        let now = current.get(&key);
        if now.map(String::as_str) == digest.map(hex::encode).as_deref() {
            continue;
        }
        let subject = format!("$KV.{}.{key}", subjects::DESIRED_BUCKET);
        let ack = match digest {
            Some(d) => js.publish(subject, perch_protocol::desired::encode(d).into()).await,
            None => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("KV-Operation", "DEL");
                js.publish_with_headers(subject, headers, Default::default()).await
            }
        }
        .map_err(nats)?;
        written += 1;
        inflight.push(std::future::IntoFuture::into_future(ack));
        let barrier = matches!(scope, Scope::Group(_));
        while inflight.len() >= WINDOW || (barrier && !inflight.is_empty()) {
            if let Some(acked) = inflight.next().await {
                acked.map_err(nats)?;
            }
        }
    }
    while let Some(acked) = inflight.next().await {
        acked.map_err(nats)?;
    }
    Ok(written)
}
