//! Browser logins, the way Jupyter's local server does them: a secret (a tenant's token,
//! the hub's service credentials), typed into a login form or carried once by a
//! short-lived link, is exchanged for a session cookie, so that nothing secret stays in a
//! URL (and so in browser history) after login. A session stands for a *principal*: a
//! tenant on the console, a shared access policy on the hub page.
//!
//! The cookie is `HttpOnly` (page scripts cannot read it) and `SameSite=Strict` (another
//! site's page cannot send it). A request the cookie authorises that changes something
//! must also carry the session's CSRF token in `X-CSRF-Token`, which only the console's
//! own pages can read (`GET /api/session`). Bearer-token callers need none of this.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use subtle::ConstantTimeEq;

/// The session cookie's name.
const COOKIE: &str = "tether_session";
/// A session not used for this long has ended.
const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// A login link works once, within this time.
const LINK_TTL: Duration = Duration::from_secs(10 * 60);
/// Sessions and links kept at most; past it the least recently used one goes, so that
/// logins in a loop cannot grow the host's memory.
const MAX_SESSIONS: usize = 10_000;
const MAX_LINKS: usize = 1_000;

/// A logged-in browser.
#[derive(Clone)]
pub(crate) struct Session {
    /// Who it acts for: a tenant, or a hub policy.
    pub principal: String,
    /// What the session's changing requests send in `X-CSRF-Token`.
    pub csrf: String,
}

struct Entry {
    session: Session,
    used: Instant,
}

struct Link {
    principal: String,
    expires: Instant,
}

/// The host's console sessions and unused login links.
#[derive(Default)]
pub(crate) struct Sessions {
    sessions: Mutex<HashMap<String, Entry>>,
    links: Mutex<HashMap<String, Link>>,
}

/// 32 random bytes, hex: a session id, CSRF token or link code nobody can guess.
pub(crate) fn secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(hex::encode(bytes))
}

/// Removes the entry of `map` that `age` finds oldest, if the map is full.
fn make_room<V>(map: &mut HashMap<String, V>, max: usize, age: impl Fn(&V) -> Instant) {
    if map.len() >= max
        && let Some(oldest) = map.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

impl Sessions {
    /// Starts a session for `principal`: its cookie's id, to set on the response.
    pub fn start(&self, principal: &str) -> std::io::Result<String> {
        let id = secret()?;
        let session = Session { principal: principal.to_owned(), csrf: secret()? };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, e| e.used.elapsed() < SESSION_IDLE);
        make_room(&mut sessions, MAX_SESSIONS, |e| e.used);
        sessions.insert(id.clone(), Entry { session, used: Instant::now() });
        Ok(id)
    }

    /// A code for a one-time login as `principal`, valid for [`LINK_TTL`].
    pub fn link(&self, principal: &str) -> std::io::Result<String> {
        let code = secret()?;
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|_, l| l.expires > Instant::now());
        make_room(&mut links, MAX_LINKS, |l| l.expires);
        links.insert(code.clone(), Link { principal: principal.to_owned(), expires: Instant::now() + LINK_TTL });
        Ok(code)
    }

    /// The principal of login code `code`, which is used up; `None` if it is unknown, used or
    /// expired.
    pub fn redeem(&self, code: &str) -> Option<String> {
        let link = self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(code)?;
        (link.expires > Instant::now()).then_some(link.principal)
    }

    /// The session of the request's cookie, if it is live.
    pub fn of(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let entry = sessions.get_mut(id)?;
        if entry.used.elapsed() >= SESSION_IDLE {
            sessions.remove(id);
            return None;
        }
        entry.used = Instant::now();
        Some(entry.session.clone())
    }

    /// Ends the request's session, if it has one.
    pub fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers) {
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
    }
}

impl Session {
    /// Whether the request carries this session's CSRF token, compared in constant time.
    pub fn csrf_ok(&self, headers: &HeaderMap) -> bool {
        headers.get("x-csrf-token").is_some_and(|sent| bool::from(sent.as_bytes().ct_eq(self.csrf.as_bytes())))
    }
}

/// The session id in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for session `id`; an empty `id` clears the cookie.
pub(crate) fn set_cookie(id: &str) -> HeaderValue {
    let max_age = if id.is_empty() { 0 } else { SESSION_IDLE.as_secs() };
    // Hex ids only, so the value is always a valid header.
    HeaderValue::from_str(&format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}")).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(value).expect("valid"));
        headers
    }

    #[test]
    fn a_link_logs_in_once() {
        let sessions = Sessions::default();
        let code = sessions.link("a").expect("random");
        assert_eq!(sessions.redeem(&code).as_deref(), Some("a"));
        assert_eq!(sessions.redeem(&code), None, "used up");
        assert_eq!(sessions.redeem("not-a-code"), None);
    }

    #[test]
    fn a_session_is_found_by_its_cookie_and_ends() {
        let sessions = Sessions::default();
        let id = sessions.start("a").expect("random");
        let headers = with_cookie(&format!("other=1; {COOKIE}={id}"));
        let session = sessions.of(&headers).expect("live");
        assert_eq!(session.principal, "a");
        assert!(sessions.of(&with_cookie(&format!("{COOKIE}=x{id}"))).is_none());
        let mut changing = headers.clone();
        assert!(!session.csrf_ok(&changing), "no CSRF token");
        changing.insert("x-csrf-token", HeaderValue::from_str(&session.csrf).expect("hex"));
        assert!(session.csrf_ok(&changing));
        changing.insert("x-csrf-token", HeaderValue::from_static("guess"));
        assert!(!session.csrf_ok(&changing));
        sessions.end(&headers);
        assert!(sessions.of(&headers).is_none(), "logged out");
    }

    #[test]
    fn sessions_are_bounded() {
        let sessions = Sessions::default();
        for _ in 0..MAX_SESSIONS + 10 {
            sessions.start("a").expect("random");
        }
        assert_eq!(sessions.sessions.lock().expect("lock").len(), MAX_SESSIONS);
    }
}
