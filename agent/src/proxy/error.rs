//! The one error type of the request path. Each refusal knows its status code, the reason the
//! client reads and the label it is counted under; `fail_to_proxy` is the one place that turns
//! it into a response and counts it.

use std::{net::SocketAddr, sync::Arc};

use http::{Response, StatusCode};

use super::{body::ProxyBody, h1::head::FramingError};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A request framed in a way two parsers could read differently (RFC 9112): refused
    /// before a byte of it reaches an upstream.
    #[error("{0}")]
    Malformed(FramingError),
    #[error("no mesh service for this request (unknown destination and Host)")]
    NoService,
    /// The connection's service left the configuration while the connection was open.
    #[error("unknown service `{0}`")]
    UnknownService(Arc<str>),
    #[error(
        "no ready endpoint for {service}/{version} (release {release}); not sent to another version"
    )]
    NoEndpoint {
        service: Arc<str>,
        version: Arc<str>,
        release: Arc<str>,
    },
    #[error("{service}/{version} (release {release}) unreachable: {cause:#}")]
    Unreachable {
        service: Arc<str>,
        version: Arc<str>,
        release: Arc<str>,
        cause: anyhow::Error,
    },
    #[error("{endpoint} failed: {cause}")]
    UpstreamFailed {
        endpoint: SocketAddr,
        cause: hyper::Error,
    },
    #[error("{endpoint} did not answer in time")]
    Timeout { endpoint: SocketAddr },
    /// The client's request body broke off or was malformed: the client's failure, never
    /// counted against the version.
    #[error("the request body could not be read: {cause}")]
    ClientBody { cause: String },
    /// The client sent its request body slower than the service's request timeout.
    #[error("the request body did not arrive within the request timeout")]
    ClientTimeout,
    /// The upstream answered 101 to a request that asked for no upgrade.
    #[error("{endpoint} switched protocols unasked")]
    UnaskedUpgrade { endpoint: SocketAddr },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Malformed(framing) => {
                StatusCode::from_u16(framing.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ProxyError::NoService | ProxyError::UnknownService(_) => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoint { .. } | ProxyError::Unreachable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamFailed { .. } | ProxyError::UnaskedUpgrade { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `reason` label of `steer_request_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::Malformed(_) => "malformed_request",
            ProxyError::NoService => "no_service",
            ProxyError::UnknownService(_) => "unknown_service",
            ProxyError::NoEndpoint { .. } => "no_endpoint",
            ProxyError::Unreachable { .. } => "connect_failed",
            ProxyError::UpstreamFailed { .. } => "upstream_failed",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::ClientBody { .. } => "client_body",
            ProxyError::ClientTimeout => "client_timeout",
            ProxyError::UnaskedUpgrade { .. } => "unasked_upgrade",
        }
    }
}

/// The response for a request steer could not proxy, counted by reason.
pub fn fail_to_proxy(error: &ProxyError, metrics: &Metrics) -> Response<ProxyBody> {
    metrics.request_error(error.label());
    Response::builder()
        .status(error.status())
        .header("content-type", "text/plain; charset=utf-8")
        .body(ProxyBody::text(format!("steer: {error}\n")))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_status_and_label() {
        let name: Arc<str> = "restaurant".into();
        let cases = [
            (ProxyError::NoService, 404, "no_service"),
            (
                ProxyError::UnknownService(name.clone()),
                404,
                "unknown_service",
            ),
            (
                ProxyError::NoEndpoint {
                    service: name.clone(),
                    version: "v2".into(),
                    release: "red".into(),
                },
                503,
                "no_endpoint",
            ),
            (
                ProxyError::Timeout {
                    endpoint: "10.0.0.1:80".parse().unwrap(),
                },
                504,
                "timeout",
            ),
            (
                ProxyError::ClientBody {
                    cause: "invalid chunk size".into(),
                },
                400,
                "client_body",
            ),
            (ProxyError::ClientTimeout, 408, "client_timeout"),
            (
                ProxyError::Malformed(FramingError::UnknownCoding),
                501,
                "malformed_request",
            ),
            (
                ProxyError::UnaskedUpgrade {
                    endpoint: "10.0.0.1:80".parse().unwrap(),
                },
                502,
                "unasked_upgrade",
            ),
        ];
        for (error, status, label) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.label(), label);
        }
        let metrics = Metrics::default();
        let response = fail_to_proxy(&ProxyError::NoService, &metrics);
        assert_eq!(response.status(), 404);
        assert!(
            metrics
                .encode()
                .contains(r#"steer_request_errors_total{reason="no_service"} 1"#)
        );
    }
}
