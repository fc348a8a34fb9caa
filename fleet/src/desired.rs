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
}

fn nats(e: impl std::fmt::Display) -> DesiredError {
    DesiredError::Nats(e.to_string())
}

/// Whose desired state.
#[derive(Debug, Clone)]
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
    let hex = hex::encode(digest);
    let chunks = js.get_stream(CHUNKS_STREAM).await.map_err(|_| DesiredError::NotPublished(hex.clone()))?;
    if chunks.get_last_raw_message_by_subject(&subjects::chunk(digest, None)).await.is_err() {
        return Err(DesiredError::NotPublished(hex));
    }
    let kv = perch_net::streams::desired(js).await.map_err(DesiredError::Nats)?;
    kv.put(&key, perch_protocol::desired::encode(digest).into()).await.map_err(nats)
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

/// Every key in force, sorted.
pub async fn list(js: &jetstream::Context) -> Result<Vec<Entry>, DesiredError> {
    let Ok(kv) = js.get_key_value(subjects::DESIRED_BUCKET).await else { return Ok(vec![]) };
    let mut keys = perch_net::kv_keys(&kv).await.map_err(nats)?;
    let mut names = vec![];
    while let Some(k) = keys.next().await {
        names.push(k.map_err(nats)?);
    }
    names.sort();
    let mut out = vec![];
    for key in names {
        let Some(e) = kv.entry(&key).await.map_err(nats)? else { continue };
        if e.operation != jetstream::kv::Operation::Put {
            continue;
        }
        let digest = perch_protocol::desired::decode(&e.value)
            .map_err(|err| DesiredError::Corrupt { key: key.clone(), detail: err.to_string() })?;
        out.push(Entry { key, bundle: hex::encode(digest), revision: e.revision });
    }
    Ok(out)
}
