//! The job image tests and the demo run, built locally because no registry
//! is reachable: the host's statically linked busybox in an otherwise empty
//! root file system, imported with `docker import`.
//!
//! Not responsible for running anything in it (the agent's Docker executor
//! does) nor for any image a real job names.

use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

/// The statically linked busybox Debian's busybox-static installs.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// Applets the local job image links to busybox: what CI scripts commonly
/// call.
const BUSYBOX_APPLETS: &[&str] = &[
    "[",
    "ash",
    "awk",
    "basename",
    "cat",
    "chmod",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "du",
    "echo",
    "env",
    "expr",
    "false",
    "find",
    "grep",
    "gzip",
    "head",
    "hostname",
    "id",
    "kill",
    "ln",
    "ls",
    "md5sum",
    "mkdir",
    "mktemp",
    "mv",
    "printf",
    "ps",
    "pwd",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "sh",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "tail",
    "tar",
    "tee",
    "test",
    "timeout",
    "touch",
    "tr",
    "true",
    "uname",
    "uniq",
    "wc",
    "wget",
    "which",
    "whoami",
    "xargs",
    "yes",
];

/// Why the job image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path} is missing ({source}); install Debian's busybox-static to build the local job image")]
    BusyboxMissing {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a statically linked executable ({reason}) and would not run in an empty image; install Debian's busybox-static")]
    BusyboxNotStatic { path: &'static str, reason: String },
    #[error("cannot {what} through the Docker engine: {source}")]
    Docker {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot write the image's root file system: {0}")]
    Archive(#[source] std::io::Error),
}

/// Makes sure image `tag` exists locally, building it when missing from the
/// host's statically linked busybox: a root file system with `bin/busybox`,
/// its common applets (`sh`, `echo`, `sleep`…) as symlinks, `/tmp` and a
/// root user, imported as an image. Returns whether it built the image.
///
/// # Errors
/// Fails when busybox is missing or not static (the message says to install
/// Debian's busybox-static), or when the engine refuses the import.
pub async fn ensure_local_image(docker: &Docker, tag: &str) -> Result<bool, ImageError> {
    ensure_image(
        docker,
        tag,
        vec![
            "ENV PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
            r#"CMD ["sh"]"#.to_owned(),
        ],
    )
    .await
}

/// The port the service image serves HTTP on.
pub const SERVICE_PORT: u16 = 8080;

/// Makes sure a service image `tag` exists locally: the job image's root
/// file system, exposing [`SERVICE_PORT`] and serving `service ready` over
/// HTTP there (busybox's httpd), like a database or web service a job
/// talks to.
///
/// # Errors
/// As [`ensure_local_image`].
pub async fn ensure_service_image(docker: &Docker, tag: &str) -> Result<bool, ImageError> {
    ensure_image(
        docker,
        tag,
        vec![
            "ENV PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
            format!("EXPOSE {SERVICE_PORT}/tcp"),
            format!(
                r#"CMD ["sh", "-c", "mkdir -p /www && echo service ready > /www/index.html && exec busybox httpd -f -p {SERVICE_PORT} -h /www"]"#
            ),
        ],
    )
    .await
}

async fn ensure_image(
    docker: &Docker,
    tag: &str,
    changes: Vec<String>,
) -> Result<bool, ImageError> {
    // Jobs starting together would each import the image, leaving all but
    // the last import behind as untagged images.
    static IMPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _importing = IMPORTING.lock().await;
    match docker.inspect_image(tag).await {
        Ok(_) => return Ok(false),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(source) => {
            return Err(ImageError::Docker {
                what: "inspect the job image",
                source,
            })
        }
    }
    let busybox =
        tokio::fs::read(BUSYBOX_PATH)
            .await
            .map_err(|source| ImageError::BusyboxMissing {
                path: BUSYBOX_PATH,
                source,
            })?;
    match elf_has_interpreter(&busybox) {
        Ok(false) => {}
        Ok(true) => {
            return Err(ImageError::BusyboxNotStatic {
                path: BUSYBOX_PATH,
                reason: "it names a dynamic loader".to_owned(),
            })
        }
        Err(reason) => {
            return Err(ImageError::BusyboxNotStatic {
                path: BUSYBOX_PATH,
                reason: reason.to_owned(),
            })
        }
    }
    let rootfs = busybox_rootfs(&busybox).map_err(ImageError::Archive)?;
    let options = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(tag)
        .changes(changes)
        .build();
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(rootfs.into())), None);
    while let Some(item) = progress.next().await {
        item.map_err(|source| ImageError::Docker {
            what: "import the job image",
            source,
        })?;
    }
    Ok(true)
}

/// Whether an ELF executable asks for a dynamic loader (has a `PT_INTERP`
/// program header). `Err` says why the bytes are not a readable ELF file.
fn elf_has_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
    const MAGIC: &[u8] = b"\x7fELF";
    const CLASS_32: u8 = 1;
    const CLASS_64: u8 = 2;
    const DATA_LE: u8 = 1;
    const DATA_BE: u8 = 2;
    const PT_INTERP: u32 = 3;

    if elf.get(..MAGIC.len()) != Some(MAGIC) {
        return Err("not an ELF file");
    }
    let little = match elf.get(5) {
        Some(&DATA_LE) => true,
        Some(&DATA_BE) => false,
        _ => return Err("unknown ELF byte order"),
    };
    let read = |offset: usize, len: usize| -> Result<u64, &'static str> {
        let bytes = offset
            .checked_add(len)
            .and_then(|end| elf.get(offset..end))
            .ok_or("truncated ELF file")?;
        let mut value = 0u64;
        for i in 0..len {
            let byte = if little { bytes[len - 1 - i] } else { bytes[i] };
            value = (value << 8) | u64::from(byte);
        }
        Ok(value)
    };
    // Field offsets of the ELF header for each class (System V gABI).
    let (phoff, phentsize, phnum) = match elf.get(4) {
        Some(&CLASS_64) => (read(0x20, 8)?, read(0x36, 2)?, read(0x38, 2)?),
        Some(&CLASS_32) => (read(0x1c, 4)?, read(0x2a, 2)?, read(0x2c, 2)?),
        _ => return Err("unknown ELF class"),
    };
    let phoff = usize::try_from(phoff).map_err(|_| "truncated ELF file")?;
    // Both widths are u16 fields, so these conversions cannot fail on any
    // target with a 32-bit or larger usize.
    let phentsize = usize::try_from(phentsize).map_err(|_| "bad program header size")?;
    let phnum = usize::try_from(phnum).map_err(|_| "bad program header count")?;
    for i in 0..phnum {
        let offset = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("truncated ELF file")?;
        if read(offset, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A root file system around `busybox` as an uncompressed tar archive,
/// every entry owned by root with a zero time, so the image is reproducible.
fn busybox_rootfs(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    /// Directory modes: world-writable sticky `/tmp`, private `/root`.
    const DIR_MODE: u32 = 0o755;
    const TMP_MODE: u32 = 0o1777;
    const ROOT_HOME_MODE: u32 = 0o700;
    const EXEC_MODE: u32 = 0o755;
    const FILE_MODE: u32 = 0o644;

    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: usize| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(size as u64);
        header
    };
    let dirs = [
        ("bin/", DIR_MODE),
        ("usr/", DIR_MODE),
        ("usr/bin/", DIR_MODE),
        ("etc/", DIR_MODE),
        ("tmp/", TMP_MODE),
        ("root/", ROOT_HOME_MODE),
    ];
    for (dir, mode) in dirs {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, dir, std::io::empty())?;
    }
    let files: [(&str, u32, &[u8]); 3] = [
        ("bin/busybox", EXEC_MODE, busybox),
        ("etc/passwd", FILE_MODE, b"root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", FILE_MODE, b"root:x:0:\n"),
    ];
    for (path, mode, data) in files {
        let mut h = header(tar::EntryType::Regular, mode, data.len());
        h.set_username("root")?;
        h.set_groupname("root")?;
        tar.append_data(&mut h, path, data)?;
    }
    let links = BUSYBOX_APPLETS
        .iter()
        .map(|applet| (format!("bin/{applet}"), "busybox"))
        .chain(std::iter::once(("usr/bin/env".to_owned(), "/bin/busybox")));
    for (path, target) in links {
        let mut h = header(tar::EntryType::Symlink, EXEC_MODE, 0);
        tar.append_link(&mut h, path, target)?;
    }
    tar.into_inner()
}

/// Whether an ELF executable is statically linked (names no dynamic
/// loader), so that it runs in an image without a C library. `Err` says
/// why the bytes are not a readable ELF executable.
pub fn is_static_executable(elf: &[u8]) -> Result<bool, &'static str> {
    elf_has_interpreter(elf).map(|dynamic| !dynamic)
}

/// One file of an image made from nothing.
#[derive(Clone, Copy, Debug)]
pub struct ScratchFile<'a> {
    /// Path inside the image, relative (`bin/tool`); its directories are
    /// made too.
    pub path: &'a str,
    pub mode: u32,
    pub contents: &'a [u8],
}

/// The label carrying the checksum and size of what a scratch image was
/// made from.
const SCRATCH_DIGEST_LABEL: &str = "servitor.test-scratch.digest";

/// Makes sure image `tag` exists with a root file system holding only
/// `files`, and Dockerfile instructions `changes` (`ENTRYPOINT […]`):
/// imports it unless the image there was made from the same files and
/// changes (a label says). Returns whether it imported.
///
/// # Errors
/// A path does not fit a tar header, or the engine refuses the import.
pub async fn ensure_scratch_image(
    docker: &Docker,
    tag: &str,
    files: &[ScratchFile<'_>],
    changes: &[String],
) -> Result<bool, ImageError> {
    // Tests starting together would each import it, leaving all but the
    // last import behind as untagged images.
    static IMPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _importing = IMPORTING.lock().await;
    let archive = scratch_rootfs(files).map_err(ImageError::Archive)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&archive);
    for change in changes {
        hasher.update(change.as_bytes());
        hasher.update(b"\n");
    }
    let digest = format!("{:08x}-{}", hasher.finalize(), archive.len());
    match docker.inspect_image(tag).await {
        Ok(image) => {
            let current = image
                .config
                .and_then(|c| c.labels)
                .and_then(|l| l.get(SCRATCH_DIGEST_LABEL).cloned());
            if current.as_deref() == Some(digest.as_str()) {
                return Ok(false);
            }
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(source) => {
            return Err(ImageError::Docker {
                what: "inspect a scratch image",
                source,
            })
        }
    }
    let mut changes = changes.to_vec();
    changes.push(format!("LABEL {SCRATCH_DIGEST_LABEL}={digest}"));
    let options = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(tag)
        .changes(changes)
        .build();
    let mut progress = docker.create_image(
        Some(options),
        Some(bollard::body_full(archive.into())),
        None,
    );
    while let Some(item) = progress.next().await {
        item.map_err(|source| ImageError::Docker {
            what: "import a scratch image",
            source,
        })?;
    }
    Ok(true)
}

/// `files` and their directories as an uncompressed tar archive, every
/// entry owned by root with a zero time.
fn scratch_rootfs(files: &[ScratchFile<'_>]) -> std::io::Result<Vec<u8>> {
    const DIR_MODE: u32 = 0o755;
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: usize| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(size as u64);
        header
    };
    let mut dirs = std::collections::BTreeSet::new();
    for file in files {
        let mut parent = std::path::Path::new(file.path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(format!("{}/", dir.display()));
            parent = dir.parent();
        }
    }
    for dir in dirs {
        let mut h = header(tar::EntryType::Directory, DIR_MODE, 0);
        tar.append_data(&mut h, dir, std::io::empty())?;
    }
    for file in files {
        let mut h = header(tar::EntryType::Regular, file.mode, file.contents.len());
        tar.append_data(&mut h, file.path, file.contents)?;
    }
    tar.into_inner()
}

/// The host's address on Docker's default bridge: what a container
/// reaches, as it reaches 169.254.169.254 on EC2 when the hop limit allows.
/// A stand-in bound there is reachable from job containers.
pub async fn bridge_gateway(docker: &Docker) -> Option<std::net::IpAddr> {
    let bridge = docker
        .inspect_network(
            "bridge",
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .ok()?;
    let config = bridge.ipam?.config?;
    let gateway = config.iter().find_map(|c| c.gateway.clone());
    match gateway {
        Some(gateway) => gateway.parse().ok(),
        // Engines that do not report it use the subnet's first address.
        None => {
            let subnet = config.iter().find_map(|c| c.subnet.clone())?;
            let base: std::net::Ipv4Addr = subnet.split('/').next()?.parse().ok()?;
            Some(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                u32::from(base) + 1,
            )))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;

    #[test]
    fn busybox_rootfs_is_a_valid_tar() {
        let tar = busybox_rootfs(b"#!fake busybox\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rootfs.tar");
        std::fs::write(&path, &tar).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
            .expect("this test needs tar on the host to read the archive back");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("bin/sh -> busybox"), "{listing}");
        assert!(listing.contains("drwxrwxrwt"), "{listing}");
        assert!(
            listing.contains("root/root        15") && listing.contains("bin/busybox"),
            "{listing}"
        );
        let extract = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(extract.status.success());
        assert_eq!(
            std::fs::read(dir.path().join("bin/busybox")).unwrap(),
            b"#!fake busybox\n"
        );
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let busybox = std::fs::read(BUSYBOX_PATH).unwrap_or_else(|e| {
            panic!("this test needs {BUSYBOX_PATH}: {e}; install Debian's busybox-static")
        });
        assert_eq!(elf_has_interpreter(&busybox), Ok(false));
        let dynamic = std::fs::read("/bin/ls").unwrap();
        assert_eq!(elf_has_interpreter(&dynamic), Ok(true));
        assert!(elf_has_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_has_interpreter(&busybox[..64]).is_err());
    }

    #[test]
    fn a_scratch_root_file_system_holds_the_files_and_their_directories() {
        let archive = scratch_rootfs(&[
            ScratchFile {
                path: "servitor-agent",
                mode: 0o755,
                contents: b"agent",
            },
            ScratchFile {
                path: "opt/data/payload.txt",
                mode: 0o600,
                contents: b"payload",
            },
        ])
        .unwrap();
        let mut read = tar::Archive::new(archive.as_slice());
        let entries: Vec<(String, u32, Vec<u8>)> = read
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let mode = e.header().mode().unwrap();
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut body).unwrap();
                (path, mode, body)
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("opt/".to_owned(), 0o755, Vec::new()),
                ("opt/data/".to_owned(), 0o755, Vec::new()),
                ("servitor-agent".to_owned(), 0o755, b"agent".to_vec()),
                (
                    "opt/data/payload.txt".to_owned(),
                    0o600,
                    b"payload".to_vec()
                ),
            ]
        );
        assert!(is_static_executable(b"#!/bin/sh\n").is_err());
    }
}
