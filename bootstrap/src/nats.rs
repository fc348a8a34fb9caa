//! The NATS side of an org: an operator, the accounts SYS, PROVISIONING and
//! FLEET (JetStream on FLEET), a FLEET signing key for the provisioner, and
//! a nats-server config include that uses the full resolver, so account
//! updates and revocations can be pushed to a running server.
//!
//! Everything is an nkey (ed25519) and a NATS JWT (v2 claims) written with
//! serde. Seeds are written 0600 and never overwritten.

use std::path::{Path, PathBuf};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::{KeyPair, KeyPairType};
use perch_support::exit::{Class, Classify};
use serde_json::{json, Value};
use sha2::{Digest, Sha512_256};

use perch_support::durable::{self, Replace, WriteError};

/// Why the NATS setup could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nkey: {0}")]
    Key(String),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("reading OS randomness: {0}")]
    Random(String),
}

impl Classify for NatsError {
    fn class(&self) -> Option<Class> {
        match self {
            NatsError::Write(e) => e.class(),
            NatsError::Read { source, .. } if perch_support::exit::is_missing(source) => Some(Class::Usage),
            NatsError::Key(_) | NatsError::Read { .. } | NatsError::Random(_) => Some(Class::Runtime),
        }
    }
}

fn key_err(e: nkeys::error::Error) -> NatsError {
    NatsError::Key(e.to_string())
}

/// The accounts perch uses.
pub const ACCOUNTS: [&str; 3] = ["SYS", "PROVISIONING", "FLEET"];

/// A fresh nkey of `kind` from OS randomness.
pub fn new_key(kind: KeyPairType) -> Result<KeyPair, NatsError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| NatsError::Random(e.to_string()))?;
    KeyPair::new_from_raw(kind, seed).map_err(key_err)
}

/// Encodes and signs a NATS JWT: the `jti` is the SHA-512/256 of the
/// claims, as nats-server's own tooling makes it.
pub fn encode_jwt(signer: &KeyPair, mut claims: Value) -> Result<String, NatsError> {
    claims["jti"] = json!("");
    let unsigned = serde_json::to_vec(&claims).map_err(|e| NatsError::Key(e.to_string()))?;
    claims["jti"] = json!(BASE32_NOPAD.encode(&Sha512_256::digest(&unsigned)));
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body =
        BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).map_err(|e| NatsError::Key(e.to_string()))?);
    let signing_input = format!("{header}.{body}");
    let sig = signer.sign(signing_input.as_bytes()).map_err(key_err)?;
    Ok(format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&sig)))
}

fn base_claims(issuer: &KeyPair, subject: &str, name: &str, now: u64, nats: Value) -> Value {
    json!({ "iat": now, "iss": issuer.public_key(), "sub": subject, "name": name, "nats": nats })
}

/// Account limits: unlimited, with JetStream storage only where asked.
fn account_nats(jetstream: bool, signing_keys: &[String]) -> Value {
    let js = if jetstream { -1 } else { 0 };
    json!({
        "type": "account",
        "version": 2,
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js,
        },
        "signing_keys": signing_keys,
        "default_permissions": { "pub": {}, "sub": {} },
    })
}

/// Permissions in a user JWT.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Let the user answer requests it received (reply subjects).
    pub allow_responses: bool,
    /// How the user may connect; empty for any way. A device or service
    /// connects as a client (`STANDARD`), a field site's server as a leaf
    /// node (`LEAFNODE`): a stolen credential of one cannot be used as the
    /// other.
    pub connection_types: Vec<&'static str>,
}

/// A client connection (`allowed_connection_types`).
pub const STANDARD: &str = "STANDARD";
/// A leaf node connection.
pub const LEAFNODE: &str = "LEAFNODE";

/// Issues a user JWT for `user_public` in `account`, signed by `signer`
/// (the account itself or one of its signing keys).
pub fn user_jwt(
    signer: &KeyPair,
    account_public: &str,
    user_public: &str,
    name: &str,
    perms: &Permissions,
    now: u64,
    expires: Option<u64>,
) -> Result<String, NatsError> {
    let mut nats = json!({
        "type": "user",
        "version": 2,
        "pub": { "allow": perms.publish },
        "sub": { "allow": perms.subscribe },
        "subs": -1, "data": -1, "payload": -1,
    });
    if perms.allow_responses {
        nats["resp"] = json!({ "max": 1, "ttl": 0 });
    }
    if !perms.connection_types.is_empty() {
        nats["allowed_connection_types"] = json!(perms.connection_types);
    }
    if signer.public_key() != account_public {
        nats["issuer_account"] = json!(account_public);
    }
    let mut claims = base_claims(signer, user_public, name, now, nats);
    if let Some(e) = expires {
        claims["exp"] = json!(e);
    }
    encode_jwt(signer, claims)
}

/// A `.creds` file: the user JWT and seed in the format NATS clients read.
pub fn creds(jwt: &str, user: &KeyPair) -> Result<String, NatsError> {
    Ok(format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n",
        user.seed().map_err(key_err)?
    ))
}

/// Where the NATS files of an org live: `DIR/nats/`.
pub fn nats_dir(org_dir: &Path) -> PathBuf {
    org_dir.join("nats")
}

/// Creates the operator, the accounts and the server config include in
/// `ORG/nats/`. Refuses to overwrite any of it.
pub fn create(
    org_dir: &Path,
    org: &str,
    now: u64,
    issuing_seed: &[u8; 32],
    tls_block: &str,
) -> Result<(), NatsError> {
    let dir = nats_dir(org_dir);
    std::fs::create_dir_all(dir.join("jwt"))
        .map_err(|source| NatsError::Read { path: dir.clone(), source })?;
    let operator = new_key(KeyPairType::Operator)?;
    let accounts: Vec<KeyPair> =
        ACCOUNTS.iter().map(|_| new_key(KeyPairType::Account)).collect::<Result<_, _>>()?;
    let sys = &accounts[0];
    let fleet_signing = KeyPair::new_from_raw(KeyPairType::Account, *issuing_seed).map_err(key_err)?;
    let provisioning_signing = new_key(KeyPairType::Account)?;
    // Account updates (revocations) are signed with this, so the operator
    // identity key can stay offline.
    let operator_signing = new_key(KeyPairType::Operator)?;

    let op_jwt = encode_jwt(
        &operator,
        base_claims(
            &operator,
            &operator.public_key(),
            org,
            now,
            json!({
                "type": "operator", "version": 2, "system_account": sys.public_key(),
                "signing_keys": [operator_signing.public_key()],
            }),
        ),
    )?;
    let mut preload = Vec::new();
    for (name, kp) in ACCOUNTS.iter().zip(&accounts) {
        let signing: Vec<String> = match *name {
            "FLEET" => vec![fleet_signing.public_key()],
            "PROVISIONING" => vec![provisioning_signing.public_key()],
            _ => vec![],
        };
        let jwt = encode_jwt(
            &operator,
            base_claims(&operator, &kp.public_key(), name, now, account_nats(*name == "FLEET", &signing)),
        )?;
        durable::write_bytes(
            &dir.join(format!("{}.jwt", name.to_lowercase())),
            0o644,
            Replace::Refuse,
            jwt.as_bytes(),
        )?;
        durable::write_bytes(
            &dir.join(format!("{}.nk", name.to_lowercase())),
            0o600,
            Replace::Refuse,
            seed_line(kp)?.as_bytes(),
        )?;
        preload.push(format!("    {}: {}", kp.public_key(), jwt));
    }
    durable::write_bytes(&dir.join("operator.jwt"), 0o644, Replace::Refuse, op_jwt.as_bytes())?;
    durable::write_bytes(&dir.join("operator.nk"), 0o600, Replace::Refuse, seed_line(&operator)?.as_bytes())?;
    durable::write_bytes(
        &dir.join("fleet-signing.nk"),
        0o600,
        Replace::Refuse,
        seed_line(&fleet_signing)?.as_bytes(),
    )?;
    durable::write_bytes(
        &dir.join("operator-signing.nk"),
        0o600,
        Replace::Refuse,
        seed_line(&operator_signing)?.as_bytes(),
    )?;
    durable::write_bytes(
        &dir.join("provisioning-signing.nk"),
        0o600,
        Replace::Refuse,
        seed_line(&provisioning_signing)?.as_bytes(),
    )?;
    let conf = format!(
        "# perch: NATS operator mode for org '{org}'. Include this from your nats-server config.\n\
         {operator}{tls_block}",
        operator = operator_block(&op_jwt, &sys.public_key(), &dir.join("jwt"), &preload, HUB_RESOLVER_SYNC),
    );
    durable::write_bytes(&dir.join("server.conf"), 0o644, Replace::Refuse, conf.as_bytes())?;
    Ok(())
}

/// How often a hub server's resolver compares its account JWTs with the
/// others' (it hears every update as it is pushed; this catches up one
/// that was down).
pub const HUB_RESOLVER_SYNC: &str = "2m";

/// The same for a field site, whose uplink is down for long stretches: a
/// revocation pushed meanwhile reaches it at most this long after the
/// uplink returns. The check is one hash each way.
pub const SITE_RESOLVER_SYNC: &str = "20s";

/// The operator, system account and full resolver settings of a server.
/// `jwt_dir` is the resolver's own store: one per server; `sync`, how
/// often it compares its store with the other servers'.
fn operator_block(op_jwt: &str, sys: &str, jwt_dir: &Path, preload: &[String], sync: &str) -> String {
    format!(
        "operator: {op_jwt}\n\
         system_account: {sys}\n\
         resolver: {{\n    type: full\n    dir: \"{jwt_dir}\"\n    allow_delete: false\n    interval: \"{sync}\"\n}}\n\
         resolver_preload: {{\n{preload}\n}}\n",
        jwt_dir = jwt_dir.display(),
        preload = preload.join("\n"),
    )
}

/// [`operator_block`] for an existing org, read back from `ORG/nats/`,
/// with the resolver storing account JWTs in `jwt_dir`.
pub fn operator_block_of(org_dir: &Path, jwt_dir: &Path, sync: &str) -> Result<String, NatsError> {
    let dir = nats_dir(org_dir);
    let read = |name: &str| {
        let path = dir.join(name);
        match durable::read_bounded(&path, 64 * 1024) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).trim().to_string()),
            Err(durable::ReadError::Io { source, .. }) => Err(NatsError::Read { path, source }),
            Err(e) => Err(NatsError::Read { path, source: std::io::Error::other(e.to_string()) }),
        }
    };
    let op_jwt = read("operator.jwt")?;
    let mut preload = Vec::new();
    for name in ACCOUNTS {
        let jwt = read(&format!("{}.jwt", name.to_lowercase()))?;
        preload.push(format!("    {}: {}", account_public(org_dir, name)?, jwt));
    }
    Ok(operator_block(&op_jwt, &account_public(org_dir, "SYS")?, jwt_dir, &preload, sync))
}

fn seed_line(kp: &KeyPair) -> Result<String, NatsError> {
    Ok(format!("{}\n", kp.seed().map_err(key_err)?))
}

/// The FLEET account JWT with its revocations (NATS user public key →
/// Unix time; JWTs issued at or before it are refused), signed by the
/// operator signing key, ready for `$SYS.REQ.CLAIMS.UPDATE`.
pub fn fleet_account_jwt(
    org_dir: &Path,
    revocations: &std::collections::BTreeMap<String, u64>,
    iat: u64,
) -> Result<String, NatsError> {
    let dir = nats_dir(org_dir);
    let signer = read_seed(&dir.join("operator-signing.nk"))?;
    let fleet = read_seed(&dir.join("fleet.nk"))?.public_key();
    let fleet_signing = read_seed(&dir.join("fleet-signing.nk"))?.public_key();
    let mut nats = account_nats(true, &[fleet_signing]);
    nats["revocations"] = json!(revocations);
    encode_jwt(&signer, base_claims(&signer, &fleet, "FLEET", iat, nats))
}

/// Reads a seed file written by [`create`].
pub fn read_seed(path: &Path) -> Result<KeyPair, NatsError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| NatsError::Read { path: path.into(), source })?;
    KeyPair::from_seed(text.trim()).map_err(key_err)
}

/// The provisioner issuing key, as a perch key: the FLEET signing nkey.
pub fn issuing_key(org_dir: &Path) -> Result<perch_protocol::SecretKey, NatsError> {
    let path = nats_dir(org_dir).join("fleet-signing.nk");
    let text = std::fs::read_to_string(&path).map_err(|source| NatsError::Read { path, source })?;
    let (_, raw) = nkeys::decode_seed(text.trim()).map_err(key_err)?;
    Ok(perch_protocol::SecretKey::from_seed(&raw))
}

/// The public key of an account, from its seed file in `ORG/nats/`.
pub fn account_public(org_dir: &Path, account: &str) -> Result<String, NatsError> {
    Ok(read_seed(&nats_dir(org_dir).join(format!("{}.nk", account.to_lowercase())))?.public_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_is_three_base64url_parts_signed_by_the_issuer() {
        let op = new_key(KeyPairType::Operator).unwrap();
        let jwt = encode_jwt(&op, json!({"iss": op.public_key(), "sub": "x", "iat": 1})).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = BASE64URL_NOPAD.decode(parts[2].as_bytes()).unwrap();
        op.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig).unwrap();
        let claims: Value =
            serde_json::from_slice(&BASE64URL_NOPAD.decode(parts[1].as_bytes()).unwrap()).unwrap();
        assert_eq!(claims["jti"].as_str().unwrap().len(), 52);
    }
}
