//! perch's NATS links, shared by the agent and the provisioner.
//!
//! - [`tls`]: rustls configs that trust the fleet CA only, by certificate or
//!   by the fingerprint an enrollment token carries.
//! - [`connect`]: connection options for a NATS user JWT whose nonce is
//!   signed by a perch device key or an nkey seed.
//!
//! Invariant: every connection made through here requires TLS and never
//! consults the system certificate store.
#![forbid(unsafe_code)]

mod log;
pub mod operator;
pub mod read;
pub mod replicas;
pub mod sites;
pub mod streams;
pub mod tls;

pub use log::{init_logging, init_logging_if_asked};

use std::sync::Arc;
use std::time::Duration;

use async_nats::{AuthError, ConnectOptions};
use perch_protocol::SecretKey;
use perch_support::exit::{Class, Classify};

pub use replicas::Replicas;
pub use tls::CaTrust;

/// What signs the server's connect nonce.
#[derive(Clone)]
pub enum Signer {
    /// A perch device key (it is the device's NATS user nkey).
    Device(Arc<SecretKey>),
    /// An nkey seed (services and operators).
    Nkey(Arc<nkeys::KeyPair>),
}

impl Signer {
    fn sign(&self, nonce: &[u8]) -> Result<Vec<u8>, AuthError> {
        match self {
            Signer::Device(k) => k
                .sign_nats_nonce(nonce)
                .map(|s| s.to_vec())
                .ok_or_else(|| AuthError::new("server sent an implausible nonce; refusing to sign it")),
            Signer::Nkey(k) => k.sign(nonce).map_err(AuthError::new),
        }
    }
}

/// A NATS user: its JWT and what signs for it.
#[derive(Clone)]
pub struct User {
    pub jwt: String,
    pub signer: Signer,
}

/// How a connection behaves.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Client name the server shows (`perch-agent drone-7`).
    pub name: String,
    /// Private inbox prefix (devices may only receive on their own).
    pub inbox_prefix: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ping_interval: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            name: "perch".into(),
            inbox_prefix: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("bad NATS URL '{url}': {detail}")]
    Url { url: String, detail: String },
    // `err`, not `source`: shown here once, not again as a cause.
    #[error("connecting to {urls}: {err}")]
    Connect { urls: String, err: async_nats::ConnectError },
}

impl Classify for LinkError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            LinkError::Tls(_) | LinkError::Url { .. } => Class::Usage,
            _ if self.is_tls_rejection() || self.is_auth_rejection() => Class::Security,
            LinkError::Connect { .. } => Class::Runtime,
        })
    }
}

impl LinkError {
    /// The server failed the fleet CA check: a security refusal, not an outage.
    pub fn is_tls_rejection(&self) -> bool {
        match self {
            LinkError::Connect { err, .. } => {
                err.kind() == async_nats::ConnectErrorKind::Tls || chain_has_rustls_error(err)
            }
            _ => false,
        }
    }

    /// The server refused the credential (revoked, expired, unknown).
    pub fn is_auth_rejection(&self) -> bool {
        matches!(self, LinkError::Connect { err, .. }
            if matches!(err.kind(), async_nats::ConnectErrorKind::AuthorizationViolation | async_nats::ConnectErrorKind::Authentication))
    }
}

/// async-nats reports a failed certificate check as an I/O error that
/// wraps the rustls error; look for it anywhere in the chain.
fn chain_has_rustls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

/// Connection options for `user`, requiring TLS trusted by `ca` only.
pub fn options(user: &User, ca: &CaTrust, link: &LinkOptions) -> Result<ConnectOptions, LinkError> {
    let signer = user.signer.clone();
    let mut o = ConnectOptions::with_jwt(user.jwt.clone(), move |nonce| {
        let r = signer.sign(&nonce);
        async move { r }
    })
    .require_tls(true)
    .tls_client_config(tls::client_config(ca)?)
    .name(&link.name)
    .connection_timeout(link.connect_timeout)
    .request_timeout(Some(link.request_timeout))
    .ping_interval(link.ping_interval);
    if let Some(p) = &link.inbox_prefix {
        o = o.custom_inbox_prefix(p);
    }
    Ok(o)
}

/// Parses URLs (`tls://host:port`) for async-nats.
pub fn server_addrs(urls: &[String]) -> Result<Vec<async_nats::ServerAddr>, LinkError> {
    urls.iter()
        .map(|u| {
            let bad = |detail: String| LinkError::Url { url: u.clone(), detail };
            // url percent-encodes a non-ASCII host in nats:// and tls://
            // URLs, which then fails as an unknown name: say why instead.
            if !u.is_ascii() {
                return Err(bad(
                    "has non-ASCII characters; write an international host name in its xn-- form".into(),
                ));
            }
            u.parse().map_err(|e: std::io::Error| bad(e.to_string()))
        })
        .collect()
}

/// Connects once (no retry on the first attempt; callers own their retry policy).
pub async fn connect(
    urls: &[String],
    user: &User,
    ca: &CaTrust,
    link: &LinkOptions,
) -> Result<async_nats::Client, LinkError> {
    let addrs = server_addrs(urls)?;
    options(user, ca, link)?
        .connect(addrs)
        .await
        .map_err(|err| LinkError::Connect { urls: urls.join(","), err })
}

/// Opens a JetStream KV bucket, creating it first if need be (with
/// [`Replicas::Auto`]); an existing bucket is left as it is.
pub async fn ensure_kv(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    description: &str,
    history: i64,
) -> Result<async_nats::jetstream::kv::Store, String> {
    kv(js, bucket, description, history, Replicas::Auto, Existing::Keep).await
}

/// Opens a JetStream KV bucket, creating it first if need be, and scales
/// its stream to `replicas`: for the provisioner, which owns the layout.
pub async fn ensure_kv_with(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    description: &str,
    history: i64,
    replicas: Replicas,
) -> Result<async_nats::jetstream::kv::Store, String> {
    kv(js, bucket, description, history, replicas, Existing::Scale).await
}

/// Opens a bucket, making its stream if need be.
///
/// async-nats's own `create_key_value` first asks for the account info,
/// whose 2.9 form it cannot parse; so the bucket's stream is made here
/// with the same settings (`KV_<bucket>`, `$KV.<bucket>.>`, rollups,
/// direct get, discard new, one message per key and `history`).
async fn kv(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    description: &str,
    history: i64,
    replicas: Replicas,
    existing: Existing,
) -> Result<async_nats::jetstream::kv::Store, String> {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
    let config = Config {
        name: format!("KV_{bucket}"),
        description: Some(description.into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history.max(1),
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    };
    stream(js, config, replicas, existing).await?;
    js.get_key_value(bucket).await.map_err(|e| format!("opening bucket {bucket}: {e}"))
}

/// How many times to create an ephemeral consumer. nats-server before
/// 2.12 may place one on a server of the stream that is down (fixed by
/// nats-server PR #7165); the create then times out, and another try
/// places it anew.
pub const EPHEMERAL_TRIES: u32 = 5;

/// Creates a stream if it does not exist (with [`Replicas::Auto`]); an
/// existing one is left as it is.
pub async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<(), String> {
    stream(js, config, Replicas::Auto, Existing::Keep).await
}

/// Creates a stream if it does not exist; an existing one keeps its
/// settings but is scaled to `replicas` (in place: JetStream copies the
/// data to the new peers). For the provisioner, which owns the layout:
/// other clients only create what is missing, so they never undo an
/// operator's `--replicas`.
pub async fn ensure_stream_with(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
    replicas: Replicas,
) -> Result<(), String> {
    stream(js, config, replicas, Existing::Scale).await
}

/// What to do with a stream that exists already.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    Keep,
    Scale,
}

/// Makes a missing stream with the replica count that fits the server we
/// are connected to; keeps or scales one that exists.
async fn stream(
    js: &async_nats::jetstream::Context,
    mut config: async_nats::jetstream::stream::Config,
    replicas: Replicas,
    existing: Existing,
) -> Result<(), String> {
    let name = config.name.clone();
    let want = replicas.count(&js.client().server_info());
    if let Ok(stream) = js.get_stream(&name).await {
        if existing == Existing::Keep {
            return Ok(());
        }
        let info = stream.cached_info();
        let Some(n) = replicas.rescale(info.config.num_replicas, want) else {
            return Ok(());
        };
        let mut scaled = info.config.clone();
        scaled.num_replicas = n;
        return while_cluster_forms(|| js.update_stream(scaled.clone()))
            .await
            .map(drop)
            .map_err(|e| format!("scaling stream {name} to R{n}: {e}"));
    }
    config.num_replicas = want;
    let created = while_cluster_forms(|| js.create_stream(config.clone())).await;
    // Another instance may have created it in the meantime: look again.
    js.get_stream(&name).await.map(drop).map_err(|e| match created {
        Err(c) => format!("creating stream {name}: {c}"),
        Ok(_) => format!("opening stream {name}: {e}"),
    })
}

/// How long a cluster that has just formed may take to place a stream.
const CLUSTER_FORMING: Duration = Duration::from_secs(15);

/// Runs a stream create or update again while the cluster is still
/// forming: for a few seconds after its servers connect, the meta leader
/// has not yet heard from every peer ("no suitable peers"), and a peer
/// may not yet have set up the account's store (nats-server 2.9: "error
/// creating store for stream"), and a server that has just started may
/// answer that JetStream is "not enabled for account" until it has
/// loaded the account's JetStream (seen on 2.9.10 in CI), or a peer the
/// stream is placed on may not have the account's JWT yet and reject the
/// assignment: "account not found" (seen on 2.15.1 in CI). A server that
/// really has JetStream off, or no such account, gives the same error
/// after the deadline.
async fn while_cluster_forms<T, F, Fut>(
    mut op: F,
) -> Result<T, async_nats::jetstream::context::CreateStreamError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, async_nats::jetstream::context::CreateStreamError>>,
{
    use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
    use async_nats::jetstream::ErrorCode;
    let deadline = tokio::time::Instant::now() + CLUSTER_FORMING;
    loop {
        let r = op().await;
        let forming = match &r {
            Err(e) => match e.kind() {
                Kind::JetStream(j) => [
                    ErrorCode::CLUSTER_NO_PEERS,
                    ErrorCode::INSUFFICIENT_RESOURCES,
                    ErrorCode::CLUSTER_NOT_AVAILABLE,
                    ErrorCode::STREAM_CREATE,
                    ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
                    ErrorCode::NO_ACCOUNT,
                ]
                .contains(&j.error_code()),
                Kind::JetStreamUnavailable => true,
                _ => false,
            },
            Ok(_) => false,
        };
        if !forming || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_non_ascii_hosts_are_refused_by_name() {
        let ok = server_addrs(&["tls://xn--bcher-kva.example:4222".into(), "tls://127.0.0.1:4222".into()]);
        assert_eq!(ok.unwrap()[0].host(), "xn--bcher-kva.example");
        let err = server_addrs(&["tls://bücher.example:4222".into()]).unwrap_err().to_string();
        assert!(err.contains("bücher") && err.contains("xn--"), "{err}");
        assert!(server_addrs(&["tls://[::1:4222".into()]).is_err());
    }
}
