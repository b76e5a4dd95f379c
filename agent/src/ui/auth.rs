//! Login to the Host UI: one local administrator whose password is kept as an argon2id hash
//! (`ui.admin_password_hash`, made by `qx-node --hash-password`), sessions as random tokens in an HttpOnly,
//! Secure, SameSite=Strict cookie, a CSRF token per session that every API call must carry in `x-csrf-token`, and
//! a lock-out after repeated failures. Sessions live in memory: a restarted daemon asks for a new login.
//!
//! Every refusal says why: no session, a cookie this node never issued (forged, logged out, or from before a
//! restart), an expired session, a missing or wrong CSRF token, a wrong password, a locked-out login.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::{SecureRandom, SystemRandom};

use super::config::UiConfig;

/// The session cookie's name.
pub const COOKIE: &str = "qx_session";
/// The request header that carries the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at most; a new login past it ends the oldest.
const MAX_SESSIONS: usize = 64;

/// Why a request or a login was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no session: log in first (POST /api/login)")]
    NoSession,
    #[error(
        "the session cookie is not one this node issued (forged, logged out, or from before a restart): log in again"
    )]
    UnknownSession,
    #[error("the session expired ({why}): log in again")]
    Expired { why: &'static str },
    #[error("the x-csrf-token header is missing or does not match the session's token")]
    Csrf,
    #[error("wrong user name or password")]
    WrongPassword,
    #[error("too many failed logins: login is locked for another {seconds} s")]
    LockedOut { seconds: u64 },
    #[error("no administrator password is set: put a hash from `qx-node --hash-password` in ui.admin_password_hash")]
    NoPassword,
}

#[derive(Debug)]
struct Session {
    user: String,
    csrf: String,
    created: Instant,
    last_used: Instant,
}

/// What a login or a session check gives the browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub user: String,
    pub csrf: String,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<String, Session>,
    /// Failed logins within the lock-out window, oldest first.
    failures: Vec<Instant>,
}

/// The administrator credential, the sessions and the failure count.
#[derive(Debug)]
pub struct Auth {
    user: String,
    hash: Option<String>,
    idle: Duration,
    max_age: Duration,
    lockout_failures: usize,
    lockout: Duration,
    state: Mutex<State>,
    random: SystemRandom,
}

impl Auth {
    pub fn new(config: &UiConfig) -> Self {
        Self {
            user: config.admin_user.clone(),
            hash: config.admin_password_hash.clone(),
            idle: Duration::from_secs(config.session_idle_seconds),
            max_age: Duration::from_secs(config.session_max_seconds),
            lockout_failures: config.lockout_failures as usize,
            lockout: Duration::from_secs(config.lockout_seconds),
            state: Mutex::new(State::default()),
            random: SystemRandom::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long login stays locked, if it is.
    fn locked_for(&self, state: &mut State, now: Instant) -> Option<Duration> {
        state.failures.retain(|at| now.duration_since(*at) < self.lockout);
        if state.failures.len() < self.lockout_failures {
            return None;
        }
        let last = *state.failures.last()?;
        Some(self.lockout.saturating_sub(now.duration_since(last)))
    }

    /// Checks a user name and password (argon2 runs off the runtime threads) and opens a session: its cookie
    /// token and what the browser keeps. While locked out the password is not even checked.
    pub async fn login(&self, user: &str, password: &str) -> Result<(String, Granted), AuthError> {
        let hash = self.hash.clone().ok_or(AuthError::NoPassword)?;
        if let Some(left) = self.locked_for(&mut self.state(), Instant::now()) {
            return Err(AuthError::LockedOut { seconds: left.as_secs().max(1) });
        }
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || verify(&hash, &password)).await.unwrap_or(false);
        let mut state = self.state();
        let now = Instant::now();
        if !matches || user != self.user {
            state.failures.push(now);
            tracing::warn!(user, "Host UI login refused: wrong user name or password");
            return Err(match self.locked_for(&mut state, now) {
                Some(left) => AuthError::LockedOut { seconds: left.as_secs().max(1) },
                None => AuthError::WrongPassword,
            });
        }
        state.failures.clear();
        if state.sessions.len() >= MAX_SESSIONS {
            let oldest = state.sessions.iter().min_by_key(|(_, s)| s.created).map(|(token, _)| token.clone());
            if let Some(oldest) = oldest {
                state.sessions.remove(&oldest);
            }
        }
        let (token, csrf) = (self.token(), self.token());
        let session = Session { user: user.to_owned(), csrf: csrf.clone(), created: now, last_used: now };
        state.sessions.insert(token.clone(), session);
        tracing::info!(user, "Host UI login");
        Ok((token, Granted { user: user.to_owned(), csrf }))
    }

    /// The session of a request's cookie token, refreshed; `csrf` is the request's `x-csrf-token`, checked when
    /// given `Some` (state-changing requests), ignored with `None` (reading the session back).
    pub fn check(&self, token: Option<&str>, csrf: Option<Option<&str>>) -> Result<Granted, AuthError> {
        let token = token.ok_or(AuthError::NoSession)?;
        let mut state = self.state();
        let now = Instant::now();
        let session = state.sessions.get_mut(token).ok_or(AuthError::UnknownSession)?;
        let why = if now.duration_since(session.last_used) >= self.idle {
            Some("idle too long")
        } else if now.duration_since(session.created) >= self.max_age {
            Some("too old")
        } else {
            None
        };
        if let Some(why) = why {
            state.sessions.remove(token);
            return Err(AuthError::Expired { why });
        }
        if let Some(given) = csrf {
            if !given.is_some_and(|given| constant_time_eq(given.as_bytes(), session.csrf.as_bytes())) {
                return Err(AuthError::Csrf);
            }
        }
        session.last_used = now;
        Ok(Granted { user: session.user.clone(), csrf: session.csrf.clone() })
    }

    /// Ends a session; an unknown token is no error.
    pub fn logout(&self, token: &str) {
        self.state().sessions.remove(token);
    }

    /// The idle timeout, for the cookie's lifetime.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// 32 random bytes as hex.
    fn token(&self) -> String {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).expect("the system random source works");
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The argon2id hash (PHC string) of `password` with a fresh random salt, for `ui.admin_password_hash`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    SystemRandom::new().fill(&mut salt).map_err(|_| "the system random source failed".to_owned())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `hash` is a PHC string argon2 can check against.
pub fn is_valid_hash(hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| h.algorithm.as_str().starts_with("argon2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(failures: u32, lockout: u64, idle: u64) -> Auth {
        Auth::new(&UiConfig {
            admin_password_hash: Some(hash_password("s3cret").unwrap()),
            lockout_failures: failures,
            lockout_seconds: lockout,
            session_idle_seconds: idle,
            ..UiConfig::default()
        })
    }

    #[tokio::test]
    async fn a_session_needs_its_cookie_and_its_csrf_token() {
        let auth = auth(5, 300, 900);
        assert_eq!(auth.login("root", "nope").await.unwrap_err(), AuthError::WrongPassword);
        assert_eq!(auth.login("admin", "s3cret").await.unwrap_err(), AuthError::WrongPassword);
        let (token, granted) = auth.login("root", "s3cret").await.unwrap();
        assert_eq!(granted.user, "root");
        assert_eq!(auth.check(Some(&token), None).unwrap(), granted);
        assert_eq!(auth.check(Some(&token), Some(Some(&granted.csrf))).unwrap(), granted);
        assert_eq!(auth.check(Some(&token), Some(None)).unwrap_err(), AuthError::Csrf);
        assert_eq!(auth.check(Some(&token), Some(Some("0000"))).unwrap_err(), AuthError::Csrf);
        assert_eq!(auth.check(None, None).unwrap_err(), AuthError::NoSession);
        assert_eq!(auth.check(Some("forged"), None).unwrap_err(), AuthError::UnknownSession);
        auth.logout(&token);
        assert_eq!(auth.check(Some(&token), None).unwrap_err(), AuthError::UnknownSession);
    }

    #[tokio::test]
    async fn repeated_failures_lock_the_login_even_for_the_right_password() {
        let auth = auth(3, 300, 900);
        for _ in 0..2 {
            assert_eq!(auth.login("root", "bad").await.unwrap_err(), AuthError::WrongPassword);
        }
        assert!(matches!(auth.login("root", "bad").await.unwrap_err(), AuthError::LockedOut { .. }));
        assert!(matches!(auth.login("root", "s3cret").await.unwrap_err(), AuthError::LockedOut { seconds: 1..=300 }));
    }

    #[tokio::test]
    async fn an_idle_session_expires() {
        let auth = auth(5, 300, 0);
        let (token, _) = auth.login("root", "s3cret").await.unwrap();
        assert_eq!(auth.check(Some(&token), None).unwrap_err(), AuthError::Expired { why: "idle too long" });
        assert_eq!(auth.check(Some(&token), None).unwrap_err(), AuthError::UnknownSession, "gone after");
    }

    #[test]
    fn hashes_are_argon2_phc_strings() {
        let hash = hash_password("pw").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(is_valid_hash(&hash));
        assert!(verify(&hash, "pw") && !verify(&hash, "pW"));
        assert!(!is_valid_hash("plaintext") && !is_valid_hash("$5$rounds=1000$salt$hash"));
    }

    #[test]
    fn no_password_set_means_no_login() {
        let auth = Auth::new(&UiConfig::default());
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(runtime.block_on(auth.login("root", "")).unwrap_err(), AuthError::NoPassword);
    }
}
