#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The image's provisioning for real: `packer/provision.sh` runs, the way
//! the Packer template runs it, in a container of a minimal Debian 12 made
//! with debootstrap, with the built agent binary uploaded where the template
//! uploads it. The result must have what an instance needs (Docker, git,
//! the agent and its unit enabled, Docker log rotation, a journal size cap),
//! the agent must run on that image's glibc, and a second run must succeed
//! and change nothing.
//!
//! The Debian root file system is built once and kept in the user's cache
//! directory (and as a local Docker image). Building it needs root; without
//! root, and without a cached copy, the test says so and does nothing else.
//! Packages come from the mirror apt on this machine uses.

use servitor_tests::{describe_output as describe, workspace_root as workspace};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const SUITE: &str = "bookworm";
/// Debian's minimal base, plus systemd, which Debian's cloud images have and
/// provision.sh uses (`systemctl enable`).
const DEBOOTSTRAP_OPTIONS: &[&str] = &["--variant=minbase", "--include=systemd,systemd-sysv"];
/// Where Debian's debootstrap package installs it.
const DEBOOTSTRAP: &str = "/usr/sbin/debootstrap";
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Files provision.sh installs, and the directories it makes.
const INSTALLED: &[&str] = &[
    "/usr/local/bin/servitor-agent",
    "/etc/systemd/system/servitor-agent.service",
    "/etc/docker/daemon.json",
    "/etc/systemd/journald.conf.d/60-servitor-agent.conf",
    "/var/lib/servitor-agent",
    "/etc/servitor-agent",
];

fn run(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().unwrap_or_else(|e| {
        let need = match program.rsplit('/').next() {
            Some("docker") => "the Docker engine",
            Some("debootstrap") => "Debian's debootstrap (tests/run.sh installs it)",
            _ => "it",
        };
        panic!("cannot run {program} ({e}); this test needs {need}")
    })
}

fn succeed(command: &mut Command) -> Output {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?}: {}",
        describe(&output)
    );
    output
}

/// Containers and images this test makes, removed however it ends.
#[derive(Default)]
struct Scratch {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = Command::new("docker")
                .args(["rm", "-f", container])
                .output();
        }
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
}

/// The Debian mirror apt on this machine uses, so the test works wherever
/// apt does (a local mirror, a proxy); `SERVITOR_DEBIAN_MIRROR` overrides it.
fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("SERVITOR_DEBIAN_MIRROR") {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut listed: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        listed.sort();
        files.extend(listed);
    }
    let is_mirror = |uri: &str| {
        (uri.starts_with("http://") || uri.starts_with("https://"))
            && uri.trim_end_matches('/').ends_with("/debian")
    };
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        for line in text.lines().map(str::trim) {
            let uris: Vec<&str> = if name.ends_with(".sources") {
                match line.strip_prefix("URIs:") {
                    Some(rest) => rest.split_whitespace().collect(),
                    None => continue,
                }
            } else if name.ends_with(".list") {
                // deb [options] uri suite components
                match line.strip_prefix("deb ") {
                    Some(rest) => rest
                        .split_whitespace()
                        .filter(|w| !w.starts_with('[') && !w.ends_with(']'))
                        .take(1)
                        .collect(),
                    None => continue,
                }
            } else {
                continue;
            };
            if let Some(uri) = uris.into_iter().find(|uri| is_mirror(uri)) {
                return uri.trim_end_matches('/').to_owned();
            }
        }
    }
    FALLBACK_MIRROR.to_owned()
}

/// The Docker image of the debootstrapped Debian: made from the cached root
/// file system, which is made first if it is not cached. None, having said
/// why, when it cannot be made here.
fn base_image() -> Option<String> {
    // Named for what is in it, so that changing the options makes a new one.
    let key = crc32fast::hash(format!("{SUITE} {}", DEBOOTSTRAP_OPTIONS.join(" ")).as_bytes());
    let image = format!("servitor-test/debian:{SUITE}-{key:08x}");
    if run(Command::new("docker").args(["image", "inspect", &image]))
        .status
        .success()
    {
        return Some(image);
    }
    let cache = cache_dir();
    let tarball = cache.join(format!("servitor-debian-{SUITE}-{key:08x}.tar"));
    if !tarball.is_file() {
        let uid = std::fs::metadata("/proc/self")
            .expect("reading /proc/self")
            .uid();
        if uid != 0 {
            println!(
                "skipped: debootstrap needs root to make the Debian {SUITE} root file system \
                 ({} is not there yet); run the tests as root, as CI does",
                tarball.display()
            );
            return None;
        }
        std::fs::create_dir_all(&cache).unwrap();
        // Beside the cache, so that the finished tarball is only renamed.
        let work = tempfile::tempdir_in(&cache).unwrap();
        let root = work.path().join("root");
        let mirror = debian_mirror();
        println!("making Debian {SUITE} from {mirror} with debootstrap (once)");
        succeed(
            // Root's PATH has sbin; a PATH that lacks it should not fail this.
            Command::new(if Path::new(DEBOOTSTRAP).is_file() {
                DEBOOTSTRAP
            } else {
                "debootstrap"
            })
            .args(DEBOOTSTRAP_OPTIONS)
            .arg(SUITE)
            .arg(&root)
            .arg(&mirror),
        );
        let partial = work.path().join("root.tar");
        succeed(
            Command::new("tar")
                .arg("--numeric-owner")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&partial)
                .arg("."),
        );
        std::fs::rename(&partial, &tarball).unwrap();
    }
    succeed(
        Command::new("docker")
            .arg("import")
            .arg(&tarball)
            .arg(&image),
    );
    Some(image)
}

/// The value of a `local` in the Packer template.
fn template_local(template: &str, name: &str) -> String {
    template
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("the template has no local {name}"))
}

/// Runs provision.sh as the template does, in a container of `from`, and
/// commits the result as `to`. The template makes `upload_dir`, uploads the
/// agent binary and its unit there, and runs the script as root with
/// `UPLOAD_DIR` set.
fn provision(
    scratch: &mut Scratch,
    from: &str,
    to: &str,
    uploads: &Path,
    upload_dir: &str,
) -> Output {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "servitor-provision-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    scratch.containers.push(name.clone());
    succeed(Command::new("docker").args([
        "create",
        "--name",
        &name,
        from,
        "sh",
        "-c",
        &format!("chmod +x /tmp/provision.sh; env UPLOAD_DIR={upload_dir} /tmp/provision.sh"),
    ]));
    succeed(
        Command::new("docker")
            .arg("cp")
            .arg(format!("{}/.", uploads.display()))
            .arg(format!("{name}:{upload_dir}")),
    );
    succeed(
        Command::new("docker")
            .arg("cp")
            .arg(workspace().join("packer/provision.sh"))
            .arg(format!("{name}:/tmp/provision.sh")),
    );
    let output = run(Command::new("docker").args(["start", "--attach", &name]));
    succeed(Command::new("docker").args(["commit", &name, to]));
    scratch.images.push(to.to_owned());
    output
}

/// Runs a bash script in a container of `image`.
fn in_image(image: &str, script: &str) -> Output {
    run(Command::new("docker").args(["run", "--rm", image, "bash", "-c", script]))
}

fn stdout_of(image: &str, script: &str) -> String {
    let output = in_image(image, script);
    assert!(output.status.success(), "{script}: {}", describe(&output));
    String::from_utf8(output.stdout).unwrap()
}

/// What provisioning decides, in a form to compare: the installed files'
/// modes, owners and contents, the enabled units, the agent's user and
/// groups, and every package with its version.
fn snapshot(image: &str) -> String {
    let installed = INSTALLED.join(" ");
    stdout_of(
        image,
        &format!(
            "set -e
            stat -c '%n %a %U:%G' {installed}
            for f in {installed}; do if [ -f \"$f\" ]; then sha256sum \"$f\"; fi; done
            find /etc/systemd/system -type l -printf '%p -> %l\\n' | sort
            getent passwd servitor-agent
            getent group docker servitor-agent
            dpkg-query -W -f '${{Package}} ${{Version}} ${{Status}}\\n' | sort"
        ),
    )
}

#[test]
fn provisioning_installs_what_an_instance_needs_and_a_second_run_changes_nothing() {
    let Some(base) = base_image() else {
        return;
    };
    let mut scratch = Scratch::default();
    let template =
        std::fs::read_to_string(workspace().join("packer/servitor-agent.pkr.hcl")).unwrap();
    let upload_dir = template_local(&template, "upload_dir");

    // What the template's file provisioner uploads: the agent binary and the
    // unit beside the template.
    let uploads = tempfile::tempdir().unwrap();
    let agent = servitor_tests::agent_binary().unwrap();
    std::fs::copy(&agent, uploads.path().join("servitor-agent")).unwrap();
    let unit = std::fs::read_to_string(workspace().join("packer/servitor-agent.service")).unwrap();
    std::fs::write(uploads.path().join("servitor-agent.service"), &unit).unwrap();

    let tag = format!("servitor-test/provisioned:{}", std::process::id());
    let first = format!("{tag}-1");
    let output = provision(&mut scratch, &base, &first, uploads.path(), &upload_dir);
    assert!(
        output.status.success(),
        "provision.sh: {}",
        describe(&output)
    );

    // Docker and git from Debian.
    for package in ["docker.io", "git"] {
        let status = stdout_of(&first, &format!("dpkg-query -W -f '${{Status}}' {package}"));
        assert_eq!(status, "install ok installed", "{package}");
    }
    for program in ["dockerd", "docker", "git"] {
        stdout_of(&first, &format!("command -v {program}"));
    }

    // The agent, at the path its unit starts, runs on this glibc.
    let version = stdout_of(&first, "/usr/local/bin/servitor-agent --version");
    assert!(
        version.starts_with("servitor-agent "),
        "servitor-agent --version printed {version:?}"
    );
    assert_eq!(
        stdout_of(&first, "cat /etc/systemd/system/servitor-agent.service"),
        unit
    );
    // The unit checks out against this system's own systemd, binary and
    // docker.service included.
    let output = in_image(
        &first,
        "SYSTEMD_LOG_COLOR=0 systemd-analyze verify /etc/systemd/system/servitor-agent.service",
    );
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "systemd-analyze verify in the image: {}",
        describe(&output)
    );

    // Enabled, with Docker, so both start at boot.
    for (unit, target) in [
        (
            "servitor-agent.service",
            "/etc/systemd/system/servitor-agent.service",
        ),
        ("docker.service", "/lib/systemd/system/docker.service"),
    ] {
        let link = stdout_of(
            &first,
            &format!("readlink /etc/systemd/system/multi-user.target.wants/{unit}"),
        );
        assert_eq!(link.trim(), target, "{unit} is not enabled");
    }
    // The agent's user drives Docker; its state is its own.
    let groups = stdout_of(&first, "id -nG servitor-agent");
    assert!(
        groups.split_whitespace().any(|g| g == "docker"),
        "servitor-agent is in {groups}"
    );
    assert_eq!(
        stdout_of(&first, "stat -c '%a %U' /var/lib/servitor-agent").trim(),
        "700 servitor-agent"
    );

    // Container logs are rotated.
    let daemon: serde_json::Value =
        serde_json::from_str(&stdout_of(&first, "cat /etc/docker/daemon.json"))
            .expect("/etc/docker/daemon.json is JSON");
    assert_eq!(daemon["log-driver"], "json-file", "{daemon}");
    for option in ["max-size", "max-file"] {
        assert!(
            daemon["log-opts"][option]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "daemon.json log-opts has no {option}: {daemon}"
        );
    }
    // The journal has a cap, as journald reads its configuration.
    let journald = stdout_of(&first, "systemd-analyze cat-config systemd/journald.conf");
    let cap = journald
        .lines()
        // The last setting read wins: a drop-in's over journald.conf's.
        .rev()
        .find_map(|l| l.trim().strip_prefix("SystemMaxUse="))
        .unwrap_or_else(|| panic!("no SystemMaxUse in journald's configuration:\n{journald}"));
    assert!(
        cap.trim_end_matches(['K', 'M', 'G'])
            .parse::<u64>()
            .is_ok_and(|n| n > 0),
        "SystemMaxUse={cap}"
    );

    // Again, on its own result: it succeeds and changes nothing.
    let second = format!("{tag}-2");
    let output = provision(&mut scratch, &first, &second, uploads.path(), &upload_dir);
    assert!(
        output.status.success(),
        "provision.sh, second run: {}",
        describe(&output)
    );
    let (before, after) = (snapshot(&first), snapshot(&second));
    if before != after {
        let changed: Vec<String> = after
            .lines()
            .filter(|l| !before.lines().any(|b| b == *l))
            .map(|l| format!("+ {l}"))
            .chain(
                before
                    .lines()
                    .filter(|l| !after.lines().any(|a| a == *l))
                    .map(|l| format!("- {l}")),
            )
            .collect();
        panic!("the second run changed the image:\n{}", changed.join("\n"));
    }
}
