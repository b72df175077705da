//! What can go wrong reading instance metadata, and whether trying again can
//! help.
//!
//! Not responsible for retrying: the watcher and the agent's startup decide
//! that from [`ImdsError::is_retryable`].

/// A failure to read the instance metadata service.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// The configured endpoint is not a URL the client can use.
    #[error(
        "imds_endpoint {endpoint:?} is not usable ({detail}); give a URL such as http://169.254.169.254"
    )]
    InvalidEndpoint { endpoint: String, detail: String },
    /// Nothing answered at the endpoint, or it did not answer in time.
    #[error(
        "instance metadata not reachable at {endpoint} ({detail}): on EC2 check the instance's \
         metadata options (IMDSv2, hop limit 2 for containers); elsewhere set imds_endpoint"
    )]
    Unreachable { endpoint: String, detail: String },
    /// The service answered the session token request, but gave no usable
    /// token: it refused (metadata turned off), or it does not speak IMDSv2.
    #[error(
        "instance metadata at {endpoint} gave no IMDSv2 session token ({detail}); on EC2 turn the \
         metadata service on (HttpEndpoint enabled in the instance's metadata options); elsewhere \
         point imds_endpoint at an IMDSv2 server"
    )]
    Token {
        endpoint: String,
        detail: String,
        /// True when the answer looked like a passing fault (such as a
        /// server error) rather than a refusal.
        transient: bool,
    },
    /// A metadata read got an HTTP status that is neither success nor the
    /// 404 that means "no such notice".
    #[error("instance metadata at {endpoint} answered HTTP {status} for {path}; {}", status_hint(*.status))]
    Status {
        endpoint: String,
        path: &'static str,
        status: u16,
    },
    /// An item every EC2 instance has was absent.
    #[error(
        "instance metadata at {endpoint} has no {path} (404); is imds_endpoint an EC2 instance \
         metadata service?"
    )]
    Missing {
        endpoint: String,
        path: &'static str,
    },
    /// A payload did not have the documented shape.
    #[error("instance metadata at {endpoint} returned a {path} the agent cannot read: {detail}")]
    Malformed {
        endpoint: String,
        path: &'static str,
        detail: String,
    },
}

/// HTTP 401: the session token was not accepted.
const HTTP_UNAUTHORIZED: u16 = 401;
/// HTTP 403: the metadata service is turned off for this instance.
const HTTP_FORBIDDEN: u16 = 403;
/// HTTP 429: IMDS throttles each instance's queries.
const HTTP_TOO_MANY_REQUESTS: u16 = 429;

fn status_hint(status: u16) -> &'static str {
    match status {
        HTTP_UNAUTHORIZED => "the session token was refused even after a fresh one was fetched",
        HTTP_FORBIDDEN => "the metadata service is turned off; enable HttpEndpoint in the instance's metadata options",
        HTTP_TOO_MANY_REQUESTS => "the metadata service is throttling this instance; it is polled again later",
        s if s >= 500 => "the metadata service failed; it is polled again later",
        _ => "this is not a documented answer for that path",
    }
}

impl ImdsError {
    /// Whether asking again later may succeed. False for what only a change
    /// of configuration or of the instance's metadata options can fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            ImdsError::Unreachable { .. } => true,
            ImdsError::Token { transient, .. } => *transient,
            ImdsError::Status { status, .. } => {
                *status == HTTP_UNAUTHORIZED || *status == HTTP_TOO_MANY_REQUESTS || *status >= 500
            }
            ImdsError::InvalidEndpoint { .. }
            | ImdsError::Missing { .. }
            | ImdsError::Malformed { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> ImdsError {
        ImdsError::Status {
            endpoint: "http://127.0.0.1:1".into(),
            path: "/latest/meta-data/instance-id",
            status,
        }
    }

    #[test]
    fn retryable_statuses() {
        for (code, retryable) in [
            (401, true),
            (403, false),
            (400, false),
            (429, true),
            (500, true),
            (503, true),
        ] {
            assert_eq!(status(code).is_retryable(), retryable, "HTTP {code}");
        }
    }

    #[test]
    fn unreachable_message_names_the_fix() {
        let e = ImdsError::Unreachable {
            endpoint: "http://169.254.169.254".into(),
            detail: "connection refused".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("not reachable at http://169.254.169.254"),
            "{text}"
        );
        assert!(text.contains("hop limit 2"), "{text}");
        assert!(text.contains("imds_endpoint"), "{text}");
        assert!(e.is_retryable());
    }
}
