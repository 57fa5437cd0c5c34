//! Secrets (node tokens, broker passwords): a value that `Debug` never shows, so no settings
//! dump or log line can leak it, compared in constant time (RustCrypto's `subtle`).

use serde::Deserialize;
use subtle::ConstantTimeEq as _;

/// A secret string. Read it with [`Secret::expose`] only where it is sent or compared.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, to send it or hand it to a library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` equals the secret, in time independent of where they differ (the
    /// length is not treated as secret).
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Equality of secrets in time independent of where they differ; the length is not treated
/// as secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value_and_comparison_is_equality() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(!format!("{:?}", Some((String::from("user"), s.clone()))).contains("hunter2"));
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter3"));
        assert!(!s.matches(b"hunter22"));
        assert!(constant_time_eq(b"", b""));
        let parsed: Secret = serde_json::from_str("\"t0k\"").unwrap();
        assert_eq!(parsed.expose(), "t0k");
    }
}
