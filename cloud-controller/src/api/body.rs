//! Request bodies: the global budget of bytes held at once (reserved before reading), and the
//! read itself with its deadline, size limit and gzip decoding.

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};

use super::{ApiError, AppState};

/// Reserves room for the request's body in the global budget: its Content-Length, or the
/// largest body allowed when it is not declared. Released when the request is answered.
pub(super) fn reserve_body(
    s: &AppState,
    headers: &HeaderMap,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let max = s.opts.max_body_bytes.min(s.opts.max_body_bytes_in_flight);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // A declared length over the limit is refused by the read itself (413); reserve the cap.
    let bytes = declared.map_or(max, |n| n.min(max)).max(1);
    let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
    Arc::clone(&s.bodies)
        .try_acquire_many_owned(bytes)
        .map_err(|_| {
            s.metrics.shed("body_budget");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the controller holds as many request bodies as --max-body-bytes-in-flight allows; retry later",
            )
            .retry_after(Duration::from_secs(1))
        })
}

/// Reads the body (gzip-decoded when so marked) within `deadline`, refusing more than `max`
/// bytes either way.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    max: usize,
    deadline: Duration,
) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is larger than {max} bytes: send fewer reports per batch"),
        )
    };
    let raw = match tokio::time::timeout(deadline, axum::body::to_bytes(body, max)).await {
        Ok(read) => read.map_err(|_| too_large())?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            ));
        }
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(&raw[..])
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("bad gzip body: {e}"),
            )
        })?;
    if out.len() > max {
        return Err(too_large());
    }
    Ok(out)
}
