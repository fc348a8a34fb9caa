//! Who may use the console, and which requests may change the fleet.
//!
//! - **Login.** `perch console` prints a login URL holding a random token
//!   (256 bits). Opening it (`/login?token=...`, or the login form) starts
//!   a session: a random session id in an `HttpOnly`, `SameSite=Strict`
//!   cookie (`Secure` over TLS), and the browser is sent on to a URL
//!   without the token. Any other request without a live session gets 401
//!   and the login form, nothing of the fleet.
//! - **Changes.** Every POST must carry the session's CSRF token (a hidden
//!   field each form holds), and is refused if the browser says it comes
//!   from another origin (`Origin`, `Sec-Fetch-Site`). A page from another
//!   site can neither read the token nor send the cookie (`SameSite`).
//! - Sessions live in memory: restarting the console logs everyone out,
//!   and a new token is printed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie that holds the session id.
pub const COOKIE: &str = "perch_console";

/// A session lasts this long after its last request.
const IDLE: Duration = Duration::from_secs(12 * 3600);

/// At most this many sessions at once; the oldest is dropped for a new one.
const MAX_SESSIONS: usize = 64;

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its forms' CSRF token.
    pub csrf: String,
}

pub struct Gate {
    token: String,
    secure: bool,
    sessions: Mutex<HashMap<String, (Session, Instant)>>,
}

impl Gate {
    /// A gate with a new random login token.
    pub fn new(secure: bool) -> Result<Gate, getrandom::Error> {
        Ok(Gate { token: random_hex()?, secure, sessions: Mutex::default() })
    }

    /// The login token (printed at start).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A new session if `token` is the login token.
    pub fn login(&self, token: &str) -> Option<(String, Session)> {
        if !same(token.as_bytes(), self.token.as_bytes()) {
            return None;
        }
        let id = random_hex().ok()?;
        let session = Session { csrf: random_hex().ok()? };
        let mut all = self.sessions();
        let now = Instant::now();
        all.retain(|_, (_, seen)| now.duration_since(*seen) < IDLE);
        if all.len() >= MAX_SESSIONS {
            if let Some(oldest) = all.iter().min_by_key(|(_, (_, seen))| *seen).map(|(k, _)| k.clone()) {
                all.remove(&oldest);
            }
        }
        all.insert(id.clone(), (session.clone(), now));
        Some((id, session))
    }

    /// The session a request's `Cookie` header names, if it is live.
    pub fn session(&self, cookie_header: Option<&str>) -> Option<Session> {
        let id = cookie_value(cookie_header?, COOKIE)?;
        let mut all = self.sessions();
        let now = Instant::now();
        // Compared in constant time against every live id, so the time
        // taken says nothing about how much of an id was right.
        let found = all.iter_mut().find(|(k, _)| same(k.as_bytes(), id.as_bytes()))?;
        let (session, seen) = found.1;
        if now.duration_since(*seen) >= IDLE {
            return None;
        }
        *seen = now;
        Some(session.clone())
    }

    /// Ends the session a `Cookie` header names.
    pub fn logout(&self, cookie_header: Option<&str>) {
        if let Some(id) = cookie_header.and_then(|c| cookie_value(c, COOKIE)) {
            self.sessions().remove(id);
        }
    }

    /// The `Set-Cookie` value for session `id`.
    pub fn set_cookie(&self, id: &str) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}")
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Session, Instant)>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a form's CSRF field matches the session's.
pub fn csrf_ok(session: &Session, field: Option<&str>) -> bool {
    field.is_some_and(|f| same(f.as_bytes(), session.csrf.as_bytes()))
}

/// Whether a state-changing request's own headers say it came from
/// another site. `host` is the request's `Host`; `origin` and `fetch_site`
/// its `Origin` and `Sec-Fetch-Site` (absent from old browsers and from
/// tools like curl, which the CSRF field still stops).
pub fn cross_site(host: Option<&str>, origin: Option<&str>, fetch_site: Option<&str>) -> bool {
    if fetch_site.is_some_and(|s| s != "same-origin" && s != "none") {
        return true;
    }
    match (origin, host) {
        (None, _) => false,
        (Some(o), Some(h)) => o.split_once("://").map(|(_, rest)| rest) != Some(h),
        (Some(_), None) => true,
    }
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').filter_map(|kv| kv.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// Equal, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_printed_token_starts_a_session_and_only_its_cookie_finds_it() {
        let g = Gate::new(false).unwrap();
        assert!(g.login("").is_none());
        assert!(g.login(&g.token()[..63]).is_none());
        assert!(g.login(&format!("{}0", g.token())).is_none());
        let (id, s) = g.login(g.token()).unwrap();
        assert_eq!(g.session(Some(&format!("a=b; {COOKIE}={id}"))).unwrap().csrf, s.csrf);
        assert!(g.session(Some(&format!("{COOKIE}={}", &id[..10]))).is_none());
        assert!(g.session(Some("other=1")).is_none());
        assert!(g.session(None).is_none());
        g.logout(Some(&format!("{COOKIE}={id}")));
        assert!(g.session(Some(&format!("{COOKIE}={id}"))).is_none());
    }

    #[test]
    fn a_cookie_is_http_only_same_site_strict_and_secure_over_tls() {
        let plain = Gate::new(false).unwrap().set_cookie("x");
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict") && !plain.contains("Secure"));
        assert!(Gate::new(true).unwrap().set_cookie("x").contains("; Secure"));
    }

    #[test]
    fn sessions_are_bounded() {
        let g = Gate::new(false).unwrap();
        let t = g.token().to_string();
        let first = g.login(&t).unwrap().0;
        for _ in 0..MAX_SESSIONS {
            g.login(&t).unwrap();
        }
        assert_eq!(g.sessions().len(), MAX_SESSIONS);
        assert!(g.session(Some(&format!("{COOKIE}={first}"))).is_none());
    }

    #[test]
    fn csrf_needs_the_sessions_own_token() {
        let s = Session { csrf: "abc".into() };
        assert!(csrf_ok(&s, Some("abc")));
        assert!(!csrf_ok(&s, Some("abd")));
        assert!(!csrf_ok(&s, Some("")));
        assert!(!csrf_ok(&s, None));
    }

    #[test]
    fn another_origin_or_a_cross_site_fetch_is_refused() {
        let h = Some("127.0.0.1:8080");
        assert!(!cross_site(h, None, None));
        assert!(!cross_site(h, Some("http://127.0.0.1:8080"), Some("same-origin")));
        assert!(cross_site(h, Some("http://evil.example"), None));
        assert!(cross_site(h, Some("null"), None));
        assert!(cross_site(h, None, Some("cross-site")));
        assert!(cross_site(h, None, Some("same-site")));
        assert!(cross_site(None, Some("http://127.0.0.1:8080"), None));
    }
}
