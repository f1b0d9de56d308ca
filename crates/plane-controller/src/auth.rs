//! Authentication of the control API (`/ctrl/*`); `/pub/*` is never authenticated.
//!
//! Two mechanisms, each optional, checked in this order:
//!
//! 1. **Bearer token** (`--ctrl-token`): a request whose `Authorization: Bearer <token>`
//!    matches is let through. Drones, proxies, DNS servers and the CLI send it. The
//!    comparison takes the same time wherever the first difference is.
//! 2. **Forward auth** (`--forward-auth <url>`, Plane-compatible): the request's method,
//!    headers (not its body) and path with query are sent to the auth service — the
//!    path and query appended to the URL's own path, the original URI also in
//!    `x-forwarded-uri` and the method in `x-forwarded-method`. A 2xx answer lets the
//!    request through; a 403 is answered 403, any other answer 401. An auth service that
//!    cannot be reached is a 502, never a pass.
//!
//! With neither configured, the control API is open (as in Plane 0.5, where it is meant
//! to be reachable only from a trusted network). With only a token, requests without it
//! get 401.

use crate::error::HttpError;
use crate::state::Controller;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use plane_types::api::ApiErrorKind;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// The longest a forward-auth check may take.
const FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The forward-auth service and the client that calls it.
#[derive(Clone, Debug)]
pub struct ForwardAuth {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl ForwardAuth {
    /// Checks requests against `url` (http or https). `extra_root_pem`: a CA certificate
    /// (PEM) to trust besides the public roots, for an auth service with a private CA.
    pub fn new(url: &str, extra_root_pem: Option<&[u8]>) -> anyhow::Result<ForwardAuth> {
        let url: reqwest::Url = url
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid forward-auth URL {url:?}: {e}"))?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https"),
            "the forward-auth URL must be http or https, not {:?}",
            url.scheme()
        );
        let mut builder = reqwest::Client::builder()
            .timeout(FORWARD_AUTH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = extra_root_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| anyhow::anyhow!("invalid forward-auth CA certificate: {e}"))?;
            anyhow::ensure!(!certs.is_empty(), "the forward-auth CA file holds no PEM certificate");
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(ForwardAuth {
            url,
            client: builder.build()?,
        })
    }

    /// The auth service's verdict on a request with this method, URI and headers.
    async fn check(&self, method: &axum::http::Method, uri: &axum::http::Uri, headers: &HeaderMap) -> Verdict {
        let mut url = self.url.clone();
        let path = format!("{}{}", url.path().trim_end_matches('/'), uri.path());
        url.set_path(&path);
        let query = match (self.url.query(), uri.query()) {
            (Some(own), Some(theirs)) => Some(format!("{own}&{theirs}")),
            (own, theirs) => own.or(theirs).map(str::to_owned),
        };
        url.set_query(query.as_deref());
        let mut req = self.client.request(method.clone(), url);
        for (name, value) in headers {
            // The caller must not choose what the auth service reads as the request.
            if !is_hop_header(name) && !is_forwarding_header(name) {
                req = req.header(name, value);
            }
        }
        let original = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        req = req
            .header("x-forwarded-uri", original)
            .header("x-forwarded-method", method.as_str());
        match req.send().await {
            Ok(resp) if resp.status().is_success() => Verdict::Allow,
            Ok(resp) if resp.status() == reqwest::StatusCode::FORBIDDEN => Verdict::Forbidden,
            Ok(resp) => {
                tracing::debug!(status = %resp.status(), "forward auth refused a request");
                Verdict::Unauthorized
            }
            Err(e) => {
                tracing::warn!(error = %e, url = %self.url, "cannot reach the forward-auth service");
                Verdict::Unreachable
            }
        }
    }
}

enum Verdict {
    Allow,
    Unauthorized,
    Forbidden,
    Unreachable,
}

/// Headers that describe the connection or the body, not the caller.
fn is_hop_header(name: &HeaderName) -> bool {
    [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::UPGRADE,
        header::TE,
        header::EXPECT,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("sec-websocket-key"),
        HeaderName::from_static("sec-websocket-version"),
        HeaderName::from_static("sec-websocket-extensions"),
    ]
    .contains(name)
}

/// Headers that describe the forwarded request itself; the controller sets them.
fn is_forwarding_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-forwarded-") || name.as_str() == "forwarded" || name.as_str() == "x-original-uri"
}

/// Whether `headers` carry `Authorization: Bearer <expected>`. Both sides are hashed
/// first, so the comparison's time does not depend on where they differ.
pub(crate) fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
    else {
        return false;
    };
    let (a, b) = (
        Sha256::digest(given.trim().as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(message: &str) -> Response {
    let mut resp = HttpError::new(StatusCode::UNAUTHORIZED, ApiErrorKind::Other, message).into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

/// The middleware on `/ctrl/*`.
pub(crate) async fn require(State(c): State<Arc<Controller>>, req: Request, next: Next) -> Response {
    let token = c.config.ctrl_token.as_deref();
    let forward = c.config.forward_auth.as_ref();
    if token.is_none() && forward.is_none() {
        return next.run(req).await;
    }
    if token.is_some_and(|t| bearer_matches(req.headers(), t)) {
        return next.run(req).await;
    }
    let Some(forward) = forward else {
        return unauthorized("this control API needs a bearer token (Authorization: Bearer <ctrl token>)");
    };
    match forward.check(req.method(), req.uri(), req.headers()).await {
        Verdict::Allow => next.run(req).await,
        Verdict::Unauthorized => unauthorized("the auth service refused this request"),
        Verdict::Forbidden => HttpError::new(
            StatusCode::FORBIDDEN,
            ApiErrorKind::Other,
            "the auth service forbids this request",
        )
        .into_response(),
        Verdict::Unreachable => HttpError::new(
            StatusCode::BAD_GATEWAY,
            ApiErrorKind::Other,
            "the auth service cannot be reached",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(bearer_matches(&with_auth("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(&with_auth("bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cretx"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
    }

    #[test]
    fn forward_auth_urls_must_be_http_or_https() {
        assert!(ForwardAuth::new("https://auth.example/check", None).is_ok());
        assert!(ForwardAuth::new("http://127.0.0.1:1/", None).is_ok());
        assert!(ForwardAuth::new("ftp://auth.example/", None).is_err());
        assert!(ForwardAuth::new("not a url", None).is_err());
        assert!(ForwardAuth::new("https://auth.example/", Some(b"garbage")).is_err());
    }
}
