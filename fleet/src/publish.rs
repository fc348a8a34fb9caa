//! `perch publish`: a verified bundle into the JetStream stream
//! `PERCH_CHUNKS`, one message per chunk, where devices fetch it.
//!
//! - The bundle is verified against the trust document first, payload
//!   included: nothing unverified is ever offered to a fleet.
//! - `perch.chunk.<digest>.m` holds the head (header, manifest,
//!   signatures); `perch.chunk.<digest>.<i>` holds chunk `i`.
//! - Publishing is idempotent: the stream keeps one message per subject and
//!   every message has a `Nats-Msg-Id`; a bundle whose head and chunks are
//!   all there already is not sent again.

use std::fs::File;
use std::path::{Path, PathBuf};

use async_nats::jetstream;
use futures_util::stream::{FuturesOrdered, StreamExt};
use perch_protocol::bundle::BundleReader;
use perch_protocol::subjects::{self, CHUNKS_STREAM};
use perch_protocol::trust::VerifiedTrust;
use perch_support::exit::{Class, Classify};

pub use crate::link::Target;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error(
        "the bundle head is {len} bytes, over the server's max_payload of {max}; use a larger --chunk-size"
    )]
    HeadTooLarge { len: usize, max: usize },
    #[error(transparent)]
    Connect(#[from] crate::link::ConnectError),
}

impl Classify for PublishError {
    fn class(&self) -> Option<Class> {
        match self {
            PublishError::Verify(e) => e.class(),
            PublishError::Connect(e) => e.class(),
            PublishError::HeadTooLarge { .. } => Some(Class::Usage),
            PublishError::File { .. } | PublishError::Nats(_) => Some(Class::Runtime),
        }
    }
}

fn nats<E: std::fmt::Display>(e: E) -> PublishError {
    PublishError::Nats(e.to_string())
}

/// What happened.
pub enum Published {
    Sent { chunks: u32, bytes: u64 },
    AlreadyThere { chunks: u32 },
}

/// Publishes the bundle at `path`; `progress` is told each chunk acked.
pub async fn publish(
    trust: &VerifiedTrust,
    path: &Path,
    target: &Target,
    now: u64,
    progress: impl Fn(u32, u32),
) -> Result<Published, PublishError> {
    crate::verify::verify_file(trust, path, now)?;
    let file_err = |detail: String| PublishError::File { path: path.into(), detail };
    let file = File::open(path).map_err(|e| file_err(e.to_string()))?;
    let mut bundle = BundleReader::open_verified(std::io::BufReader::new(file), trust, now)
        .map_err(|e| file_err(e.to_string()))?;
    let digest = bundle.manifest().digest().0;
    let chunk_count = bundle.manifest().manifest().chunk_count();
    let m = bundle.manifest().manifest();
    let entry = crate::catalog::Published {
        name: m.name.clone(),
        counter: m.counter,
        version: m.version.clone(),
        digest: hex::encode(digest),
        chunks: chunk_count,
        payload_len: m.payload_len(),
        published_at: now,
        signers: bundle.manifest().signers().iter().map(|k| k.to_hex()).collect(),
        threshold: trust.threshold(),
        targets: m.targets.clone(),
        kind: m.kind.as_str().to_string(),
        stored_len: m.stored_len(),
        expires_at: m.expires_at,
    };
    let mut head = Vec::new();
    bundle.manifest().head().write_to(&mut head).map_err(|e| file_err(e.to_string()))?;

    let client = target.connect("perch publish").await?;
    let max = client.server_info().max_payload;
    if head.len() > max {
        return Err(PublishError::HeadTooLarge { len: head.len(), max });
    }
    let js = jetstream::new(client);
    perch_net::ensure_stream(&js, perch_net::streams::chunks()).await.map_err(PublishError::Nats)?;
    if already_there(&js, &digest, chunk_count).await? {
        // (Recorded again: the catalog may be younger than the chunks.)
        crate::catalog::record(&js, &entry).await.map_err(nats)?;
        return Ok(Published::AlreadyThere { chunks: chunk_count });
    }

    // Chunks first, the head last: a device that sees the head finds every chunk.
    let hex = hex::encode(digest);
    let mut inflight = FuturesOrdered::new();
    let (mut acked, mut bytes) = (0u32, 0u64);
    let mut buf = Vec::new();
    loop {
        // The bytes that travel: compressed chunks stay compressed.
        let index = bundle.read_stored_chunk(&mut buf).map_err(|e| file_err(e.to_string()))?;
        if let Some(i) = index {
            bytes += buf.len() as u64;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{hex}.{i}").as_str());
            let ack = js
                .publish_with_headers(subjects::chunk(&digest, Some(i)), headers, buf.clone().into())
                .await
                .map_err(nats)?;
            inflight.push_back(std::future::IntoFuture::into_future(ack));
        }
        // Keep a window of acks outstanding, and drain it at the end.
        while inflight.len() >= 32 || (index.is_none() && !inflight.is_empty()) {
            if let Some(r) = inflight.next().await {
                r.map_err(nats)?;
                acked += 1;
                progress(acked, chunk_count);
            }
        }
        if index.is_none() {
            break;
        }
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{hex}.m").as_str());
    js.publish_with_headers(subjects::chunk(&digest, None), headers, head.into())
        .await
        .map_err(nats)?
        .await
        .map_err(nats)?;
    // Last: the catalog names only bundles whose every message is stored.
    crate::catalog::record(&js, &entry).await.map_err(nats)?;
    Ok(Published::Sent { chunks: chunk_count, bytes })
}

/// Whether the head and every chunk of the bundle are in the stream.
async fn already_there(
    js: &jetstream::Context,
    digest: &[u8; 32],
    chunk_count: u32,
) -> Result<bool, PublishError> {
    let stream = js.get_stream(CHUNKS_STREAM).await.map_err(nats)?;
    let filter = format!("perch.chunk.{}.>", hex::encode(digest));
    let mut subjects = stream.info_with_subjects(filter).await.map_err(nats)?;
    let mut found = 0u64;
    while let Some(s) = subjects.next().await {
        s.map_err(nats)?;
        found += 1;
    }
    Ok(found == u64::from(chunk_count) + 1)
}
