//! Reading a whole stream or bucket in one pass: an ordered push consumer
//! (no state kept on the server once it is gone) that delivers what is
//! stored now and stops at the last message. A fleet of 10,000 devices is
//! then one consumer and 10,000 deliveries, not 10,000 requests.
//!
//! - [`each`]: every message matching a filter, or only the last per
//!   subject (the registry, the desired state, the last report per lane).
//! - [`kv_entries`]: the value of every key of a KV bucket under a prefix.

use async_nats::jetstream::{self, consumer::push::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt;

/// How many times a read is asked for. A cluster that is busy (10,000
/// devices connecting at once) or electing a leader answers "JetStream
/// system temporarily unavailable" (503) for a moment; an ephemeral
/// consumer may be placed on a server that is down (see
/// [`crate::EPHEMERAL_TRIES`]).
const TRIES: u32 = 6;

/// 0.25 s, 0.5 s, 1 s, ... between tries (7.75 s in all).
async fn pause(tries: u32) {
    tokio::time::sleep(std::time::Duration::from_millis(250 << tries.min(5).saturating_sub(1))).await
}

/// Asks `f` up to [`TRIES`] times, pausing between tries: for a request
/// that a busy or electing cluster may answer with a 503.
pub async fn again<T, E: std::fmt::Display, Fut: std::future::Future<Output = Result<T, E>>>(
    mut f: impl FnMut() -> Fut,
) -> Result<T, E> {
    let mut tries = 0;
    loop {
        tries += 1;
        match f().await {
            Err(e) if tries < TRIES => {
                tracing::debug!("{e}; asking again");
                pause(tries).await
            }
            done => return done,
        }
    }
}

/// Which messages of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    All,
    LastPerSubject,
}

/// Calls `f` with every message of `stream` matching `filter` (all, or the
/// last per subject), in stream order, up to the last stored when the
/// read began. Ok(false) if the stream does not exist.
pub async fn each(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    which: Which,
    mut f: impl FnMut(jetstream::Message) -> Result<(), String>,
) -> Result<bool, String> {
    let mut tries = 0;
    let stream = loop {
        tries += 1;
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Ok(false)
                }
                _ if tries < TRIES => pause(tries).await,
                _ => return Err(e.to_string()),
            },
        }
    };
    let policy = match which {
        Which::All => DeliverPolicy::All,
        Which::LastPerSubject => DeliverPolicy::LastPerSubject,
    };
    let mut tries = 0;
    let consumer = loop {
        tries += 1;
        let made = stream
            .create_consumer(OrderedConfig {
                deliver_subject: js.client().new_inbox(),
                filter_subject: filter.to_string(),
                deliver_policy: policy,
                ..Default::default()
            })
            .await;
        match made {
            Ok(c) => break c,
            // Placed on a server that is down (see crate::EPHEMERAL_TRIES),
            // or a busy cluster's 503: ask again.
            Err(e) if tries < TRIES => {
                tracing::debug!("reading {filter}: {e}; asking again");
                pause(tries).await
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if consumer.cached_info().num_pending == 0 {
        return Ok(true);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        let pending = m.info().map_err(|e| e.to_string())?.pending;
        f(m)?;
        if pending == 0 {
            break;
        }
    }
    Ok(true)
}

/// One key of a KV bucket as it stands.
#[derive(Debug, Clone)]
pub struct KvEntry {
    pub key: String,
    /// The key's revision: its message's sequence in the bucket's stream.
    pub revision: u64,
    pub value: Vec<u8>,
}

/// Every key of KV bucket `bucket` starting with `prefix` that holds a
/// value (deleted and purged keys left out), in stream order. Empty if the
/// bucket does not exist.
pub async fn kv_entries(js: &jetstream::Context, bucket: &str, prefix: &str) -> Result<Vec<KvEntry>, String> {
    let subject_prefix = format!("$KV.{bucket}.");
    let mut out = vec![];
    each(js, &format!("KV_{bucket}"), &format!("{subject_prefix}{prefix}>"), Which::LastPerSubject, |m| {
        let op = m.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str().to_string());
        if op.is_some_and(|op| op == "DEL" || op == "PURGE") {
            return Ok(());
        }
        let revision = m.info().map_err(|e| e.to_string())?.stream_sequence;
        let key = m.subject.strip_prefix(subject_prefix.as_str()).unwrap_or(&m.subject).to_string();
        out.push(KvEntry { key, revision, value: m.payload.to_vec() });
        Ok(())
    })
    .await?;
    Ok(out)
}
