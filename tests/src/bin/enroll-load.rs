//! Load generator for `cargo xtask bench enroll`: N simulated devices, each
//! on its own TLS connection, enroll with one token, C at a time. Each
//! device makes its key, signs its request, and checks the enrollment it
//! gets back exactly as the agent does.
//!
//! Prints one JSON line: devices, enrolled, refused, seconds, per_second.

use std::sync::Arc;
use std::time::Instant;

use perch_net::{CaTrust, LinkOptions, Signer, User};
use perch_protocol::enroll::{EnrollResponse, Expect, RequestBody, SignedRequest};
use perch_protocol::subjects::ENROLL_REQUEST;
use perch_protocol::token::SignedToken;
use perch_protocol::SecretKey;

fn usage() -> ! {
    eprintln!("usage: enroll-load TOKEN_FILE DEVICES CONCURRENCY ID_PREFIX");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token_file, devices, concurrency, prefix] = args.as_slice() else { usage() };
    let (Ok(devices), Ok(concurrency)) = (devices.parse::<usize>(), concurrency.parse::<usize>()) else {
        usage()
    };
    let text = std::fs::read_to_string(token_file).unwrap_or_else(|e| {
        eprintln!("enroll-load: {token_file}: {e}");
        std::process::exit(2)
    });
    let token = SignedToken::parse(&text).unwrap_or_else(|e| {
        eprintln!("enroll-load: {token_file}: {e}");
        std::process::exit(3)
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let summary = rt.block_on(run(text.trim().to_string(), token, devices, concurrency, prefix.clone()));
    println!("{summary}");
}

async fn run(
    text: String,
    token: SignedToken,
    devices: usize,
    concurrency: usize,
    prefix: String,
) -> serde_json::Value {
    let tb = Arc::new(token.unverified_body().clone());
    let text = Arc::new(text);
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(devices);
    for i in 0..devices {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let (tb, text, id) = (tb.clone(), text.clone(), format!("{prefix}-{i:05}"));
        tasks.push(tokio::spawn(async move {
            // A failed attempt (no answer yet: a cluster still spreading
            // the provisioner's interest to the server this device reached)
            // is tried again, as the agent does; a refusal is an answer.
            let mut r = one_device(&tb, &text, &id).await;
            for attempt in 1..5u64 {
                if r.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                r = one_device(&tb, &text, &id).await;
            }
            drop(permit);
            r
        }));
    }
    let (mut enrolled, mut refused, mut failed) = (0usize, 0usize, Vec::new());
    let (mut connect_s, mut answer_s) = (0.0, 0.0);
    for t in tasks {
        match t.await {
            Ok(Ok((ok, c, a))) => {
                connect_s += c;
                answer_s += a;
                if ok {
                    enrolled += 1
                } else {
                    refused += 1
                }
            }
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(e) = failed.first() {
        eprintln!("enroll-load: {} devices failed; first: {e}", failed.len());
    }
    serde_json::json!({
        "devices": devices, "concurrency": concurrency, "enrolled": enrolled, "refused": refused,
        "failed": failed.len(), "seconds": secs, "per_second": enrolled as f64 / secs,
        "mean_connect_ms": 1000.0 * connect_s / devices.max(1) as f64,
        "mean_answer_ms": 1000.0 * answer_s / devices.max(1) as f64,
    })
}

/// One device: connect, ask, check. (enrolled?, connect seconds, answer seconds).
async fn one_device(
    tb: &perch_protocol::token::TokenBody,
    text: &str,
    id: &str,
) -> Result<(bool, f64, f64), String> {
    let mut seed = [0u8; 32];
    getrandom(&mut seed)?;
    let key = SecretKey::from_seed(&seed);
    let user_key = nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, tb.provisioning_seed)
        .map_err(|e| e.to_string())?;
    let user = User { jwt: tb.provisioning_jwt(), signer: Signer::Nkey(Arc::new(user_key)) };
    let link = LinkOptions {
        name: id.into(),
        inbox_prefix: Some(perch_protocol::subjects::token_inbox_prefix(&tb.token_id)),
        ..LinkOptions::default()
    };
    let t0 = Instant::now();
    let client = perch_net::connect(&tb.urls, &user, &CaTrust::Fingerprint(tb.ca_fingerprint), &link)
        .await
        .map_err(|e| e.to_string())?;
    let connected = t0.elapsed();
    let mut nonce = [0u8; 16];
    getrandom(&mut nonce)?;
    let body = RequestBody {
        device_id: id.into(),
        device_key: key.public(),
        groups: vec![],
        target: "bench".into(),
        agent_version: "bench".into(),
        nonce,
        created_at: 0,
        token: Some(text.into()),
    };
    let req = SignedRequest::sign(body, &key).map_err(|e| e.to_string())?;
    let t1 = Instant::now();
    let reply = client.request(ENROLL_REQUEST, req.to_bytes().into()).await.map_err(|e| e.to_string())?;
    let answered = t1.elapsed();
    let ok = match EnrollResponse::from_bytes(&reply.payload).map_err(|e| e.to_string())? {
        EnrollResponse::Enrolled(e) => {
            let expect = Expect {
                device_id: id,
                device_key: key.public(),
                trust_fingerprint: tb.trust_fingerprint,
                ca_fingerprint: Some(tb.ca_fingerprint),
                now: perch_support_now(),
            };
            e.verify(&expect).map_err(|e| e.to_string())?;
            true
        }
        _ => false,
    };
    drop(client);
    Ok((ok, connected.as_secs_f64(), answered.as_secs_f64()))
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).map_err(|e| e.to_string())
}

fn perch_support_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
