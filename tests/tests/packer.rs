//! The Spot instance image's files against the agent they serve: the
//! configuration `packer/user-data.sh` writes must load with the agent's own
//! loader (unknown keys are errors there), the systemd unit must read the file
//! user-data writes, and the scripts must at least parse.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use servitor_agent::config::{AgentConfig, EnrollMethod, ExecutorKind};

const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const TOKEN: &str = "join-token-for-the-packer-test";

fn packer_dir() -> PathBuf {
    // The tests crate sits one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate has a parent directory")
        .join("packer")
}

fn read(name: &str) -> String {
    let path = packer_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs user-data as a test may: in `etc`, without root or systemd, with
/// only the variables given (none inherited from whoever runs the tests).
fn run_user_data(etc: &Path, vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(packer_dir().join("user-data.sh"))
        .env("SERVITOR_ETC", etc)
        .env("SERVITOR_NO_SYSTEMCTL", "1");
    for name in [
        "COORDINATOR",
        "CA_SHA256",
        "ENROLL",
        "JOIN_TOKEN",
        "CAPACITY",
        "DEFAULT_IMAGE",
    ] {
        command.env_remove(name);
    }
    for (name, value) in vars {
        command.env(name, value);
    }
    command.output().expect("running bash packer/user-data.sh")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The value of `--config` in a unit's command line.
fn config_arg(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "--config")?;
    words.next()
}

#[test]
fn user_data_writes_a_config_the_agent_loads() {
    let etc = tempfile::tempdir().expect("creating a temporary directory");
    let output = run_user_data(
        etc.path(),
        &[
            ("COORDINATOR", "10.1.2.3:7443"),
            ("CA_SHA256", PIN),
            ("ENROLL", "join-token"),
            ("JOIN_TOKEN", TOKEN),
            ("CAPACITY", "3"),
            ("DEFAULT_IMAGE", "alpine:3.20"),
        ],
    );
    assert!(output.status.success(), "{}", describe(&output));

    let config = AgentConfig::load(&etc.path().join("agent.toml"))
        .unwrap_or_else(|e| panic!("user-data wrote a config the agent rejects: {e}"));
    assert_eq!(config.coordinator, "10.1.2.3:7443");
    assert_eq!(config.capacity, 3);
    assert_eq!(config.ca_sha256.as_deref(), Some(PIN));
    assert_eq!(config.ca_file, None);
    assert_eq!(config.join_token_file, etc.path().join("join-token"));
    assert_eq!(config.executor.kind, ExecutorKind::Docker);
    assert_eq!(
        config.executor.default_image.as_deref(),
        Some("alpine:3.20")
    );
    assert!(
        config.instance.imds,
        "instances watch IMDS for Spot notices"
    );

    let token = std::fs::read_to_string(&config.join_token_file).expect("reading the join token");
    assert_eq!(token.trim(), TOKEN);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config.join_token_file)
        .expect("stat of the join token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the join token is a secret");
}

#[test]
fn user_data_by_default_enrolls_by_instance_identity_and_holds_no_secret() {
    let etc = tempfile::tempdir().expect("creating a temporary directory");
    let output = run_user_data(etc.path(), &[("CA_SHA256", PIN)]);
    assert!(output.status.success(), "{}", describe(&output));
    let config = AgentConfig::load(&etc.path().join("agent.toml"))
        .unwrap_or_else(|e| panic!("user-data wrote a config the agent rejects: {e}"));
    assert_eq!(config.capacity, 1);
    assert_eq!(config.enroll, EnrollMethod::AwsIid);
    assert!(config.instance.imds);
    assert!(
        !etc.path().join("join-token").exists(),
        "no token is written to the instance"
    );
}

#[test]
fn user_data_rejects_a_bad_pin_or_an_empty_token_by_name() {
    let etc = tempfile::tempdir().expect("creating a temporary directory");
    for (vars, variable) in [
        (
            vec![("CA_SHA256", "sha256:abc"), ("JOIN_TOKEN", TOKEN)],
            "CA_SHA256",
        ),
        (
            vec![
                ("CA_SHA256", PIN.trim_start_matches("sha256:")),
                ("JOIN_TOKEN", TOKEN),
            ],
            "CA_SHA256",
        ),
        // The template's own placeholder must not pass for a pin.
        (vec![("JOIN_TOKEN", TOKEN)], "CA_SHA256"),
        (
            vec![
                ("CA_SHA256", PIN),
                ("ENROLL", "join-token"),
                ("JOIN_TOKEN", ""),
            ],
            "JOIN_TOKEN",
        ),
        (
            vec![
                ("CA_SHA256", PIN),
                ("ENROLL", "join-token"),
                ("JOIN_TOKEN", " \n"),
            ],
            "JOIN_TOKEN",
        ),
        // A token in user-data with identity enrollment would be readable
        // for nothing.
        (
            vec![("CA_SHA256", PIN), ("JOIN_TOKEN", TOKEN)],
            "JOIN_TOKEN",
        ),
        (vec![("CA_SHA256", PIN), ("ENROLL", "password")], "ENROLL"),
    ] {
        let output = run_user_data(etc.path(), &vars);
        assert!(!output.status.success(), "{vars:?}: {}", describe(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{vars:?}: {}", describe(&output));
        assert!(
            !etc.path().join("agent.toml").exists(),
            "{vars:?}: nothing is written from bad input"
        );
    }
}

#[test]
fn scripts_parse() {
    for script in ["provision.sh", "user-data.sh"] {
        let output = Command::new("bash")
            .arg("-n")
            .arg(packer_dir().join(script))
            .output()
            .expect("running bash -n");
        assert!(output.status.success(), "{script}: {}", describe(&output));
    }
}

#[test]
fn unit_reads_the_config_user_data_writes() {
    let user_data = read("user-data.sh");
    let prefix = "SERVITOR_ETC=\"${SERVITOR_ETC:-";
    let etc = user_data
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_suffix("}\""))
        .expect("user-data.sh sets SERVITOR_ETC with a default");
    let written = format!("{etc}/agent.toml");

    let unit = read("servitor-agent.service");
    let directive = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("servitor-agent.service has no {key}"))
    };
    for key in ["ExecStartPre", "ExecStart"] {
        assert_eq!(
            config_arg(directive(key)),
            Some(written.as_str()),
            "{key} must read the file user-data writes"
        );
    }
    assert!(directive("ExecStartPre").contains("--check-config"));
    assert_eq!(directive("ConditionPathExists"), written);

    // The state directory systemd creates is the one the config names.
    let etc_dir = tempfile::tempdir().expect("creating a temporary directory");
    let output = run_user_data(etc_dir.path(), &[("CA_SHA256", PIN)]);
    assert!(output.status.success(), "{}", describe(&output));
    let config = AgentConfig::load(&etc_dir.path().join("agent.toml")).expect("loading the config");
    assert_eq!(
        config.state_dir,
        Some(Path::new("/var/lib").join(directive("StateDirectory")))
    );
}
