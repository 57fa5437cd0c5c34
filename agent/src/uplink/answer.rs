//! What the controller's answer to a batch means: one pure classification of HTTP answers
//! (retry, send smaller, or wait for a person) and of a 2xx's per-report results.

use std::collections::HashMap;
use std::time::Duration;

use edgesync_protocol::wire::{ReportBatchResponse, ReportStatus};

/// What became of one batch.
#[derive(Debug)]
pub enum Outcome {
    /// 2xx: this many (device, version) pairs are done (durable, stale or rejected).
    Acked {
        covered: usize,
        /// A live answer: what its live state holds, awaiting a durable version.
        live: Option<LiveAccepted>,
        /// Versions the answer says are durable (from this batch or earlier ones).
        durable: Vec<(String, u64)>,
    },
    /// Transport error, timeout, 408, 429 or 5xx: try again later.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// 413: the batch was too large; send smaller ones.
    TooLarge,
    /// 401/403, 409 (a superseded epoch), other 4xx: a person must fix something; retry
    /// slowly.
    Refused { status: u16, body: String },
}

impl Outcome {
    /// What an operator should check, for a refusal's log line.
    pub fn hint(status: u16) -> &'static str {
        match status {
            401 | 403 => "check cloud.url, cloud.token_file and the EdgeNode's tokenSecretRef",
            409 => {
                "another agent database reports for this node now (the message says what to \
                 do); nothing pending here is dropped"
            }
            _ => "the message says why",
        }
    }
}

/// The reports a live answer accepted: applied to the live state named `id`, not yet
/// durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAccepted {
    /// The live state's identity.
    pub id: String,
    /// (device, version) pairs it holds.
    pub accepted: Vec<(String, u64)>,
}

/// Classifies an HTTP answer: its parsed results on a 2xx, otherwise what to do.
/// `retry_after` is the `Retry-After` header (seconds; an HTTP date is ignored).
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<ReportBatchResponse, Outcome> {
    let excerpt = |max: usize| String::from_utf8_lossy(&body[..body.len().min(max)]).into_owned();
    match status {
        200..=299 => serde_json::from_slice(body).map_err(|e| Outcome::Retry {
            after: None,
            reason: format!("unreadable 2xx answer: {e}"),
        }),
        408 | 429 | 500..=599 => Err(Outcome::Retry {
            after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
            reason: format!("HTTP {status}: {}", excerpt(512)),
        }),
        413 => Err(Outcome::TooLarge),
        _ => Err(Outcome::Refused {
            status,
            body: excerpt(1024),
        }),
    }
}

/// One report the controller settled for good.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub device: String,
    /// Never newer than the version sent.
    pub version: u64,
    pub status: ReportStatus,
    pub reason: Option<String>,
}

/// The reports of `sent` that `resp` settles: results for devices not sent are ignored, and a
/// result never covers a newer version than the one sent.
pub fn settled(sent: &[(String, u64)], resp: ReportBatchResponse) -> Vec<Done> {
    let sent: HashMap<&str, u64> = sent.iter().map(|(d, v)| (d.as_str(), *v)).collect();
    resp.results
        .into_iter()
        .filter_map(|r| {
            let &v = sent.get(r.device.as_str())?;
            Some(Done {
                version: r.version.min(v),
                device: r.device,
                status: r.status,
                reason: r.reason,
            })
        })
        .collect()
}

/// A 2xx answer, sorted: what leaves the outbox, and what a live state holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Sorted {
    /// Reports settled for good (stale, rejected; accepted when answered durably).
    pub done: Vec<Done>,
    /// Reports a live answer accepted: they stay in the outbox until a durable version
    /// covers them.
    pub live: Option<LiveAccepted>,
    /// Versions the answer says are durable: each removes its device's rows up to it.
    pub durable: Vec<(String, u64)>,
}

/// Sorts the answer to a batch that carried `sent` (see [`settled`]).
pub fn sort(sent: &[(String, u64)], mut resp: ReportBatchResponse) -> Sorted {
    let durable = std::mem::take(&mut resp.durable)
        .into_iter()
        .map(|d| (d.device, d.version))
        .collect();
    let Some(id) = resp.live.take() else {
        return Sorted {
            done: settled(sent, resp),
            live: None,
            durable,
        };
    };
    let (accepted, done): (Vec<Done>, Vec<Done>) = settled(sent, resp)
        .into_iter()
        .partition(|d| d.status == ReportStatus::Accepted);
    Sorted {
        done,
        live: Some(LiveAccepted {
            id,
            accepted: accepted
                .into_iter()
                .map(|d| (d.device, d.version))
                .collect(),
        }),
        durable,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn http_answers_are_classified() {
        let ok = br#"{"seq":1,"results":[]}"#;
        assert!(classify(200, None, ok).unwrap().results.is_empty());
        assert!(matches!(
            classify(200, None, b"<html>"),
            Err(Outcome::Retry { after: None, .. })
        ));
        for status in [408, 429, 500, 503, 599] {
            assert!(
                matches!(classify(status, Some(" 7 "), b""), Err(Outcome::Retry { after: Some(d), .. }) if d == Duration::from_secs(7)),
                "{status}"
            );
        }
        assert!(matches!(
            classify(503, Some("Wed, 21 Oct 2026 07:28:00 GMT"), b""),
            Err(Outcome::Retry { after: None, .. })
        ));
        assert!(matches!(classify(413, None, b""), Err(Outcome::TooLarge)));
        for status in [400, 401, 403, 404, 409, 301] {
            assert!(
                matches!(classify(status, None, b"why"), Err(Outcome::Refused { status: s, ref body }) if s == status && body == "why"),
                "{status}"
            );
        }
        let long = vec![b'x'; 5000];
        let Err(Outcome::Retry { reason, .. }) = classify(500, None, &long) else {
            panic!("500 is retried");
        };
        assert!(reason.len() < 600, "the reason quotes at most 512 bytes");
    }

    #[test]
    fn a_live_answer_keeps_accepted_reports_and_durable_versions_end_any() {
        let resp: ReportBatchResponse = serde_json::from_str(
            r#"{"seq":3,"live":"c0ffee","results":[
                {"device":"a","version":5,"status":"accepted"},
                {"device":"b","version":2,"status":"stale"}],
                "durable":[{"device":"z","version":7},{"device":"a","version":4}]}"#,
        )
        .unwrap();
        let sent = [("a".to_owned(), 5), ("b".to_owned(), 2)];
        let sorted = sort(&sent, resp);
        assert_eq!(sorted.done.len(), 1);
        assert_eq!(sorted.done[0].device, "b");
        assert_eq!(
            sorted.live,
            Some(LiveAccepted {
                id: "c0ffee".into(),
                accepted: vec![("a".into(), 5)],
            })
        );
        // A durable version may name a device this batch did not carry.
        assert_eq!(sorted.durable, [("z".into(), 7), ("a".into(), 4)]);

        // A durable answer (a controller without live answers) settles accepted reports.
        let resp: ReportBatchResponse = serde_json::from_str(
            r#"{"seq":3,"results":[{"device":"a","version":5,"status":"accepted"}]}"#,
        )
        .unwrap();
        let sorted = sort(&sent, resp);
        assert_eq!(
            (sorted.done.len(), sorted.live, sorted.durable.len()),
            (1, None, 0)
        );
    }

    #[test]
    fn results_settle_only_what_was_sent_and_never_a_newer_version() {
        let resp: ReportBatchResponse = serde_json::from_str(
            r#"{"seq":1,"results":[
                {"device":"a","version":5,"status":"accepted"},
                {"device":"b","version":9,"status":"stale"},
                {"device":"c","version":1,"status":"accepted"},
                {"device":"d","version":2,"status":"rejected","reason":"too large"}]}"#,
        )
        .unwrap();
        let sent = [
            ("a".to_owned(), 5),
            ("b".to_owned(), 3),
            ("d".to_owned(), 2),
        ];
        let done = settled(&sent, resp);
        let pairs: Vec<(&str, u64)> = done
            .iter()
            .map(|d| (d.device.as_str(), d.version))
            .collect();
        assert_eq!(pairs, [("a", 5), ("b", 3), ("d", 2)], "c was never sent");
        assert_eq!(done[2].reason.as_deref(), Some("too large"));
    }
}
