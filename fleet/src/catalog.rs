//! The catalog of published bundles: `PERCH_BUNDLES`, key `<name>.<counter>`,
//! written by `perch publish` after the last chunk is stored, so that an
//! operator can say `perch deploy --bundle os@3` instead of a digest.

use std::path::{Path, PathBuf};

use async_nats::jetstream;
use perch_support::exit::{Class, Classify};
use serde::{Deserialize, Serialize};

/// One published bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub name: String,
    pub counter: u64,
    pub version: String,
    /// Hex.
    pub digest: String,
    pub chunks: u32,
    pub payload_len: u64,
    pub published_at: u64,
    // What the console's Bundles page shows. Entries written before these
    // were recorded read as empty.
    /// The release keys whose signatures met the threshold (key ids, hex).
    #[serde(default)]
    pub signers: Vec<String>,
    /// How many signatures the trust document it was verified against asks for.
    #[serde(default)]
    pub threshold: u32,
    /// The device classes it is for.
    #[serde(default)]
    pub targets: Vec<String>,
    /// image or archive.
    #[serde(default)]
    pub kind: String,
    /// Its chunks' bytes as they travel (compressed or not).
    #[serde(default)]
    pub stored_len: u64,
    /// When devices stop accepting it (unix seconds).
    #[serde(default)]
    pub expires_at: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("'{0}' is not NAME@COUNTER")]
    BadRef(String),
    #[error("{0} is not published (run `perch publish` first)")]
    Unknown(String),
    #[error("catalog entry {key} is not readable: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("--bundle {0}: no such bundle file, and not NAME@COUNTER")]
    NoBundle(String),
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("{} is {name}@{counter}, but the bundle published as {name}@{counter} is another one (digest {published})", path.display())]
    NotThePublished { path: PathBuf, name: String, counter: u64, published: String },
}

impl Classify for CatalogError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            CatalogError::BadRef(_)
            | CatalogError::Unknown(_)
            | CatalogError::NoBundle(_)
            | CatalogError::File { .. }
            | CatalogError::NotThePublished { .. } => Class::Usage,
            CatalogError::Nats(_) | CatalogError::Corrupt { .. } => Class::Runtime,
        })
    }
}

fn key(name: &str, counter: u64) -> String {
    format!("{name}.{counter}")
}

/// Splits `NAME@COUNTER`.
pub fn parse_ref(s: &str) -> Result<(String, u64), CatalogError> {
    let (name, counter) = s.split_once('@').ok_or_else(|| CatalogError::BadRef(s.into()))?;
    let counter = counter.parse::<u64>().map_err(|_| CatalogError::BadRef(s.into()))?;
    if !perch_protocol::subjects::is_token(name) {
        return Err(CatalogError::BadRef(s.into()));
    }
    Ok((name.into(), counter))
}

/// What `--bundle` names, in every command that takes it: a published
/// `NAME@COUNTER`, or a bundle file (its head says its name, counter and
/// digest). An existing file wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleArg {
    Published { name: String, counter: u64 },
    File(PathBuf),
}

impl BundleArg {
    pub fn parse(s: &str) -> Result<BundleArg, CatalogError> {
        if Path::new(s).is_file() {
            return Ok(BundleArg::File(s.into()));
        }
        let (name, counter) = parse_ref(s).map_err(|_| CatalogError::NoBundle(s.into()))?;
        Ok(BundleArg::Published { name, counter })
    }

    /// The catalog entry of the bundle named. A file must be the bundle
    /// published under its name and counter.
    pub async fn published(&self, js: &jetstream::Context) -> Result<Published, CatalogError> {
        match self {
            BundleArg::Published { name, counter } => lookup(js, name, *counter).await,
            BundleArg::File(path) => {
                let (name, counter, digest) = head_of(path)?;
                let p = lookup(js, &name, counter).await?;
                if p.digest != hex::encode(digest) {
                    return Err(CatalogError::NotThePublished {
                        path: path.clone(),
                        name,
                        counter,
                        published: p.digest,
                    });
                }
                Ok(p)
            }
        }
    }

    /// The digest of the bundle named: a file's own, or the published one's.
    pub async fn digest(&self, js: &jetstream::Context) -> Result<[u8; 32], CatalogError> {
        match self {
            BundleArg::File(path) => Ok(head_of(path)?.2),
            published => {
                let p = published.published(js).await?;
                perch_protocol::digest_from_hex(&p.digest).ok_or_else(|| CatalogError::Corrupt {
                    key: key(&p.name, p.counter),
                    detail: format!("digest '{}' is not 64 hex digits", p.digest),
                })
            }
        }
    }
}

/// A bundle file's name, counter and digest, from its head (unverified:
/// the catalog and the devices check the rest).
fn head_of(path: &Path) -> Result<(String, u64, [u8; 32]), CatalogError> {
    let file_err = |detail: String| CatalogError::File { path: path.into(), detail };
    let f = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    let r = perch_protocol::bundle::BundleReader::open(std::io::BufReader::new(f))
        .map_err(|e| file_err(e.to_string()))?;
    let head = r.head();
    let m = head.unverified_manifest();
    Ok((m.name.clone(), m.counter, head.digest().0))
}

pub async fn record(js: &jetstream::Context, p: &Published) -> Result<(), CatalogError> {
    let kv = perch_net::streams::bundles(js).await.map_err(CatalogError::Nats)?;
    let json = serde_json::to_vec(p).map_err(|e| CatalogError::Nats(e.to_string()))?;
    kv.put(key(&p.name, p.counter), json.into()).await.map_err(|e| CatalogError::Nats(e.to_string()))?;
    Ok(())
}

/// The bundle published as `name@counter`.
pub async fn lookup(js: &jetstream::Context, name: &str, counter: u64) -> Result<Published, CatalogError> {
    let unknown = || CatalogError::Unknown(format!("{name}@{counter}"));
    let kv = js.get_key_value(perch_protocol::subjects::BUNDLES_BUCKET).await.map_err(|_| unknown())?;
    let k = key(name, counter);
    let bytes = kv.get(&k).await.map_err(|e| CatalogError::Nats(e.to_string()))?.ok_or_else(unknown)?;
    serde_json::from_slice(&bytes).map_err(|e| CatalogError::Corrupt { key: k, detail: e.to_string() })
}

/// Every published bundle, oldest first: one pass over the bucket.
pub async fn list(js: &jetstream::Context) -> Result<Vec<Published>, CatalogError> {
    let entries = perch_net::read::kv_entries(js, perch_protocol::subjects::BUNDLES_BUCKET, "")
        .await
        .map_err(CatalogError::Nats)?;
    let mut out = entries
        .iter()
        .map(|e| {
            serde_json::from_slice::<Published>(&e.value)
                .map_err(|err| CatalogError::Corrupt { key: e.key.clone(), detail: err.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| (a.published_at, &a.name, a.counter).cmp(&(b.published_at, &b.name, b.counter)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn refs_are_name_at_counter() {
        assert_eq!(super::parse_ref("os@3").unwrap(), ("os".to_string(), 3));
        for bad in ["os", "os@", "@3", "o.s@3", "os@x", "os@-1"] {
            assert!(super::parse_ref(bad).is_err(), "{bad}");
        }
    }
}
