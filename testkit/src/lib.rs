//! Servitor's test doubles, wire-faithful and local: a [`gitlab`] stand-in
//! that speaks the runner API (and git's smart HTTP) over HTTP, an [`imds`]
//! stand-in that speaks IMDSv2, [`iid`] identity documents signed by a test
//! key, a container [`registry`] behind Basic
//! authentication, and the job [`image`] built from the host's
//! busybox because no registry is reachable.
//!
//! Used by the unit tests of the production crates (as a dev-dependency),
//! the end-to-end tests and the demo. Never a dependency of a production
//! crate: the installed coordinator and agent carry no stand-in.

#![forbid(unsafe_code)]

pub mod gitlab;
pub mod iid;
pub mod image;
pub mod imds;
pub mod registry;
pub mod task_metadata;

use std::time::Duration;

/// Serves `router` on `listener` in the background until `stop` is
/// cancelled; `what` names the stand-in in the warning if serving fails.
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: &tokio_util::sync::CancellationToken,
    what: &'static str,
) {
    let stopped = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::warn!(error = %e, "{what} stopped serving");
        }
    });
}

/// How often [`wait_until`] looks again.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// What a test waited for did not happen in time.
#[derive(Debug, thiserror::Error)]
#[error("{what} did not happen within {timeout:?}")]
pub struct NotInTime {
    pub what: String,
    pub timeout: Duration,
}

/// Waits until `check` holds, looking every 50 ms, for at most `timeout`:
/// for events a test can only observe, not subscribe to (a log line, a
/// process state, a counter). Fails naming `what`.
///
/// # Errors
/// [`NotInTime`]: `check` did not hold within `timeout`.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<(), NotInTime> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return Err(NotInTime {
                what: what.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
    Ok(())
}
