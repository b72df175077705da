//! The Spot instance image's files against the agent they serve: the
//! configuration `packer/user-data.sh` writes must load with the agent's own
//! loader (unknown keys are errors there), the systemd unit must read the file
//! user-data writes, and the scripts must at least parse. The template
//! passes `packer validate` of Debian's Packer as far as that version reads
//! it, and its build instance takes IMDSv2 tokens only, with hop limit 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use servitor_agent::config::{AgentConfig, EnrollMethod, ExecutorKind};
use servitor_tests::describe_output as describe;

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

/// Runs `packer/user-data.sh` (see [`servitor_tests::run_user_data`]).
fn run_user_data(etc: &Path, vars: &[(&str, &str)]) -> Output {
    servitor_tests::run_user_data(&packer_dir().join("user-data.sh"), etc, vars)
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
            ("RUNNER", "build"),
            ("PRIVILEGED", "true"),
        ],
    );
    assert!(output.status.success(), "{}", describe(&output));

    let config = AgentConfig::load(&etc.path().join("agent.toml"))
        .unwrap_or_else(|e| panic!("user-data wrote a config the agent rejects: {e}"));
    assert_eq!(config.coordinator, "10.1.2.3:7443");
    assert_eq!(config.capacity, 3);
    assert_eq!(
        config.runner, "build",
        "the instance takes its runner's jobs"
    );
    assert!(config.executor.privileged, "Docker-in-Docker needs it");
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
    assert_eq!(
        config.runner, "",
        "a coordinator with one runner needs no name"
    );
    assert!(!config.executor.privileged, "not privileged unless asked");
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
        (vec![("CA_SHA256", PIN), ("RUNNER", "build jobs")], "RUNNER"),
        (
            vec![("CA_SHA256", PIN), ("PRIVILEGED", "yes")],
            "PRIVILEGED",
        ),
        (vec![("CA_SHA256", PIN), ("RUNNER", "x\"y")], "RUNNER"),
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

/// The template with what Debian's Packer (1.6.6, the newest any Debian
/// release packages) cannot read taken out: the `packer { required_plugins }`
/// block (1.7 and later), and the build instance's `metadata_options` and
/// the AMI's `imds_support`, which its built-in amazon builder predates.
/// Every one of them must be there to be taken out; what they say is
/// checked by `template_requires_imdsv2_with_hop_limit_1` instead.
fn template_for_packer_1_6(template: &str) -> String {
    fn cut_block(text: &str, opening: &str) -> String {
        let start = text
            .find(opening)
            .unwrap_or_else(|| panic!("the template has no `{opening}`"));
        let close = format!(
            "\n{}}}\n",
            " ".repeat(opening.len() - opening.trim_start().len())
        );
        let end = start
            + text[start..]
                .find(&close)
                .unwrap_or_else(|| panic!("`{opening}` is not closed"))
            + close.len();
        format!("{}{}", &text[..start], &text[end..])
    }
    let text = cut_block(template, "packer {");
    let text = cut_block(&text, "  metadata_options {");
    let line = "  imds_support = \"v2.0\"\n";
    assert!(text.contains(line), "the template has no `{}`", line.trim());
    text.replace(line, "")
}

fn packer(args: &[&str], dir: &Path) -> Output {
    Command::new("packer")
        .args(args)
        .current_dir(dir)
        // No check-point calls home from a test.
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run packer ({e}); install Debian's packer (tests/run.sh does)")
        })
}

#[test]
fn template_validates_with_debians_packer() {
    let template = read("servitor-agent.pkr.hcl");

    // The whole template is formatted as packer fmt writes it.
    let output = packer(
        &["fmt", "-check", "-diff", "servitor-agent.pkr.hcl"],
        &packer_dir(),
    );
    assert!(output.status.success(), "packer fmt: {}", describe(&output));

    // The rest is validated in full: every builder and provisioner setting
    // by name and value, variables, locals, and that the files it uploads
    // and runs exist. It sits beside copies of packer/ since the template
    // finds them through path.root; the agent binary is the one built.
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    for entry in std::fs::read_dir(packer_dir()).expect("listing packer/") {
        let entry = entry.expect("listing packer/");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copying packer/");
    }
    let trimmed = template_for_packer_1_6(&template);
    let agent = servitor_tests::agent_binary().expect("the built agent");
    let agent_var = format!("agent_binary={}", agent.display());
    let validate = |template: &str| {
        std::fs::write(dir.path().join("check.pkr.hcl"), template).expect("writing the template");
        packer(
            &[
                "validate",
                "-var",
                "region=eu-west-1",
                "-var",
                &agent_var,
                "check.pkr.hcl",
            ],
            dir.path(),
        )
    };
    let output = validate(&trimmed);
    assert!(
        output.status.success(),
        "packer validate: {}",
        describe(&output)
    );

    // It does find mistakes: a misspelt setting (reported on stdout), and
    // an upload that is not there.
    let output = validate(&trimmed.replace("ssh_username", "ssh_user_name"));
    assert!(
        !output.status.success() && describe(&output).contains("\"ssh_user_name\""),
        "{}",
        describe(&output)
    );
    std::fs::remove_file(dir.path().join("provision.sh")).expect("removing a copy");
    let output = validate(&trimmed);
    assert!(
        !output.status.success() && describe(&output).contains("provision.sh"),
        "{}",
        describe(&output)
    );
}

#[test]
fn template_requires_imdsv2_with_hop_limit_1() {
    let template = read("servitor-agent.pkr.hcl");
    let start = template
        .find("  metadata_options {")
        .expect("the template sets metadata_options");
    let block = &template[start..start + template[start..].find("\n  }").expect("closed")];
    let setting = |key: &str| {
        block
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("metadata_options has no {key}"))
    };
    assert_eq!(setting("http_endpoint"), "\"enabled\"");
    assert_eq!(setting("http_tokens"), "\"required\"");
    assert_eq!(setting("http_put_response_hop_limit"), "1");
    assert!(
        template.contains("\n  imds_support = \"v2.0\"\n"),
        "instances launched from the image require IMDSv2"
    );
}
