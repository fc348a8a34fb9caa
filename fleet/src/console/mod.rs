//! `perch console`: the fleet in a browser, served by the operator's own
//! `perch` and acting with the operator's NATS credentials. No server
//! component is added to the fleet; nothing is fetched from the internet
//! (the page's script and style are in this binary).
//!
//! - [`auth`]: the login token, sessions, CSRF.
//! - [`live`]: the fleet as last heard, kept current by KV watches and a
//!   stream read left open; it tells browsers what changed (SSE).
//! - one module per page, rendering HTML on the server with maud (every
//!   interpolated string escaped); [`html`] has the frame they share.
//! - [`tls`]: HTTPS, required to listen beyond loopback.
//!
//! The stack: axum 0.8 (HTTP/1.1 only, no JSON or websocket features: a
//! page is HTML, live updates are server-sent events), maud for markup,
//! tokio-rustls on the rustls perch-net already links. None of it is in
//! the agent.

mod auth;
mod bundles_page;
mod device_page;
mod enrollment_page;
mod fleet_page;
mod html;
mod live;
mod rollouts_page;
mod tls;

use std::collections::{BTreeSet, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{html as markup, Markup, DOCTYPE};
use perch_protocol::subjects::is_token;
use perch_support::exit::{Class, Classify};
use perch_support::now_unix;

use self::auth::{Gate, Session};
use self::html::{Nav, Note, Who};
use self::live::Live;
use crate::link::Target;
use crate::rollout_store;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Listening beyond loopback without TLS, or TLS files that do not load.
    #[error("{0}")]
    Usage(String),
    #[error("listening on {addr}: {detail}")]
    Listen { addr: SocketAddr, detail: String },
    #[error(transparent)]
    Connect(#[from] crate::link::ConnectError),
    #[error("the console stopped: {0}")]
    Serve(String),
}

impl Classify for ConsoleError {
    fn class(&self) -> Option<Class> {
        match self {
            ConsoleError::Usage(_) => Some(Class::Usage),
            ConsoleError::Listen { .. } | ConsoleError::Serve(_) => Some(Class::Runtime),
            ConsoleError::Connect(e) => e.class(),
        }
    }
}

/// How the console is started.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// Certificate chain and key (PEM); required beyond loopback.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The org directory: with it the console can revoke and issue tokens.
    pub org: Option<PathBuf>,
    pub stale_after_secs: u64,
}

/// What every handler shares.
struct Console {
    client: async_nats::Client,
    live: Arc<Live>,
    gate: Gate,
    who: Who,
    org: Option<PathBuf>,
    urls: Vec<String>,
    stale_after_secs: u64,
    /// Rollouts this console drives.
    driving: Mutex<HashSet<String>>,
}

type App = Arc<Console>;

/// How often a rollout this console drives looks at the fleet.
const DRIVE_TICK: Duration = Duration::from_secs(2);

/// Serves until `stop` resolves. `started` is called with the login URL
/// once the console listens and is connected.
pub async fn run(
    target: &Target,
    opts: Options,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    started: impl FnOnce(&str),
) -> Result<(), ConsoleError> {
    if !opts.listen.ip().is_loopback() && opts.tls.is_none() {
        return Err(ConsoleError::Usage(format!(
            "--listen {}: not a loopback address, so the console needs TLS (--tls-cert and --tls-key): \
             its login token and session cookie would cross the network in clear",
            opts.listen
        )));
    }
    let tls = match &opts.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key).map_err(ConsoleError::Usage)?),
        None => None,
    };
    let listen_err = |e: std::io::Error| ConsoleError::Listen { addr: opts.listen, detail: e.to_string() };
    let tcp = tokio::net::TcpListener::bind(opts.listen).await.map_err(listen_err)?;
    let local = tcp.local_addr().map_err(listen_err)?;
    let client = target.connect("perch console").await?;
    let live = Live::new();
    live.start(&client);
    let gate = Gate::new(tls.is_some()).map_err(|e| ConsoleError::Serve(format!("no randomness: {e}")))?;
    let who = Who {
        user: creds_user(&target.creds),
        creds: target.creds.display().to_string(),
        urls: target.urls.join(", "),
        org: opts.org.as_ref().map(|o| o.display().to_string()),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let login = format!("{scheme}://{local}/login?token={}", gate.token());
    let app = Arc::new(Console {
        client,
        live,
        gate,
        who,
        org: opts.org,
        urls: target.urls.clone(),
        stale_after_secs: opts.stale_after_secs,
        driving: Mutex::default(),
    });
    // Open event streams would hold a graceful shutdown forever: they are
    // ended first, then the server waits for the requests under way.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let stop = async move {
        stop.await;
        let _ = stopping.send(true);
    };
    let router = router(app, stopped);
    started(&login);
    let served = match tls {
        Some(config) => {
            let l = tls::TlsListener::new(tcp, config).map_err(listen_err)?;
            axum::serve(l, router).with_graceful_shutdown(stop).await
        }
        None => axum::serve(tcp, router).with_graceful_shutdown(stop).await,
    };
    served.map_err(|e| ConsoleError::Serve(e.to_string()))
}

fn router(app: App, stopped: tokio::sync::watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/", get(fleet))
        .route("/fleet/rows", get(fleet_rows))
        .route("/fleet/summary", get(fleet_summary))
        .route("/device/{id}", get(device))
        .route("/device/{id}/body", get(device_body))
        .route("/rollouts", get(rollouts).post(start_rollout))
        .route("/rollouts/body", get(rollouts_body))
        .route("/rollouts/{id}/{action}", post(change_rollout))
        .route("/enrollment", get(enrollment))
        .route("/enrollment/pending", get(pending))
        .route("/enrollment/token", post(issue_token))
        .route("/enrollment/revoke", post(revoke_by_form))
        .route("/enrollment/{id}/{action}", post(enrollment_action))
        .route("/bundles", get(bundles))
        .route("/events", get(move |state| events(state, stopped.clone())))
        .route(
            "/static/console.js",
            get(|| async { asset("text/javascript", include_str!("assets/console.js")) }),
        )
        .route("/static/console.css", get(|| async { asset("text/css", include_str!("assets/console.css")) }))
        .route("/logout", post(logout))
        .route("/login", get(login_link).post(login_form))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(middleware::map_response(headers))
        .with_state(app)
}

// ---- the gate ----

/// Lets a request through only with a live session (the login routes
/// aside), and a state-changing one only from the console's own pages.
async fn guard(State(c): State<App>, mut req: Request, next: Next) -> Response {
    let (cross, session) = {
        let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let changes = req.method() != Method::GET && req.method() != Method::HEAD;
        (
            changes && auth::cross_site(h("host"), h("origin"), h("sec-fetch-site")),
            c.gate.session(h("cookie")),
        )
    };
    if cross {
        return (StatusCode::FORBIDDEN, "perch console: refused a request from another site\n")
            .into_response();
    }
    if req.uri().path() == "/login" {
        return next.run(req).await;
    }
    let Some(session) = session else {
        return login_page(StatusCode::UNAUTHORIZED, None);
    };
    req.extensions_mut().insert(session);
    next.run(req).await
}

/// Headers every answer carries: no script, style or frame from
/// elsewhere, nothing cached, no Referer to another site.
async fn headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not no-referrer: with it, browsers send `Origin: null` on a form
    // POST, and the same-origin check could not tell the console's own.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

async fn login_link(State(c): State<App>, Query(q): Query<LoginQuery>) -> Response {
    match q.token {
        Some(t) => login(&c, &t),
        None => login_page(StatusCode::OK, None),
    }
}

async fn login_form(State(c): State<App>, Form(q): Form<LoginQuery>) -> Response {
    login(&c, q.token.as_deref().unwrap_or_default())
}

fn login(c: &Console, token: &str) -> Response {
    match c.gate.login(token.trim()) {
        Some((id, _)) => {
            // To a URL without the token, so it stays out of the history.
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&c.gate.set_cookie(&id)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        None => login_page(StatusCode::UNAUTHORIZED, Some("That is not this console's login token.")),
    }
}

async fn logout(State(c): State<App>, headers: axum::http::HeaderMap, _form: Posted) -> Response {
    c.gate.logout(headers.get(header::COOKIE).and_then(|v| v.to_str().ok()));
    login_page(StatusCode::OK, Some("Logged out."))
}

fn login_page(status: StatusCode, note: Option<&str>) -> Response {
    let page = markup! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Log in · perch console" }
            }
            body.login {
                main {
                    h1 { "perch console" }
                    @if let Some(n) = note { p.note.err role="alert" { (n) } }
                    p { "Open the login link " code { "perch console" } " printed, or paste its token." }
                    form method="post" action="/login" {
                        label { "Token " input type="password" name="token" autocomplete="off" required autofocus; }
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    };
    (status, page).into_response()
}

/// A form POST whose CSRF field matches the session's; its fields.
struct Posted(Vec<(String, String)>);

impl Posted {
    fn get(&self, name: &str) -> &str {
        self.0.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
    }
}

impl<S: Send + Sync> FromRequest<S> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let session = req.extensions().get::<Session>().cloned();
        let refused = || {
            (
                StatusCode::FORBIDDEN,
                "perch console: the form's CSRF token is missing or stale: reload the page\n",
            )
                .into_response()
        };
        // Not a form at all: no CSRF token either.
        let Ok(Form(fields)) = Form::<Vec<(String, String)>>::from_request(req, state).await else {
            return Err(refused());
        };
        let posted = Posted(fields);
        match session {
            Some(s) if auth::csrf_ok(&s, Some(posted.get("csrf"))) => Ok(posted),
            _ => Err(refused()),
        }
    }
}

// ---- pages ----

fn page(c: &Console, s: &Session, title: &str, nav: Nav, note: Option<&Note>, body: Markup) -> Response {
    html::page(title, nav, &c.who, s, note, body).into_response()
}

/// A failed action: the reason, and the way back.
fn failed(c: &Console, s: &Session, status: StatusCode, back: &str, why: String) -> Response {
    let body = markup! { p { a href=(back) { "← back" } } };
    (status, page(c, s, "Not done", Nav::None, Some(&Note::Failed(why)), body)).into_response()
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Done {
    ok: String,
    id: String,
}

/// What a redirect after an action says it did. Only known words and a
/// valid id are shown: a link cannot make the page say something else.
fn done_note(d: &Done) -> Option<Note> {
    let what = match d.ok.as_str() {
        "started" => "Started rollout",
        "paused" => "Paused rollout",
        "resumed" => "Resumed rollout",
        "aborted" => "Aborted rollout",
        "approved" => "Approved",
        "rejected" => "Rejected",
        "revoked" => "Revoked",
        _ => return None,
    };
    is_token(&d.id).then(|| Note::Done(format!("{what} {}.", d.id)))
}

fn stale_note(c: &Console) -> Option<Note> {
    (!c.live.ready())
        .then(|| Note::Failed("Still reading the fleet from NATS: this page may be incomplete.".into()))
}

async fn fleet(
    State(c): State<App>,
    Extension(s): Extension<Session>,
    Query(q): Query<fleet_page::Query>,
) -> Response {
    let now = now_unix();
    let view = c.live.fleet(now, c.stale_after_secs);
    let body = fleet_page::body(view.devices, &q, now);
    page(&c, &s, "Fleet", Nav::Fleet, stale_note(&c).as_ref(), body)
}

async fn fleet_summary(State(c): State<App>) -> Response {
    fleet_page::summary(&c.live.fleet(now_unix(), c.stale_after_secs).devices).into_response()
}

/// The rows of the devices named `id=` (the script asks for those on its
/// page that changed).
async fn fleet_rows(State(c): State<App>, Query(q): Query<Vec<(String, String)>>) -> Response {
    let ids: Vec<String> = q
        .into_iter()
        .filter(|(k, v)| k == "id" && is_token(v))
        .map(|(_, v)| v)
        .take(fleet_page::PAGE)
        .collect();
    let now = now_unix();
    let rows = c.live.devices(&ids, now, c.stale_after_secs);
    markup! { @for d in &rows { (fleet_page::row(d, now)) } }.into_response()
}

async fn device(State(c): State<App>, Extension(s): Extension<Session>, Path(id): Path<String>) -> Response {
    match device_markup(&c, &s, &id).await {
        Ok(body) => page(&c, &s, &format!("Device {id}"), Nav::Fleet, None, body),
        Err((status, why)) => failed(&c, &s, status, "/", why),
    }
}

async fn device_body(
    State(c): State<App>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    match device_markup(&c, &s, &id).await {
        Ok(body) => body.into_response(),
        Err((status, why)) => (status, why).into_response(),
    }
}

async fn device_markup(c: &Console, s: &Session, id: &str) -> Result<Markup, (StatusCode, String)> {
    if !is_token(id) {
        return Err((StatusCode::NOT_FOUND, "no such device".into()));
    }
    let js = async_nats::jetstream::new(c.client.clone());
    let (reports, refused) =
        crate::status::reports(&js, Some(id)).await.map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    let registry: Vec<_> = c.live.record(id).into_iter().collect();
    if registry.is_empty() && reports.is_empty() {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no device '{id}': not in the registry and no reports from it"),
        ));
    }
    let now = now_unix();
    let view = crate::view::build(&registry, reports.clone(), now, c.stale_after_secs, true);
    let Some(v) = view.devices.first() else {
        return Err((StatusCode::NOT_FOUND, format!("no device '{id}'")));
    };
    let shown = device_page::Shown {
        view: v,
        reports: &reports,
        refused: &refused,
        now,
        can_revoke: c.org.is_some(),
    };
    Ok(device_page::body(s, &shown))
}

async fn rollouts(State(c): State<App>, Extension(s): Extension<Session>, Query(d): Query<Done>) -> Response {
    let js = async_nats::jetstream::new(c.client.clone());
    let (catalog, note) = match crate::catalog::list(&js).await {
        Ok(all) => (all, done_note(&d)),
        Err(e) => (vec![], Some(Note::Failed(format!("the catalog: {e}")))),
    };
    let groups: BTreeSet<String> = c.live.registry().into_iter().flat_map(|r| r.groups).collect();
    let body = markup! {
        (rollouts_page::start_form(&s, &catalog, &groups))
        (rollouts_markup(&c, &s))
    };
    page(&c, &s, "Rollouts", Nav::Rollouts, note.as_ref(), body)
}

async fn rollouts_body(State(c): State<App>, Extension(s): Extension<Session>) -> Response {
    rollouts_markup(&c, &s).into_response()
}

fn rollouts_markup(c: &Console, s: &Session) -> Markup {
    let view = c.live.fleet(now_unix(), c.stale_after_secs);
    rollouts_page::body(s, &c.live.rollouts(), &view)
}

async fn start_rollout(State(c): State<App>, Extension(s): Extension<Session>, form: Posted) -> Response {
    match plan(&form) {
        Err(why) => failed(&c, &s, StatusCode::BAD_REQUEST, "/rollouts", why),
        Ok(plan) => match rollout_store::create(&c.client, &plan, now_unix()).await {
            Ok(r) => {
                drive(&c, r.id.clone());
                Redirect::to(&format!("/rollouts?ok=started&id={}", r.id)).into_response()
            }
            Err(e) => failed(&c, &s, status_of(&e), "/rollouts", e.to_string()),
        },
    }
}

/// The rollout the start form asks for.
fn plan(f: &Posted) -> Result<rollout_store::Plan, String> {
    let (name, counter) = crate::catalog::parse_ref(f.get("bundle")).map_err(|e| e.to_string())?;
    let devices: Vec<String> = f
        .get("devices")
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    let target = match (f.get("group"), devices.is_empty()) {
        ("", true) => return Err("name a group or some devices".into()),
        ("", false) => rollout_store::Target::Devices(devices),
        (g, true) => rollout_store::Target::Group(g.to_string()),
        (_, false) => return Err("a group or devices, not both".into()),
    };
    Ok(rollout_store::Plan {
        bundle: (name, counter),
        target,
        waves: crate::rollout::parse_waves(f.get("waves"))?,
        max_failures: crate::rollout::Limit::parse(f.get("max_failures"))?,
        wave_wait: humantime::parse_duration(f.get("wave_wait")).map_err(|e| format!("soak: {e}"))?,
    })
}

async fn change_rollout(
    State(c): State<App>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
    _form: Posted,
) -> Response {
    let now = now_unix();
    let done = match action.as_str() {
        "pause" => rollout_store::pause(&c.client, &id, now).await.map(|_| "paused"),
        "resume" => rollout_store::resume(&c.client, &id, now).await.map(|r| {
            drive(&c, r.id);
            "resumed"
        }),
        "abort" => rollout_store::abort(&c.client, &id, now).await.map(|_| "aborted"),
        _ => return failed(&c, &s, StatusCode::NOT_FOUND, "/rollouts", format!("no action '{action}'")),
    };
    match done {
        Ok(word) => Redirect::to(&format!("/rollouts?ok={word}&id={id}")).into_response(),
        Err(e) => failed(&c, &s, status_of(&e), "/rollouts", e.to_string()),
    }
}

fn status_of(e: &rollout_store::RolloutError) -> StatusCode {
    if e.is_transient() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::CONFLICT
    }
}

/// Drives rollout `id` from this console until it ends or pauses (once:
/// a second request finds it driven).
fn drive(c: &App, id: String) {
    if !c.driving.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone()) {
        return;
    }
    let c = c.clone();
    tokio::spawn(async move {
        let show = |_: &crate::rollout::Rollout, _: &crate::view::FleetView, notes: &[String]| {
            for n in notes {
                tracing::warn!("rollout {id}: {n}");
            }
        };
        match rollout_store::drive(&c.client, &id, DRIVE_TICK, now_unix, show).await {
            Ok(r) => tracing::info!("rollout {id}: {}", r.state.name()),
            Err(e) => tracing::warn!("rollout {id}: the console stopped driving it: {e}"),
        }
        c.driving.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    });
}

async fn enrollment(
    State(c): State<App>,
    Extension(s): Extension<Session>,
    Query(d): Query<Done>,
) -> Response {
    enrollment_page(&c, &s, done_note(&d), None)
}

fn enrollment_page(
    c: &Console,
    s: &Session,
    note: Option<Note>,
    issued: Option<&enrollment_page::Issued>,
) -> Response {
    let body =
        enrollment_page::body(s, &c.live.registry(), c.org.is_some().then_some(c.urls.as_slice()), issued);
    page(c, s, "Enrollment", Nav::Enrollment, note.as_ref(), body)
}

async fn enrollment_action(
    State(c): State<App>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
    _form: Posted,
) -> Response {
    enrollment_act(&c, &s, &id, &action).await
}

async fn revoke_by_form(State(c): State<App>, Extension(s): Extension<Session>, form: Posted) -> Response {
    enrollment_act(&c, &s, form.get("id").trim(), "revoke").await
}

async fn pending(Extension(s): Extension<Session>, State(c): State<App>) -> Response {
    enrollment_page::pending(&s, &c.live.registry()).into_response()
}

async fn enrollment_act(c: &Console, s: &Session, id: &str, action: &str) -> Response {
    use perch_bootstrap::admin;
    if !is_token(id) {
        return failed(c, s, StatusCode::BAD_REQUEST, "/enrollment", format!("'{id}' is not a device id"));
    }
    let now = now_unix();
    let js = async_nats::jetstream::new(c.client.clone());
    let reg = match perch_bootstrap::registry::Registry::open(&js).await {
        Ok(r) => r,
        Err(e) => return failed(c, s, StatusCode::BAD_GATEWAY, "/enrollment", e.to_string()),
    };
    let done = match (action, &c.org) {
        ("approve", _) => admin::approve(&reg, id, now).await.map(|_| "approved"),
        ("reject", _) => admin::reject(&reg, id, now).await.map(|_| "rejected"),
        ("revoke", Some(org)) => admin::revoke(org, &c.urls, &reg, id, now).await.map(|_| "revoked"),
        ("revoke", None) => {
            return failed(
                c,
                s,
                StatusCode::FORBIDDEN,
                "/enrollment",
                "revoking needs the org's keys: start the console with --org DIR".into(),
            )
        }
        _ => return failed(c, s, StatusCode::NOT_FOUND, "/enrollment", format!("no action '{action}'")),
    };
    match done {
        Ok(word) => Redirect::to(&format!("/enrollment?ok={word}&id={id}")).into_response(),
        Err(e) => failed(c, s, StatusCode::CONFLICT, "/enrollment", e.to_string()),
    }
}

async fn issue_token(State(c): State<App>, Extension(s): Extension<Session>, form: Posted) -> Response {
    let Some(org) = c.org.clone() else {
        return failed(
            &c,
            &s,
            StatusCode::FORBIDDEN,
            "/enrollment",
            "issuing tokens needs the org's keys: start the console with --org DIR".into(),
        );
    };
    let ask = match token_ask(&form, &c.urls) {
        Ok(a) => a,
        Err(why) => return failed(&c, &s, StatusCode::BAD_REQUEST, "/enrollment", why),
    };
    let (uses, groups) = (ask.uses, ask.groups.clone());
    let now = now_unix();
    let issued = perch_bootstrap::token::issue_from_org(&org, ask, now)
        .map_err(|e| perch_support::chain_line(anyhow::Error::new(e).chain()))
        .and_then(|t| {
            let text = t.to_text();
            let svg = enrollment_page::qr_svg(&text)?;
            Ok(enrollment_page::Issued {
                text,
                svg,
                expires_at: t.unverified_body().expires_at,
                uses,
                groups,
            })
        });
    match issued {
        Ok(t) => enrollment_page(&c, &s, Some(Note::Done("Issued a token.".into())), Some(&t)),
        Err(why) => failed(&c, &s, StatusCode::BAD_REQUEST, "/enrollment", why),
    }
}

fn token_ask(f: &Posted, urls: &[String]) -> Result<perch_bootstrap::token::Ask, String> {
    use perch_protocol::token::Approval;
    let groups: Vec<String> = f
        .get("groups")
        .split([',', ' '])
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect();
    if let Some(bad) = groups.iter().find(|g| !is_token(g)) {
        return Err(format!("'{bad}' is not a group name (letters, digits, - and _)"));
    }
    let uses: u32 =
        f.get("uses").trim().parse().map_err(|_| "how many devices: a whole number".to_string())?;
    let ttl = humantime::parse_duration(f.get("ttl").trim()).map_err(|e| format!("valid for: {e}"))?;
    let approval = match f.get("approval") {
        "manual" => Approval::Manual,
        _ => Approval::Auto,
    };
    let pattern = f.get("id_pattern").trim();
    // The servers the devices will enroll through: the console's own
    // unless the form names others (a site's address as devices see it).
    let named: Vec<String> =
        f.get("urls").split([',', ' ']).map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
    Ok(perch_bootstrap::token::Ask {
        groups,
        uses,
        approval,
        id_pattern: (!pattern.is_empty()).then(|| pattern.to_string()),
        urls: if named.is_empty() { urls.to_vec() } else { named },
        ttl_secs: ttl.as_secs(),
    })
}

async fn bundles(State(c): State<App>, Extension(s): Extension<Session>) -> Response {
    let js = async_nats::jetstream::new(c.client.clone());
    let (catalog, note) = match crate::catalog::list(&js).await {
        Ok(all) => (all, None),
        Err(e) => (vec![], Some(Note::Failed(format!("the catalog: {e}")))),
    };
    page(&c, &s, "Bundles", Nav::Bundles, note.as_ref(), bundles_page::body(&catalog, now_unix()))
}

/// Server-sent events: what changed, coalesced over half a second, as
/// `changed` events whose data is `d:ID` and `r:ID` words (a device, a
/// rollout); `reload` if this browser fell too far behind.
async fn events(State(c): State<App>, stopped: tokio::sync::watch::Receiver<bool>) -> impl IntoResponse {
    let stream =
        futures_util::stream::unfold((c.live.subscribe(), stopped), |(mut rx, mut stopped)| async move {
            let next = tokio::select! {
                e = changes(&mut rx) => e,
                // The console is stopping: end the stream.
                _ = stopped.wait_for(|s| *s) => None,
            };
            next.map(|e| (Ok::<_, Infallible>(e), (rx, stopped)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The next `changed` event: what changed over half a second from the
/// first change on; `reload` if this browser fell behind; None once the
/// picture is gone.
async fn changes(rx: &mut tokio::sync::broadcast::Receiver<live::Event>) -> Option<SseEvent> {
    use tokio::sync::broadcast::error::RecvError;
    let reload = || Some(SseEvent::default().event("reload").data(""));
    let mut words: BTreeSet<String> = BTreeSet::new();
    let mut add = |e: live::Event| {
        words.insert(match e {
            live::Event::Device(id) => format!("d:{id}"),
            live::Event::Rollout(id) => format!("r:{id}"),
        });
    };
    match rx.recv().await {
        Ok(e) => add(e),
        Err(RecvError::Lagged(_)) => return reload(),
        Err(RecvError::Closed) => return None,
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Ok(e)) => add(e),
            Ok(Err(RecvError::Lagged(_))) => return reload(),
            Ok(Err(RecvError::Closed)) | Err(_) => break,
        }
    }
    Some(SseEvent::default().event("changed").data(words.into_iter().collect::<Vec<_>>().join(" ")))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The NATS user's name in a creds file (its JWT's `name`), else the
/// file's name.
fn creds_user(path: &std::path::Path) -> String {
    let fallback = || path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let Ok(text) = std::fs::read_to_string(path) else { return fallback() };
    let jwt = text.lines().skip_while(|l| !l.contains("BEGIN NATS USER JWT")).nth(1).unwrap_or_default();
    let claims = jwt.split('.').nth(1).unwrap_or_default();
    data_encoding::BASE64URL_NOPAD
        .decode(claims.trim_end_matches('=').as_bytes())
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(String::from))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(fallback)
}
