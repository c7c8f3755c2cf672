//! Who may connect to the embedded broker, and what each may read and write.
//!
//! Users come from `password_file` (`user:argon2-hash` lines, written by `anotador
//! passwd`) and their rights from `acl_file` (mqtt5's format: `user NAME topic FILTER
//! permission read|write|readwrite|deny`, `role` and `assign` lines, `%u` for the
//! user's name), both checked line by line here because mqtt5 skips a line it cannot
//! read with a warning: a typo would silently drop a rule.
//!
//! The daemon's own client does not appear in either file. It connects as
//! [`DAEMON_USER`] with a secret drawn at every start and held only in this process,
//! and [`Access`] lets that client alone (that secret) through and lets it read and write everything: no network client can take that path (the
//! name is refused in a password file, and the secret never leaves memory), a user
//! cannot lock the daemon out with an ACL, and there is no daemon password on disk to
//! steal or rotate.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use mqtt5::broker::acl::AclManager;
use mqtt5::broker::auth::{
    AuthProvider, AuthRateLimiter, AuthResult, ComprehensiveAuthProvider, PasswordAuthProvider,
    RateLimitedAuthProvider,
};
use mqtt5::error::Result as MqttResult;
use mqtt5::packet::connect::ConnectPacket;
use mqtt5::protocol::v5::reason_codes::ReasonCode;

/// The daemon's own user name on its embedded broker; refused in a password file.
pub const DAEMON_USER: &str = "anotador-daemon";

/// The daemon's credentials for this run: [`DAEMON_USER`] and 32 random bytes, hex.
pub fn daemon_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

use crate::config::Embedded;

/// Failed logins per address within a minute before every login from that address is
/// refused for five minutes (mqtt5's rate limiter, its defaults, keyed on the address):
/// a password guesser slows to a crawl; other addresses, clients already connected
/// and the daemon's own client (checked before the limiter) are not affected.
const LOGIN_ATTEMPTS: u32 = 5;
const LOGIN_WINDOW_S: u64 = 60;
const LOGIN_LOCKOUT_S: u64 = 300;

/// mqtt5's providers (password file, ACL, rate limit) for `config`, the files
/// checked line by line first. `None` where neither file is set: everyone is let
/// in (or nobody, with `allow_anonymous = false`, which `check` refuses).
pub async fn users(config: &Embedded) -> Result<Option<Arc<dyn AuthProvider>>, String> {
    if config.password_file.is_none() && config.acl_file.is_none() {
        return Ok(None);
    }
    let anonymous = config
        .allow_anonymous
        .unwrap_or(config.password_file.is_none());
    let passwords = match &config.password_file {
        Some(file) => {
            check_password_file(file)?;
            PasswordAuthProvider::from_file(file)
                .await
                .map_err(|e| e.to_string())?
        }
        None => PasswordAuthProvider::new(),
    }
    .with_anonymous(anonymous);
    let acl = match &config.acl_file {
        Some(file) => {
            check_acl_file(file)?;
            AclManager::from_file(file)
                .await
                .map_err(|e| e.to_string())?
        }
        None => AclManager::allow_all(),
    };
    let provider = ComprehensiveAuthProvider::with_providers(passwords, acl);
    let limiter = AuthRateLimiter::new(LOGIN_ATTEMPTS, LOGIN_WINDOW_S, LOGIN_LOCKOUT_S);
    Ok(Some(Arc::new(RateLimitedAuthProvider::new(
        Arc::new(provider),
        Arc::new(limiter),
    ))))
}

/// mqtt5's providers with the daemon's own path in front of them; the providers
/// are replaced whole on SIGHUP ([`Access::replace`]), so a client is checked
/// against one consistent pair of files.
pub struct Access {
    inner: std::sync::RwLock<Arc<dyn AuthProvider>>,
    secret: String,
}

impl Access {
    pub fn new(inner: Arc<dyn AuthProvider>, secret: String) -> Access {
        Access {
            inner: std::sync::RwLock::new(inner),
            secret,
        }
    }

    pub fn replace(&self, inner: Arc<dyn AuthProvider>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = inner;
    }

    fn current(&self) -> Arc<dyn AuthProvider> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl AuthProvider for Access {
    fn authenticate<'a>(
        &'a self,
        connect: &'a ConnectPacket,
        client_addr: SocketAddr,
    ) -> Boxed<'a, MqttResult<AuthResult>> {
        let ok = connect.password.as_deref() == Some(self.secret.as_bytes());
        let inner = self.current();
        Box::pin(async move {
            if connect.username.as_deref() != Some(DAEMON_USER) {
                return inner.authenticate(connect, client_addr).await;
            }
            Ok(if ok {
                AuthResult::success_with_user(DAEMON_USER)
            } else {
                log::warn!("embedded broker: {client_addr} tried the daemon's own user name");
                AuthResult::fail(ReasonCode::BadUsernameOrPassword)
            })
        })
    }

    fn authorize_publish<'a>(
        &'a self,
        client_id: &str,
        user_id: Option<&'a str>,
        topic: &'a str,
    ) -> Boxed<'a, bool> {
        if user_id == Some(DAEMON_USER) {
            return Box::pin(async { true });
        }
        let inner = self.current();
        let client_id = client_id.to_string();
        Box::pin(async move { inner.authorize_publish(&client_id, user_id, topic).await })
    }

    fn authorize_subscribe<'a>(
        &'a self,
        client_id: &str,
        user_id: Option<&'a str>,
        topic_filter: &'a str,
    ) -> Boxed<'a, bool> {
        if user_id == Some(DAEMON_USER) {
            return Box::pin(async { true });
        }
        let inner = self.current();
        let client_id = client_id.to_string();
        Box::pin(async move {
            inner
                .authorize_subscribe(&client_id, user_id, topic_filter)
                .await
        })
    }
}

/// The lines of a password or ACL file that say something (trimmed; not blank, not a
/// `#` comment), with their index from 0.
fn entries(path: &Path) -> Result<Vec<(usize, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (i, l.to_string()))
        .collect())
}

/// Reads a password file as the broker will, refusing what it would skip: a line
/// without `user:hash`, a hash argon2 cannot parse, the daemon's own name, a user
/// twice. Returns the users.
pub fn check_password_file(path: &Path) -> Result<Vec<String>, String> {
    let mut users = Vec::new();
    for (i, line) in entries(path)? {
        let line = line.as_str();
        let at = |why: &str| format!("{} line {}: {why}", path.display(), i + 1);
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| at("expected user:hash (anotador passwd FILE USER writes them)"))?;
        let user = user.trim();
        if user.is_empty() || user.contains(char::is_whitespace) {
            return Err(at("a user name is one word"));
        }
        if user == DAEMON_USER {
            return Err(at(&format!("{DAEMON_USER} is the daemon's own name")));
        }
        argon2::PasswordHash::new(hash.trim())
            .map_err(|e| at(&format!("not an argon2 hash ({e})")))?;
        if users.iter().any(|u| u == user) {
            return Err(at(&format!("{user} appears twice")));
        }
        users.push(user.to_string());
    }
    Ok(users)
}

/// Reads an ACL file as mqtt5 will, refusing the lines it would skip.
pub fn check_acl_file(path: &Path) -> Result<usize, String> {
    let mut rules = 0;
    for (i, line) in entries(path)? {
        let at = |why: &str| format!("{} line {}: {why}", path.display(), i + 1);
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[0] {
            "user" | "role" => {
                if w.len() != 6 || w[2] != "topic" || w[4] != "permission" {
                    return Err(at(&format!(
                        "expected `{} NAME topic FILTER permission read|write|readwrite|deny`",
                        w[0]
                    )));
                }
                if w[5].parse::<mqtt5::broker::Permission>().is_err() {
                    return Err(at(&format!(
                        "permission `{}`: read, write, readwrite or deny",
                        w[5]
                    )));
                }
                rules += 1;
            }
            "assign" if w.len() == 3 => {}
            "assign" => return Err(at("expected `assign USER ROLE`")),
            other => {
                return Err(at(&format!(
                    "`{other}`: a line is `user …`, `role …` or `assign …`"
                )))
            }
        }
    }
    Ok(rules)
}

/// `anotador passwd FILE USER`: writes or replaces USER's line with a fresh argon2 hash
/// of `password`, keeping every other line; a new file is created readable by its
/// owner alone (0600), as `mosquitto_passwd` does.
pub fn set_password(path: &Path, user: &str, password: &str) -> Result<(), String> {
    if user.is_empty() || user.contains(char::is_whitespace) || user.contains(':') {
        return Err(format!("user `{user}`: one word, without `:`"));
    }
    if user == DAEMON_USER {
        return Err(format!("{DAEMON_USER} is the daemon's own name"));
    }
    if password.is_empty() {
        return Err("empty password".into());
    }
    let hash = mqtt5::broker::auth::PasswordAuthProvider::hash_password(password)
        .map_err(|e| format!("hashing: {e}"))?;
    let old = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut lines: Vec<String> = old
        .as_deref()
        .unwrap_or("")
        .lines()
        .filter(|l| l.split_once(':').map(|(u, _)| u.trim()) != Some(user))
        .map(str::to_string)
        .collect();
    lines.push(format!("{user}:{hash}"));
    let mut text = lines.join("\n");
    text.push('\n');
    // Written beside and renamed over: a crash leaves the old file or the new one.
    let tmp = path.with_extension("tmp-passwd");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        // Keep the mode a user chose for an existing file (e.g. 0640 for a group).
        std::fs::set_permissions(&tmp, meta.permissions()).ok();
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_writes_replaces_and_keeps_other_users() {
        let dir = std::env::temp_dir().join(format!("anotador-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("passwd");
        std::fs::remove_file(&file).ok();
        set_password(&file, "sensor1", "uno").unwrap();
        set_password(&file, "dashboard", "dos").unwrap();
        let first = std::fs::read_to_string(&file).unwrap();
        set_password(&file, "sensor1", "tres").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            check_password_file(&file).unwrap(),
            ["dashboard", "sensor1"]
        );
        assert_ne!(first, text, "sensor1's hash was replaced");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let hash = |user: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{user}:")))
                .unwrap()
                .to_string()
        };
        use mqtt5::broker::auth::PasswordAuthProvider as P;
        assert!(P::verify_password("tres", &hash("sensor1")));
        assert!(!P::verify_password("uno", &hash("sensor1")));
        assert!(P::verify_password("dos", &hash("dashboard")));
        assert!(set_password(&file, DAEMON_USER, "x").is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let dir = std::env::temp_dir().join(format!("anotador-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let acl = dir.join("acl");
        std::fs::write(
            &acl,
            "# sensors\nuser * topic anotador/in/ner/%u permission write\nuser dash topic anotador/out/# permission raed\n",
        )
        .unwrap();
        let err = check_acl_file(&acl).unwrap_err();
        assert!(err.contains("line 3") && err.contains("raed"), "{err}");
        let pw = dir.join("passwd");
        std::fs::write(&pw, "sensor1:plaintext\n").unwrap();
        let err = check_password_file(&pw).unwrap_err();
        assert!(err.contains("line 1") && err.contains("argon2"), "{err}");
        std::fs::write(
            &pw,
            format!(
                "{DAEMON_USER}:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n"
            ),
        )
        .unwrap();
        assert!(check_password_file(&pw)
            .unwrap_err()
            .contains("daemon's own"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
