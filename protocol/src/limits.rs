//! Size and shape limits on everything a device or agent may send, checked before anything is
//! stored.
//!
//! Defaults follow AWS IoT Device Shadow quotas, which shop-floor integrators already design
//! for: 8 KiB state document, nesting depth 6, 128-byte keys, 64-byte `clientToken`, and a
//! 128 KiB MQTT payload. Device ids must be valid Kubernetes object names (DNS-1123
//! subdomains) because each device becomes a `Device` custom resource of that name.

use serde_json::{Map, Value};

/// Default maximum size in bytes of a shadow state document (desired + reported, serialized).
pub const DEFAULT_MAX_STATE_BYTES: usize = 8 * 1024;
/// Default maximum object nesting depth inside `desired` or `reported` (`{"a":1}` has depth 1).
pub const DEFAULT_MAX_DEPTH: usize = 6;
/// Default maximum length in bytes of an object key.
pub const DEFAULT_MAX_KEY_BYTES: usize = 128;
/// Default maximum length in bytes of a `clientToken`.
pub const DEFAULT_MAX_CLIENT_TOKEN_BYTES: usize = 64;
/// Default maximum size in bytes of one MQTT payload.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// Maximum length of a Kubernetes object name (DNS-1123 subdomain).
pub const MAX_DEVICE_ID_BYTES: usize = 253;

/// Configurable limits applied to shadow updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum serialized size of desired + reported after an update is applied.
    pub max_state_bytes: usize,
    /// Maximum object nesting depth within `desired` or `reported`.
    pub max_depth: usize,
    /// Maximum length of any object key, in bytes.
    pub max_key_bytes: usize,
    /// Maximum length of a `clientToken`, in bytes.
    pub max_client_token_bytes: usize,
    /// Maximum size of a raw MQTT payload, in bytes.
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_state_bytes: DEFAULT_MAX_STATE_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_client_token_bytes: DEFAULT_MAX_CLIENT_TOKEN_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// A limit was exceeded or a name was invalid. Messages are written for the person who has to
/// fix the device or integration that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The raw payload is larger than `max_payload_bytes`.
    #[error("payload is {size} bytes, larger than the limit of {max} bytes")]
    PayloadTooLarge {
        /// Size of the payload.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The state document would grow larger than `max_state_bytes`.
    #[error(
        "state document would be {size} bytes (desired + reported), larger than the limit of {max} bytes; send fewer or smaller fields, or delete unused ones with null"
    )]
    StateTooLarge {
        /// Size the document would have.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Objects are nested deeper than `max_depth`.
    #[error("state is nested {depth} levels deep at '{path}', deeper than the limit of {max}")]
    TooDeep {
        /// Depth reached.
        depth: usize,
        /// The limit.
        max: usize,
        /// JSON pointer of the first object past the limit.
        path: String,
    },
    /// An object key is longer than `max_key_bytes`.
    #[error("key at '{path}' is {len} bytes, longer than the limit of {max} bytes")]
    KeyTooLong {
        /// JSON pointer of the offending key.
        path: String,
        /// Key length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An object key starts with `$`, which is reserved.
    #[error("key at '{path}' starts with '$', which is reserved")]
    ReservedKey {
        /// JSON pointer of the offending key.
        path: String,
    },
    /// The key is empty.
    #[error("empty key at '{path}' is not allowed")]
    EmptyKey {
        /// JSON pointer of the parent object.
        path: String,
    },
    /// The `clientToken` is longer than `max_client_token_bytes`.
    #[error("clientToken is {len} bytes, longer than the limit of {max} bytes")]
    ClientTokenTooLong {
        /// Token length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The device id is not a valid Kubernetes object name.
    #[error("invalid device id '{id}': {reason}")]
    InvalidDeviceId {
        /// The id as received (truncated to 64 characters).
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

impl LimitError {
    /// Whether this error means "too large" (HTTP 413) rather than "malformed" (HTTP 400).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            LimitError::PayloadTooLarge { .. } | LimitError::StateTooLarge { .. }
        )
    }
}

/// Checks that `id` is a DNS-1123 subdomain: at most 253 characters of lowercase letters,
/// digits, `-` and `.`, starting and ending with a letter or digit, with every dot-separated
/// label non-empty and bounded by letters or digits.
///
/// # Errors
/// [`LimitError::InvalidDeviceId`] naming the rule that was broken.
pub fn validate_device_id(id: &str) -> Result<(), LimitError> {
    let fail = |reason| {
        Err(LimitError::InvalidDeviceId {
            id: id.chars().take(64).collect(),
            reason,
        })
    };
    if id.is_empty() {
        return fail("must not be empty");
    }
    if id.len() > MAX_DEVICE_ID_BYTES {
        return fail("must be at most 253 characters (a Kubernetes object name)");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return fail("may contain only lowercase letters, digits, '-' and '.'");
    }
    for label in id.split('.') {
        let (Some(first), Some(last)) = (label.bytes().next(), label.bytes().last()) else {
            return fail("must not contain empty segments between dots");
        };
        if first == b'-' || last == b'-' {
            return fail("each dot-separated segment must start and end with a letter or digit");
        }
    }
    Ok(())
}

/// Checks the shape of a `desired` or `reported` object: nesting depth and keys.
///
/// # Errors
/// The first [`LimitError`] found, with a JSON pointer to where it is.
pub fn check_state(state: &Map<String, Value>, limits: &Limits) -> Result<(), LimitError> {
    let mut path = String::new();
    check_object(state, 1, limits, &mut path)
}

fn check_object(
    obj: &Map<String, Value>,
    depth: usize,
    limits: &Limits,
    path: &mut String,
) -> Result<(), LimitError> {
    if depth > limits.max_depth {
        return Err(LimitError::TooDeep {
            depth,
            max: limits.max_depth,
            path: if path.is_empty() {
                "/".to_owned()
            } else {
                path.clone()
            },
        });
    }
    for (key, value) in obj {
        let parent_len = path.len();
        path.push('/');
        push_escaped(path, key);
        if key.is_empty() {
            path.truncate(parent_len);
            let parent = if path.is_empty() { "/" } else { path.as_str() };
            return Err(LimitError::EmptyKey {
                path: parent.to_owned(),
            });
        }
        if key.len() > limits.max_key_bytes {
            return Err(LimitError::KeyTooLong {
                path: path.clone(),
                len: key.len(),
                max: limits.max_key_bytes,
            });
        }
        if key.starts_with('$') {
            return Err(LimitError::ReservedKey { path: path.clone() });
        }
        check_value(value, depth, limits, path)?;
        path.truncate(parent_len);
    }
    Ok(())
}

fn check_value(
    value: &Value,
    depth: usize,
    limits: &Limits,
    path: &mut String,
) -> Result<(), LimitError> {
    match value {
        Value::Object(inner) => check_object(inner, depth + 1, limits, path),
        // Objects inside arrays count toward depth too, or an array would be a way around it.
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let parent_len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                check_value(item, depth, limits, path)?;
                path.truncate(parent_len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// RFC 6901 escaping so error paths point at the exact key.
fn push_escaped(path: &mut String, key: &str) {
    for c in key.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

/// Checks a `clientToken` against the limit.
///
/// # Errors
/// [`LimitError::ClientTokenTooLong`].
pub fn check_client_token(token: &str, limits: &Limits) -> Result<(), LimitError> {
    if token.len() > limits.max_client_token_bytes {
        return Err(LimitError::ClientTokenTooLong {
            len: token.len(),
            max: limits.max_client_token_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test fixture must be an object"),
        }
    }

    #[test]
    fn device_ids_follow_kubernetes_names() {
        for ok in ["press-1", "a", "line3.press-07", "0abc", &"a".repeat(253)] {
            assert_eq!(validate_device_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Press1",
            "press_1",
            "-press",
            "press-",
            "a..b",
            ".a",
            "a/b",
            "a+b",
            "a#",
            "ünï",
            &"a".repeat(254),
        ] {
            assert!(
                validate_device_id(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn device_id_error_reads_well() {
        let err = validate_device_id("Press_1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid device id 'Press_1': may contain only lowercase letters, digits, '-' and '.'"
        );
    }

    #[test]
    fn depth_counts_objects_including_inside_arrays() {
        let limits = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        assert!(check_state(&obj(json!({"a": {"b": 1}})), &limits).is_ok());
        let err = check_state(&obj(json!({"a": {"b": {"c": 1}}})), &limits).unwrap_err();
        assert_eq!(
            err,
            LimitError::TooDeep {
                depth: 3,
                max: 2,
                path: "/a/b".into()
            }
        );
        assert!(check_state(&obj(json!({"a": [{"b": {"c": 1}}]})), &limits).is_err());
        // Arrays of scalars do not add depth.
        assert!(check_state(&obj(json!({"a": {"b": [[1, 2], [3]]}})), &limits).is_ok());
    }

    #[test]
    fn default_depth_is_six() {
        let six = json!({"a":{"b":{"c":{"d":{"e":{"f":1}}}}}});
        let seven = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}});
        assert!(check_state(&obj(six), &Limits::default()).is_ok());
        assert!(matches!(
            check_state(&obj(seven), &Limits::default()),
            Err(LimitError::TooDeep { depth: 7, .. })
        ));
    }

    #[test]
    fn keys_are_checked_with_a_pointer_to_them() {
        let limits = Limits::default();
        let long = "k".repeat(129);
        let err = check_state(&obj(json!({"a": {long.clone(): 1}})), &limits).unwrap_err();
        assert_eq!(
            err,
            LimitError::KeyTooLong {
                path: format!("/a/{long}"),
                len: 129,
                max: 128
            }
        );
        let err = check_state(&obj(json!({"x/y": {"$meta": 1}})), &limits).unwrap_err();
        assert_eq!(
            err,
            LimitError::ReservedKey {
                path: "/x~1y/$meta".into()
            }
        );
        assert!(matches!(
            check_state(&obj(json!({"": 1})), &limits),
            Err(LimitError::EmptyKey { .. })
        ));
    }

    #[test]
    fn client_token_limit() {
        let limits = Limits::default();
        assert!(check_client_token(&"t".repeat(64), &limits).is_ok());
        assert_eq!(
            check_client_token(&"t".repeat(65), &limits),
            Err(LimitError::ClientTokenTooLong { len: 65, max: 64 })
        );
    }
}
