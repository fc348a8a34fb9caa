//! The device's FLEET link: its own NATS user (the device key signs the
//! server's nonce), TLS trusted by the fleet CA from its enrollment only,
//! and its private inbox prefix. On every (re)connect it says hello with
//! its credential, so the provisioner learns of devices enrolled offline.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Event;
use perch_net::{CaTrust, LinkOptions, Signer, User};
use perch_protocol::enroll::VerifiedEnrollment;
use perch_protocol::subjects;
use perch_protocol::SecretKey;
use tracing::{info, warn};

/// How the device's link behaves.
pub fn link_options(device_id: &str) -> LinkOptions {
    LinkOptions {
        name: format!("perch-agent {device_id}"),
        inbox_prefix: Some(subjects::inbox_prefix(device_id)),
        ..LinkOptions::default()
    }
}

fn user(v: &VerifiedEnrollment, key: Arc<SecretKey>) -> User {
    User { jwt: v.enrollment.user_jwt.clone(), signer: Signer::Device(key) }
}

/// One connection attempt to FLEET, then hello.
pub async fn connect_once(
    v: &VerifiedEnrollment,
    key: Arc<SecretKey>,
) -> Result<async_nats::Client, perch_net::LinkError> {
    let id = &v.credential.device_id;
    let client = perch_net::connect(
        &v.enrollment.fleet_urls,
        &user(v, key),
        &CaTrust::Certificate(v.enrollment.ca_der.clone()),
        &link_options(id),
    )
    .await?;
    hello(&client, v).await;
    Ok(client)
}

async fn hello(client: &async_nats::Client, v: &VerifiedEnrollment) {
    let id = &v.credential.device_id;
    if let Err(e) = client.publish(subjects::hello(id), v.enrollment.credential.clone().into()).await {
        warn!(device = %id, error = %e, "hello not sent");
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        warn!(device = %id, error = %e, "hello not flushed");
    }
}

/// Keeps the FLEET link up for as long as the agent runs: starts with no
/// link at all, reconnects with backoff, says hello on every connect.
pub async fn maintain(v: VerifiedEnrollment, key: Arc<SecretKey>) -> Result<(), perch_net::LinkError> {
    let id = v.credential.device_id.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let opts = perch_net::options(
        &user(&v, key),
        &CaTrust::Certificate(v.enrollment.ca_der.clone()),
        &link_options(&id),
    )?
    .retry_on_initial_connect()
    .event_callback(move |ev| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ev);
        }
    });
    let client = opts
        .connect(perch_net::server_addrs(&v.enrollment.fleet_urls)?)
        .await
        .map_err(|err| perch_net::LinkError::Connect { urls: v.enrollment.fleet_urls.join(","), err })?;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Connected => {
                info!(device = %id, "FLEET link up");
                hello(&client, &v).await;
            }
            Event::Disconnected => warn!(device = %id, "FLEET link down"),
            other => warn!(device = %id, "FLEET link: {other}"),
        }
    }
    Ok(())
}
