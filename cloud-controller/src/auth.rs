//! Node authentication: the bearer token must equal the value in the Secret named by the
//! EdgeNode's `spec.tokenSecretRef` (same namespace, key defaulting to `token`).
//!
//! Secrets are read on demand with a short-lived cache rather than watched: the controller
//! then needs only `get` on Secrets, not `list`/`watch` of every Secret in the cluster. A token
//! that does not match the cached value triggers a re-read (at most once a second per Secret),
//! so a rotated Secret is honoured on the agent's first request with the new token, and the old
//! token stops working within `--token-cache-seconds`. Token values are never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync_crds::EdgeNode;
use edgesync_protocol::secret::Secret as Token;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tracing::warn;

/// Re-reads of one Secret triggered by mismatching tokens are at most this frequent.
const MISMATCH_REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// What a caller is told for every authentication failure, whatever the cause: telling an
/// unauthenticated caller whether a node exists, or naming its Secret, would help it guess.
/// The controller's log says which cause it was ([`Denied`]).
pub const UNAUTHORIZED_MESSAGE: &str = "authentication failed: send `Authorization: Bearer <token>` with the token in the Secret named by the EdgeNode's spec.tokenSecretRef, for an EdgeNode that exists in this namespace (the controller's log names the cause)";

/// Why a request was not authenticated: for the log only, never for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No or malformed `Authorization` header.
    MissingToken,
    /// A token that does not match the node's Secret.
    WrongToken,
    /// The Secret, or its key, does not exist.
    NoSecret {
        /// `namespace/name`.
        secret: String,
        /// The key looked for.
        key: String,
    },
    /// No such EdgeNode.
    UnknownNode,
}

impl Denied {
    /// A short, bounded label for the log's `reason` field.
    pub fn label(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::WrongToken => "wrong_token",
            Self::NoSecret { .. } => "no_token_secret",
            Self::UnknownNode => "unknown_node",
        }
    }

    /// What the operator should know (logged at debug; no token value ever).
    pub fn detail(&self) -> String {
        match self {
            Self::MissingToken => "no bearer token (a proxy stripping Authorization?)".into(),
            Self::WrongToken => "the token does not match the node's Secret".into(),
            Self::NoSecret { secret, key } => format!(
                "the node's token Secret {secret} (key {key:?}) does not exist or has no such key; an operator must create it"
            ),
            Self::UnknownNode => {
                "no such EdgeNode: create it (with a tokenSecretRef) before its agent connects"
                    .into()
            }
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No or malformed `Authorization` header, or a token that does not match.
    #[error("{}", .0.detail())]
    Unauthorized(Denied),
    /// The Secret could not be read because the API server is unavailable.
    #[error("cannot verify the token: {0}")]
    Unavailable(String),
}

struct Entry {
    token: Option<Token>,
    fetched: Instant,
}

/// A Secret by namespace, name and key.
type SecretKey = (String, String, String);

/// Verifies node tokens against their Secrets.
pub struct TokenVerifier {
    client: Client,
    ttl: Duration,
    cache: Mutex<HashMap<SecretKey, Entry>>,
    /// One read of a Secret at a time: callers that waited for it use what it read. Keys come
    /// from EdgeNode specs, never from requests, so the map stays as small as the fleet.
    reads: Mutex<HashMap<SecretKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenVerifier {
    /// A verifier trusting a read Secret value for `ttl`.
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            cache: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `presented` (the raw `Authorization` header value) for `node`.
    pub async fn verify(&self, node: &EdgeNode, presented: Option<&str>) -> Result<(), AuthError> {
        let token = presented
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Unauthorized(Denied::MissingToken))?;
        let namespace = node.metadata.namespace.clone().unwrap_or_default();
        let secret = &node.spec.token_secret_ref;
        let key = (namespace, secret.name.clone(), secret.key.clone());

        let now = Instant::now();
        let refetch = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&key) {
                Some(e) if now.duration_since(e.fetched) < self.ttl => {
                    if e.token
                        .as_ref()
                        .is_some_and(|t| t.matches(token.as_bytes()))
                    {
                        return Ok(());
                    }
                    now.duration_since(e.fetched) >= MISMATCH_REFETCH_INTERVAL
                }
                _ => true,
            }
        };
        if refetch {
            // Single flight: 1,000 concurrent wrong tokens make one Secret read, not 1,000.
            let gate = {
                let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
                Arc::clone(reads.entry(key.clone()).or_default())
            };
            let _reading = gate.lock().await;
            let fresh = {
                let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                cache
                    .get(&key)
                    .is_some_and(|e| e.fetched.elapsed() < MISMATCH_REFETCH_INTERVAL)
            };
            if !fresh {
                let value = self.read_secret(&key).await?;
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                cache.insert(
                    key.clone(),
                    Entry {
                        token: value,
                        fetched: Instant::now(),
                    },
                );
            }
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&key).and_then(|e| e.token.as_ref()) {
            Some(t) if t.matches(token.as_bytes()) => Ok(()),
            Some(_) => Err(AuthError::Unauthorized(Denied::WrongToken)),
            None => Err(AuthError::Unauthorized(Denied::NoSecret {
                secret: format!("{}/{}", key.0, key.1),
                key: key.2.clone(),
            })),
        }
    }

    async fn read_secret(
        &self,
        (namespace, name, key): &(String, String, String),
    ) -> Result<Option<Token>, AuthError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                let value = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| token_of(trim_newline(&b.0)))
                    .or_else(|| {
                        secret
                            .string_data
                            .as_ref()
                            .and_then(|d| d.get(key))
                            .map(|s| token_of(trim_newline(s.as_bytes())))
                    });
                if value.is_none() {
                    warn!(
                        namespace,
                        secret = name,
                        key,
                        "Node token Secret has no such key"
                    );
                }
                Ok(value)
            }
            Ok(None) => {
                warn!(namespace, secret = name, "Node token Secret does not exist");
                Ok(None)
            }
            Err(kube::Error::Api(s)) if s.code == 403 => Err(AuthError::Unavailable(format!(
                "the controller may not read Secret {namespace}/{name}: {}",
                s.message
            ))),
            Err(e) => Err(AuthError::Unavailable(e.to_string())),
        }
    }
}

/// A token read from a Secret. A value that is not UTF-8 cannot equal any bearer token (HTTP
/// header values are visible ASCII), so the lossy conversion never makes one match.
fn token_of(bytes: &[u8]) -> Token {
    Token::new(String::from_utf8_lossy(bytes))
}

/// Secrets written from files often end in a newline that is not part of the token.
fn trim_newline(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && matches!(b[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &b[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_newlines_are_not_part_of_a_token() {
        assert_eq!(trim_newline(b"tok\r\n"), b"tok");
        assert_eq!(trim_newline(b"tok"), b"tok");
    }
}
