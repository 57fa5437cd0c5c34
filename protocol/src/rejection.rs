//! How a device says no to a desired state: `{prefix}/{device}/shadow/desired/reject`.
//!
//! A device that cannot or will not apply a desired generation publishes
//! `{"desiredGeneration":7,"code":"out_of_range","message":"speed 9000 is above 6000"}`. The
//! agent keeps the newest refusal with the shadow (one per device, so a device cannot make it
//! hold more), reports it upstream like a reported change, and the Device shows it in
//! `status.desiredRejection` and its `DesiredAccepted` condition. A newer desired generation
//! replaces it: the refusal answered a state that is no longer asked for.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::limits::Limits;
use crate::shadow::{EpochSeconds, ShadowDocument, ShadowError, parse_object, take_client_token};

/// Longest `code`, in bytes: a machine-readable reason, used as a condition reason.
pub const MAX_CODE_BYTES: usize = 64;
/// Longest `message`, in bytes: a line for a person.
pub const MAX_MESSAGE_BYTES: usize = 256;

/// A device's refusal of one desired generation, as stored with its shadow and reported
/// upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// The `Device` generation (`desiredGeneration` of the shadow) the device refused.
    pub desired_generation: i64,
    /// Why, for machines: 1 to 64 bytes of `a-z`, `0-9` and `_`.
    pub code: String,
    /// Why, for people: at most 256 bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the agent took it (seconds since the Unix epoch).
    pub timestamp: EpochSeconds,
}

impl Rejection {
    /// Checks fields that came from elsewhere (the controller reads them off the wire from
    /// agents it does not trust further than their token).
    ///
    /// # Errors
    /// A sentence saying which field is wrong.
    pub fn check(&self) -> Result<(), String> {
        check_fields(self.desired_generation, &self.code, &self.message)
    }
}

/// A parsed `shadow/desired/reject` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectRequest {
    /// The generation refused.
    pub desired_generation: i64,
    /// Machine-readable reason.
    pub code: String,
    /// Human-readable reason (may be empty).
    pub message: String,
    /// Echoed back in replies.
    pub client_token: Option<String>,
}

impl RejectRequest {
    /// Parses `{"desiredGeneration":N,"code":"..","message":"..","clientToken":".."}`.
    ///
    /// # Errors
    /// [`ShadowError::Malformed`] for bad JSON, a missing or wrong field, or an unknown one;
    /// [`ShadowError::Limit`] for an oversized payload or token.
    pub fn parse(payload: &[u8], limits: &Limits) -> Result<Self, ShadowError> {
        let mut root = parse_object(payload, limits)?;
        let client_token = take_client_token(&mut root, limits)?;
        let desired_generation = root
            .remove("desiredGeneration")
            .and_then(|v| v.as_i64())
            .ok_or_else(|| {
                malformed(
                    "desiredGeneration must be the positive integer a delta or shadow/get carried",
                )
            })?;
        let code = match root.remove("code") {
            Some(Value::String(c)) => c,
            _ => return Err(malformed(CODE_RULE)),
        };
        let message = match root.remove("message") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(m)) => m,
            Some(_) => return Err(malformed("message must be a string")),
        };
        if let Some(key) = root.keys().next() {
            // Cut: the key is the sender's, and the reply must stay small.
            let key: String = key.chars().take(64).collect();
            return Err(malformed(&format!(
                "unknown field '{key}'; allowed: desiredGeneration, code, message, clientToken"
            )));
        }
        check_fields(desired_generation, &code, &message).map_err(|e| malformed(&e))?;
        Ok(Self {
            desired_generation,
            code,
            message,
            client_token,
        })
    }
}

const CODE_RULE: &str =
    "code must be 1 to 64 characters of a-z, 0-9 and _ (for example \"out_of_range\")";

fn check_fields(generation: i64, code: &str, message: &str) -> Result<(), String> {
    if generation < 1 {
        return Err(format!(
            "desiredGeneration must be a positive integer, not {generation}"
        ));
    }
    let code_ok = !code.is_empty()
        && code.len() <= MAX_CODE_BYTES
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !code_ok {
        return Err(CODE_RULE.to_owned());
    }
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message is {} bytes, longer than the limit of {MAX_MESSAGE_BYTES} bytes",
            message.len()
        ));
    }
    Ok(())
}

fn malformed(what: &str) -> ShadowError {
    ShadowError::Malformed(what.to_owned())
}

impl ShadowDocument {
    /// Records the device's refusal of its current desired generation. Returns whether the
    /// document changed (and so its version was bumped); the same refusal again (a
    /// redelivered message) changes nothing.
    ///
    /// # Errors
    /// [`ShadowError::GenerationReplaced`] for a generation older than the one held, and
    /// [`ShadowError::GenerationNotHeld`] for any other that is not the one held (including
    /// any generation when the shadow has no desired state yet). The document is unchanged.
    pub fn apply_rejection(
        &mut self,
        req: &RejectRequest,
        now: EpochSeconds,
    ) -> Result<bool, ShadowError> {
        let held = self.desired_generation;
        if req.desired_generation < held {
            return Err(ShadowError::GenerationReplaced {
                rejected: req.desired_generation,
                held,
            });
        }
        if req.desired_generation != held {
            return Err(ShadowError::GenerationNotHeld {
                rejected: req.desired_generation,
                held,
            });
        }
        let same = self.rejection.as_ref().is_some_and(|r| {
            r.desired_generation == req.desired_generation
                && r.code == req.code
                && r.message == req.message
        });
        if same {
            return Ok(false);
        }
        self.rejection = Some(Rejection {
            desired_generation: req.desired_generation,
            code: req.code.clone(),
            message: req.message.clone(),
            timestamp: now,
        });
        self.version += 1;
        self.timestamp = now;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<RejectRequest, ShadowError> {
        RejectRequest::parse(v.to_string().as_bytes(), &Limits::default())
    }

    fn request(generation: i64, code: &str) -> RejectRequest {
        parse(json!({"desiredGeneration": generation, "code": code})).unwrap()
    }

    #[test]
    fn a_request_parses_and_every_bad_field_is_named() {
        let r = parse(json!({"desiredGeneration": 7, "code": "out_of_range",
            "message": "speed 9000 is above 6000", "clientToken": "t1"}))
        .unwrap();
        assert_eq!(
            (r.desired_generation, r.code.as_str(), r.message.as_str()),
            (7, "out_of_range", "speed 9000 is above 6000")
        );
        assert_eq!(r.client_token.as_deref(), Some("t1"));
        for (bad, says) in [
            (json!({"code": "x"}), "desiredGeneration"),
            (
                json!({"desiredGeneration": "7", "code": "x"}),
                "desiredGeneration",
            ),
            (json!({"desiredGeneration": 0, "code": "x"}), "positive"),
            (json!({"desiredGeneration": -3, "code": "x"}), "positive"),
            (json!({"desiredGeneration": 1}), "code must be"),
            (json!({"desiredGeneration": 1, "code": ""}), "code must be"),
            (
                json!({"desiredGeneration": 1, "code": "Out"}),
                "code must be",
            ),
            (
                json!({"desiredGeneration": 1, "code": "a-b"}),
                "code must be",
            ),
            (
                json!({"desiredGeneration": 1, "code": "x".repeat(65)}),
                "code must be",
            ),
            (
                json!({"desiredGeneration": 1, "code": "x", "message": 3}),
                "message must be",
            ),
            (
                json!({"desiredGeneration": 1, "code": "x", "message": "m".repeat(257)}),
                "257 bytes",
            ),
            (
                json!({"desiredGeneration": 1, "code": "x", "extra": 1}),
                "unknown field 'extra'",
            ),
            (
                json!({"desiredGeneration": 1, "code": "x", "clientToken": 5}),
                "clientToken",
            ),
            (json!([1]), "JSON object"),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert_eq!(e.code(), 400, "{bad}");
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        assert!(
            parse(json!({"desiredGeneration": 1, "code": "x".repeat(64),
            "message": "m".repeat(256)}))
            .is_ok()
        );
        let big = vec![b' '; Limits::default().max_payload_bytes + 1];
        assert_eq!(
            RejectRequest::parse(&big, &Limits::default())
                .unwrap_err()
                .code(),
            413
        );
    }

    #[test]
    fn only_the_held_generation_can_be_refused_and_a_repeat_changes_nothing() {
        let mut doc = ShadowDocument::default();
        let limits = Limits::default();
        // No desired state yet: nothing to refuse.
        let e = doc.apply_rejection(&request(1, "no"), 10).unwrap_err();
        assert_eq!((e.code(), e.reason()), (400, "generation_not_held"));
        doc.set_desired(
            json!({"speed": 9000}).as_object().cloned().unwrap(),
            3,
            &limits,
            10,
        )
        .unwrap();
        let before = doc.clone();
        assert!(doc.apply_rejection(&request(4, "no"), 11).is_err());
        let e = doc.apply_rejection(&request(2, "no"), 11).unwrap_err();
        assert_eq!((e.code(), e.reason()), (409, "generation_replaced"));
        assert_eq!(doc, before, "a refused request changes nothing");

        assert!(
            doc.apply_rejection(&request(3, "out_of_range"), 12)
                .unwrap()
        );
        assert_eq!(doc.version, before.version + 1);
        assert!(
            !doc.apply_rejection(&request(3, "out_of_range"), 13)
                .unwrap(),
            "a redelivered refusal is not a change"
        );
        assert_eq!(doc.version, before.version + 1);
        assert!(doc.apply_rejection(&request(3, "busy"), 14).unwrap());
        assert_eq!(doc.rejection.as_ref().unwrap().code, "busy");

        // The same generation again (a resync) keeps it; a new one replaces it.
        doc.set_desired(
            json!({"speed": 9000}).as_object().cloned().unwrap(),
            3,
            &limits,
            15,
        )
        .unwrap();
        assert!(doc.rejection.is_some());
        doc.set_desired(
            json!({"speed": 1500}).as_object().cloned().unwrap(),
            4,
            &limits,
            16,
        )
        .unwrap();
        assert_eq!(doc.rejection, None);
    }

    #[test]
    fn a_document_without_a_refusal_reads_and_writes_as_before() {
        let text = r#"{"state":{"desired":{},"reported":{}},"metadata":{"desired":{},"reported":{}},"version":1,"timestamp":1}"#;
        let doc: ShadowDocument = serde_json::from_str(text).unwrap();
        assert_eq!(doc.rejection, None);
        assert!(!serde_json::to_string(&doc).unwrap().contains("rejection"));
        let mut doc = doc;
        doc.desired_generation = 2;
        doc.apply_rejection(&request(2, "no"), 5).unwrap();
        let back: ShadowDocument =
            serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        const SEEDS: [&str; 3] = [
            r#"{"desiredGeneration":3,"code":"out_of_range","message":"speed 9000 is above 6000"}"#,
            r#"{"desiredGeneration":3,"code":"busy","clientToken":"t-1"}"#,
            r#"{"desiredGeneration":2,"code":"x","message":null}"#,
        ];

        proptest! {
            /// Arbitrary and mutated payloads: never a panic; what is accepted obeys the field
            /// rules; a refusal's text stays short; a refused request leaves the document as
            /// it was, and an accepted one changes it by exactly one version.
            #[test]
            fn fuzz_reject_requests(
                payload in crate::fuzzing::bytes(SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect()),
            ) {
                let limits = Limits::default();
                let mut doc = ShadowDocument { desired_generation: 3, version: 9, ..Default::default() };
                let before = doc.clone();
                match RejectRequest::parse(&payload, &limits) {
                    Err(e) => prop_assert!(e.to_string().len() <= 1024, "{}", e),
                    Ok(req) => {
                        prop_assert!(check_fields(req.desired_generation, &req.code, &req.message).is_ok());
                        match doc.apply_rejection(&req, 1) {
                            Ok(changed) => {
                                prop_assert!(changed);
                                prop_assert_eq!(doc.version, 10);
                                prop_assert!(doc.rejection.as_ref().is_some_and(|r| r.check().is_ok()));
                            }
                            Err(_) => prop_assert_eq!(&doc, &before),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn checked_fields_from_the_wire() {
        let ok = Rejection {
            desired_generation: 2,
            code: "busy".into(),
            message: String::new(),
            timestamp: 1,
        };
        assert!(ok.check().is_ok());
        for bad in [
            Rejection {
                desired_generation: 0,
                ..ok.clone()
            },
            Rejection {
                code: "Busy".into(),
                ..ok.clone()
            },
            Rejection {
                message: "m".repeat(300),
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
