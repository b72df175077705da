#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! What ships besides the binaries, checked with the tools that will read it:
//! every shell script in the repository passes shellcheck, both systemd
//! units pass `systemd-analyze verify` and keep their sandbox (their
//! exposure score), and the coordinator's unit hands over the tokens and
//! makes the directories its AWS example configuration names.
//!
//! A missing tool fails the test with the Debian package to install;
//! `tests/run.sh` installs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use servitor_coordinator::config::Config;
use servitor_tests::{describe_output as describe, workspace_root as workspace};

const COORDINATOR_UNIT: &str = "coordinator/systemd/servitor-coordinator.service";
const AGENT_UNIT: &str = "packer/servitor-agent.service";
const AWS_EXAMPLE: &str = "coordinator/coordinator.aws.example.toml";

/// The exposure `systemd-analyze security` gives each unit (0 is a fully
/// sandboxed service, 10 none at all), with a little room for a new
/// systemd weighing things differently. The agent's is higher because it
/// keeps a static user for its docker group (see the unit).
const COORDINATOR_MAX_EXPOSURE: f64 = 1.5;
const AGENT_MAX_EXPOSURE: f64 = 2.0;

/// Runs a tool the test cannot do without, naming its Debian package when
/// it is missing.
fn run_tool(command: &mut Command, package: &str) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}); install Debian's {package} (tests/run.sh does)")
    })
}

/// Shell scripts git tracks: `*.sh`, and files whose first line runs sh or
/// bash.
fn tracked_shell_scripts() -> Vec<PathBuf> {
    let root = workspace();
    let output = run_tool(
        Command::new("git")
            .args(["ls-files", "-z"])
            .current_dir(&root),
        "git",
    );
    assert!(
        output.status.success(),
        "git ls-files: {}",
        describe(&output)
    );
    let mut scripts = Vec::new();
    for name in output.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let path = root.join(String::from_utf8_lossy(name).as_ref());
        // Listed but deleted in the work tree: nothing to check.
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let first_line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        let first_line = String::from_utf8_lossy(first_line);
        let shebang = first_line.strip_prefix("#!").is_some_and(|command| {
            command
                .split_whitespace()
                .filter(|word| *word != "/usr/bin/env")
                .take(1)
                .any(|interpreter| {
                    let name = interpreter.rsplit('/').next().unwrap_or(interpreter);
                    matches!(name, "sh" | "bash" | "dash")
                })
        });
        if shebang || path.extension().is_some_and(|e| e == "sh") {
            scripts.push(path);
        }
    }
    scripts
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let root = workspace();
    let scripts = tracked_shell_scripts();
    let names: Vec<String> = scripts
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    // The selection itself is under test: an empty list would pass anything.
    for known in [
        ".ci/run",
        "tests/run.sh",
        "packer/provision.sh",
        "packer/user-data.sh",
    ] {
        assert!(
            names.iter().any(|n| n == known),
            "{known} is not among the scripts found: {names:?}"
        );
    }

    // shellcheck finds what it should here, so a silent pass below means
    // the scripts are clean, not that the tool looked at nothing.
    let dir = tempfile::tempdir().unwrap();
    let sloppy = dir.path().join("sloppy.sh");
    std::fs::write(&sloppy, "#!/bin/sh\nrm -rf $1/\n").unwrap();
    let output = run_tool(Command::new("shellcheck").arg(&sloppy), "shellcheck");
    assert!(
        !output.status.success() && String::from_utf8_lossy(&output.stdout).contains("SC2086"),
        "shellcheck missed an unquoted variable: {}",
        describe(&output)
    );

    let output = run_tool(
        Command::new("shellcheck")
            .arg("--external-sources")
            .args(&names)
            .current_dir(&root),
        "shellcheck",
    );
    assert!(
        output.status.success(),
        "shellcheck finds problems in {names:?}:\n{}",
        describe(&output)
    );
}

/// A root directory for `systemd-analyze verify --root`: the host's own
/// units (for the targets ours name) and the unit under test, with an
/// executable placeholder at every path its commands start. verify checks
/// that a command exists and is executable, never runs it, and the binaries
/// are installed in /usr/local/bin on a server, not on the machine running
/// the tests.
fn verify_root(unit_text: &str, unit_name: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|dir| dir.join("sysinit.target").is_file())
        .expect("no systemd units on this machine (sysinit.target); install Debian's systemd");
    let copy = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(system_units).unwrap() {
        let entry = entry.unwrap();
        // Units only; the .wants directories add nothing verify needs.
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    for line in unit_text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !key.starts_with("Exec") {
            continue;
        }
        let program = value.trim_start_matches(['-', '@', ':', '+', '!']);
        let program = program.split_whitespace().next().unwrap();
        assert!(
            program.starts_with('/'),
            "{unit_name}: {key} must name an absolute path"
        );
        let placeholder = root.path().join(program.trim_start_matches('/'));
        std::fs::create_dir_all(placeholder.parent().unwrap()).unwrap();
        std::fs::write(&placeholder, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&placeholder, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join(unit_name), unit_text).unwrap();
    root
}

/// `systemd-analyze verify` of `unit_text` installed as
/// /etc/systemd/system/`unit_name`. It exits 0 on mere warnings (an
/// unknown key, a bad value it ignores), so anything it says is a finding.
fn verify(unit_text: &str, unit_name: &str) -> Result<(), String> {
    let root = verify_root(unit_text, unit_name);
    let output = run_tool(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(root.path().join("etc/systemd/system").join(unit_name))
            .env("SYSTEMD_LOG_COLOR", "0"),
        "systemd",
    );
    if output.status.success() && output.stdout.is_empty() && output.stderr.is_empty() {
        Ok(())
    } else {
        Err(describe(&output))
    }
}

#[test]
fn both_units_pass_systemd_analyze_verify() {
    for path in [COORDINATOR_UNIT, AGENT_UNIT] {
        let text = std::fs::read_to_string(workspace().join(path)).unwrap();
        let name = Path::new(path).file_name().unwrap().to_str().unwrap();
        if let Err(findings) = verify(&text, name) {
            panic!("systemd-analyze verify {path}:\n{findings}");
        }
        // And verify reports what it should: a misspelt key.
        let broken = text.replace("ProtectSystem=strict", "ProtectSytem=strict");
        assert_ne!(broken, text, "{path} sets ProtectSystem=strict");
        let findings = verify(&broken, name).expect_err("verify accepted a misspelt key");
        assert!(findings.contains("ProtectSytem"), "{findings}");
    }
}

/// The overall exposure `systemd-analyze security --offline=true` gives.
fn exposure(path: &str) -> f64 {
    let output = run_tool(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(workspace().join(path)),
        "systemd",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| {
            let rest = line.split_once("Overall exposure level for ")?.1;
            rest.split_once(": ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no exposure level for {path}: {}", describe(&output)))
}

#[test]
fn both_units_keep_their_sandbox() {
    for (path, max) in [
        (COORDINATOR_UNIT, COORDINATOR_MAX_EXPOSURE),
        (AGENT_UNIT, AGENT_MAX_EXPOSURE),
    ] {
        let score = exposure(path);
        assert!(
            score <= max,
            "{path}: systemd-analyze security rates its exposure {score}, more than {max}; \
             run `systemd-analyze security --offline=true {path}` to see what is open"
        );
    }
}

/// The values of `key` in a unit, in order.
fn directives<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn coordinator_unit_provides_what_the_aws_example_names() {
    let unit = std::fs::read_to_string(workspace().join(COORDINATOR_UNIT)).unwrap();
    let example = std::fs::read_to_string(workspace().join(AWS_EXAMPLE)).unwrap();
    let config = Config::from_toml_str(&example, AWS_EXAMPLE).unwrap();
    let unit_name = Path::new(COORDINATOR_UNIT).file_name().unwrap();

    // Each token file is a credential the unit loads, so the service reads
    // it from systemd and the token on disk can stay root's alone.
    let credentials = Path::new("/run/credentials").join(unit_name);
    let loaded: Vec<(&str, &str)> = directives(&unit, "LoadCredential")
        .into_iter()
        .map(|v| v.split_once(':').expect("LoadCredential=NAME:PATH"))
        .collect();
    for (setting, file) in [
        (
            "gitlab.token_file",
            config
                .gitlab
                .token_file
                .as_ref()
                .expect("the example names the runner token file"),
        ),
        ("agents.join_token_file", &config.agents.join_token_file),
    ] {
        let name = file
            .strip_prefix(&credentials)
            .unwrap_or_else(|_| {
                panic!(
                    "{AWS_EXAMPLE}: {setting} {} is not in {}",
                    file.display(),
                    credentials.display()
                )
            })
            .to_str()
            .unwrap();
        let (_, source) = loaded
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{setting}: the unit loads no credential {name}"));
        assert!(
            source.starts_with("/etc/servitor/"),
            "credential {name} comes from {source}"
        );
    }

    // The state directory systemd makes is the example's state_dir, and the
    // configuration the unit reads is in the directory systemd makes.
    assert_eq!(
        directives(&unit, "StateDirectory"),
        [config
            .state_dir
            .strip_prefix("/var/lib")
            .unwrap()
            .to_str()
            .unwrap()]
    );
    let etc = format!("/etc/{}/", directives(&unit, "ConfigurationDirectory")[0]);
    for key in ["ExecStartPre", "ExecStart"] {
        for line in directives(&unit, key) {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "--config").unwrap();
            let path = words.next().unwrap();
            assert!(path.starts_with(&etc), "{key} reads {path}, outside {etc}");
        }
    }
}
