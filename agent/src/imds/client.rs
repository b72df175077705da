//! [`Imds`]: the real [`InstanceMetadata`], over the AWS SDK's IMDSv2 client
//! (`aws_config::imds::Client`), with timeouts sized for polling and the
//! payloads turned into the agent's types.
//!
//! Not responsible for polling or for retrying across polls: one call makes
//! one read of each path it needs (plus a fresh session when the token is
//! refused) and reports what it got.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_config::imds::client::error::{ImdsError as SdkImdsError, TokenError};
use aws_config::imds::Client;
use serde::Deserialize;

use super::error::ImdsError;
use super::{InstanceFacts, InstanceMetadata, Market, Notices, SpotAction};
use servitor_proto::imds as paths;

/// One attempt per request. A failed poll is repeated by the watcher two
/// seconds later, sooner than the SDK's own retry backoff (up to 1 s, then
/// 2 s) would repeat it inside the poll; and an SDK retry of a refused token
/// reuses the cached token, so [`Imds`] starts a new session itself.
const MAX_ATTEMPTS: u32 = 1;
/// IMDS is link-local and answers in well under a millisecond on EC2; a
/// connection that takes longer than this is not going to come.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on one request, including the token `PUT` when the session needs
/// one. A poll makes at most two requests per path in sequence (the second
/// only after a refused token), all paths at once, so a poll takes at most
/// two of these: the watcher's two-second interval.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest IMDS allows (21600 s): fewer token requests. The SDK renews
/// the token two minutes before it runs out.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// Where the SDK goes when neither the configuration nor its environment
/// variable names an endpoint; used only to name the endpoint in messages.
const SDK_DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// The SDK's environment variable for the endpoint, read here only to name
/// the endpoint in messages.
const SDK_ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";
/// HTTP status meaning "no such item" (for notices: "no notice").
const HTTP_NOT_FOUND: u16 = 404;
/// HTTP status for a refused session token.
const HTTP_UNAUTHORIZED: u16 = 401;

/// The instance metadata service, read over IMDSv2.
///
/// The session token is cached by the SDK client. When the service refuses
/// it before its time (the service restarted, or the instance was stopped
/// and started), the client is replaced, which fetches a new token.
#[derive(Debug)]
pub struct Imds {
    /// The endpoint from the configuration; `None` leaves it to the SDK.
    endpoint: Option<String>,
    /// The endpoint as messages name it.
    label: String,
    session: Mutex<Session>,
}

#[derive(Debug)]
struct Session {
    /// Counts replacements, so concurrent reads that all saw the same
    /// refused token replace the client once.
    generation: u64,
    client: Client,
}

impl Imds {
    /// A client for `endpoint` (such as `http://169.254.169.254`), or, with
    /// `None`, wherever the SDK's own resolution points: the
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT` variable, the AWS profile, or
    /// the IPv4 link-local address. Nothing is contacted yet.
    ///
    /// # Errors
    /// [`ImdsError::InvalidEndpoint`] when `endpoint` is not an `http://` or
    /// `https://` URL.
    pub fn new(endpoint: Option<&str>) -> Result<Self, ImdsError> {
        if let Some(endpoint) = endpoint {
            let has_scheme = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !has_scheme {
                return Err(ImdsError::InvalidEndpoint {
                    endpoint: endpoint.to_owned(),
                    detail: "it does not start with http:// or https://".to_owned(),
                });
            }
        }
        let client = build_client(endpoint)?;
        let label = match endpoint {
            Some(endpoint) => endpoint.to_owned(),
            None => std::env::var(SDK_ENDPOINT_ENV).unwrap_or_else(|_| SDK_DEFAULT_ENDPOINT.into()),
        };
        Ok(Self {
            endpoint: endpoint.map(str::to_owned),
            label,
            session: Mutex::new(Session {
                generation: 0,
                client,
            }),
        })
    }

    /// The endpoint as messages name it.
    pub fn endpoint(&self) -> &str {
        &self.label
    }

    fn current(&self) -> (u64, Client) {
        let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        (session.generation, session.client.clone())
    }

    /// Replaces the client unless another read already did since `seen`.
    fn renew(&self, seen: u64) -> Result<(), ImdsError> {
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        if session.generation == seen {
            session.client = build_client(self.endpoint.as_deref())?;
            session.generation += 1;
        }
        Ok(())
    }

    /// Reads `path`; `Ok(None)` on 404.
    async fn read(&self, path: &'static str) -> Result<Option<String>, ImdsError> {
        let (generation, client) = self.current();
        match client.get(path).await {
            Err(e) if status_of(&e) == Some(HTTP_UNAUTHORIZED) => {
                tracing::debug!(
                    path,
                    "instance metadata refused the session token; starting a new session"
                );
                self.renew(generation)?;
                let (_, client) = self.current();
                self.outcome(path, client.get(path).await)
            }
            result => self.outcome(path, result),
        }
    }

    /// The instance identity document, byte for byte as served, and its
    /// RSA-2048 PKCS#7 signature: the proof enrollment by instance
    /// identity sends.
    ///
    /// # Errors
    /// When either cannot be read.
    pub async fn identity(&self) -> Result<servitor_proto::agent::AwsIdentity, ImdsError> {
        let missing = |path| ImdsError::Missing {
            endpoint: self.label.clone(),
            path,
        };
        let (document, rsa2048) = tokio::try_join!(
            self.read(paths::IDENTITY_DOCUMENT),
            self.read(paths::IDENTITY_RSA2048),
        )?;
        Ok(servitor_proto::agent::AwsIdentity {
            document: document.ok_or_else(|| missing(paths::IDENTITY_DOCUMENT))?,
            rsa2048: rsa2048.ok_or_else(|| missing(paths::IDENTITY_RSA2048))?,
        })
    }

    /// Reads `path`, which every EC2 instance has.
    async fn read_required(&self, path: &'static str) -> Result<String, ImdsError> {
        match self.read(path).await? {
            Some(body) => Ok(body.trim().to_owned()),
            None => Err(ImdsError::Missing {
                endpoint: self.label.clone(),
                path,
            }),
        }
    }

    fn outcome(
        &self,
        path: &'static str,
        result: Result<aws_config::imds::client::SensitiveString, SdkImdsError>,
    ) -> Result<Option<String>, ImdsError> {
        match result {
            Ok(body) => Ok(Some(String::from(body))),
            Err(e) => match status_of(&e) {
                Some(HTTP_NOT_FOUND) => Ok(None),
                Some(status) => Err(ImdsError::Status {
                    endpoint: self.label.clone(),
                    path,
                    status,
                }),
                None => Err(self.transport_error(e)),
            },
        }
    }

    /// Maps an SDK failure that carries no metadata answer.
    fn transport_error(&self, e: SdkImdsError) -> ImdsError {
        let endpoint = self.label.clone();
        let detail = error_chain(&e);
        match &e {
            // The token service answered, but not with a token.
            SdkImdsError::FailedToLoadToken(failed) if !failed.is_dispatch_failure() => {
                match find_token_error(&e) {
                    Some(token_error) => ImdsError::Token {
                        endpoint,
                        detail,
                        transient: !token_refused(token_error),
                    },
                    // A timeout or a broken answer on the token request.
                    None => ImdsError::Unreachable { endpoint, detail },
                }
            }
            _ => ImdsError::Unreachable { endpoint, detail },
        }
    }

    fn malformed(&self, path: &'static str, detail: String) -> ImdsError {
        ImdsError::Malformed {
            endpoint: self.label.clone(),
            path,
            detail,
        }
    }
}

impl InstanceMetadata for Imds {
    async fn instance_facts(&self) -> Result<InstanceFacts, ImdsError> {
        let (instance_id, instance_type, availability_zone, region, life_cycle) = tokio::try_join!(
            self.read_required(paths::INSTANCE_ID),
            self.read_required(paths::INSTANCE_TYPE),
            self.read_required(paths::AVAILABILITY_ZONE),
            self.read_required(paths::REGION),
            self.read_required(paths::LIFE_CYCLE),
        )?;
        Ok(InstanceFacts {
            instance_id,
            instance_type,
            availability_zone,
            region,
            market: Market::from_life_cycle(&life_cycle),
        })
    }

    async fn poll_notices(&self) -> Result<Notices, ImdsError> {
        let (spot, rebalance, state) = tokio::try_join!(
            self.read(paths::SPOT_ACTION),
            self.read(paths::REBALANCE),
            self.read(paths::TARGET_LIFECYCLE_STATE),
        )?;
        let spot_action = spot
            .map(|body| parse_spot_action(&body))
            .transpose()
            .map_err(|detail| self.malformed(paths::SPOT_ACTION, detail))?;
        let rebalance = rebalance
            .map(|body| parse_rebalance(&body))
            .transpose()
            .map_err(|detail| self.malformed(paths::REBALANCE, detail))?;
        let target_lifecycle_state = state
            .map(|body| body.trim().to_owned())
            .filter(|state| !state.is_empty());
        Ok(Notices {
            spot_action,
            rebalance,
            target_lifecycle_state,
        })
    }
}

fn build_client(endpoint: Option<&str>) -> Result<Client, ImdsError> {
    let mut builder = Client::builder()
        .max_attempts(MAX_ATTEMPTS)
        .token_ttl(TOKEN_TTL)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(REQUEST_TIMEOUT)
        .operation_attempt_timeout(REQUEST_TIMEOUT)
        .operation_timeout(REQUEST_TIMEOUT);
    if let Some(endpoint) = endpoint {
        builder = builder
            .endpoint(endpoint)
            .map_err(|e| ImdsError::InvalidEndpoint {
                endpoint: endpoint.to_owned(),
                detail: e.to_string(),
            })?;
    }
    Ok(builder.build())
}

/// The HTTP status of a metadata read that got an answer.
fn status_of(e: &SdkImdsError) -> Option<u16> {
    match e {
        SdkImdsError::ErrorResponse(response) => Some(response.response().status().as_u16()),
        _ => None,
    }
}

fn find_token_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TokenError> {
    let mut next = Some(e);
    while let Some(current) = next {
        if let Some(token_error) = current.downcast_ref::<TokenError>() {
            return Some(token_error);
        }
        next = current.source();
    }
    None
}

/// Whether the token service refused outright (HTTP 403: metadata turned
/// off; HTTP 400: a request it will never accept), as opposed to giving an
/// answer that was not a token (which a server error also produces). The
/// SDK keeps the kind private; its `Debug` form names it.
fn token_refused(e: &TokenError) -> bool {
    let kind = format!("{e:?}");
    kind.contains("Forbidden") || kind.contains("InvalidParameters")
}

/// The error and its sources, joined, for messages.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = source.source();
    }
    text
}

#[derive(Deserialize)]
struct RawSpotAction {
    action: String,
    time: String,
}

#[derive(Deserialize)]
struct RawRebalance {
    #[serde(rename = "noticeTime")]
    notice_time: String,
}

/// Parses `{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`.
fn parse_spot_action(body: &str) -> Result<SpotAction, String> {
    let raw: RawSpotAction = serde_json::from_str(body).map_err(|e| e.to_string())?;
    if raw.action.is_empty() {
        return Err("the action is empty".to_owned());
    }
    Ok(SpotAction {
        action: raw.action,
        time: parse_time(&raw.time)?,
    })
}

/// Parses `{"noticeTime": "2020-10-27T08:22:00Z"}`.
fn parse_rebalance(body: &str) -> Result<SystemTime, String> {
    let raw: RawRebalance = serde_json::from_str(body).map_err(|e| e.to_string())?;
    parse_time(&raw.notice_time)
}

fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(text).map_err(|e| format!("time {text:?} is not RFC 3339 UTC ({e})"))
}

/// Entry points of the fuzz targets (`fuzz/`): the metadata answers the
/// agent reads, with arbitrary text. Built only for fuzzing.
#[cfg(fuzzing)]
pub mod fuzzing {
    pub fn spot_action(body: &str) {
        let _ = super::parse_spot_action(body);
    }

    pub fn rebalance(body: &str) {
        let _ = super::parse_rebalance(body);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, UNIX_EPOCH};

    use super::*;
    use servitor_testkit::imds::{ImdsStandIn, InstanceSpec};

    /// Whole-poll bound the tests hold the client to (two requests' worth,
    /// with room for a loaded test machine).
    const FAIL_FAST: Duration = Duration::from_secs(3);

    fn spec() -> InstanceSpec {
        InstanceSpec {
            instance_id: "i-0abc1234def567890".into(),
            instance_type: "c6i.large".into(),
            zone: "eu-west-1b".into(),
            region: "eu-west-1".into(),
            life_cycle: "spot".into(),
        }
    }

    async fn stand_in() -> (ImdsStandIn, Imds) {
        let standin = ImdsStandIn::start(spec()).await.expect("stand-in starts");
        let imds = Imds::new(Some(&standin.url())).expect("valid endpoint");
        (standin, imds)
    }

    #[tokio::test]
    async fn facts_are_read() {
        let (standin, imds) = stand_in().await;
        let facts = imds.instance_facts().await.expect("facts");
        assert_eq!(
            facts,
            InstanceFacts {
                instance_id: "i-0abc1234def567890".into(),
                instance_type: "c6i.large".into(),
                availability_zone: "eu-west-1b".into(),
                region: "eu-west-1".into(),
                market: Market::Spot,
            }
        );
        assert_eq!(facts.market.as_str(), "spot");
        // One session for all five concurrent reads.
        assert_eq!(standin.token_puts(), 1);
    }

    #[tokio::test]
    async fn no_notices_are_all_none() {
        let (_standin, imds) = stand_in().await;
        assert_eq!(imds.poll_notices().await.expect("poll"), Notices::default());
    }

    #[tokio::test]
    async fn notices_are_read() {
        let (standin, imds) = stand_in().await;
        standin.set_spot_action("stop", Duration::from_secs(120));
        standin.set_rebalance();
        standin.set_target_lifecycle_state("Warmed:Stopped");
        let notices = imds.poll_notices().await.expect("poll");
        let spot = notices.spot_action.expect("spot action");
        assert_eq!(spot.action, "stop");
        let left = spot
            .time
            .duration_since(SystemTime::now())
            .expect("deadline ahead");
        // The wire time has whole seconds.
        assert!(
            left > Duration::from_secs(115) && left <= Duration::from_secs(120),
            "{left:?}"
        );
        let rebalance = notices.rebalance.expect("rebalance");
        let age = SystemTime::now()
            .duration_since(rebalance)
            .expect("notice in the past");
        assert!(age < Duration::from_secs(5), "{age:?}");
        assert_eq!(
            notices.target_lifecycle_state.as_deref(),
            Some("Warmed:Stopped")
        );

        standin.clear();
        assert_eq!(imds.poll_notices().await.expect("poll"), Notices::default());
    }

    #[tokio::test]
    async fn refused_token_starts_a_new_session() {
        let (standin, imds) = stand_in().await;
        imds.poll_notices().await.expect("first poll");
        assert_eq!(standin.token_puts(), 1);
        standin.expire_tokens();
        standin.set_target_lifecycle_state("InService");
        let notices = imds.poll_notices().await.expect("poll after expiry");
        assert_eq!(notices.target_lifecycle_state.as_deref(), Some("InService"));
        // The three concurrent reads were refused together and share the
        // new session.
        assert_eq!(standin.token_puts(), 2);
        imds.poll_notices().await.expect("later poll");
        assert_eq!(standin.token_puts(), 2);
    }

    #[tokio::test]
    async fn refused_port_fails_fast_and_is_retryable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").port()
        };
        let imds = Imds::new(Some(&format!("http://127.0.0.1:{port}"))).expect("valid endpoint");
        let started = Instant::now();
        let e = imds.poll_notices().await.expect_err("nothing listens");
        assert!(started.elapsed() < FAIL_FAST, "{:?}", started.elapsed());
        assert!(matches!(e, ImdsError::Unreachable { .. }), "{e:?}");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("hop limit 2"), "{e}");
    }

    #[tokio::test]
    async fn service_gone_after_a_session_is_retryable() {
        let (standin, imds) = stand_in().await;
        imds.poll_notices().await.expect("poll opens the session");
        drop(standin);
        let started = Instant::now();
        // The pooled connection may outlive the server briefly; the service
        // is gone once a poll fails.
        let e = loop {
            match imds.poll_notices().await {
                Err(e) => break e,
                Ok(_) => assert!(started.elapsed() < FAIL_FAST, "still answering"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(started.elapsed() < FAIL_FAST, "{:?}", started.elapsed());
        assert!(matches!(e, ImdsError::Unreachable { .. }), "{e:?}");
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn silent_endpoint_times_out_and_is_retryable() {
        // Accepts connections (the kernel does) but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let imds = Imds::new(Some(&url)).expect("valid endpoint");
        let started = Instant::now();
        let e = imds.poll_notices().await.expect_err("no answer");
        let took = started.elapsed();
        assert!(took < FAIL_FAST, "{took:?}");
        assert!(took >= REQUEST_TIMEOUT / 2, "{took:?}");
        assert!(e.is_retryable(), "{e:?}");
        drop(listener);
    }

    #[tokio::test]
    async fn disabled_metadata_is_not_retryable() {
        let (standin, imds) = stand_in().await;
        standin.set_disabled(true);
        let e = imds.instance_facts().await.expect_err("disabled");
        assert!(matches!(e, ImdsError::Token { .. }), "{e:?}");
        assert!(!e.is_retryable(), "{e:?}");
        assert!(e.to_string().contains("HttpEndpoint enabled"), "{e}");
    }

    #[tokio::test]
    async fn one_poll_is_quick() {
        let (_standin, imds) = stand_in().await;
        imds.poll_notices()
            .await
            .expect("first poll opens the session");
        let started = Instant::now();
        imds.poll_notices().await.expect("poll");
        let took = started.elapsed();
        eprintln!("one poll against the stand-in took {took:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn endpoint_must_be_a_url() {
        let e = Imds::new(Some("169.254.169.254")).expect_err("no scheme");
        assert!(matches!(e, ImdsError::InvalidEndpoint { .. }), "{e:?}");
        assert!(!e.is_retryable());
        assert!(Imds::new(Some("http://[fd00:ec2::254]")).is_ok());
    }

    #[test]
    fn spot_action_payloads() {
        let spot = parse_spot_action(r#"{"action": "terminate", "time": "2017-09-18T08:22:00Z"}"#)
            .expect("documented example");
        assert_eq!(spot.action, "terminate");
        assert_eq!(spot.time, UNIX_EPOCH + Duration::from_secs(1_505_722_920));
        for bad in [
            "",
            "terminate",
            r#"{"action": "terminate"}"#,
            r#"{"action": "", "time": "2017-09-18T08:22:00Z"}"#,
            r#"{"action": "stop", "time": "soon"}"#,
        ] {
            assert!(parse_spot_action(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rebalance_payloads() {
        assert_eq!(
            parse_rebalance(r#"{"noticeTime": "2020-10-27T08:22:00Z"}"#),
            Ok(UNIX_EPOCH + Duration::from_secs(1_603_786_920))
        );
        assert!(parse_rebalance(r#"{"notice_time": "2020-10-27T08:22:00Z"}"#).is_err());
    }
}
