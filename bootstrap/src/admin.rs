//! Operator and technician actions on a running fleet: list, approve,
//! reject and revoke devices. They need the org directory (its signing
//! keys) and a NATS URL; they change the registry with compare-and-swap.
//!
//! Revocation is pushed live: the FLEET account JWT is re-signed with the
//! device's NATS user in its revocation list and sent to the SYS account's
//! `$SYS.REQ.CLAIMS.UPDATE`. nats-server then closes the device's
//! connections and refuses new ones; the full resolver keeps the update
//! across restarts.

use std::path::Path;
use std::time::Duration;

use nkeys::KeyPairType;
use perch_net::{CaTrust, LinkOptions, Signer, User};
use perch_protocol::subjects::CLAIMS_UPDATE;
use perch_support::exit::{Class, Classify};

use crate::nats::{self, NatsError, Permissions};
use crate::registry::{Cas, DeviceRecord, Registry, RegistryError, Status};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Link(#[from] perch_net::LinkError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("pushing the FLEET account update: {0}")]
    ClaimsUpdate(String),
}

impl Classify for AdminError {
    fn class(&self) -> Option<Class> {
        match self {
            AdminError::Nats(e) => e.class(),
            AdminError::Tls(e) => e.class(),
            AdminError::Link(e) => e.class(),
            AdminError::Registry(e) => e.class(),
            AdminError::ClaimsUpdate(_) => Some(Class::Runtime),
        }
    }
}

/// Which account a service or operator connection joins.
#[derive(Debug, Clone, Copy)]
pub enum Account {
    Fleet,
    Provisioning,
    Sys,
}

/// A service user in `account`, minted on the spot from the org's keys:
/// FLEET and PROVISIONING users are signed by the account signing keys,
/// SYS users by the SYS account key.
pub fn service_user(org_dir: &Path, account: Account, name: &str, now: u64) -> Result<User, AdminError> {
    let ndir = nats::nats_dir(org_dir);
    let (signer_file, account_name) = match account {
        Account::Fleet => ("fleet-signing.nk", "fleet"),
        Account::Provisioning => ("provisioning-signing.nk", "provisioning"),
        Account::Sys => ("sys.nk", "sys"),
    };
    let signer = nats::read_seed(&ndir.join(signer_file))?;
    let account_pub = nats::account_public(org_dir, account_name)?;
    let user = nats::new_key(KeyPairType::User)?;
    let perms = Permissions::default();
    let jwt = nats::user_jwt(&signer, &account_pub, &user.public_key(), name, &perms, now, None)?;
    Ok(User { jwt, signer: Signer::Nkey(std::sync::Arc::new(user)) })
}

/// Connects to `urls` as a service user of `account`, trusting the org's CA.
pub async fn connect(
    org_dir: &Path,
    urls: &[String],
    account: Account,
    name: &str,
    now: u64,
) -> Result<async_nats::Client, AdminError> {
    let user = service_user(org_dir, account, name, now)?;
    let ca = CaTrust::Certificate(crate::tls::ca_der(org_dir)?);
    let link = LinkOptions { name: name.into(), ..LinkOptions::default() };
    Ok(perch_net::connect(urls, &user, &ca, &link).await?)
}

/// The registry, through a FLEET service connection.
pub async fn registry(org_dir: &Path, urls: &[String], now: u64) -> Result<Registry, AdminError> {
    let client = connect(org_dir, urls, Account::Fleet, "perch-bootstrap", now).await?;
    Ok(Registry::open(&async_nats::jetstream::new(client)).await?)
}

/// Approves a pending device, or a pending re-enrollment with a new key.
pub async fn approve(reg: &Registry, id: &str, now: u64) -> Result<DeviceRecord, AdminError> {
    Ok(reg
        .update_device(id, |rec| {
            if let Some(rk) = rec.rekey.as_mut().filter(|r| !r.approved) {
                rk.approved = true;
            } else if rec.status == Status::Pending || rec.status == Status::Rejected {
                rec.status = Status::Approved;
            } else {
                return Err(RegistryError::WrongStatus {
                    id: id.into(),
                    status: rec.status,
                    action: "approve",
                });
            }
            rec.updated_at = now;
            Ok(())
        })
        .await?)
}

/// Rejects a pending device (or its pending re-enrollment).
pub async fn reject(reg: &Registry, id: &str, now: u64) -> Result<DeviceRecord, AdminError> {
    Ok(reg
        .update_device(id, |rec| {
            if rec.rekey.is_some() {
                rec.rekey = None;
            } else if matches!(rec.status, Status::Pending | Status::Approved) {
                rec.status = Status::Rejected;
            } else {
                return Err(RegistryError::WrongStatus {
                    id: id.into(),
                    status: rec.status,
                    action: "reject",
                });
            }
            rec.updated_at = now;
            Ok(())
        })
        .await?)
}

/// Revokes a device: marks it revoked and pushes the revocation of its
/// NATS user to the server, which cuts it off at once.
pub async fn revoke(
    org_dir: &Path,
    urls: &[String],
    reg: &Registry,
    id: &str,
    now: u64,
) -> Result<DeviceRecord, AdminError> {
    let rec = reg
        .update_device(id, |rec| {
            rec.status = Status::Revoked;
            rec.rekey = None;
            rec.updated_at = now;
            Ok(())
        })
        .await?;
    revoke_users(org_dir, urls, reg, std::slice::from_ref(&rec.nats_user), now).await?;
    Ok(rec)
}

/// Adds NATS users to the FLEET account's revocation list and pushes it.
pub async fn revoke_users(
    org_dir: &Path,
    urls: &[String],
    reg: &Registry,
    users: &[String],
    now: u64,
) -> Result<(), AdminError> {
    let jwt = loop {
        let (mut r, rev) = reg.revocations().await?;
        for u in users {
            r.users.insert(u.clone(), now);
        }
        // Each account JWT must be newer than the one the server holds.
        r.last_iat = now.max(r.last_iat + 1);
        let jwt = nats::fleet_account_jwt(org_dir, &r.users, r.last_iat)?;
        if let Cas::Done(_) = reg.put_revocations(&r, rev).await? {
            break jwt;
        }
    };
    let sys = connect(org_dir, urls, Account::Sys, "perch-bootstrap-sys", now).await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), sys.request(CLAIMS_UPDATE, jwt.into()))
        .await
        .map_err(|_| AdminError::ClaimsUpdate("no answer from the server in 10 s".into()))?
        .map_err(|e| AdminError::ClaimsUpdate(e.to_string()))?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| AdminError::ClaimsUpdate(format!("unreadable answer: {e}")))?;
    if let Some(err) = answer.get("error") {
        return Err(AdminError::ClaimsUpdate(err.to_string()));
    }
    Ok(())
}
