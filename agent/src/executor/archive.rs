//! Files in and out of archives, on the host, as gitlab-runner's helper
//! does it inside its helper container: choosing files by `paths`,
//! `exclude` and `untracked`, writing them as zip (artifacts, caches),
//! gzip (one member per file, for reports) or raw, and extracting a zip
//! into the project directory. Blocking code: callers run it on a
//! blocking thread. Archives stream to and from files, never memory.
//!
//! Not responsible for where archives go (see `artifacts`) or for
//! expanding variables in patterns (callers expand first).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use flate2::{Compression, GzBuilder};

/// How hard zip archives are compressed: gitlab-runner's
/// `ARTIFACT_COMPRESSION_LEVEL` and `CACHE_COMPRESSION_LEVEL`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Level {
    /// Stored, not compressed: for data that is already compressed, or
    /// when the network is faster than deflate.
    Fastest,
    Fast,
    #[default]
    Default,
    Slow,
    Slowest,
}

impl Level {
    /// Reads a level by name; `None` for a name that is none of
    /// `fastest`, `fast`, `default`, `slow`, `slowest`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "fastest" => Some(Level::Fastest),
            "fast" => Some(Level::Fast),
            "" | "default" => Some(Level::Default),
            "slow" => Some(Level::Slow),
            "slowest" => Some(Level::Slowest),
            _ => None,
        }
    }

    /// The job's level from variable `key`, with the warning for a value
    /// that names no level (the default level is used, as gitlab-runner
    /// does).
    pub fn from_variable(value: Option<&str>, key: &str) -> (Self, Option<String>) {
        match value.map(|v| (v, Self::parse(v))) {
            None => (Level::Default, None),
            Some((_, Some(level))) => (level, None),
            Some((value, None)) => (
                Level::Default,
                Some(format!(
                    "{key} {value:?} is not a compression level; using default (choose fastest, fast, default, slow or slowest)"
                )),
            ),
        }
    }

    fn options(self, options: zip::write::SimpleFileOptions) -> zip::write::SimpleFileOptions {
        let deflated = options.compression_method(zip::CompressionMethod::Deflated);
        match self {
            Level::Fastest => options.compression_method(zip::CompressionMethod::Stored),
            Level::Fast => deflated.compression_level(Some(1)),
            Level::Default => deflated,
            Level::Slow => deflated.compression_level(Some(7)),
            Level::Slowest => deflated.compression_level(Some(9)),
        }
    }
}

/// What a chosen path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// Kept as a link, never followed.
    Symlink,
}

/// Files chosen for an archive: relative slash paths, sorted, with what
/// each is; plus the lines gitlab-runner's helper prints while choosing.
#[derive(Debug, Default)]
pub struct Selection {
    pub entries: BTreeMap<String, Kind>,
    pub notes: Vec<Note>,
}

/// A log line for the job, as the helper words it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Info(String),
    Warning(String),
}

/// Why an archive could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Zip {
        path: String,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("only one file can be sent as raw; {count} matched ({first} …)")]
    RawNotOne { count: usize, first: String },
    #[error("{0} is not a regular file; only regular files can be sent as a report")]
    NotRegular(String),
    #[error("{name:?} in the archive would be written outside the project directory; refusing it")]
    Escapes { name: String },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Chooses files below `project_dir` as gitlab-runner's file archiver
/// does: each of `paths` is a glob relative to the project directory
/// whose matches are walked (directories with all they hold, links kept
/// as links); `untracked` files are added; then each `exclude` glob
/// removes the paths it matches.
///
/// # Errors
/// Fails only when the project directory cannot be read; a pattern that
/// matches nothing or points outside is a note, not an error.
pub fn select(
    project_dir: &Path,
    paths: &[String],
    exclude: &[String],
    untracked: &[String],
) -> Result<Selection, ArchiveError> {
    let mut selection = Selection::default();
    for pattern in paths {
        let Some(relative) = relative_pattern(project_dir, pattern) else {
            selection.notes.push(Note::Warning(format!(
                "{pattern}: artifact path is not a subpath of project directory: {}",
                project_dir.display()
            )));
            continue;
        };
        let full = format!(
            "{}/{}",
            glob::Pattern::escape(&project_dir.to_string_lossy()),
            relative
        );
        let mut found = 0usize;
        if let Ok(matches) = glob::glob_with(&full, MATCH) {
            for path in matches.flatten() {
                found += walk(project_dir, &path, &mut selection.entries)?;
            }
        }
        if found == 0 {
            selection.notes.push(Note::Warning(format!(
                "{pattern}: no matching files. Ensure that the artifact path is relative to the working directory ({})",
                project_dir.display()
            )));
        } else {
            selection.notes.push(Note::Info(format!(
                "{pattern}: found {found} matching artifact files and directories"
            )));
        }
    }
    if !untracked.is_empty() {
        for rel in untracked {
            let path = project_dir.join(rel);
            walk(project_dir, &path, &mut selection.entries)?;
        }
        selection.notes.push(Note::Info(format!(
            "untracked: found {} files",
            untracked.len()
        )));
    }
    for pattern in exclude {
        let Some(relative) = relative_pattern(project_dir, pattern) else {
            continue;
        };
        let Ok(glob) = glob::Pattern::new(&relative) else {
            selection.notes.push(Note::Warning(format!(
                "{pattern}: not a valid pattern; nothing excluded by it"
            )));
            continue;
        };
        let before = selection.entries.len();
        selection
            .entries
            .retain(|rel, _| !glob.matches_with(rel, MATCH));
        selection.notes.push(Note::Info(format!(
            "{pattern}: excluded {} files",
            before - selection.entries.len()
        )));
    }
    Ok(selection)
}

/// `pattern` relative to the project directory, slash-separated and
/// normalised; `None` when it points outside.
fn relative_pattern(project_dir: &Path, pattern: &str) -> Option<String> {
    let path = Path::new(pattern);
    let rel = if path.is_absolute() {
        path.strip_prefix(project_dir).ok()?
    } else {
        path
    };
    let mut parts: Vec<String> = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// Adds `path` and, for a directory, everything below it; returns how many
/// entries it found.
fn walk(
    project_dir: &Path,
    path: &Path,
    entries: &mut BTreeMap<String, Kind>,
) -> Result<usize, ArchiveError> {
    let mut found = 0;
    for entry in walkdir::WalkDir::new(path).follow_links(false) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) => {
                continue
            }
            Err(e) => {
                return Err(ArchiveError::Io {
                    what: "read",
                    path: path.display().to_string(),
                    source: e.into(),
                })
            }
        };
        let Ok(rel) = entry.path().strip_prefix(project_dir) else {
            continue;
        };
        let rel = slash_path(rel);
        if rel.is_empty() {
            continue;
        }
        let kind = if entry.path_is_symlink() {
            Kind::Symlink
        } else if entry.file_type().is_dir() {
            Kind::Dir
        } else {
            Kind::File
        };
        entries.insert(rel, kind);
        found += 1;
    }
    Ok(found)
}

fn slash_path(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

fn zip_time(modified: io::Result<SystemTime>) -> zip::DateTime {
    modified
        .ok()
        .map(time::OffsetDateTime::from)
        .and_then(|t| zip::DateTime::try_from(t).ok())
        .unwrap_or_default()
}

/// Writes `selection` from `project_dir` as a zip at `dest`: directories
/// end in `/`, files are deflated at `level`, links are stored with their
/// target as content; modes and modification times are kept.
///
/// # Errors
/// Fails when a file cannot be read or the archive written.
pub fn write_zip(
    project_dir: &Path,
    selection: &Selection,
    dest: &Path,
    level: Level,
) -> Result<u64, ArchiveError> {
    let zip_error = |source| ArchiveError::Zip {
        path: dest.display().to_string(),
        source,
    };
    let file = File::create(dest).map_err(io_error("create", dest))?;
    let mut zip = zip::ZipWriter::new(BufWriter::new(file));
    for (rel, kind) in &selection.entries {
        let path = project_dir.join(rel);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // Removed since it was chosen (by a service, say): skip it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("read", &path)(e)),
        };
        let options = zip::write::SimpleFileOptions::default()
            .unix_permissions(mode_of(&meta))
            .last_modified_time(zip_time(meta.modified()));
        match kind {
            Kind::Dir => zip
                .add_directory(format!("{rel}/"), options)
                .map_err(zip_error)?,
            Kind::Symlink => {
                let target = std::fs::read_link(&path).map_err(io_error("read link", &path))?;
                zip.add_symlink(rel.as_str(), target.to_string_lossy(), options)
                    .map_err(zip_error)?;
            }
            Kind::File => {
                let options = level
                    .options(options)
                    .large_file(meta.len() >= u64::from(u32::MAX));
                zip.start_file(rel.as_str(), options).map_err(zip_error)?;
                let mut source = File::open(&path).map_err(io_error("read", &path))?;
                io::copy(&mut source, &mut zip).map_err(io_error("archive", &path))?;
            }
        }
    }
    let out = zip.finish().map_err(zip_error)?;
    close(out, dest)
}

/// Flushes and syncs a written archive; returns its size.
fn close(out: BufWriter<File>, dest: &Path) -> Result<u64, ArchiveError> {
    let file = out
        .into_inner()
        .map_err(|e| io_error("write", dest)(e.into_error()))?;
    file.sync_all().map_err(io_error("write", dest))?;
    file.metadata()
        .map(|m| m.len())
        .map_err(io_error("read", dest))
}

/// Writes the regular files of `selection` as one gzip member each, named
/// by the file's base name with its relative path as the comment, as
/// gitlab-runner writes reports.
///
/// # Errors
/// Fails on a link (reports must be regular files) or on I/O.
pub fn write_gzip(
    project_dir: &Path,
    selection: &Selection,
    dest: &Path,
) -> Result<u64, ArchiveError> {
    let mut out = BufWriter::new(File::create(dest).map_err(io_error("create", dest))?);
    for (rel, kind) in &selection.entries {
        match kind {
            Kind::Dir => continue,
            Kind::Symlink => return Err(ArchiveError::NotRegular(rel.clone())),
            Kind::File => {}
        }
        let path = project_dir.join(rel);
        let base = rel.rsplit('/').next().unwrap_or(rel);
        let mut encoder = GzBuilder::new()
            .filename(gzip_name(base))
            .comment(gzip_name(rel))
            .write(&mut out, Compression::default());
        let mut source = BufReader::new(File::open(&path).map_err(io_error("read", &path))?);
        io::copy(&mut source, &mut encoder).map_err(io_error("archive", &path))?;
        encoder.finish().map_err(io_error("write", dest))?;
    }
    close(out, dest)
}

/// A gzip header name as gitlab-runner writes it: non-ASCII or `%` makes
/// it `e:` followed by the path-escaped name.
fn gzip_name(name: &str) -> String {
    if name.is_ascii() && !name.contains('%') {
        return name.to_owned();
    }
    let mut escaped = String::from("e:");
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

/// The one regular file of `selection`, for a raw upload.
///
/// # Errors
/// Fails unless exactly one regular file was chosen.
pub fn raw_file(project_dir: &Path, selection: &Selection) -> Result<PathBuf, ArchiveError> {
    let files: Vec<(&String, &Kind)> = selection
        .entries
        .iter()
        .filter(|(_, kind)| **kind != Kind::Dir)
        .collect();
    match files.as_slice() {
        [(rel, Kind::File)] => Ok(project_dir.join(rel)),
        [(rel, _)] => Err(ArchiveError::NotRegular((*rel).clone())),
        _ => Err(ArchiveError::RawNotOne {
            count: files.len(),
            first: files.first().map(|(r, _)| (*r).clone()).unwrap_or_default(),
        }),
    }
}

/// What an extraction wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub files: usize,
    pub bytes: u64,
}

/// Extracts the zip at `archive` into `dest`, replacing files already
/// there. Names that would land outside `dest` (absolute, `..`, or below
/// a link the archive made) are refused.
///
/// # Errors
/// Fails on a corrupt archive, an escaping name, or I/O.
pub fn extract_zip(archive: &Path, dest: &Path) -> Result<Extracted, ArchiveError> {
    let zip_error = |source| ArchiveError::Zip {
        path: archive.display().to_string(),
        source,
    };
    let file = File::open(archive).map_err(io_error("open", archive))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(zip_error)?;
    let mut done = Extracted::default();
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(zip_error)?;
        let name = entry.name().to_owned();
        let Some(rel) = entry.enclosed_name() else {
            return Err(ArchiveError::Escapes { name });
        };
        let path = dest.join(&rel);
        if crosses_link(dest, &rel) {
            return Err(ArchiveError::Escapes { name });
        }
        if entry.is_dir() {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                remove_existing(&path)?;
            }
            std::fs::create_dir_all(&path).map_err(io_error("create", &path))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        }
        remove_existing(&path)?;
        if entry.is_symlink() {
            let mut target = String::new();
            io::Read::read_to_string(&mut entry, &mut target)
                .map_err(io_error("read link target", &path))?;
            std::os::unix::fs::symlink(&target, &path).map_err(io_error("create link", &path))?;
            continue;
        }
        let mut out = File::create(&path).map_err(io_error("create", &path))?;
        done.bytes += io::copy(&mut entry, &mut out).map_err(io_error("extract", &path))?;
        done.files += 1;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = out.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777));
        }
        if let Some(modified) = entry
            .last_modified()
            .and_then(|t| time::OffsetDateTime::try_from(t).ok())
        {
            let _ = out.set_modified(SystemTime::from(modified));
        }
    }
    Ok(done)
}

/// Whether any directory between `dest` and `rel`'s parent is a link (one
/// an earlier entry made, say), which would send the write elsewhere.
fn crosses_link(dest: &Path, rel: &Path) -> bool {
    let mut path = dest.to_path_buf();
    let parents: Vec<Component<'_>> = rel.components().collect();
    for component in parents.iter().take(parents.len().saturating_sub(1)) {
        path.push(component);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

fn remove_existing(path: &Path) -> Result<(), ArchiveError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(path).map_err(io_error("replace", path))
        }
        Ok(_) => std::fs::remove_file(path).map_err(io_error("replace", path)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, body) in [
            ("out/app.bin", "binary"),
            ("out/app.tmp", "scratch"),
            ("out/sub/deep.txt", "deep"),
            ("report.xml", "<testsuite/>"),
            ("src/main.rs", "fn main() {}"),
        ] {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        std::os::unix::fs::symlink("app.bin", root.join("out/latest")).unwrap();
        dir
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn paths_are_walked_and_excludes_applied() {
        let dir = tree();
        let selection = select(
            dir.path(),
            &strings(&["out/", "nothing/*"]),
            &strings(&["out/*.tmp"]),
            &[],
        )
        .unwrap();
        let names: Vec<&str> = selection.entries.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                "out",
                "out/app.bin",
                "out/latest",
                "out/sub",
                "out/sub/deep.txt"
            ]
        );
        assert_eq!(selection.entries["out/latest"], Kind::Symlink);
        assert!(selection
            .notes
            .contains(&Note::Info("out/*.tmp: excluded 1 files".into())));
        assert!(selection.notes.iter().any(
            |n| matches!(n, Note::Warning(w) if w.starts_with("nothing/*: no matching files"))
        ));
    }

    #[test]
    fn double_star_crosses_directories_and_outside_paths_are_refused() {
        let dir = tree();
        let selection = select(
            dir.path(),
            &strings(&["**/*.txt", "../elsewhere", "/etc/passwd"]),
            &[],
            &[],
        )
        .unwrap();
        let names: Vec<&str> = selection.entries.keys().map(String::as_str).collect();
        assert_eq!(names, vec!["out/sub/deep.txt"]);
        let outside = selection
            .notes
            .iter()
            .filter(|n| matches!(n, Note::Warning(w) if w.contains("not a subpath")))
            .count();
        assert_eq!(outside, 2);
    }

    #[test]
    fn zip_round_trips_files_links_and_modes() {
        let dir = tree();
        let script = dir.path().join("out/run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let selection = select(dir.path(), &strings(&["out"]), &[], &[]).unwrap();
        let archive = dir.path().join("a.zip");
        write_zip(dir.path(), &selection, &archive, Level::Default).unwrap();

        let target = tempfile::tempdir().unwrap();
        std::fs::write(target.path().join("out"), "a file where a dir goes").ok();
        let done = extract_zip(&archive, target.path()).unwrap();
        assert_eq!(done.files, 4);
        let back = target.path().join("out/sub/deep.txt");
        assert_eq!(std::fs::read_to_string(back).unwrap(), "deep");
        let link = std::fs::read_link(target.path().join("out/latest")).unwrap();
        assert_eq!(link, Path::new("app.bin"));
        let mode = std::fs::metadata(target.path().join("out/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn compression_levels_trade_size_for_speed_and_all_extract() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..20_000)
            .map(|i| format!("line {} of a log\n", i % 97))
            .collect();
        std::fs::write(dir.path().join("log.txt"), &text).unwrap();
        let selection = select(dir.path(), &strings(&["log.txt"]), &[], &[]).unwrap();
        let mut sizes = Vec::new();
        for level in [Level::Fastest, Level::Fast, Level::Slowest] {
            let archive = dir.path().join(format!("{level:?}.zip"));
            sizes.push(write_zip(dir.path(), &selection, &archive, level).unwrap());
            let target = tempfile::tempdir().unwrap();
            extract_zip(&archive, target.path()).unwrap();
            assert_eq!(
                std::fs::read_to_string(target.path().join("log.txt")).unwrap(),
                text
            );
        }
        // Stored: at least the file itself; deflated: far smaller.
        assert!(sizes[0] >= text.len() as u64, "{sizes:?}");
        assert!(sizes[1] * 5 < sizes[0], "{sizes:?}");
        assert!(sizes[2] <= sizes[1], "{sizes:?}");
        assert_eq!(Level::parse(" Slowest "), Some(Level::Slowest));
        let (level, warning) = Level::from_variable(Some("ultra"), "CACHE_COMPRESSION_LEVEL");
        assert_eq!(level, Level::Default);
        assert!(warning
            .unwrap()
            .contains("CACHE_COMPRESSION_LEVEL \"ultra\""));
    }

    #[test]
    fn extraction_refuses_names_that_escape() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("evil.zip");
        let mut zip = zip::ZipWriter::new(File::create(&archive).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.add_symlink("link", "/tmp", options).unwrap();
        zip.start_file("link/planted", options).unwrap();
        zip.write_all(b"x").unwrap();
        zip.finish().unwrap();
        let target = tempfile::tempdir().unwrap();
        let err = extract_zip(&archive, target.path()).unwrap_err();
        assert!(matches!(err, ArchiveError::Escapes { .. }), "{err}");
    }

    #[test]
    fn reports_are_one_gzip_member_per_file() {
        let dir = tree();
        let selection =
            select(dir.path(), &strings(&["report.xml", "src/*.rs"]), &[], &[]).unwrap();
        let archive = dir.path().join("junit.xml.gz");
        write_gzip(dir.path(), &selection, &archive).unwrap();
        let mut decoder = flate2::read::MultiGzDecoder::new(File::open(&archive).unwrap());
        let mut all = String::new();
        decoder.read_to_string(&mut all).unwrap();
        assert_eq!(all, "<testsuite/>fn main() {}");
        let first = flate2::read::GzDecoder::new(File::open(&archive).unwrap());
        let header = first.header().unwrap();
        assert_eq!(header.filename(), Some(&b"report.xml"[..]));
        assert_eq!(header.comment(), Some(&b"report.xml"[..]));
        assert_eq!(gzip_name("résumé.xml"), "e:r%C3%A9sum%C3%A9.xml");
    }

    #[test]
    fn raw_takes_exactly_one_file() {
        let dir = tree();
        let one = select(dir.path(), &strings(&["report.xml"]), &[], &[]).unwrap();
        assert_eq!(
            raw_file(dir.path(), &one).unwrap(),
            dir.path().join("report.xml")
        );
        let many = select(dir.path(), &strings(&["out"]), &[], &[]).unwrap();
        let err = raw_file(dir.path(), &many).unwrap_err();
        assert!(
            err.to_string().contains("only one file can be sent as raw"),
            "{err}"
        );
    }
}
