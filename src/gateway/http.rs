//! The HTTP layer under the routes: the connection loop (hyper HTTP/1.1 with graceful
//! shutdown), the limits on request heads and bodies, and the net that turns any error
//! response not already a problem document into one.
//!
//! hyper answers a request head over its own limits by itself, before any of this code runs,
//! with a bodiless `431`. So hyper's limits are set well above the gateway's
//! ([`HEADER_MAX_BYTES`], [`HEADERS_MAX`]), which [`limit_headers`] enforces with a
//! `431` problem document; only a head over hyper's ceiling ([`HEAD_CEILING_BYTES`],
//! [`HEADERS_CEILING`]) still gets hyper's bare answer.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::problem::{PROBLEM_JSON, Problem, ProblemKind};
use super::routes::BODY_MAX_BYTES;

/// Largest request head the gateway reads, in bytes: the sum over the header fields of
/// name + value + 4 (`": "` and CRLF). Bearer tokens, `Idempotency-Key` and `Prefer` fit
/// many times over; more is refused with a `431` problem document.
pub const HEADER_MAX_BYTES: usize = 16 * 1024;
/// Most header fields in one request; more are refused with a `431` problem document.
pub const HEADERS_MAX: usize = 100;
/// hyper's own limit on a request head (start line included), in bytes: above it hyper
/// answers a bodiless `431` and closes the connection. Far above [`HEADER_MAX_BYTES`] so that
/// oversized heads normally reach [`limit_headers`]; it bounds a connection's read buffer.
pub const HEAD_CEILING_BYTES: usize = 256 * 1024;
/// hyper's own limit on the number of header fields (bodiless `431` above it); above
/// [`HEADERS_MAX`] for the same reason.
pub const HEADERS_CEILING: usize = 256;
/// Longest wait for a request head, from the start of the connection or the end of the
/// previous request: a client that sends nothing (or too slowly) is disconnected without an
/// answer, so idle and slow-loris connections cannot pile up.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a request body (at most [`BODY_MAX_BYTES`]) once the head is read; then
/// the answer is `408`.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown` resolves, then finishes the requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let address = listener.local_addr().context("reading the listening address")?;
    tracing::info!(%address, "gateway listening");
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(HEAD_CEILING_BYTES)
        .max_headers(HEADERS_CEILING);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Refuses requests whose header fields are over [`HEADER_MAX_BYTES`] or [`HEADERS_MAX`]
/// with a `431` problem document (before anything reads them).
pub(super) async fn limit_headers(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    if headers.len() > HEADERS_MAX || bytes > HEADER_MAX_BYTES {
        let detail = format!(
            "the request has {} header fields of {bytes} bytes; at most {HEADERS_MAX} fields \
             of {HEADER_MAX_BYTES} bytes in all are accepted",
            headers.len()
        );
        return Problem::new(ProblemKind::HeadersTooLarge, detail).into_response();
    }
    next.run(request).await
}

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFailure {
    /// Not all of it came within the timeout.
    TimedOut,
    /// Over the limit (declared or sent).
    TooLarge,
    /// The connection failed while it was read.
    Broken,
}

/// Reads the request body within [`BODY_READ_TIMEOUT`] and at most [`BODY_MAX_BYTES`], so
/// that a slow or oversized body is a problem document (`408`, `413`) and never holds a
/// handler; the handler gets the buffered body.
pub(super) async fn read_body(request: Request, next: Next) -> Response {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > BODY_MAX_BYTES as u64) {
        return body_problem(BodyFailure::TooLarge);
    }
    let (parts, body) = request.into_parts();
    match buffer(body, BODY_MAX_BYTES, BODY_READ_TIMEOUT).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(failure) => body_problem(failure),
    }
}

/// The whole of `body`, if it is at most `limit_bytes` and arrives within `timeout`.
async fn buffer(body: Body, limit_bytes: usize, timeout: Duration) -> Result<Bytes, BodyFailure> {
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buffered: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| BodyFailure::Broken)?;
            if buffered.len().saturating_add(chunk.len()) > limit_bytes {
                return Err(BodyFailure::TooLarge);
            }
            buffered.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buffered))
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(BodyFailure::TimedOut))
}

fn body_problem(failure: BodyFailure) -> Response {
    let problem = match failure {
        BodyFailure::TimedOut => Problem::new(
            ProblemKind::RequestTimeout,
            format!("the body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
        ),
        BodyFailure::TooLarge => {
            Problem::new(ProblemKind::BodyTooLarge, format!("the body is over the {BODY_MAX_BYTES}-byte limit"))
        }
        BodyFailure::Broken => Problem::new(ProblemKind::InvalidBody, "the body could not be read"),
    };
    problem.into_response()
}

/// The safety net: an error response (4xx, 5xx) that is not already a problem document —
/// one made by axum or a layer rather than by the gateway's handlers — becomes one, with the
/// same status and headers (`Allow`, `Retry-After`…) and `type` `about:blank` (RFC 9457 §4.2.1).
pub(super) async fn problem_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    tracing::debug!(%status, "an error response of the HTTP layer became a problem document");
    let (mut parts, _) = response.into_parts();
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("the body is over the {BODY_MAX_BYTES}-byte limit"),
        _ => format!("the HTTP layer answered {status}"),
    };
    let problem = Problem::new(ProblemKind::Http(status), detail).into_response();
    let (problem_parts, body) = problem.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    for (name, value) in &problem_parts.headers {
        if !parts.headers.contains_key(name) {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_are_bounded_in_size_and_time() {
        let small = Body::from("{\"amount\":\"1\"}");
        assert_eq!(buffer(small, 64, Duration::from_secs(1)).await, Ok(Bytes::from_static(b"{\"amount\":\"1\"}")));
        let exact = Body::from(vec![b'x'; 64]);
        assert_eq!(buffer(exact, 64, Duration::from_secs(1)).await.map(|b| b.len()), Ok(64));
        let large = Body::from(vec![b'x'; 65]);
        assert_eq!(buffer(large, 64, Duration::from_secs(1)).await, Err(BodyFailure::TooLarge));
        let stalled = Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        assert_eq!(buffer(stalled, 64, Duration::from_millis(20)).await, Err(BodyFailure::TimedOut));
        let broken = Body::from_stream(futures_util::stream::iter([Err::<Bytes, _>(std::io::Error::other("reset"))]));
        assert_eq!(buffer(broken, 64, Duration::from_secs(1)).await, Err(BodyFailure::Broken));
        let timed_out = body_problem(BodyFailure::TimedOut);
        assert_eq!(timed_out.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(timed_out.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[tokio::test]
    async fn other_error_responses_become_problem_documents() {
        let plain = (StatusCode::IM_A_TEAPOT, [(header::RETRY_AFTER, "7")], "short and stout").into_response();
        let converted = problem_errors(plain).await;
        assert_eq!(converted.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(converted.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(converted.headers()[header::RETRY_AFTER], "7", "the layer's own headers are kept");
        let body = axum::body::to_bytes(converted.into_body(), 4096).await.unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "about:blank");
        assert_eq!(json["status"], 418);
        assert_eq!(json["title"], "I'm a teapot");

        let untouched = problem_errors(Problem::new(ProblemKind::NoSuchRoute, "no route").into_response()).await;
        let body = axum::body::to_bytes(untouched.into_body(), 4096).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("no-such-route"));
        let ok = problem_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(ok.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }
}
