#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The agent link over real QUIC and real TLS on 127.0.0.1: the coordinator's
//! `LinkServer` against the agent's `connect`, against raw clients that
//! misbehave, and against the agent's whole session (`session::run`, shell
//! executor) with the test speaking the coordinator's side of the control
//! stream, to see what the agent says when.

use std::sync::{Arc, Mutex};

use servitor_agent::executor::{AnyExecutor, ShellExecutor};
use servitor_agent::link::{connect, CaTrust, LinkError as AgentLinkError, LinkSettings};
use servitor_agent::session::{AgentSettings, Notice};
use servitor_proto::agent::{
    agent_message, coordinator_message, Ack, AgentMessage, Assign, AttemptRef, Cancel, CancelMode,
    CoordinatorMessage, Heartbeat, Hello, InstanceFacts, Outcome, Welcome,
};
use servitor_proto::frame::{read_frame, write_frame};

use std::time::Duration;

use rustls::pki_types::CertificateDer;
use servitor_coordinator::link::{AgentConnection, LinkServer, JOIN_TOKEN_REJECTED};
use servitor_coordinator::pki::{Pki, DEFAULT_CLIENT_CERT_VALIDITY};
use servitor_proto::link::close_code;
use servitor_runtime::link::code;
use servitor_runtime::secret::Secret;

const JOIN_TOKEN: &str = "join-token-for-tests";
/// How long a test waits for something that should happen now.
const PROMPT: Duration = Duration::from_secs(10);
/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

/// A coordinator with its own state directory, listening on 127.0.0.1.
struct Coordinator {
    _state: tempfile::TempDir,
    pki: Pki,
    server: LinkServer,
}

fn coordinator() -> Coordinator {
    let state = tempfile::tempdir().unwrap();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let pki = Pki::load_or_create(state.path(), &names).unwrap();
    let server = LinkServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        &pki,
        Secret::new(JOIN_TOKEN),
        DEFAULT_CLIENT_CERT_VALIDITY,
    )
    .unwrap();
    Coordinator {
        _state: state,
        pki,
        server,
    }
}

impl Coordinator {
    fn settings(&self, agent_name: &str, state_dir: Option<&std::path::Path>) -> LinkSettings {
        let mut settings = LinkSettings::new(
            self.server.local_addr().to_string(),
            CaTrust::Pem(self.pki.ca_pem().to_owned()),
            Secret::new(JOIN_TOKEN),
            agent_name,
        );
        settings.state_dir = state_dir.map(std::path::Path::to_path_buf);
        settings
    }

    async fn accept_promptly(&self) -> AgentConnection {
        tokio::time::timeout(PROMPT, self.server.accept())
            .await
            .expect("an agent connection within the time limit")
            .expect("the server is open")
    }

    async fn accept_nothing(&self) {
        if let Ok(conn) = tokio::time::timeout(QUIET, self.server.accept()).await {
            panic!("accept() yielded {conn:?}");
        }
    }
}

/// Log lines from everything on this test's thread (the tests run on a
/// current-thread runtime, so the coordinator's tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn warnings(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|line| line.contains("WARN"))
            .map(str::to_owned)
            .collect()
    }
}

/// A QUIC client that trusts the coordinator's CA and presents `identity`
/// if given: for tests that must misbehave in ways the agent never would.
async fn raw_client(
    coordinator: &Coordinator,
    identity: Option<(
        CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(coordinator.pki.ca_der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![servitor_proto::link::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            coordinator.server.local_addr(),
            servitor_proto::link::DEFAULT_SERVER_NAME,
        )
        .unwrap()
        .await
}

/// The application close a raw client got, within the time limit.
async fn application_close(connection: &quinn::Connection) -> quinn::ApplicationClose {
    match tokio::time::timeout(PROMPT, connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => close,
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn enrolled_agent_is_accepted_and_frames_round_trip() {
    let coordinator = coordinator();
    let agent_state = tempfile::tempdir().unwrap();
    let settings = coordinator.settings("Build Box #7", Some(agent_state.path()));

    let link = connect(&settings).await.unwrap();
    assert!(
        link.agent_id.starts_with("build-box-7-"),
        "{}",
        link.agent_id
    );
    let agent = coordinator.accept_promptly().await;
    assert_eq!(agent.agent_id, link.agent_id);
    assert_eq!(agent.remote.ip(), std::net::Ipv4Addr::LOCALHOST);

    let (mut send, mut recv) = link.connection.open_bi().await.unwrap();
    let hello = AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: servitor_proto::link::PROTOCOL_VERSION,
            agent_name: settings.agent_name.clone(),
            capacity: 2,
            free_slots: 2,
            ..Hello::default()
        })),
    };
    write_frame(&mut send, &hello).await.unwrap();
    let (mut server_send, mut server_recv) = agent.connection.accept_bi().await.unwrap();
    let got: AgentMessage = read_frame(&mut server_recv).await.unwrap().unwrap();
    assert_eq!(got, hello);
    let welcome = CoordinatorMessage {
        msg: Some(coordinator_message::Msg::Welcome(Welcome {
            agent_id: agent.agent_id.clone(),
            ..Welcome::default()
        })),
    };
    write_frame(&mut server_send, &welcome).await.unwrap();
    let got: CoordinatorMessage = read_frame(&mut recv).await.unwrap().unwrap();
    assert_eq!(got, welcome);

    // The certificate and key were stored privately ...
    let mut stored = 0;
    for entry in std::fs::read_dir(agent_state.path()).unwrap() {
        let entry = entry.unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&entry.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{:?}", entry.path());
        stored += 1;
    }
    assert_eq!(stored, 2);
    // ... and the next connection uses them instead of enrolling again.
    let again = connect(&settings).await.unwrap();
    assert_eq!(again.agent_id, link.agent_id);
    assert_eq!(coordinator.accept_promptly().await.agent_id, link.agent_id);
}

#[tokio::test]
async fn memory_only_agent_reuses_its_certificate_within_the_process() {
    let coordinator = coordinator();
    let settings = coordinator.settings("memory-box", None);
    let first = connect(&settings).await.unwrap();
    let second = connect(&settings).await.unwrap();
    assert_eq!(first.agent_id, second.agent_id);
    assert_eq!(coordinator.accept_promptly().await.agent_id, first.agent_id);
    assert_eq!(coordinator.accept_promptly().await.agent_id, first.agent_id);
}

#[tokio::test]
async fn wrong_join_token_is_refused_and_logged() {
    let (logs, _guard) = Logs::capture();
    let coordinator = coordinator();
    let agent_state = tempfile::tempdir().unwrap();
    let mut settings = coordinator.settings("box", Some(agent_state.path()));
    settings.join_token = Secret::new("not-the-token");

    let err = connect(&settings).await.unwrap_err();
    match &err {
        AgentLinkError::Refused(reason) => assert_eq!(reason, JOIN_TOKEN_REJECTED),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(!err.is_retryable());
    coordinator.accept_nothing().await;
    assert_eq!(std::fs::read_dir(agent_state.path()).unwrap().count(), 0);

    let warnings = logs.warnings();
    let local = loopback();
    assert!(
        warnings
            .iter()
            .any(|line| line.contains("join token") && line.contains(&local)),
        "{warnings:#?}"
    );
    assert!(
        !warnings.iter().any(|line| line.contains("not-the-token")),
        "the token must never be logged: {warnings:#?}"
    );
}

fn loopback() -> String {
    std::net::Ipv4Addr::LOCALHOST.to_string()
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let (logs, _guard) = Logs::capture();
    let coordinator = coordinator();

    // A CA the coordinator has never heard of, and a client certificate from
    // it that is otherwise exactly what the coordinator issues.
    let foreign_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        servitor_coordinator::pki::CA_COMMON_NAME,
    );
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let foreign_ca = rcgen::CertifiedIssuer::self_signed(ca_params, foreign_key).unwrap();
    let client_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intruder-abcdef");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = params.signed_by(&client_key, &foreign_ca).unwrap();
    let identity = (
        client_cert.der().clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
    );

    // QUIC lets the client finish its side of the handshake before the
    // server has judged its certificate, so the refusal may come either as a
    // failed connect or as the connection closing straight after.
    let refusal = match raw_client(&coordinator, Some(identity)).await {
        Err(e) => e,
        Ok(connection) => tokio::time::timeout(PROMPT, connection.closed())
            .await
            .expect("the coordinator closes the connection"),
    };
    assert!(
        servitor_agent::link::is_certificate_rejection(&refusal),
        "{refusal:?}"
    );
    coordinator.accept_nothing().await;
    let warnings = logs.warnings();
    assert!(
        warnings
            .iter()
            .any(|line| line.contains("TLS handshake") && line.contains(&loopback())),
        "{warnings:#?}"
    );
}

#[tokio::test]
async fn unauthenticated_non_enrollment_frame_gets_only_a_close() {
    let coordinator = coordinator();
    let connection = raw_client(&coordinator, None).await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let heartbeat = AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(Heartbeat { sequence: 1 })),
    };
    write_frame(&mut send, &heartbeat).await.unwrap();
    send.finish().unwrap();
    let answer = read_frame::<_, servitor_proto::agent::EnrollResponse>(&mut recv).await;
    assert!(!matches!(answer, Ok(Some(_))), "got an answer: {answer:?}");
    let close = application_close(&connection).await;
    assert_eq!(close.error_code, code(close_code::PROTOCOL_VIOLATION));
    assert!(
        String::from_utf8_lossy(&close.reason).contains("may only enroll"),
        "{close:?}"
    );
    coordinator.accept_nothing().await;
}

#[tokio::test]
async fn unauthenticated_unidirectional_stream_is_closed() {
    let coordinator = coordinator();
    let connection = raw_client(&coordinator, None).await.unwrap();
    let mut send = connection.open_uni().await.unwrap();
    send.write_all(b"output").await.unwrap();
    let close = application_close(&connection).await;
    assert_eq!(close.error_code, code(close_code::PROTOCOL_VIOLATION));
    coordinator.accept_nothing().await;
}

#[tokio::test]
async fn unauthenticated_second_stream_is_closed() {
    let coordinator = coordinator();
    let connection = raw_client(&coordinator, None).await.unwrap();
    // Half a length prefix keeps the first stream waiting for its request.
    let (mut first, _first_recv) = connection.open_bi().await.unwrap();
    first.write_all(&[0x80]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut second, _second_recv) = connection.open_bi().await.unwrap();
    second.write_all(&[0x00]).await.unwrap();
    let close = application_close(&connection).await;
    assert_eq!(close.error_code, code(close_code::PROTOCOL_VIOLATION));
    coordinator.accept_nothing().await;
}

#[tokio::test]
async fn oversized_enrollment_frame_is_refused_unread() {
    let coordinator = coordinator();
    let connection = raw_client(&coordinator, None).await.unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    let mut prefix = Vec::new();
    prost::encoding::encode_varint(1 << 20, &mut prefix);
    send.write_all(&prefix).await.unwrap();
    let close = application_close(&connection).await;
    assert_eq!(close.error_code, code(close_code::PROTOCOL_VIOLATION));
}

#[tokio::test]
async fn stalled_enrollment_does_not_hold_up_other_agents() {
    let coordinator = coordinator();
    // Connected, no certificate, says nothing.
    let _silent = raw_client(&coordinator, None).await.unwrap();
    let settings = coordinator.settings("prompt-box", None);
    let link = tokio::time::timeout(PROMPT, connect(&settings))
        .await
        .expect("connect is not held up")
        .unwrap();
    assert_eq!(coordinator.accept_promptly().await.agent_id, link.agent_id);
}

#[tokio::test]
async fn pinned_ca_is_trusted_and_a_wrong_pin_is_not() {
    let coordinator = coordinator();
    let mut settings = coordinator.settings("pinned-box", None);
    settings.trust = CaTrust::Sha256Pin(coordinator.pki.ca_sha256_pin());
    let link = connect(&settings).await.unwrap();
    assert_eq!(coordinator.accept_promptly().await.agent_id, link.agent_id);

    let mut wrong = coordinator.settings("wrong-pin-box", None);
    wrong.trust = CaTrust::Sha256Pin(format!("sha256:{}", "0".repeat(64)));
    let err = connect(&wrong).await.unwrap_err();
    assert!(matches!(err, AgentLinkError::Untrusted(_)), "{err:?}");
    assert!(err.to_string().contains("ca_sha256"), "{err}");
    assert!(!err.is_retryable());
    coordinator.accept_nothing().await;
}

#[tokio::test]
async fn another_coordinators_ca_is_untrusted() {
    let coordinator = coordinator();
    let other = self::coordinator();
    let mut settings = coordinator.settings("box", None);
    settings.trust = CaTrust::Pem(other.pki.ca_pem().to_owned());
    let err = connect(&settings).await.unwrap_err();
    assert!(matches!(err, AgentLinkError::Untrusted(_)), "{err:?}");
    assert!(err.to_string().contains("ca_file"), "{err}");
    coordinator.accept_nothing().await;
}

#[tokio::test]
async fn wrong_server_name_is_untrusted() {
    let coordinator = coordinator();
    let mut settings = coordinator.settings("box", None);
    settings.server_name = "somebody-else.example".into();
    let err = connect(&settings).await.unwrap_err();
    assert!(matches!(err, AgentLinkError::Untrusted(_)), "{err:?}");
}

#[tokio::test]
async fn agent_enrolls_again_when_the_coordinator_ca_changed() {
    let agent_state = tempfile::tempdir().unwrap();
    let old = coordinator();
    let first = connect(&old.settings("box", Some(agent_state.path())))
        .await
        .unwrap();
    drop(old);

    // A coordinator rebuilt from scratch: new CA, which the operator has
    // given the agent; the stored certificate is from the old CA.
    let new = coordinator();
    let second = connect(&new.settings("box", Some(agent_state.path())))
        .await
        .unwrap();
    assert_ne!(second.agent_id, first.agent_id);
    assert_eq!(new.accept_promptly().await.agent_id, second.agent_id);
}

#[tokio::test]
async fn closed_server_accepts_nothing_more() {
    let coordinator = coordinator();
    let settings = coordinator.settings("box", None);
    coordinator.server.close();
    assert!(coordinator.server.accept().await.is_none());
    tokio::time::timeout(PROMPT, coordinator.server.closed())
        .await
        .expect("close finishes");
    let err = tokio::time::timeout(PROMPT, connect(&settings))
        .await
        .expect("connect gives up in time")
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn out_of_range_certificate_validity_is_refused_at_bind() {
    let state = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(state.path(), &[]).unwrap();
    for validity in [
        Duration::ZERO,
        servitor_coordinator::pki::MAX_CLIENT_CERT_VALIDITY * 2,
    ] {
        let err = LinkServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            &pki,
            Secret::new(JOIN_TOKEN),
            validity,
        )
        .unwrap_err();
        assert!(
            matches!(err, servitor_coordinator::link::LinkError::CertValidity(_)),
            "{err}"
        );
        assert!(err.to_string().contains("agents.cert_validity"), "{err}");
        assert!(!err.is_retryable());
    }
}

/// The agent's whole life (`session::run`, shell executor) in this process,
/// dialling the test's coordinator.
struct Agent {
    notices: tokio::sync::mpsc::Sender<Notice>,
    shutdown: tokio_util::sync::CancellationToken,
    run: tokio::task::JoinHandle<Result<(), servitor_agent::session::AgentError>>,
    _work: tempfile::TempDir,
}

impl Agent {
    fn start(coordinator: &Coordinator) -> Self {
        let work = tempfile::tempdir().unwrap();
        let settings = AgentSettings {
            link: coordinator.settings("session-test", None),
            runner: String::new(),
            one_job: false,
            capacity: 1,
            executor: AnyExecutor::from(ShellExecutor::new()),
            work_dir: work.path().to_path_buf(),
            instance: InstanceFacts::default(),
            imds: None,
        };
        let (notices, received) = tokio::sync::mpsc::channel(8);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(servitor_agent::session::run(
            settings,
            received,
            shutdown.clone(),
        ));
        Self {
            notices,
            shutdown,
            run,
            _work: work,
        }
    }

    /// Waits for `run` to return, which it must do promptly now.
    async fn ended(self) -> Result<(), servitor_agent::session::AgentError> {
        tokio::time::timeout(PROMPT, self.run)
            .await
            .expect("the agent exits in time")
            .unwrap()
    }
}

/// The coordinator's end of one agent session.
struct Session {
    agent: AgentConnection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: Hello,
}

impl Coordinator {
    /// Accepts the agent's next connection and reads its hello.
    async fn next_session(&self) -> Session {
        let agent = self.accept_promptly().await;
        let (send, mut recv) = tokio::time::timeout(PROMPT, agent.connection.accept_bi())
            .await
            .expect("the agent opens its control stream in time")
            .unwrap();
        let first: AgentMessage = read_frame(&mut recv).await.unwrap().unwrap();
        let Some(agent_message::Msg::Hello(hello)) = first.msg else {
            panic!("the agent's first message is not a hello: {first:?}");
        };
        // Output streams are read to their end, as the coordinator does, so
        // the agent does not wait for them to be taken.
        let connection = agent.connection.clone();
        tokio::spawn(async move {
            while let Ok(mut output) = connection.accept_uni().await {
                tokio::spawn(async move { output.read_to_end(usize::MAX).await });
            }
        });
        Session {
            agent,
            send,
            recv,
            hello,
        }
    }
}

impl Session {
    async fn say(&mut self, msg: coordinator_message::Msg) {
        write_frame(&mut self.send, &CoordinatorMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    async fn welcome(&mut self, heartbeat_interval_ms: u32) {
        let agent_id = self.agent.agent_id.clone();
        self.say(coordinator_message::Msg::Welcome(Welcome {
            agent_id,
            heartbeat_interval_ms,
            ..Welcome::default()
        }))
        .await;
    }

    /// The agent's next message, heartbeats included.
    async fn next(&mut self) -> agent_message::Msg {
        loop {
            let message: AgentMessage = tokio::time::timeout(PROMPT, read_frame(&mut self.recv))
                .await
                .expect("the agent says something in time")
                .unwrap()
                .expect("the control stream stays open");
            if let Some(msg) = message.msg {
                return msg;
            }
        }
    }

    /// The agent's next message that is not a heartbeat.
    async fn next_not_heartbeat(&mut self) -> agent_message::Msg {
        loop {
            match self.next().await {
                agent_message::Msg::Heartbeat(_) => {}
                msg => return msg,
            }
        }
    }

    /// Hangs up, as a coordinator that restarts or a path that breaks.
    fn drop_link(&self) {
        self.agent
            .connection
            .close(0u32.into(), b"test drops the link");
    }
}

/// A job that runs until it is stopped.
fn endless_job(job_id: i64) -> Vec<u8> {
    let job = servitor_proto::job::JobPayload {
        id: job_id,
        token: "job-token".into(),
        runner_info: servitor_proto::job::RunnerInfo { timeout: 3600 },
        steps: vec![servitor_proto::job::Step {
            name: "script".into(),
            script: vec!["sleep 3600".into()],
            timeout: 3600,
            when: "on_success".into(),
            allow_failure: false,
        }],
        ..servitor_proto::job::JobPayload::default()
    };
    serde_json::to_vec(&job).unwrap()
}

#[tokio::test]
async fn agent_heartbeats_at_the_pace_the_coordinator_asks_for() {
    /// Far quicker than the protocol's default of 5 s.
    const ASKED_MS: u32 = 200;
    /// Heartbeats counted after the Welcome; the first may be the one the
    /// agent sends as its session opens, before it read the Welcome.
    const COUNTED: u32 = 6;
    let coordinator = coordinator();
    let agent = Agent::start(&coordinator);
    let mut session = coordinator.next_session().await;
    session.welcome(ASKED_MS).await;
    let welcomed = tokio::time::Instant::now();
    let mut heartbeats = 0;
    while heartbeats < COUNTED {
        if let agent_message::Msg::Heartbeat(_) = session.next().await {
            heartbeats += 1;
        }
    }
    let took = welcomed.elapsed();
    let paced = Duration::from_millis(u64::from(ASKED_MS) * u64::from(COUNTED - 1));
    assert!(
        took >= paced,
        "{COUNTED} heartbeats in {took:?}: faster than asked"
    );
    assert!(
        took < servitor_proto::link::HEARTBEAT_INTERVAL - Duration::from_secs(1),
        "{COUNTED} heartbeats took {took:?}: not at the asked pace"
    );
    agent.shutdown.cancel();
    assert!(matches!(
        session.next_not_heartbeat().await,
        agent_message::Msg::Interrupting(_)
    ));
    agent.ended().await.unwrap();
}

#[tokio::test]
async fn spot_notice_during_a_long_reconnect_backoff_redials_at_once_and_reports_it() {
    /// Links lost in quick succession until the agent waits 4 to 8 s before
    /// its next try (from 250 ms, doubling, each wait drawn from its upper
    /// half).
    const LOSSES: usize = 6;
    /// Far less than the shortest wait the agent would otherwise keep.
    const AT_ONCE: Duration = Duration::from_secs(2);
    let (logs, _guard) = Logs::capture();
    let coordinator = coordinator();
    let agent = Agent::start(&coordinator);
    let mut session = coordinator.next_session().await;
    session.welcome(0).await;
    let attempt = AttemptRef::new(41, 1);
    session
        .say(coordinator_message::Msg::Assign(Assign {
            attempt: Some(attempt),
            job_json: endless_job(attempt.job_id),
            gitlab_url: String::new(),
            caches: Vec::new(),
        }))
        .await;
    assert!(matches!(
        session.next_not_heartbeat().await,
        agent_message::Msg::Started(_)
    ));
    session.drop_link();
    for _ in 1..LOSSES {
        let again = coordinator.next_session().await;
        assert_eq!(again.hello.running, vec![attempt], "the job runs on");
        again.drop_link();
    }
    let lost_lines = || {
        logs.warnings()
            .iter()
            .filter(|line| line.contains("lost the coordinator"))
            .count()
    };
    servitor_tests::wait_until("the agent backing off", PROMPT, || lost_lines() == LOSSES)
        .await
        .unwrap();
    let noticed = tokio::time::Instant::now();
    agent
        .notices
        .send(Notice::Interrupt {
            reason: "Spot interruption notice: terminate".into(),
            deadline: std::time::SystemTime::now() + Duration::from_secs(120),
        })
        .await
        .unwrap();
    let mut session = coordinator.next_session().await;
    let redialled = noticed.elapsed();
    assert!(
        redialled < AT_ONCE,
        "the agent redialled {redialled:?} after the notice"
    );
    assert_eq!(session.hello.running, vec![attempt]);
    assert_eq!(session.hello.free_slots, 0, "it takes no more work");
    match session.next_not_heartbeat().await {
        agent_message::Msg::Interrupting(interrupting) => {
            assert!(
                interrupting.reason.contains("Spot interruption notice"),
                "{interrupting:?}"
            );
        }
        other => panic!("expected the interruption right after the hello, got {other:?}"),
    }
    // The hand-back, as the coordinator does it: stop the job, take its
    // result; the agent then has nothing left and exits.
    session.welcome(0).await;
    session
        .say(coordinator_message::Msg::Cancel(Cancel {
            attempt: Some(attempt),
            mode: CancelMode::Abort.into(),
            reason: "instance interrupted".into(),
        }))
        .await;
    match session.next_not_heartbeat().await {
        agent_message::Msg::Finished(finished) => {
            assert_eq!(finished.attempt, Some(attempt));
            assert_eq!(finished.outcome(), Outcome::Canceled);
        }
        other => panic!("expected the attempt's result, got {other:?}"),
    }
    session
        .say(coordinator_message::Msg::Ack(Ack {
            attempt: Some(attempt),
        }))
        .await;
    agent.ended().await.unwrap();
}
