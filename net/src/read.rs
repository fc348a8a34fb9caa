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
    let Ok(stream) = js.get_stream(stream).await else { return Ok(false) };
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
            // Placed on a server that is down: see crate::EPHEMERAL_TRIES.
            Err(e)
                if tries < crate::EPHEMERAL_TRIES
                    && e.kind() == jetstream::stream::ConsumerErrorKind::TimedOut => {}
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
