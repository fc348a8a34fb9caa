//! `perch-bootstrap`: the org's side of perch. It creates the org and
//! maintains its trust document, issues tokens and NATS credentials, runs
//! the provisioner, keeps the device registry (approve, reject, revoke),
//! and writes the configuration of a server cluster and of field sites.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use perch_bootstrap::org::{self, InitParams, TRUST_DOC};
use perch_bootstrap::{nats, provisioner, token};

mod fleet;
use perch_protocol::token::{Approval, SignedToken};
use perch_protocol::trust::{SignedTrust, TrustBody, MAX_TRUST_FILE_LEN};
use perch_protocol::PublicKey;
use perch_support::durable::{self, read_bounded, Replace};
use perch_support::exit::{self, SecurityError, UsageError};
use perch_support::{keyfile, now_unix};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "perch-bootstrap",
    version,
    about = "perch trust and enrollment: org init, trust documents, tokens, the provisioner and device approval"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an org: root key pair and a version-1 trust document.
    Init(InitArgs),
    /// Rotate, co-sign, check and show trust documents.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// NATS credentials for the org's accounts.
    #[command(subcommand)]
    Nats(NatsCommand),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Field sites: ground-station servers, leaf nodes of the hub.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Run the provisioner: answer enrollment requests until stopped.
    Run(RunArgs),
    /// List devices waiting for approval (new devices and re-enrollments).
    Pending {
        #[command(flatten)]
        access: RegistryAccess,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// List every device in the registry.
    Devices {
        #[command(flatten)]
        access: RegistryAccess,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending device (or its re-enrollment with a new key).
    Approve {
        #[command(flatten)]
        access: RegistryAccess,
        /// The device id.
        id: String,
    },
    /// Reject a pending device (or its re-enrollment with a new key).
    Reject {
        #[command(flatten)]
        access: RegistryAccess,
        /// The device id.
        id: String,
    },
    /// Revoke a device: the server cuts it off within seconds and refuses it from then on.
    Revoke {
        #[command(flatten)]
        access: RegistryAccess,
        /// The device id.
        id: String,
    },
    /// Offline enrollment: answer a device's request file with an enrollment file.
    SignRequest {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        /// The request from `perch-agent enroll --request-out`.
        file: PathBuf,
        /// Where to write the enrollment file (`perch-agent enroll --import` reads it).
        #[arg(long)]
        out: PathBuf,
        /// A group the device joins; repeat for several.
        #[arg(long = "group", value_name = "G", required = true)]
        groups: Vec<String>,
        /// URL the device connects to for FLEET; repeat for several.
        #[arg(long = "fleet-url", value_name = "URL", default_value = "tls://127.0.0.1:4222")]
        fleet_urls: Vec<String>,
        /// How long the credential is valid.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "365d")]
        credential_ttl: Duration,
    },
}

/// `perch-bootstrap run`: the provisioner.
#[derive(clap::Args)]
struct RunArgs {
    /// The org directory (`perch-bootstrap init` made it).
    #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
    dir: PathBuf,
    #[command(flatten)]
    server: Server,
    /// URL enrolled devices connect to for FLEET; repeat for several (default: --url).
    #[arg(long = "fleet-url", value_name = "URL")]
    fleet_urls: Vec<String>,
    /// How long device credentials are valid.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "365d")]
    credential_ttl: Duration,
    /// Enrollment requests handled at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Copies of each stream and bucket: auto (3 on a cluster of three
    /// or more servers, else 1; only ever scales up) or 1 to 5.
    #[arg(long, default_value = "auto")]
    replicas: perch_net::Replicas,
}

/// `perch-bootstrap init`.
#[derive(clap::Args)]
struct InitArgs {
    /// The org directory (`perch-bootstrap init` made it).
    #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
    dir: PathBuf,
    /// A release public key (PREFIX.pub); repeat for each key.
    #[arg(long = "release-key", value_name = "PUB", required = true)]
    release_keys: Vec<PathBuf>,
    /// How many distinct release keys must sign a bundle.
    #[arg(long)]
    threshold: u32,
    /// Org name.
    #[arg(long, default_value = "perch")]
    org: String,
    /// Make the trust document expire, e.g. "2y".
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
    /// A DNS name or IP address devices reach nats-server by; repeat for several.
    #[arg(long = "tls-name", value_name = "NAME", default_values = ["localhost", "127.0.0.1"])]
    tls_names: Vec<String>,
    /// Use your own fleet CA certificate (PEM) instead of making one.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Your nats-server certificate (PEM, signed by --tls-ca).
    #[arg(long, requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_ca")]
    tls_key: Option<PathBuf>,
}

/// As whom the registry commands act: an operator's FLEET creds file, or
/// the org's own keys (the org directory). `revoke` needs the org's keys:
/// it signs the FLEET account's revocation list.
#[derive(clap::Args)]
struct RegistryAccess {
    /// The org directory: act with the org's keys (what `revoke` needs).
    /// Also PERCH_ORG.
    #[arg(long, value_name = "ORG_DIR")]
    dir: Option<PathBuf>,
    /// A FLEET user's creds file (`perch-bootstrap nats creds --account fleet`):
    /// act as that operator, without the org's keys. Also PERCH_CREDS.
    #[arg(long, value_name = "FILE")]
    creds: Option<PathBuf>,
    /// The fleet CA certificate, with --creds (default: ORG_DIR/tls/ca.pem).
    /// Also PERCH_CA.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    #[command(flatten)]
    server: Server,
}

impl RegistryAccess {
    fn with_env(self, wants_org: bool) -> Result<fleet::Access> {
        self.resolve(wants_org, |v| std::env::var_os(v))
    }

    /// Which authority to act with. A flag beats both variables (so
    /// `--dir` is not overridden by a PERCH_CREDS set for `perch`); with
    /// only the variables, `revoke` (`wants_org`) takes PERCH_ORG and the
    /// others PERCH_CREDS, the smaller authority.
    fn resolve(
        self,
        wants_org: bool,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<fleet::Access> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (creds, dir) = match (self.creds, self.dir) {
            (None, None) => match (var("PERCH_CREDS"), var("PERCH_ORG")) {
                (Some(_), Some(dir)) if wants_org => (None, Some(dir)),
                from_env => from_env,
            },
            flags => flags,
        };
        let urls = self.server.urls;
        match (creds, dir) {
            (Some(creds), dir) => {
                let ca = match (self.ca.or_else(|| var("PERCH_CA")), dir) {
                    (Some(ca), _) => ca,
                    (None, Some(dir)) => perch_bootstrap::tls::ca_cert_path(&dir),
                    (None, None) => {
                        return Err(UsageError("--creds needs --ca (the fleet CA) or --dir ORG_DIR".into()).into())
                    }
                };
                Ok(fleet::Access::Creds(perch_net::operator::Target { urls, creds, ca }))
            }
            (None, Some(dir)) => Ok(fleet::Access::Org { dir, urls }),
            (None, None) => Err(UsageError(
                "give --creds FILE (a FLEET creds file; also PERCH_CREDS) with --ca, or --dir ORG_DIR (also PERCH_ORG)"
                    .into(),
            )
            .into()),
        }
    }
}

/// Where the fleet's nats-server is.
#[derive(clap::Args)]
struct Server {
    /// NATS URL; repeat for several (PERCH_URL: comma-separated).
    #[arg(
        long = "url",
        env = "PERCH_URL",
        value_delimiter = ',',
        value_name = "URL",
        default_value = "tls://127.0.0.1:4222"
    )]
    urls: Vec<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue an enrollment token (printed on stdout).
    Issue {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        /// A group enrolled devices may join; repeat for several.
        #[arg(long = "group", value_name = "G", required = true)]
        groups: Vec<String>,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid, e.g. "24h".
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        ttl: Duration,
        /// auto: enroll at once; manual: wait for `approve`.
        #[arg(long, value_enum, default_value = "auto")]
        approval: ApprovalArg,
        /// A glob the device id must match, e.g. "drone-*".
        #[arg(long)]
        id_pattern: Option<String>,
        /// The provisioner's NATS URL; repeat for several.
        #[arg(long = "url", default_value = "tls://127.0.0.1:4222")]
        urls: Vec<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// Also print the token as a QR code for the terminal.
        #[arg(long)]
        qr: bool,
    },
    /// Check a token against a trust document and print what it allows.
    Check {
        /// The org trust document the token must be signed under.
        #[arg(long)]
        trust: PathBuf,
        /// The token text (or use --file).
        token: Option<String>,
        /// A file holding the token (a QR code's text, say).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ApprovalArg {
    Auto,
    Manual,
}

#[derive(Subcommand)]
enum NatsCommand {
    /// Issue a user credential (.creds, mode 0600) in an account, signed by
    /// the account's signing key: for services and operators.
    Creds {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        /// fleet or provisioning.
        #[arg(long)]
        account: String,
        /// The user's name, as the server's monitoring shows it.
        #[arg(long)]
        name: String,
        /// A subject the user may publish to; repeat for several.
        #[arg(long = "pub", value_name = "SUBJECT")]
        publish: Vec<String>,
        /// A subject the user may subscribe to; repeat for several.
        #[arg(long = "sub", value_name = "SUBJECT")]
        subscribe: Vec<String>,
        /// Let the user reply to requests it receives.
        #[arg(long)]
        allow_responses: bool,
        /// Where to write the .creds file (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the configuration of an N-server nats-server cluster (routes
    /// over TLS, JetStream, the operator and a full resolver on each) to
    /// DIR/nats/cluster/<name>/.
    Cluster {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        /// A server: NAME=HOST or NAME=HOST:CLIENT_PORT:ROUTE_PORT[:LEAF_PORT]; repeat for each (at least 3).
        #[arg(long = "server", value_name = "NAME=HOST", required = true)]
        servers: Vec<perch_bootstrap::cluster::Member>,
        /// The cluster's name.
        #[arg(long, default_value = "perch")]
        cluster_name: String,
        /// The address each server listens on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// The port clients connect to, unless a --server gives its own.
        #[arg(long, default_value_t = 4222)]
        client_port: u16,
        /// The port the servers connect to each other on (routes), unless a --server gives its own.
        #[arg(long, default_value_t = 6222)]
        route_port: u16,
        /// Where field sites connect (leaf nodes), unless a --server gives its own.
        #[arg(long, default_value_t = perch_bootstrap::server_conf::LEAF_PORT)]
        leaf_port: u16,
        /// The hub's JetStream domain (a-z 0-9 -), the same on every server.
        #[arg(long, default_value = perch_protocol::subjects::HUB_DOMAIN)]
        domain: String,
        /// Another DNS name or address in every server's certificate (a load balancer); repeat for several.
        #[arg(long = "tls-name", value_name = "NAME")]
        tls_names: Vec<String>,
        /// Where each server's files will be on its host (default: where they are written).
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Where each server keeps JetStream and account JWTs (default: CONFIG_DIR/data).
        #[arg(long)]
        store_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Write a field site's nats-server configuration, credentials and
    /// certificate to DIR/sites/NAME/.
    Init {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        /// The site's name (a-z 0-9 -, at most 32): its JetStream domain.
        #[arg(long)]
        name: String,
        /// The hub's leafnode URL, tls://HOST:7422; repeat for each hub server.
        #[arg(long = "hub", value_name = "URL", required = true)]
        hub_urls: Vec<String>,
        /// The hub's JetStream domain.
        #[arg(long, default_value = perch_protocol::subjects::HUB_DOMAIN)]
        hub_domain: String,
        /// A DNS name or IPv4 address drones reach the site's server by; repeat for several.
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
        /// The port the site's devices connect to.
        #[arg(long, default_value_t = 4222)]
        client_port: u16,
        /// The address the site's server listens on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Where the site's files will be on the ground station (default: where they are written).
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Where the site's server keeps JetStream and account JWTs (default: CONFIG_DIR/data).
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// The most the site's JetStream keeps on disk, e.g. 8G.
        #[arg(long, default_value = "8G", value_parser = perch_bootstrap::site::parse_size)]
        max_store: u64,
    },
    /// Run a field site's daemon on its ground station, next to its
    /// nats-server: make the site's streams, copy the bundles the fleet
    /// wants, wake the drones, announce the site to the hub.
    Run {
        /// The site's directory (from `site init`), with site.json.
        #[arg(long)]
        dir: PathBuf,
        /// Bytes of reports the site keeps for the hub, e.g. 1G (default:
        /// an eighth of the store, at most 1G); the rest is for bundles.
        #[arg(long, value_parser = perch_bootstrap::site::parse_size)]
        reports_limit: Option<u64>,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Root-sign the next version of DIR/trust.doc into OUT (needs co-signing).
    Rotate {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        /// A release public key of the new version (PREFIX.pub); repeat for each.
        #[arg(long = "release-key", value_name = "PUB", required = true)]
        release_keys: Vec<PathBuf>,
        /// How many release keys must sign a bundle in the new version.
        #[arg(long)]
        threshold: u32,
        /// How long the new version is valid (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// Where to write the new version (it still needs `trust sign`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a rotation signature by one of the current version's release keys.
    Sign {
        /// A release secret key of the current version (PREFIX.key).
        #[arg(long)]
        key: PathBuf,
        /// The new trust document, signed in place.
        file: PathBuf,
    },
    /// Check that NEW may replace CURRENT (root signature and k-of-n rotation).
    Verify {
        /// The trust document in force.
        #[arg(long)]
        current: PathBuf,
        /// The one that would replace it.
        new: PathBuf,
    },
    /// Push a trust document (default DIR/trust.doc) to every enrolled
    /// device; each takes it only by a valid rotation chain. The bucket
    /// keeps only the latest: a device that missed a version refuses the
    /// next until it gets the missed one, so push versions in order.
    Push {
        /// The org directory (`perch-bootstrap init` made it).
        #[arg(long, env = "PERCH_ORG", value_name = "ORG_DIR")]
        dir: PathBuf,
        #[command(flatten)]
        server: Server,
        /// The trust document to push (default: DIR/trust.doc).
        file: Option<PathBuf>,
    },
    /// Print a trust document.
    Show {
        /// The trust document.
        file: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version, to stdout.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", exit::one_line_usage("perch-bootstrap", &e.to_string()));
            return ExitCode::from(exit::USAGE as u8);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perch-bootstrap: {}", perch_support::chain_line(e.chain()));
            ExitCode::from(exit::code_for(e.chain(), &[perch_bootstrap::CLASSIFY]) as u8)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let now = now_unix();
    // The daemons keep SIGPIPE ignored; see perch_support::sigpipe.
    if !matches!(cli.command, Command::Run(_) | Command::Site(SiteCommand::Run { .. })) {
        perch_support::sigpipe::die_on_closed_pipe();
    }
    match cli.command {
        Command::Init(args) => init(args, now),
        Command::Run(args) => provision(args),
        Command::Pending { access, json } => fleet::list(&access.with_env(false)?, json, true),
        Command::Devices { access, json } => fleet::list(&access.with_env(false)?, json, false),
        Command::Approve { access, id } => fleet::act(&access.with_env(false)?, fleet::Action::Approve, &id),
        Command::Reject { access, id } => fleet::act(&access.with_env(false)?, fleet::Action::Reject, &id),
        Command::Revoke { access, id } => fleet::act(&access.with_env(true)?, fleet::Action::Revoke, &id),
        Command::SignRequest { dir, file, out, groups, fleet_urls, credential_ttl } => {
            fleet::sign_request(&dir, &file, &out, &groups, &fleet_urls, credential_ttl)
        }
        Command::Trust(cmd) => trust(cmd, now),
        Command::Nats(cmd) => nats_cmd(cmd, now),
        Command::Site(cmd) => site(cmd, now),
        Command::Token(cmd) => token_cmd(cmd, now),
    }
}

/// `perch-bootstrap init`: the org's keys, trust document, NATS operator and TLS.
fn init(args: InitArgs, now: u64) -> Result<()> {
    let InitArgs { dir, release_keys, threshold, org, expires_in, tls_names, tls_ca, tls_cert, tls_key } =
        args;
    let own_tls = match (tls_ca, tls_cert, tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(perch_bootstrap::tls::OwnCerts { ca, cert, key }),
        _ => None,
    };
    let params = InitParams {
        org,
        release_keys: read_pubs(&release_keys)?,
        threshold,
        now,
        expires_at: expires_in.map(|d| now + d.as_secs()),
        tls_names,
        own_tls,
    };
    let (mut seed, mut issuing) = ([0u8; 32], [0u8; 32]);
    getrandom::getrandom(&mut seed).context("reading OS randomness")?;
    getrandom::getrandom(&mut issuing).context("reading OS randomness")?;
    let doc = org::init(&dir, &seed, &issuing, params)?;
    let b = doc.unverified_body();
    println!("created org '{}' in {}", b.org, dir.display());
    println!("  root key   {} ({}; keep it offline)", b.root_key.id(), dir.join(org::ROOT_KEY).display());
    println!(
        "  trust doc  {} version {}, {} of {} release keys",
        dir.join(TRUST_DOC).display(),
        b.version,
        b.threshold,
        b.release_keys.len()
    );
    println!("  fingerprint {}", hex::encode(doc.fingerprint()));
    println!(
        "  nats       {} (operator mode, full resolver: include it in nats-server's config)",
        nats::nats_dir(&dir).join("server.conf").display()
    );
    Ok(())
}

/// `perch-bootstrap run`: the provisioner, until SIGINT or SIGTERM.
fn provision(args: RunArgs) -> Result<()> {
    let RunArgs { dir, server, fleet_urls, credential_ttl, concurrency, replicas } = args;
    fleet::init_logging(tracing::Level::INFO);
    provisioner::preflight(&dir)?;
    let fleet_urls = if fleet_urls.is_empty() { server.urls.clone() } else { fleet_urls };
    let settings = provisioner::Settings {
        org_dir: dir,
        urls: server.urls,
        fleet_urls,
        credential_ttl,
        concurrency,
        replicas,
    };
    let rt = fleet::runtime()?;
    let done = rt.block_on(provisioner::run(settings, fleet::shutdown_signal()));
    // Tasks still waiting on a hung server are dropped, not awaited.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(done?)
}

/// `perch-bootstrap trust ...`: the trust document's versions.
fn trust(cmd: TrustCommand, now: u64) -> Result<()> {
    match cmd {
        TrustCommand::Rotate { dir, release_keys, threshold, expires_in, out } => {
            let current = read_trust(&dir.join(TRUST_DOC))?;
            let params = InitParams {
                org: String::new(),
                release_keys: read_pubs(&release_keys)?,
                threshold,
                now,
                expires_at: expires_in.map(|d| now + d.as_secs()),
                tls_names: vec![],
                own_tls: None,
            };
            let next = org::rotate(&dir, &current, params)?;
            durable::write_bytes(&out, 0o644, Replace::Refuse, &next.to_bytes())?;
            let cur = current.unverified_body();
            println!(
                "wrote {} (version {}); it needs rotation signatures from {} of the {} current release keys: `perch-bootstrap trust sign --key KEY {}`",
                out.display(),
                next.unverified_body().version,
                cur.threshold,
                cur.release_keys.len(),
                out.display()
            );
            Ok(())
        }
        TrustCommand::Sign { key, file } => {
            let key = keyfile::read_secret(&key)?;
            let mut doc = read_trust(&file)?;
            if doc.add_rotation_signature(&key) {
                durable::write_bytes(&file, 0o644, Replace::Allow, &doc.to_bytes())?;
                println!("added rotation signature by key {}", key.public().id());
            } else {
                println!(
                    "{} already carries a signature by key {}; nothing changed",
                    file.display(),
                    key.public().id()
                );
            }
            Ok(())
        }
        TrustCommand::Push { dir, server, file } => {
            let file = file.unwrap_or_else(|| dir.join(TRUST_DOC));
            let bytes = read_bounded(&file, MAX_TRUST_FILE_LEN)?;
            let trust = perch_bootstrap::trust_push::check(&dir, &file, &bytes, now)?;
            fleet::init_logging(tracing::Level::WARN);
            let rev = fleet::runtime()?.block_on(perch_bootstrap::trust_push::push(
                &dir,
                &server.urls,
                bytes,
                now,
            ))?;
            println!(
                "pushed trust document version {} of org '{}' to {} (revision {rev}); devices take it if it follows the version they accepted",
                trust.body().version,
                trust.body().org,
                perch_protocol::subjects::TRUST_BUCKET
            );
            Ok(())
        }
        TrustCommand::Verify { current, new } => {
            let cur = read_trust(&current)?
                .verify_anchor(now, None)
                .with_context(|| current.display().to_string())?;
            let next =
                read_trust(&new)?.verify_rotation(&cur, now).with_context(|| new.display().to_string())?;
            println!(
                "OK {} may replace version {} with version {}",
                new.display(),
                cur.body().version,
                next.body().version
            );
            Ok(())
        }
        TrustCommand::Show { file, json } => {
            let doc = read_trust(&file)?;
            show(&doc, json);
            Ok(())
        }
    }
}

/// `perch-bootstrap nats ...`: credentials and server cluster configs.
fn nats_cmd(cmd: NatsCommand, now: u64) -> Result<()> {
    match cmd {
        NatsCommand::Creds { dir, account, name, publish, subscribe, allow_responses, out } => {
            let account = account.to_lowercase();
            if account != "fleet" && account != "provisioning" {
                return Err(
                    UsageError(format!("--account must be fleet or provisioning, not '{account}'")).into()
                );
            }
            let ndir = nats::nats_dir(&dir);
            let signer = nats::read_seed(&ndir.join(format!("{account}-signing.nk")))?;
            let account_pub = nats::account_public(&dir, &account)?;
            let user = nats::new_key(nkeys::KeyPairType::User)?;
            let perms = nats::Permissions { publish, subscribe, allow_responses, ..Default::default() };
            let jwt = nats::user_jwt(&signer, &account_pub, &user.public_key(), &name, &perms, now, None)?;
            durable::write_bytes(&out, 0o600, Replace::Refuse, nats::creds(&jwt, &user)?.as_bytes())?;
            println!(
                "wrote {} for user {} in account {}",
                out.display(),
                user.public_key(),
                account.to_uppercase()
            );
            Ok(())
        }
        NatsCommand::Cluster {
            dir,
            servers,
            cluster_name,
            bind,
            client_port,
            route_port,
            leaf_port,
            domain,
            tls_names,
            config_dir,
            store_dir,
        } => {
            let org = read_trust(&dir.join(TRUST_DOC))?.unverified_body().org.clone();
            let params = perch_bootstrap::cluster::ClusterParams {
                org,
                name: cluster_name,
                members: servers,
                bind,
                client_port,
                route_port,
                leaf_port,
                domain,
                tls_names,
                config_dir,
                store_dir,
            };
            let written = perch_bootstrap::cluster::write(&dir, &params)?;
            for conf in written {
                println!("wrote {}", conf.display());
            }
            let urls: Vec<String> = params
                .members
                .iter()
                .map(|m| format!("tls://{}:{}", m.host, m.ports.map_or(params.client_port, |p| p.0)))
                .collect();
            println!("clients: --url {}", urls.join(" --url "));
            let hubs: Vec<String> = params
                .members
                .iter()
                .map(|m| format!("tls://{}:{}", m.host, m.leaf_port.unwrap_or(params.leaf_port)))
                .collect();
            println!("field sites (JetStream domain '{}'): --hub {}", params.domain, hubs.join(" --hub "));
            Ok(())
        }
    }
}

/// `perch-bootstrap site ...`: a field site's config and its daemon.
fn site(cmd: SiteCommand, now: u64) -> Result<()> {
    match cmd {
        SiteCommand::Init {
            dir,
            name,
            hub_urls,
            hub_domain,
            hosts,
            client_port,
            bind,
            config_dir,
            store_dir,
            max_store,
        } => {
            use perch_bootstrap::site;
            let org = read_trust(&dir.join(TRUST_DOC))?.unverified_body().org.clone();
            let params = site::SiteParams {
                org,
                name,
                hub_urls,
                hub_domain,
                hosts,
                client_port,
                bind,
                config_dir,
                store_dir,
                max_store,
            };
            let written = site::write(&dir, &params, now)?;
            println!("wrote {}", written.display());
            println!(
                "start it on the ground station: nats-server -c {}",
                params.config_dir.unwrap_or(written).join("nats-server.conf").display()
            );
            Ok(())
        }
        SiteCommand::Run { dir, reports_limit } => {
            fleet::init_logging(tracing::Level::INFO);
            let c = perch_bootstrap::site::SiteConfig::load(&dir.join(perch_bootstrap::site::SITE_JSON))?;
            let p = perch_bootstrap::site_run::SiteRun::from_config(&c, &dir, reports_limit)
                .map_err(|e| UsageError(e.to_string()))?;
            let rt = fleet::runtime()?;
            let done = rt.block_on(perch_bootstrap::site_run::run(p, fleet::shutdown_signal()));
            rt.shutdown_timeout(Duration::from_secs(1));
            Ok(done?)
        }
    }
}

/// `perch-bootstrap token ...`: enrollment tokens.
fn token_cmd(cmd: TokenCommand, now: u64) -> Result<()> {
    match cmd {
        TokenCommand::Issue { dir, groups, uses, ttl, approval, id_pattern, urls, json, qr } => {
            // The format needs expires_at > issued_at; never round 0s up silently.
            if ttl.as_secs() == 0 {
                return Err(UsageError(format!(
                    "--ttl {}: a token must be valid for at least 1s",
                    humantime::format_duration(ttl)
                ))
                .into());
            }
            let ask = token::Ask {
                groups,
                uses,
                approval: match approval {
                    ApprovalArg::Auto => Approval::Auto,
                    ApprovalArg::Manual => Approval::Manual,
                },
                id_pattern,
                urls,
                ttl_secs: ttl.as_secs(),
            };
            let t = token::issue_from_org(&dir, ask, now)?;
            let text = t.to_text();
            if json {
                let b = t.unverified_body();
                println!(
                    "{}",
                    json!({ "token": text, "id": hex::encode(b.token_id), "length": text.len(), "expires_at": b.expires_at })
                );
            } else {
                println!("{text}");
            }
            if qr {
                print!("{}", fleet::qr(&text)?);
            }
            Ok(())
        }
        TokenCommand::Check { trust, token, file, json } => {
            let text = match (token, file) {
                (Some(t), None) => t,
                (None, Some(f)) => {
                    let max = perch_protocol::token::MAX_TOKEN_TEXT + 64;
                    // No real token is that large: hostile input, not a typo.
                    let bytes = match read_bounded(&f, max) {
                        Err(durable::ReadError::TooLarge { .. }) => {
                            return Err(SecurityError(format!(
                                "{}: token file is over {max} bytes",
                                f.display()
                            ))
                            .into())
                        }
                        r => r?,
                    };
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                _ => return Err(UsageError("give the token or --file, not both".into()).into()),
            };
            let trust = read_trust(&trust)?.verify_anchor(now, None)?;
            let v = SignedToken::parse(&text).and_then(|t| t.verify(&trust, now))?;
            let b = v.body();
            let approval = if b.approval == Approval::Auto { "auto" } else { "manual" };
            if json {
                println!(
                    "{}",
                    json!({ "id": hex::encode(b.token_id), "org": b.org, "groups": b.groups, "uses": b.uses,
                            "expires_at": b.expires_at, "approval": approval, "id_pattern": b.id_pattern, "urls": b.urls })
                );
            } else {
                println!(
                    "OK token {} for org '{}': {} use(s), groups [{}], approval {approval}, expires {}",
                    hex::encode(b.token_id),
                    b.org,
                    b.uses,
                    b.groups.join(", "),
                    b.expires_at
                );
            }
            Ok(())
        }
    }
}

fn show(doc: &SignedTrust, json: bool) {
    let b: &TrustBody = doc.unverified_body();
    let ids = |keys: &[PublicKey]| keys.iter().map(|k| k.id().to_string()).collect::<Vec<_>>();
    let rotation: Vec<String> = doc.rotation_signers().map(|k| k.to_string()).collect();
    if json {
        let doc = json!({
            "org": b.org,
            "version": b.version,
            "issued_at": b.issued_at,
            "expires_at": b.expires_at,
            "root_key": b.root_key.id().to_string(),
            "release_keys": ids(&b.release_keys),
            "threshold": b.threshold,
            "issuing_keys": ids(&b.issuing_keys),
            "rotation_signers": rotation,
            "fingerprint": hex::encode(doc.fingerprint()),
        });
        println!("{doc}");
        return;
    }
    println!("org          {}", b.org);
    println!("version      {}", b.version);
    println!("fingerprint  {}", hex::encode(doc.fingerprint()));
    println!("root key     {}", b.root_key.id());
    println!("release keys {} (threshold {})", ids(&b.release_keys).join(" "), b.threshold);
    println!("issuing keys {}", ids(&b.issuing_keys).join(" "));
    println!("expires      {}", b.expires_at.map(|e| e.to_string()).unwrap_or_else(|| "never".into()));
    println!("rotation sigs {}", rotation.join(" "));
}

fn read_pubs(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths.iter().map(|p| Ok(keyfile::read_public(p)?)).collect()
}

fn read_trust(path: &Path) -> Result<SignedTrust> {
    let bytes = read_bounded(path, MAX_TRUST_FILE_LEN)?;
    SignedTrust::parse(&bytes).with_context(|| path.display().to_string())
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is in `--help`.
    #[test]
    fn no_flag_or_argument_has_a_blank_help() {
        let blank = perch_support::clap_help::blank_help(&super::Cli::command());
        assert!(blank.is_empty(), "no help text: {blank:#?}");
    }
}

#[cfg(test)]
mod access_tests {
    use std::ffi::OsString;

    use crate::fleet::Access;
    use clap::Parser;

    /// The access `args` (after `perch-bootstrap`) resolve to with `env` set.
    fn access(args: &[&str], env: &[(&str, &str)]) -> Result<Access, String> {
        let cli = super::Cli::try_parse_from(std::iter::once("perch-bootstrap").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let (access, wants_org) = match cli.command {
            super::Command::Devices { access, .. } => (access, false),
            super::Command::Revoke { access, .. } => (access, true),
            _ => unreachable!("only devices and revoke here"),
        };
        let env = |v: &str| env.iter().find(|(k, _)| *k == v).map(|(_, val)| OsString::from(val));
        access.resolve(wants_org, env).map_err(|e| e.to_string())
    }

    fn is_org(a: &Access, dir: &str) -> bool {
        matches!(a, Access::Org { dir: d, .. } if d.as_os_str() == dir)
    }

    fn is_creds(a: &Access, creds: &str) -> bool {
        matches!(a, Access::Creds(t) if t.creds.as_os_str() == creds)
    }

    #[test]
    fn a_flag_beats_both_variables() {
        let env = [("PERCH_CREDS", "env.creds"), ("PERCH_ORG", "env-org")];
        assert!(is_org(&access(&["devices", "--dir", "flag-org"], &env).unwrap(), "flag-org"));
        let revoke = access(&["revoke", "--creds", "flag.creds", "--ca", "ca.pem", "d1"], &env);
        assert!(is_creds(&revoke.unwrap(), "flag.creds"));
    }

    #[test]
    fn with_only_variables_revoke_takes_the_org_and_the_rest_the_creds() {
        let env = [("PERCH_CREDS", "env.creds"), ("PERCH_ORG", "env-org")];
        assert!(is_creds(&access(&["devices"], &env).unwrap(), "env.creds"));
        assert!(is_org(&access(&["revoke", "d1"], &env).unwrap(), "env-org"));
        // Creds alone need the CA from somewhere.
        let e = access(&["revoke", "d1"], &env[..1]).err().unwrap();
        assert!(e.contains("--ca"), "{e}");
    }

    #[test]
    fn nothing_given_is_a_usage_error_naming_both_ways() {
        let e = access(&["devices"], &[]).err().unwrap();
        assert!(e.contains("--creds") && e.contains("--dir"), "{e}");
    }
}
