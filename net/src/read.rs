//! Reading a whole stream or bucket in one pass: an ordered push consumer
//! (no state kept on the server once it is gone) that delivers what is
//! stored now and stops at the last message. A fleet of 10,000 devices is
//! then one consumer and 10,000 deliveries, not 10,000 requests.
//!
//! - [`each`]: every message matching a filter, or only the last per
//!   subject (the registry, the desired state, the last report per lane).
//! - [`follow`]: the same, and then every new message as it is stored
//!   (the console's live view).
//! - [`kv_entries`]: the value of every key of a KV bucket under a prefix;
//!   [`kv_entry`]: of one key.

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
    let Some(consumer) = ordered(js, stream, filter, which).await? else {
        return Ok(false);
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

/// What [`follow`] hands its callback.
pub enum Followed {
    /// A message, in stream order (after a reconnection the stream may
    /// deliver messages already seen: compare sequences).
    Message(Box<jetstream::Message>),
    /// Every message stored when the consumer was made has been delivered.
    CaughtUp,
}

/// Like [`each`], but it does not stop: after what is stored it hands `f`
/// each new message as it is stored, for as long as `f` returns true. A
/// stream that does not exist yet is looked for again, and a consumer lost
/// with its server is made again (from the same policy: `f` sees the
/// current messages again, then [`Followed::CaughtUp`]). While the stream
/// does not exist, `f` is told [`Followed::CaughtUp`] every time it is
/// looked for.
pub async fn follow(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    which: Which,
    mut f: impl FnMut(Followed) -> bool,
) {
    loop {
        match ordered(js, stream, filter, which).await {
            Ok(Some(consumer)) => {
                let mut caught_up = consumer.cached_info().num_pending == 0;
                if caught_up && !f(Followed::CaughtUp) {
                    return;
                }
                let mut messages = match consumer.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!("following {filter}: {e}");
                        continue;
                    }
                };
                while let Some(m) = messages.next().await {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::debug!("following {filter}: {e}; making the consumer again");
                            break;
                        }
                    };
                    let pending = m.info().map(|i| i.pending).unwrap_or(0);
                    if !f(Followed::Message(Box::new(m))) {
                        return;
                    }
                    if !caught_up && pending == 0 {
                        caught_up = true;
                        if !f(Followed::CaughtUp) {
                            return;
                        }
                    }
                }
            }
            Ok(None) => {
                tracing::debug!("following {filter}: no stream {stream} yet");
                // Nothing is stored: nothing to catch up with.
                if !f(Followed::CaughtUp) {
                    return;
                }
            }
            Err(e) => tracing::debug!("following {filter}: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// An ordered push consumer on `stream` for `filter`; None if the stream
/// does not exist.
async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    which: Which,
) -> Result<Option<jetstream::consumer::Consumer<OrderedConfig>>, String> {
    let mut tries = 0;
    let stream = loop {
        tries += 1;
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Ok(None)
                }
                // An account without JetStream (another account's
                // credentials) will not have it in a moment: say so now.
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT =>
                {
                    return Err(e.to_string())
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
    loop {
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
            Ok(c) => return Ok(Some(c)),
            // Placed on a server that is down (see crate::EPHEMERAL_TRIES),
            // or a busy cluster's 503: ask again.
            Err(e) if tries < TRIES => {
                tracing::debug!("reading {filter}: {e}; asking again");
                pause(tries).await
            }
            Err(e) => return Err(e.to_string()),
        }
    }
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
///
/// The read is folded by key, the highest revision winning: an ordered
/// consumer that misses a heartbeat (a busy cluster) is made again by
/// async-nats with every message from the next sequence on (or from the
/// start), not the last per subject, so a key may come more than once, or
/// a put after its own delete.
pub async fn kv_entries(js: &jetstream::Context, bucket: &str, prefix: &str) -> Result<Vec<KvEntry>, String> {
    kv_matching(js, bucket, &format!("{prefix}>")).await
}

/// The value of `key` in KV bucket `bucket`; None if the key holds none
/// (never put, deleted, purged) or the bucket does not exist.
pub async fn kv_entry(js: &jetstream::Context, bucket: &str, key: &str) -> Result<Option<KvEntry>, String> {
    Ok(kv_matching(js, bucket, key).await?.pop())
}

/// The keys matching `keys` (a subject filter below the bucket's prefix).
async fn kv_matching(js: &jetstream::Context, bucket: &str, keys: &str) -> Result<Vec<KvEntry>, String> {
    let subject_prefix = format!("$KV.{bucket}.");
    let mut keys_seen = Latest::default();
    each(js, &format!("KV_{bucket}"), &format!("{subject_prefix}{keys}"), Which::LastPerSubject, |m| {
        let deleted = is_kv_delete(&m);
        let revision = m.info().map_err(|e| e.to_string())?.stream_sequence;
        let key = m.subject.strip_prefix(subject_prefix.as_str()).unwrap_or(&m.subject).to_string();
        keys_seen.offer(key, revision, (!deleted).then(|| m.payload.to_vec()));
        Ok(())
    })
    .await?;
    Ok(keys_seen.entries())
}

/// Whether a KV bucket's message deletes its key (a delete or purge marker).
pub fn is_kv_delete(m: &async_nats::Message) -> bool {
    let op = m.headers.as_ref().and_then(|h| h.get("KV-Operation"));
    op.is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
}

/// The latest revision seen of each key, a delete included (so an older
/// put delivered after it does not bring the key back).
#[derive(Default)]
struct Latest(std::collections::HashMap<String, (u64, Option<Vec<u8>>)>);

impl Latest {
    fn offer(&mut self, key: String, revision: u64, value: Option<Vec<u8>>) {
        match self.0.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if o.get().0 < revision {
                    o.insert((revision, value));
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((revision, value));
            }
        }
    }

    /// The keys that hold a value, in revision (stream) order.
    fn entries(self) -> Vec<KvEntry> {
        let mut out: Vec<KvEntry> = self
            .0
            .into_iter()
            .filter_map(|(key, (revision, value))| value.map(|value| KvEntry { key, revision, value }))
            .collect();
        out.sort_by_key(|e| e.revision);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_read_twice_keeps_its_highest_revision_and_a_delete_wins_over_an_older_put() {
        let mut l = Latest::default();
        l.offer("a".into(), 5, Some(b"new".to_vec()));
        l.offer("b".into(), 7, None);
        l.offer("c".into(), 2, Some(b"c".to_vec()));
        // A consumer made again from the start delivers older revisions.
        l.offer("a".into(), 1, Some(b"old".to_vec()));
        l.offer("b".into(), 3, Some(b"put before the delete".to_vec()));
        l.offer("c".into(), 9, Some(b"c2".to_vec()));
        let got: Vec<(String, u64, Vec<u8>)> =
            l.entries().into_iter().map(|e| (e.key, e.revision, e.value)).collect();
        assert_eq!(got, vec![("a".into(), 5, b"new".to_vec()), ("c".into(), 9, b"c2".to_vec())]);
    }

    proptest::proptest! {
        /// However the revisions arrive (repeated, out of order), each key
        /// ends with its highest one.
        #[test]
        fn any_delivery_order_ends_with_each_keys_highest_revision(
            offers in proptest::collection::vec((0u8..4, 1u64..50, proptest::option::of(0u8..3)), 0..40)
        ) {
            let mut l = Latest::default();
            let mut best: std::collections::HashMap<u8, (u64, Option<u8>)> = Default::default();
            for (k, rev, v) in &offers {
                l.offer(k.to_string(), *rev, v.map(|v| vec![v]));
                let b = best.entry(*k).or_insert((*rev, *v));
                if b.0 < *rev { *b = (*rev, *v); }
            }
            let mut want: Vec<(String, u64, Vec<u8>)> = best
                .into_iter()
                .filter_map(|(k, (rev, v))| v.map(|v| (k.to_string(), rev, vec![v])))
                .collect();
            want.sort_by_key(|w| w.1);
            let got: Vec<(String, u64, Vec<u8>)> = l.entries().into_iter().map(|e| (e.key, e.revision, e.value)).collect();
            // Equal revisions of one key keep the first offered: compare keys and revisions.
            let strip = |v: &[(String, u64, Vec<u8>)]| v.iter().map(|(k, r, _)| (k.clone(), *r)).collect::<std::collections::BTreeSet<_>>();
            proptest::prop_assert_eq!(strip(&got), strip(&want));
        }
    }
}
