//! Who may connect to the embedded broker and which topics each client may use: a reader of
//! Mosquitto's password file (`mosquitto_passwd` output) and ACL file, plus the built-in
//! "each device only its own topics" policy. It owns parsing those texts and answering
//! verify/publish/subscribe questions; it does no I/O (the caller reads the files and
//! decides when to reload) and never sees a connection. Key invariant: every answer fails
//! closed — an unknown user, an unparsable line, a topic no grant matches, or a deny entry
//! that matches (or, for a subscription, could match) all mean "no".

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use edgesync_protocol::secret::constant_time_eq;
use ring::{digest, pbkdf2};

/// Both hash formats store a SHA-512 sized digest.
const HASH_LEN: usize = 64;
/// What `mosquitto_passwd` 2.0 writes; also the cost of the decoy check for unknown users.
const DEFAULT_ITERATIONS: NonZeroU32 = match NonZeroU32::new(101) {
    Some(n) => n,
    None => NonZeroU32::MIN,
};

const REMEDY: &str =
    "create the file with mosquitto_passwd from Mosquitto 2.0 (PBKDF2-SHA512, $7$)";

/// A password or ACL file that cannot be used, with the line (1-based) at fault.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// A password file entry whose username could be read.
    #[error("line {line} (user \"{user}\"): {reason}")]
    Password {
        /// Line number, from 1.
        line: usize,
        /// The entry's username.
        user: String,
        /// What is wrong and, where there is one, how to fix it.
        reason: String,
    },
    /// Any other bad line, in either file.
    #[error("line {line}: {reason}")]
    Line {
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

enum StoredHash {
    /// `$7$`: PBKDF2-HMAC-SHA512 (Mosquitto 2.0).
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// `$6$`: one SHA-512 over password then salt (Mosquitto 1.x).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

// By hand so that logging a parsed file never prints salts and hashes for offline cracking.
impl fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pbkdf2 { iterations, .. } => write!(f, "Pbkdf2Sha512({iterations} iterations)"),
            Self::Sha512 { .. } => f.write_str("Sha512"),
        }
    }
}

impl StoredHash {
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Self::Sha512 { salt, hash } => {
                let mut ctx = digest::Context::new(&digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                constant_time_eq(ctx.finish().as_ref(), hash)
            }
        }
    }
}

/// The users of a Mosquitto password file and their hashed passwords.
#[derive(Debug)]
pub struct PasswordFile {
    users: HashMap<String, (usize, StoredHash)>,
    /// The costliest iteration count in the file: an unknown user's decoy check costs as
    /// much, so the answer's timing does not tell which users exist.
    decoy_iterations: NonZeroU32,
}

impl PasswordFile {
    /// Parses the text of a file written by `mosquitto_passwd`: `username:hash` lines, with
    /// blank lines and `#` comments ignored. Accepts `$7$` (PBKDF2-SHA512) and `$6$`
    /// (salted SHA-512) hashes; any other format, a malformed line or a user listed twice
    /// is an error naming the line.
    ///
    /// Every CONNECT pays the iterations of its user's hash, so a hash with more than
    /// `max_iterations` (a typo'd extra zero, a hostile edit) is an error naming the line and
    /// `broker.max_password_iterations`.
    pub fn parse(text: &str, max_iterations: u32) -> Result<Self, AuthFileError> {
        let mut users: HashMap<String, (usize, StoredHash)> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = content.split_once(':') else {
                let reason = "expected \"username:hash\"".to_owned();
                return Err(AuthFileError::Line { line, reason });
            };
            if user.is_empty() {
                let reason = "empty username".to_owned();
                return Err(AuthFileError::Line { line, reason });
            }
            let bad = |reason: String| AuthFileError::Password {
                line,
                user: user.to_owned(),
                reason,
            };
            let stored = parse_hash(hash, max_iterations).map_err(bad)?;
            if let Some((first, _)) = users.insert(user.to_owned(), (line, stored)) {
                return Err(bad(format!(
                    "duplicate user, first defined on line {first}"
                )));
            }
        }
        let decoy_iterations = users
            .values()
            .filter_map(|(_, h)| match h {
                StoredHash::Pbkdf2 { iterations, .. } => Some(*iterations),
                StoredHash::Sha512 { .. } => None,
            })
            .max()
            .unwrap_or(DEFAULT_ITERATIONS);
        Ok(Self {
            users,
            decoy_iterations,
        })
    }

    /// Whether `password` is this user's. An unknown user gets `false` after a decoy
    /// PBKDF2 run as costly as the file's costliest hash, so the answer's timing does not
    /// tell which usernames exist. Costs up to `broker.max_password_iterations` PBKDF2
    /// rounds: call it off the async runtime.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        match self.users.get(username) {
            Some((_, stored)) => stored.verify(password),
            None => {
                let decoy = [0u8; HASH_LEN];
                let alg = pbkdf2::PBKDF2_HMAC_SHA512;
                let _ = pbkdf2::verify(alg, self.decoy_iterations, &decoy, password, &decoy);
                false
            }
        }
    }

    /// The usernames.
    pub fn usernames(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users (so nobody can log in).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn parse_hash(hash: &str, max_iterations: u32) -> Result<StoredHash, String> {
    if let Some(rest) = hash.strip_prefix("$7$") {
        let parts: Vec<&str> = rest.split('$').collect();
        let [iterations, salt, digest] = parts[..] else {
            return Err("malformed $7$ hash: expected $7$<iterations>$<salt>$<hash>".into());
        };
        let iterations = match iterations.parse::<u32>().ok().and_then(NonZeroU32::new) {
            Some(n) if n.get() <= max_iterations => n,
            _ => {
                return Err(format!(
                    "iterations must be 1 to {max_iterations} (broker.max_password_iterations; every CONNECT pays them)"
                ));
            }
        };
        let (salt, hash) = (decode(salt, "salt")?, decode(digest, "hash")?);
        Ok(StoredHash::Pbkdf2 {
            iterations,
            salt,
            hash,
        })
    } else if let Some(rest) = hash.strip_prefix("$6$") {
        let Some((salt, digest)) = rest.split_once('$') else {
            return Err("malformed $6$ hash: expected $6$<salt>$<hash>".into());
        };
        let (salt, hash) = (decode(salt, "salt")?, decode(digest, "hash")?);
        Ok(StoredHash::Sha512 { salt, hash })
    } else if let Some(rest) = hash.strip_prefix('$') {
        // Echo only a short scheme id such as "$argon2id$": more could be a password.
        match rest.find('$').map(|end| &hash[..end + 2]) {
            Some(id) if id.len() <= 16 => Err(format!("unsupported hash \"{id}\"; {REMEDY}")),
            _ => Err(format!("unsupported hash format; {REMEDY}")),
        }
    } else {
        Err("the password is not hashed; hash the file with mosquitto_passwd -U".into())
    }
}

fn decode(text: &str, what: &str) -> Result<Vec<u8>, String> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| format!("{what} is not valid base64"))?;
    match (what, bytes.len()) {
        (_, 0) => Err(format!("empty {what}")),
        ("hash", n) if n != HASH_LEN => Err(format!("hash is {n} bytes, expected {HASH_LEN}")),
        _ => Ok(bytes),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn grants(self, wanted: Self) -> bool {
        self == wanted || (self == Self::ReadWrite && wanted != Self::Deny)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    filter: String,
}

/// Topic permissions in Mosquitto's ACL file format, with Mosquitto 2.x semantics: a
/// matching `deny` wins, otherwise any matching grant allows, and nothing matching denies.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// `topic` lines before any `user` line: for clients without a username.
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    /// `pattern` lines, for every client, with `%u` and `%c` substituted per check.
    patterns: Vec<Rule>,
}

/// The outcome of putting a client's username and id into a pattern.
enum Substituted {
    Filter(String),
    /// The value is absent or empty: the pattern does not concern this client.
    Empty,
    /// The value has `/`, `+` or `#`, which would let a client widen its own grant.
    Dangerous,
}

impl Acl {
    /// Parses the text of a Mosquitto ACL file: `user <name>`, `topic [access] <filter>`
    /// and `pattern [access] <filter>` lines, with access one of `read`, `write`,
    /// `readwrite` (the default) or `deny`. A filter containing spaces needs an explicit
    /// access word, so that a misspelt one is reported instead of becoming part of a filter.
    pub fn parse(text: &str) -> Result<Self, AuthFileError> {
        let mut acl = Self::default();
        let mut user: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason: String| AuthFileError::Line { line, reason };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (keyword, rest) = content
                .split_once(char::is_whitespace)
                .unwrap_or((content, ""));
            let rest = rest.trim_start();
            match keyword {
                "user" if rest.is_empty() => return Err(err("\"user\" needs a name".into())),
                "user" => user = Some(rest.to_owned()),
                "topic" | "pattern" => {
                    let rule = parse_rule(rest).map_err(err)?;
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else if let Some(name) = &user {
                        acl.users.entry(name.clone()).or_default().push(rule);
                    } else {
                        acl.anonymous.push(rule);
                    }
                }
                other => {
                    let reason =
                        format!("unknown keyword \"{other}\" (expected user, topic or pattern)");
                    return Err(err(reason));
                }
            }
        }
        Ok(acl)
    }

    /// The built-in policy "each device only its own topics", for devices whose username
    /// is their device id: publish to `{prefix}/<id>/shadow/update`, `.../shadow/get` and
    /// `.../shadow/desired/reject`, and to each ingest topic with `{device}` as `<id>`; subscribe within
    /// `{prefix}/<id>/shadow/#`. Ingest topics without `{device}` are not granted. Clients
    /// without a username get nothing from it.
    pub fn own_topics(prefix: &str, ingest_topics: &[&str]) -> Self {
        let prefix = prefix.trim_end_matches('/');
        let rule = |access, filter: String| Rule { access, filter };
        let mut patterns = vec![
            rule(Access::Write, format!("{prefix}/%u/shadow/update")),
            rule(Access::Write, format!("{prefix}/%u/shadow/get")),
            rule(Access::Write, format!("{prefix}/%u/shadow/desired/reject")),
            rule(Access::Read, format!("{prefix}/%u/shadow/#")),
        ];
        for topic in ingest_topics.iter().filter(|t| t.contains("{device}")) {
            let filter = topic.replace("{device}", "%u");
            // A template that is not a valid filter would match in surprising ways.
            if valid_filter(&filter).is_ok() {
                patterns.push(rule(Access::Write, filter));
            }
        }
        Self {
            patterns,
            ..Self::default()
        }
    }

    /// "Each device only its own topics" for Sparkplug B edge nodes whose username is their
    /// edge node id: publish their births, data and deaths and their devices' in `group`
    /// (`+`: any), and subscribe to their own commands and to host `STATE`.
    pub fn sparkplug_own_topics(group: &str) -> Self {
        let ns = edgesync_protocol::sparkplug::topic::NAMESPACE;
        let rule = |access, filter: String| Rule { access, filter };
        Self {
            patterns: vec![
                rule(Access::Write, format!("{ns}/{group}/+/%u")),
                rule(Access::Write, format!("{ns}/{group}/+/%u/+")),
                rule(Access::Read, format!("{ns}/{group}/NCMD/%u")),
                rule(Access::Read, format!("{ns}/{group}/DCMD/%u/+")),
                rule(Access::Read, format!("{ns}/STATE/+")),
            ],
            ..Self::default()
        }
    }

    /// "Each device only its own topics" for KubeEdge twin devices whose username is their
    /// device name: publish their own `twin/update` and `twin/get` (either id form), and
    /// subscribe to their own twin replies.
    pub fn kubeedge_own_topics() -> Self {
        let p = edgesync_protocol::kubeedge::PREFIX;
        let rule = |access, filter: String| Rule { access, filter };
        let mut patterns = Vec::new();
        for id in ["%u", "+/%u"] {
            patterns.push(rule(Access::Write, format!("{p}{id}/twin/update")));
            patterns.push(rule(Access::Write, format!("{p}{id}/twin/get")));
            patterns.push(rule(Access::Read, format!("{p}{id}/twin/#")));
        }
        Self {
            patterns,
            ..Self::default()
        }
    }

    /// Both ACLs' entries together: grants add up, and a deny in either still wins.
    pub fn merge(mut self, other: Self) -> Self {
        self.anonymous.extend(other.anonymous);
        for (name, rules) in other.users {
            self.users.entry(name).or_default().extend(rules);
        }
        self.patterns.extend(other.patterns);
        self
    }

    /// Whether this client may publish to `topic` (a topic name, without wildcards).
    pub fn can_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return false;
        }
        // A topic name is a filter that matches only itself, so coverage is matching.
        let hit = |filter: &str| covers(filter, topic);
        self.decide(username, client_id, Access::Write, hit, hit)
    }

    /// Whether this client may subscribe to `filter`: a read grant must cover every topic
    /// the filter can match, and no deny entry may match any of them.
    pub fn can_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        if valid_filter(filter).is_err() {
            return false;
        }
        let deny_hit = |acl: &str| overlaps(acl, filter);
        let grant_hit = |acl: &str| covers(acl, filter);
        self.decide(username, client_id, Access::Read, deny_hit, grant_hit)
    }

    fn decide(
        &self,
        username: Option<&str>,
        client_id: &str,
        wanted: Access,
        deny_hit: impl Fn(&str) -> bool,
        grant_hit: impl Fn(&str) -> bool,
    ) -> bool {
        let fixed = match username {
            Some(name) => self.users.get(name).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let mut granted = false;
        // Returns whether a deny entry hit; every entry is looked at for denies, since a
        // deny after a grant still wins.
        let mut denied_by = |access: Access, filter: &str| {
            if access == Access::Deny {
                return deny_hit(filter);
            }
            if !granted && access.grants(wanted) {
                granted = grant_hit(filter);
            }
            false
        };
        for rule in fixed {
            if denied_by(rule.access, &rule.filter) {
                return false;
            }
        }
        for rule in &self.patterns {
            let denied = match substitute(&rule.filter, username, client_id) {
                Substituted::Filter(filter) => denied_by(rule.access, &filter),
                Substituted::Empty => false,
                // A deny we cannot evaluate must not become a way around it.
                Substituted::Dangerous => rule.access == Access::Deny,
            };
            if denied {
                return false;
            }
        }
        granted
    }
}

fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let access = match first.to_ascii_lowercase().as_str() {
        "read" => Some(Access::Read),
        "write" => Some(Access::Write),
        "readwrite" => Some(Access::ReadWrite),
        "deny" => Some(Access::Deny),
        _ => None,
    };
    let (access, filter) = match access {
        Some(access) => (access, after.trim()),
        None if after.trim().is_empty() => (Access::ReadWrite, first),
        None => {
            return Err(format!(
                "unknown access \"{first}\" (expected read, write, readwrite or deny)"
            ));
        }
    };
    valid_filter(filter).map_err(|why| format!("bad topic filter \"{filter}\": {why}"))?;
    Ok(Rule {
        access,
        filter: filter.to_owned(),
    })
}

fn valid_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty");
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("'#' must be a whole level and the last one");
        }
        if level.contains('+') && level != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

fn substitute(template: &str, username: Option<&str>, client_id: &str) -> Substituted {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let value = match rest.get(at..at + 2) {
            Some("%u") => username.unwrap_or(""),
            Some("%c") => client_id,
            _ => {
                out.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        };
        if value.is_empty() {
            return Substituted::Empty;
        }
        if value.contains(['/', '+', '#']) {
            return Substituted::Dangerous;
        }
        out.push_str(value);
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Substituted::Filter(out)
}

/// MQTT's `$` rule: a wildcard in the first level never matches a topic starting with `$`.
fn dollar_mismatch(wild: &str, other: &str) -> bool {
    matches!(wild.split('/').next(), Some("+" | "#")) && other.starts_with('$')
}

/// Whether every topic `requested` can match is also matched by `granted`.
fn covers(granted: &str, requested: &str) -> bool {
    if dollar_mismatch(granted, requested) {
        return false;
    }
    let (mut g, mut r) = (granted.split('/'), requested.split('/'));
    loop {
        match (g.next(), r.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic could match both filters.
fn overlaps(a: &str, b: &str) -> bool {
    if dollar_mismatch(a, b) || dollar_mismatch(b, a) {
        return false;
    }
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Made by Mosquitto 2.0.11's own `mosquitto_passwd -b -c pw user secret` and
    /// `mosquitto_passwd -H sha512 -b pw legacy 's3cr3t pw'`.
    const REAL_FILE: &str = "user:$7$101$24kV1Ze5u1gJ2qtS$exBL4HrAzf27SDEkKw4+jyUWpRV4xQMQ/i/PtSiQZBkqJ/a+vTrFGqhnYGlgDSxTiiYmdicb/UBtG68YaInqpg==\n\
        legacy:$6$IwABctj1niTvmE8Q$StBcrCiuqI0lypzIRu2tZAVdHzP3FW1+HseP4OgQL7WvEi7+eaXIsnzSoCiIi8jVsKhYwAPWG8K1iDy1DOogEg==\n";

    fn pbkdf2_line(user: &str, password: &[u8], iterations: u32) -> String {
        let salt = [7u8; 12];
        let mut hash = [0u8; HASH_LEN];
        let n = NonZeroU32::new(iterations).unwrap();
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, n, &salt, password, &mut hash);
        format!(
            "{user}:$7${iterations}${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(hash)
        )
    }

    fn parse_err(text: &str) -> String {
        PasswordFile::parse(text, 1_000).unwrap_err().to_string()
    }

    #[test]
    fn real_mosquitto_passwd_output_verifies() {
        let file = PasswordFile::parse(REAL_FILE, 1_000).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.verify("user", b"secret"));
        assert!(!file.verify("user", b"secret2"));
        assert!(file.verify("legacy", b"s3cr3t pw"));
        assert!(!file.verify("legacy", b"s3cr3t"));
        assert!(!file.verify("nobody", b"secret"));
    }

    #[test]
    fn pbkdf2_line_made_with_ring_verifies() {
        let text = format!("# devices\n\n{}\r\n", pbkdf2_line("press-1", b"pw-1", 101));
        let file = PasswordFile::parse(&text, 1_000).unwrap();
        assert!(!file.is_empty());
        assert!(file.verify("press-1", b"pw-1"));
        assert!(!file.verify("press-1", b"pw-2"));
        assert!(!file.verify("press-2", b"pw-1"));
    }

    #[test]
    fn sha512_line_made_with_ring_verifies() {
        let salt = b"0123456789ab";
        let mut ctx = digest::Context::new(&digest::SHA512);
        ctx.update(b"hunter2");
        ctx.update(salt);
        let hash = STANDARD.encode(ctx.finish());
        let file = PasswordFile::parse(&format!("old:$6${}${hash}", STANDARD.encode(salt)), 1_000)
            .unwrap();
        assert!(file.verify("old", b"hunter2"));
        assert!(!file.verify("old", b"hunter3"));
    }

    #[test]
    fn malformed_password_lines_name_line_and_user() {
        let e = parse_err("# c\n\n\npress-1:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n");
        assert_eq!(
            e,
            "line 4 (user \"press-1\"): unsupported hash \"$argon2id$\"; create the file with \
             mosquitto_passwd from Mosquitto 2.0 (PBKDF2-SHA512, $7$)"
        );
        assert!(parse_err("a:plaintext").contains("not hashed"));
        assert!(parse_err("no colon here").starts_with("line 1: expected"));
        assert!(parse_err(":$6$x$y").contains("empty username"));
        assert!(parse_err("a:$7$101$c2FsdA==").contains("malformed $7$"));
        assert!(parse_err("a:$7$0$c2FsdA==$aGFzaA==").contains("iterations"));
        assert!(parse_err("a:$7$1001$c2FsdA==$aGFzaA==").contains("max_password_iterations"));
        assert!(parse_err("a:$6$!!$aGFzaA==").contains("salt is not valid base64"));
        assert!(parse_err("a:$6$c2FsdA==$aGFzaA==").contains("hash is 4 bytes"));
    }

    #[test]
    fn duplicate_user_is_an_error() {
        let text = format!(
            "{}\n{}\n",
            pbkdf2_line("a", b"1", 101),
            pbkdf2_line("a", b"2", 101)
        );
        let e = parse_err(&text);
        assert!(e.starts_with("line 2 (user \"a\"): duplicate user, first defined on line 1"));
    }

    #[test]
    fn debug_output_hides_hashes() {
        let file = PasswordFile::parse(REAL_FILE, 1_000).unwrap();
        assert!(!format!("{file:?}").contains("24kV1Ze5"));
    }

    #[test]
    fn user_section_and_anonymous_section() {
        let acl = Acl::parse(
            "# anonymous\ntopic read public/#\n\nuser press 1\ntopic write plant/line 1/+\n\
             user ops\ntopic #\n",
        )
        .unwrap();
        assert!(acl.can_subscribe(None, "c", "public/x"));
        assert!(!acl.can_publish(None, "c", "public/x"));
        assert!(acl.can_publish(Some("press 1"), "c", "plant/line 1/a"));
        assert!(!acl.can_subscribe(Some("press 1"), "c", "public/x"));
        assert!(!acl.can_publish(Some("someone"), "c", "public/x"));
        assert!(acl.can_publish(Some("ops"), "c", "any/thing"));
        assert!(acl.can_subscribe(Some("ops"), "c", "#"));
    }

    #[test]
    fn access_words() {
        let acl =
            Acl::parse("topic read r\ntopic write w\ntopic readwrite rw\ntopic both\n").unwrap();
        let pubs = |t| acl.can_publish(None, "c", t);
        let subs = |t| acl.can_subscribe(None, "c", t);
        assert!(subs("r") && !pubs("r"));
        assert!(pubs("w") && !subs("w"));
        assert!(pubs("rw") && subs("rw") && pubs("both") && subs("both"));
        assert!(!pubs("other") && !subs("other"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = |t| Acl::parse(t).unwrap_err().to_string();
        assert!(e("topic a\nsubscribe b\n").starts_with("line 2: unknown keyword \"subscribe\""));
        assert!(e("\ntopic reed a/b\n").starts_with("line 2: unknown access \"reed\""));
        assert!(e("topic read a/#/b").starts_with("line 1: bad topic filter"));
        assert!(e("pattern write a+/b").contains("'+' must be a whole level"));
        assert!(e("topic read").contains("bad topic filter \"\""));
        assert!(e("user").contains("needs a name"));
    }

    #[test]
    fn deny_wins_over_grants() {
        let acl =
            Acl::parse("pattern readwrite #\nuser u\ntopic deny secret/#\ntopic a/#\n").unwrap();
        assert!(acl.can_publish(Some("u"), "c", "a/b"));
        assert!(!acl.can_publish(Some("u"), "c", "secret/x"));
        assert!(acl.can_publish(Some("v"), "c", "secret/x"));
        // Subscribing to `#` could deliver secret/x: the overlapping deny refuses it.
        assert!(!acl.can_subscribe(Some("u"), "c", "#"));
        assert!(!acl.can_subscribe(Some("u"), "c", "+/x"));
        assert!(acl.can_subscribe(Some("u"), "c", "a/#"));
    }

    #[test]
    fn pattern_substitution_and_refusals() {
        let acl = Acl::parse("pattern write d/%u/%c/out\npattern read in/%c/#\n").unwrap();
        assert!(acl.can_publish(Some("u1"), "c1", "d/u1/c1/out"));
        assert!(!acl.can_publish(Some("u1"), "c1", "d/u2/c1/out"));
        assert!(acl.can_subscribe(None, "c1", "in/c1/#"));
        assert!(!acl.can_subscribe(None, "c1", "in/c2/#"));
        // Anonymous: no %u, so the %u pattern grants nothing.
        assert!(!acl.can_publish(None, "c1", "d//c1/out"));
        for bad in ["a/b", "+", "#"] {
            assert!(!acl.can_publish(Some(bad), "c1", &format!("d/{bad}/c1/out")));
            assert!(!acl.can_subscribe(None, bad, &format!("in/{bad}/#")));
        }
        assert!(acl.can_subscribe(None, "x", "in/x/y"));
        assert!(!acl.can_subscribe(None, "", "in//#"));
    }

    #[test]
    fn dangerous_value_in_deny_pattern_fails_closed() {
        let acl = Acl::parse("pattern a/#\npattern deny a/%c/secret\n").unwrap();
        assert!(acl.can_publish(None, "c1", "a/b"));
        assert!(!acl.can_publish(None, "c1", "a/c1/secret"));
        assert!(!acl.can_publish(None, "c+", "a/b"));
    }

    #[test]
    fn subscribe_coverage() {
        let acl = Acl::parse("topic read a/+/c\ntopic read x/#\n").unwrap();
        let sub = |f| acl.can_subscribe(None, "c", f);
        assert!(sub("a/b/c") && sub("a/+/c"));
        assert!(!sub("a/#") && !sub("a/b/#") && !sub("a/b/c/d") && !sub("+/b/c"));
        assert!(sub("x/b/#") && sub("x/#") && sub("x") && sub("x/+/y"));
        assert!(!sub("#") && !sub("a/b/+/#"));
        assert!(!sub("a/#/c"), "invalid filters are refused");
    }

    #[test]
    fn dollar_topics_need_an_explicit_grant() {
        let acl = Acl::parse("topic readwrite #\ntopic read +/status\n").unwrap();
        assert!(acl.can_publish(None, "c", "plant/x"));
        assert!(!acl.can_publish(None, "c", "$SYS/x"));
        assert!(!acl.can_subscribe(None, "c", "$SYS/#"));
        assert!(!acl.can_subscribe(None, "c", "$SYS/status"));
        let sys = Acl::parse("topic read $SYS/#\ntopic deny #\n").unwrap();
        assert!(sys.can_subscribe(None, "c", "$SYS/broker/uptime"));
        assert!(sys.can_subscribe(None, "c", "$SYS/#"));
    }

    #[test]
    fn dialect_own_topics_keep_edge_nodes_and_twin_devices_apart() {
        let acl = Acl::sparkplug_own_topics("Plant1");
        let gw = Some("GW1");
        assert!(acl.can_publish(gw, "c", "spBv1.0/Plant1/NBIRTH/GW1"));
        assert!(acl.can_publish(gw, "c", "spBv1.0/Plant1/DDATA/GW1/Press_1"));
        assert!(!acl.can_publish(gw, "c", "spBv1.0/Plant1/NDATA/GW2"));
        assert!(!acl.can_publish(gw, "c", "spBv1.0/Plant2/NDATA/GW1"));
        assert!(acl.can_subscribe(gw, "c", "spBv1.0/Plant1/DCMD/GW1/+"));
        assert!(!acl.can_subscribe(gw, "c", "spBv1.0/Plant1/DCMD/GW2/+"));
        let acl = Acl::kubeedge_own_topics();
        let me = Some("press-1");
        assert!(acl.can_publish(me, "c", "$hw/events/device/press-1/twin/update"));
        assert!(acl.can_publish(me, "c", "$hw/events/device/plant/press-1/twin/get"));
        assert!(!acl.can_publish(me, "c", "$hw/events/device/press-2/twin/update"));
        assert!(acl.can_subscribe(me, "c", "$hw/events/device/press-1/twin/#"));
        assert!(!acl.can_subscribe(me, "c", "$hw/events/device/+/twin/#"));
    }

    #[test]
    fn own_topics_keeps_devices_apart() {
        let acl = Acl::own_topics("edgesync/", &["factory/{device}/state", "global/feed"]);
        let me = Some("press-1");
        assert!(acl.can_publish(me, "c", "edgesync/press-1/shadow/update"));
        assert!(acl.can_publish(me, "c", "edgesync/press-1/shadow/get"));
        assert!(acl.can_publish(me, "c", "edgesync/press-1/shadow/desired/reject"));
        assert!(!acl.can_publish(me, "c", "edgesync/press-2/shadow/desired/reject"));
        assert!(!acl.can_publish(me, "c", "edgesync/press-2/shadow/update"));
        assert!(!acl.can_publish(me, "c", "edgesync/press-1/shadow/update/delta"));
        assert!(acl.can_publish(me, "c", "factory/press-1/state"));
        assert!(!acl.can_publish(me, "c", "factory/press-2/state"));
        assert!(!acl.can_publish(me, "c", "global/feed"));
        assert!(acl.can_subscribe(me, "c", "edgesync/press-1/shadow/#"));
        assert!(acl.can_subscribe(me, "c", "edgesync/press-1/shadow/update/delta"));
        assert!(!acl.can_subscribe(me, "c", "edgesync/+/shadow/#"));
        assert!(!acl.can_subscribe(me, "c", "edgesync/press-2/shadow/#"));
        assert!(!acl.can_publish(None, "c", "edgesync//shadow/update"));
        assert!(!acl.can_publish(Some("a/b"), "c", "edgesync/a/b/shadow/update"));
    }

    #[test]
    fn merge_adds_grants_and_keeps_denies() {
        let file = Acl::parse("user ops\ntopic read #\npattern deny edgesync/%u/shadow/get\n");
        let acl = Acl::own_topics("edgesync", &[]).merge(file.unwrap());
        assert!(acl.can_subscribe(Some("ops"), "c", "edgesync/+/shadow/update"));
        // The deny pattern, substituted for ops, overlaps what `+/shadow/#` could deliver.
        assert!(!acl.can_subscribe(Some("ops"), "c", "edgesync/+/shadow/#"));
        assert!(acl.can_publish(Some("press-1"), "c", "edgesync/press-1/shadow/update"));
        assert!(!acl.can_publish(Some("press-1"), "c", "edgesync/press-1/shadow/get"));
    }
}
