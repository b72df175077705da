//! [`ImdsStandIn`]: a local HTTP server that speaks the IMDSv2 wire protocol
//! (session tokens, the same paths, status codes and payloads) for one
//! made-up instance, with a Rust API to raise and clear interruption
//! notices. The coordinator's demo runs agents against it, and tests point
//! the real client at it.
//!
//! Not responsible for anything the agent does not read: no user data, no
//! credentials, no signed identity documents, no IMDSv1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio_util::sync::CancellationToken;

use servitor_proto::imds as paths;

/// The longest token lifetime IMDS grants, in seconds (six hours).
const MAX_TOKEN_TTL_SECS: u64 = 21_600;
/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;
/// The identity document's schema version, as IMDS gives it.
const IDENTITY_DOCUMENT_VERSION: &str = "2017-09-30";
/// Made-up account and image for the identity document; nothing checks
/// them against AWS.
const ACCOUNT_ID: &str = "123456789012";
const IMAGE_ID: &str = "ami-0123456789abcdef0";
const PRIVATE_IP: &str = "10.0.0.10";
const ARCHITECTURE: &str = "x86_64";
/// Where `start` listens: loopback, a free port.
const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";
/// IMDS answers an absent item with an HTML page.
const NOT_FOUND_BODY: &str = "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n\
 <head>\n  <title>404 - Not Found</title>\n </head>\n\
 <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n";

/// The made-up instance the stand-in describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    pub instance_id: String,
    pub instance_type: String,
    /// Availability zone, such as `us-east-1a`.
    pub zone: String,
    pub region: String,
    /// `spot` or `on-demand`.
    pub life_cycle: String,
}

impl Default for InstanceSpec {
    fn default() -> Self {
        Self {
            instance_id: "i-1234567890abcdef0".into(),
            instance_type: "m5.large".into(),
            zone: "us-east-1a".into(),
            region: "us-east-1".into(),
            life_cycle: "spot".into(),
        }
    }
}

/// A running IMDSv2 stand-in; stops when dropped.
#[derive(Debug)]
pub struct ImdsStandIn {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    spec: InstanceSpec,
    /// When the instance started, for the identity document.
    launched: SystemTime,
    state: Mutex<Notices>,
    /// Issued tokens and when each runs out.
    tokens: Mutex<HashMap<String, Instant>>,
    /// Answers everything with 403, like an instance whose metadata
    /// endpoint is turned off.
    disabled: AtomicBool,
    token_puts: AtomicU64,
    requests: AtomicU64,
    /// Signs the identity document (`instance-identity/rsa2048`) when set.
    signer: Mutex<Option<Arc<crate::iid::IidSigner>>>,
}

/// The notices as they appear on the wire.
#[derive(Debug, Default)]
struct Notices {
    spot_action: Option<(String, SystemTime)>,
    rebalance: Option<SystemTime>,
    target_lifecycle_state: Option<String>,
}

impl ImdsStandIn {
    /// Starts a stand-in for `spec` on a free loopback port.
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn start(spec: InstanceSpec) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(LOOPBACK_ANY_PORT).await?;
        Self::serve(spec, listener)
    }

    /// Starts a stand-in for `spec` on `address`, for a client configured
    /// before the stand-in existed.
    ///
    /// # Errors
    /// When `address` cannot be bound.
    pub async fn start_at(spec: InstanceSpec, address: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        Self::serve(spec, listener)
    }

    fn serve(spec: InstanceSpec, listener: tokio::net::TcpListener) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            spec,
            launched: SystemTime::now(),
            state: Mutex::new(Notices::default()),
            tokens: Mutex::new(HashMap::new()),
            disabled: AtomicBool::new(false),
            token_puts: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            signer: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        crate::serve(listener, app, &stop, "instance metadata stand-in");
        Ok(Self {
            address,
            shared,
            stop,
        })
    }

    /// Serves the identity document's signature, made with `signer`, as
    /// AWS's key for the Region would.
    pub fn sign_identity_with(&self, signer: Arc<crate::iid::IidSigner>) {
        *self
            .shared
            .signer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(signer);
    }

    /// The base URL to give the client as its endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Schedules a Spot interruption: `action` (`terminate`, `stop` or
    /// `hibernate`) `after` from now, in whole seconds as IMDS gives it.
    pub fn set_spot_action(&self, action: &str, after: Duration) {
        self.shared.notices().spot_action = Some((action.to_owned(), SystemTime::now() + after));
    }

    /// Raises a rebalance recommendation noticed now.
    pub fn set_rebalance(&self) {
        self.shared.notices().rebalance = Some(SystemTime::now());
    }

    /// Sets the Auto Scaling target lifecycle state (`InService`,
    /// `Terminated`, `Warmed:Stopped`, ...).
    pub fn set_target_lifecycle_state(&self, state: &str) {
        self.shared.notices().target_lifecycle_state = Some(state.to_owned());
    }

    /// Withdraws every notice: those paths answer 404 again.
    pub fn clear(&self) {
        *self.shared.notices() = Notices::default();
    }

    /// Makes every token issued so far invalid, as if it had run out; reads
    /// with them get 401 until the client fetches a new one.
    pub fn expire_tokens(&self) {
        self.shared.tokens().clear();
    }

    /// Turns the metadata endpoint off (every request gets 403) or on.
    pub fn set_disabled(&self, disabled: bool) {
        self.shared.disabled.store(disabled, Ordering::Relaxed);
    }

    /// Tokens issued so far (successful `PUT`s to the token path).
    pub fn token_puts(&self) -> u64 {
        self.shared.token_puts.load(Ordering::Relaxed)
    }

    /// Requests answered so far, whatever their path and outcome.
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }
}

impl Drop for ImdsStandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    fn notices(&self) -> std::sync::MutexGuard<'_, Notices> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issue_token(&self, ttl: Duration) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut tokens = self.tokens();
        tokens.retain(|_, expiry| *expiry > now);
        tokens.insert(token.clone(), now + ttl);
        self.token_puts.fetch_add(1, Ordering::Relaxed);
        token
    }

    fn token_valid(&self, token: &str) -> bool {
        self.tokens()
            .get(token)
            .is_some_and(|expiry| *expiry > Instant::now())
    }

    /// The body at `path`, or `None` where IMDS answers 404.
    fn lookup(&self, path: &str) -> Option<(&'static str, String)> {
        const TEXT: &str = "text/plain";
        const JSON: &str = "application/json";
        let spec = &self.spec;
        let text = |value: &str| Some((TEXT, value.to_owned()));
        match path {
            paths::INSTANCE_ID => text(&spec.instance_id),
            paths::INSTANCE_TYPE => text(&spec.instance_type),
            paths::AVAILABILITY_ZONE => text(&spec.zone),
            paths::REGION => text(&spec.region),
            paths::LIFE_CYCLE => text(&spec.life_cycle),
            paths::SPOT_ACTION => self.notices().spot_action.as_ref().map(|(action, time)| {
                let body = serde_json::json!({ "action": action, "time": rfc3339(*time) });
                (JSON, body.to_string())
            }),
            paths::REBALANCE => self.notices().rebalance.map(|time| {
                let body = serde_json::json!({ "noticeTime": rfc3339(time) });
                (JSON, body.to_string())
            }),
            paths::TARGET_LIFECYCLE_STATE => self
                .notices()
                .target_lifecycle_state
                .as_deref()
                .and_then(text),
            paths::IDENTITY_DOCUMENT => Some((JSON, self.identity_document())),
            paths::IDENTITY_RSA2048 => self
                .signer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(|signer| {
                    let document = self.identity_document();
                    (
                        TEXT,
                        signer.sign(document.as_bytes(), crate::iid::Tamper::None),
                    )
                }),
            _ => None,
        }
    }

    fn identity_document(&self) -> String {
        let spec = &self.spec;
        let document = serde_json::json!({
            "accountId": ACCOUNT_ID,
            "architecture": ARCHITECTURE,
            "availabilityZone": spec.zone,
            "billingProducts": null,
            "devpayProductCodes": null,
            "marketplaceProductCodes": null,
            "imageId": IMAGE_ID,
            "instanceId": spec.instance_id,
            "instanceType": spec.instance_type,
            "kernelId": null,
            "pendingTime": rfc3339(self.launched),
            "privateIp": PRIVATE_IP,
            "ramdiskId": null,
            "region": spec.region,
            "version": IDENTITY_DOCUMENT_VERSION,
        });
        serde_json::to_string_pretty(&document).unwrap_or_else(|_| document.to_string())
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn random_token() -> String {
    use std::fmt::Write;
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    bytes.iter().fold(String::new(), |mut token, byte| {
        let _ = write!(token, "{byte:02x}");
        token
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if shared.disabled.load(Ordering::Relaxed) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let path = uri.path();
    if path == paths::TOKEN {
        return if method == Method::PUT {
            put_token(&shared, &headers)
        } else {
            StatusCode::METHOD_NOT_ALLOWED.into_response()
        };
    }
    if method == Method::PUT && path.ends_with(paths::TOKEN.trim_start_matches("/latest")) {
        // A token PUT to a version-specific path (`/2021-03-23/api/token`).
        return StatusCode::FORBIDDEN.into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let authorized = headers
        .get(paths::TOKEN_HEADER)
        .and_then(|token| token.to_str().ok())
        .is_some_and(|token| shared.token_valid(token));
    if !authorized {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match shared.lookup(path) {
        Some((content_type, body)) => {
            (StatusCode::OK, [(CONTENT_TYPE, content_type)], body).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            [(CONTENT_TYPE, "text/html")],
            NOT_FOUND_BODY,
        )
            .into_response(),
    }
}

fn put_token(shared: &Shared, headers: &HeaderMap) -> Response {
    if headers.contains_key(paths::FORWARDED_FOR_HEADER) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let ttl = headers
        .get(paths::TOKEN_TTL_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .filter(|secs| (1..=MAX_TOKEN_TTL_SECS).contains(secs));
    let Some(ttl) = ttl else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = shared.issue_token(Duration::from_secs(ttl));
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, HeaderValue::from_static("text/plain")),
            (
                axum::http::HeaderName::from_static(paths::TOKEN_TTL_HEADER),
                HeaderValue::from(ttl),
            ),
        ],
        token,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An answer read off the wire.
    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// One HTTP/1.1 request over a fresh connection, written by hand so the
    /// test controls every header.
    async fn raw(
        standin: &ImdsStandIn,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut stream = tokio::net::TcpStream::connect(standin.address)
            .await
            .expect("connect");
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", standin.address);
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read");
        let text = String::from_utf8(bytes).expect("UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn token(standin: &ImdsStandIn) -> String {
        let answer = raw(
            standin,
            "PUT",
            paths::TOKEN,
            &[(paths::TOKEN_TTL_HEADER, "60")],
        )
        .await;
        assert_eq!(answer.status, 200);
        answer.body
    }

    async fn get(standin: &ImdsStandIn, path: &str, token: &str) -> Answer {
        raw(standin, "GET", path, &[(paths::TOKEN_HEADER, token)]).await
    }

    async fn start() -> ImdsStandIn {
        ImdsStandIn::start(InstanceSpec::default())
            .await
            .expect("stand-in starts")
    }

    #[tokio::test]
    async fn token_put_needs_a_valid_ttl() {
        let standin = start().await;
        let missing = raw(&standin, "PUT", paths::TOKEN, &[]).await;
        assert_eq!(missing.status, 400);
        for bad in ["0", "21601", "-1", "an hour"] {
            let answer = raw(
                &standin,
                "PUT",
                paths::TOKEN,
                &[(paths::TOKEN_TTL_HEADER, bad)],
            )
            .await;
            assert_eq!(answer.status, 400, "TTL {bad:?}");
        }
        assert_eq!(standin.token_puts(), 0);

        let answer = raw(
            &standin,
            "PUT",
            paths::TOKEN,
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header(paths::TOKEN_TTL_HEADER), Some("21600"));
        assert_eq!(answer.body.len(), TOKEN_BYTES * 2);
        assert_eq!(standin.token_puts(), 1);
        assert_ne!(token(&standin).await, answer.body, "tokens are random");
    }

    #[tokio::test]
    async fn forwarded_token_put_is_forbidden() {
        let standin = start().await;
        let answer = raw(
            &standin,
            "PUT",
            paths::TOKEN,
            &[
                (paths::TOKEN_TTL_HEADER, "60"),
                ("X-Forwarded-For", "203.0.113.7"),
            ],
        )
        .await;
        assert_eq!(answer.status, 403);
        let versioned = raw(
            &standin,
            "PUT",
            "/2021-03-23/api/token",
            &[(paths::TOKEN_TTL_HEADER, "60")],
        )
        .await;
        assert_eq!(versioned.status, 403);
        assert_eq!(standin.token_puts(), 0);
    }

    #[tokio::test]
    async fn reads_need_a_live_token() {
        let standin = start().await;
        let none = raw(&standin, "GET", paths::INSTANCE_ID, &[]).await;
        assert_eq!(none.status, 401);
        assert_eq!(
            get(&standin, paths::INSTANCE_ID, "made-up").await.status,
            401
        );

        let token = token(&standin).await;
        let answer = get(&standin, paths::INSTANCE_ID, &token).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "i-1234567890abcdef0");

        standin.expire_tokens();
        assert_eq!(get(&standin, paths::INSTANCE_ID, &token).await.status, 401);
        assert_eq!(standin.request_count(), 5);
    }

    #[tokio::test]
    async fn paths_and_payloads() {
        let standin = start().await;
        let token = token(&standin).await;
        for (path, body) in [
            (paths::INSTANCE_TYPE, "m5.large"),
            (paths::AVAILABILITY_ZONE, "us-east-1a"),
            (paths::REGION, "us-east-1"),
            (paths::LIFE_CYCLE, "spot"),
        ] {
            let answer = get(&standin, path, &token).await;
            assert_eq!((answer.status, answer.body.as_str()), (200, body), "{path}");
        }
        for path in [
            paths::SPOT_ACTION,
            paths::REBALANCE,
            paths::TARGET_LIFECYCLE_STATE,
            "/latest/meta-data/no-such-thing",
        ] {
            let answer = get(&standin, path, &token).await;
            assert_eq!(answer.status, 404, "{path}");
            assert!(answer.body.contains("404 - Not Found"), "{path}");
        }

        standin.set_spot_action("terminate", Duration::from_secs(120));
        standin.set_rebalance();
        standin.set_target_lifecycle_state("Terminated");
        let spot = get(&standin, paths::SPOT_ACTION, &token).await;
        assert_eq!(spot.status, 200);
        let spot: serde_json::Value = serde_json::from_str(&spot.body).expect("JSON");
        assert_eq!(spot["action"], "terminate");
        let time = spot["time"].as_str().expect("time is a string");
        assert!(
            time.ends_with('Z') && time.len() == "2017-09-18T08:22:00Z".len(),
            "{time}"
        );
        let rebalance = get(&standin, paths::REBALANCE, &token).await;
        let rebalance: serde_json::Value = serde_json::from_str(&rebalance.body).expect("JSON");
        assert!(rebalance["noticeTime"].is_string(), "{rebalance}");
        let state = get(&standin, paths::TARGET_LIFECYCLE_STATE, &token).await;
        assert_eq!((state.status, state.body.as_str()), (200, "Terminated"));

        let document = get(&standin, paths::IDENTITY_DOCUMENT, &token).await;
        assert_eq!(document.status, 200);
        let document: serde_json::Value = serde_json::from_str(&document.body).expect("JSON");
        assert_eq!(document["instanceId"], "i-1234567890abcdef0");
        assert_eq!(document["availabilityZone"], "us-east-1a");
        assert_eq!(document["region"], "us-east-1");
        assert_eq!(document["version"], IDENTITY_DOCUMENT_VERSION);

        standin.clear();
        for path in [
            paths::SPOT_ACTION,
            paths::REBALANCE,
            paths::TARGET_LIFECYCLE_STATE,
        ] {
            assert_eq!(get(&standin, path, &token).await.status, 404, "{path}");
        }
    }

    #[tokio::test]
    async fn disabled_endpoint_forbids_everything() {
        let standin = start().await;
        standin.set_disabled(true);
        let answer = raw(
            &standin,
            "PUT",
            paths::TOKEN,
            &[(paths::TOKEN_TTL_HEADER, "60")],
        )
        .await;
        assert_eq!(answer.status, 403);
        standin.set_disabled(false);
        token(&standin).await;
    }

    #[tokio::test]
    async fn stops_when_dropped() {
        let standin = start().await;
        let address = standin.address;
        drop(standin);
        // The listener closes once the server task sees the stop.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if tokio::net::TcpStream::connect(address).await.is_err() {
                break;
            }
            assert!(Instant::now() < deadline, "still listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
