//! The device registry and token use counters, in the JetStream KV bucket
//! `PERCH_REGISTRY` (FLEET account). Every change is a compare-and-swap on
//! the key's revision, so several provisioners and operators can work at
//! once without losing an update or issuing a token use twice.
//!
//! Keys:
//! - `device.<id>`: a [`DeviceRecord`] (JSON, so `nats kv get` reads it;
//!   the type is in perch-protocol: `perch status` reads it too);
//! - `token.<token id hex>`: how many uses of a token were claimed (decimal);
//! - `revocations`: the FLEET account's revocation list ([`Revocations`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;
use perch_support::exit::{Class, Classify};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use perch_protocol::registry::device_key;
pub use perch_protocol::registry::{DeviceRecord, Rekey, Status};
use perch_protocol::subjects::REGISTRY_BUCKET;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("JetStream KV {REGISTRY_BUCKET}: {0}")]
    Kv(String),
    #[error("registry record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("no device '{0}' in the registry")]
    NoSuchDevice(String),
    #[error("device '{id}' is {status}; {action} does not apply")]
    WrongStatus { id: String, status: Status, action: &'static str },
}

impl Classify for RegistryError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            RegistryError::NoSuchDevice(_) | RegistryError::WrongStatus { .. } => Class::Usage,
            RegistryError::Kv(_) | RegistryError::Corrupt { .. } => Class::Runtime,
        })
    }
}

fn kv_err(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Kv(e.to_string())
}

/// The FLEET account's revoked users, and the `iat` of the last account
/// JWT pushed (each push must be newer than the last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub users: BTreeMap<String, u64>,
    pub last_iat: u64,
}

/// Whether a compare-and-swap write went through.
pub enum Cas {
    Done(u64),
    Conflict,
}

/// One token's counter as this instance last wrote it, and the claims
/// waiting for it. Claims that arrive while a write is in flight are
/// granted together by the next write: one compare-and-swap for many
/// devices, so a popular token does not serialise enrollment.
#[derive(Default)]
struct TokenSlot {
    /// (revision, uses claimed) after this instance's last write.
    counter: Mutex<Option<(u64, u32)>>,
    waiting: std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<Result<bool, String>>>>,
}

/// The registry bucket, plus a per-token lock so one instance never races
/// itself on a token counter (instances still race each other, safely).
#[derive(Clone)]
pub struct Registry {
    kv: Store,
    /// For reading the whole bucket in one pass.
    js: jetstream::Context,
    tokens: Arc<Mutex<HashMap<String, Arc<TokenSlot>>>>,
}

impl Registry {
    /// Opens the bucket, creating it on first use.
    pub async fn open(js: &jetstream::Context) -> Result<Self, RegistryError> {
        let kv = perch_net::streams::REGISTRY.open(js).await.map_err(RegistryError::Kv)?;
        Ok(Self { kv, js: js.clone(), tokens: Arc::default() })
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, RegistryError> {
        let Some(entry) = self.kv.entry(key).await.map_err(kv_err)? else {
            return Ok(None);
        };
        if entry.operation != Operation::Put {
            return Ok(None);
        }
        let v = serde_json::from_slice(&entry.value)
            .map_err(|e| RegistryError::Corrupt { key: key.into(), detail: e.to_string() })?;
        Ok(Some((v, entry.revision)))
    }

    async fn put_cas<T: Serialize>(
        &self,
        key: &str,
        v: &T,
        revision: Option<u64>,
    ) -> Result<Cas, RegistryError> {
        let bytes: Bytes = serde_json::to_vec(v).map_err(kv_err)?.into();
        match revision {
            None => match self.kv.create(key, bytes).await {
                Ok(r) => Ok(Cas::Done(r)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(Cas::Conflict),
                Err(e) => Err(kv_err(e)),
            },
            Some(rev) => match self.kv.update(key, bytes, rev).await {
                Ok(r) => Ok(Cas::Done(r)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
                Err(e) => Err(kv_err(e)),
            },
        }
    }

    pub async fn device(&self, id: &str) -> Result<Option<(DeviceRecord, u64)>, RegistryError> {
        self.get_json(&device_key(id)).await
    }

    /// Writes a record if the stored revision is still `revision` (None: if absent).
    pub async fn put_device(&self, rec: &DeviceRecord, revision: Option<u64>) -> Result<Cas, RegistryError> {
        self.put_cas(&device_key(&rec.id), rec, revision).await
    }

    /// Applies `change` to a device record with compare-and-swap, retrying
    /// on conflicts. `change` returns an error to leave the record alone.
    pub async fn update_device(
        &self,
        id: &str,
        mut change: impl FnMut(&mut DeviceRecord) -> Result<(), RegistryError>,
    ) -> Result<DeviceRecord, RegistryError> {
        loop {
            let (mut rec, rev) =
                self.device(id).await?.ok_or_else(|| RegistryError::NoSuchDevice(id.into()))?;
            change(&mut rec)?;
            if let Cas::Done(_) = self.put_device(&rec, Some(rev)).await? {
                return Ok(rec);
            }
        }
    }

    /// Every device record, sorted by id: one pass over the bucket.
    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let entries =
            perch_net::read::kv_entries(&self.js, perch_protocol::subjects::REGISTRY_BUCKET, "device.")
                .await
                .map_err(kv_err)?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let rec: DeviceRecord = serde_json::from_slice(&e.value)
                .map_err(|err| RegistryError::Corrupt { key: e.key.clone(), detail: err.to_string() })?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn token_slot(&self, token: &str) -> Arc<TokenSlot> {
        self.tokens.lock().await.entry(token.to_string()).or_default().clone()
    }

    /// Claims one use of a token with `uses` uses. False when none are left.
    /// Exactly `uses` claims succeed, across all provisioner instances.
    pub async fn claim_token_use(&self, token: &str, uses: u32) -> Result<bool, RegistryError> {
        let slot = self.token_slot(token).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        slot.waiting.lock().map_err(|_| kv_err("token claim queue poisoned"))?.push(tx);
        {
            // Whoever holds the counter grants every claim queued so far,
            // ours included unless an earlier holder already did.
            let mut counter = slot.counter.lock().await;
            let batch =
                std::mem::take(&mut *slot.waiting.lock().map_err(|_| kv_err("token claim queue poisoned"))?);
            if !batch.is_empty() {
                match self.grant(token, uses, batch.len() as u32, &mut counter).await {
                    Ok(granted) => {
                        for (i, w) in batch.into_iter().enumerate() {
                            let _ = w.send(Ok((i as u32) < granted));
                        }
                    }
                    Err(e) => {
                        for w in batch {
                            let _ = w.send(Err(e.to_string()));
                        }
                    }
                }
            }
        }
        rx.await.map_err(|_| kv_err("token claim dropped"))?.map_err(RegistryError::Kv)
    }

    /// Takes up to `wanted` uses in one compare-and-swap; returns how many.
    async fn grant(
        &self,
        token: &str,
        uses: u32,
        wanted: u32,
        counter: &mut Option<(u64, u32)>,
    ) -> Result<u32, RegistryError> {
        let key = format!("token.{token}");
        loop {
            let (rev, used) = match *counter {
                Some(c) => (Some(c.0), c.1),
                None => self.read_count(&key).await?,
            };
            let granted = wanted.min(uses.saturating_sub(used));
            if granted == 0 {
                *counter = None; // re-read next time: a use may have been given back
                return Ok(0);
            }
            match self.put_cas(&key, &(used + granted), rev).await? {
                Cas::Done(r) => {
                    *counter = Some((r, used + granted));
                    return Ok(granted);
                }
                Cas::Conflict => *counter = None,
            }
        }
    }

    /// Gives back a use claimed for an enrollment that did not happen.
    pub async fn release_token_use(&self, token: &str) -> Result<(), RegistryError> {
        let slot = self.token_slot(token).await;
        let mut counter = slot.counter.lock().await;
        let key = format!("token.{token}");
        loop {
            let (rev, used) = match *counter {
                Some(c) => (Some(c.0), c.1),
                None => self.read_count(&key).await?,
            };
            let Some(next) = used.checked_sub(1) else { return Ok(()) };
            match self.put_cas(&key, &next, rev).await? {
                Cas::Done(r) => {
                    *counter = Some((r, next));
                    return Ok(());
                }
                Cas::Conflict => *counter = None,
            }
        }
    }

    /// The stored count of a token and its revision (None: never claimed).
    async fn read_count(&self, key: &str) -> Result<(Option<u64>, u32), RegistryError> {
        match self.kv.entry(key).await.map_err(kv_err)? {
            Some(e) if e.operation == Operation::Put => {
                let used =
                    std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<u32>().ok()).ok_or_else(
                        || RegistryError::Corrupt { key: key.into(), detail: "not a count".into() },
                    )?;
                Ok((Some(e.revision), used))
            }
            _ => Ok((None, 0)),
        }
    }

    pub async fn revocations(&self) -> Result<(Revocations, Option<u64>), RegistryError> {
        Ok(match self.get_json::<Revocations>("revocations").await? {
            Some((r, rev)) => (r, Some(rev)),
            None => (Revocations::default(), None),
        })
    }

    pub async fn put_revocations(
        &self,
        r: &Revocations,
        revision: Option<u64>,
    ) -> Result<Cas, RegistryError> {
        self.put_cas("revocations", r, revision).await
    }
}
