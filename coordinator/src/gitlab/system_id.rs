//! The runner manager's `system_id`: GitLab tells apart processes sharing
//! one runner token by it, so it must stay the same across restarts. It is
//! created once (`s_` + 12 random alphanumerics, gitlab-runner's format) and
//! kept in the coordinator's state directory.
//!
//! Not responsible for choosing the state directory.

use std::path::Path;

use super::GitLabError;

/// File name of the system id inside the state directory.
pub const SYSTEM_ID_FILE: &str = "system_id";

/// Length of the random part (gitlab-runner: `^[sr]_[0-9a-zA-Z]{12}$`).
const RANDOM_CHARS: usize = 12;

const ALPHANUMERIC: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Whether `id` has gitlab-runner's system id format.
pub fn is_valid_system_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("s_").or_else(|| id.strip_prefix("r_")) else {
        return false;
    };
    rest.len() == RANDOM_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn new_system_id() -> String {
    let random: String = (0..RANDOM_CHARS)
        .map(|_| char::from(ALPHANUMERIC[rand::random_range(0..ALPHANUMERIC.len())]))
        .collect();
    format!("s_{random}")
}

/// Reads `<state_dir>/system_id`, creating the directory and the file with a
/// new id when missing.
///
/// # Errors
/// [`GitLabError::SystemIdIo`] when the file cannot be read or written,
/// [`GitLabError::SystemIdInvalid`] when it holds something else.
pub fn load_or_create_system_id(state_dir: &Path) -> Result<String, GitLabError> {
    load_or_create_system_id_in(state_dir, SYSTEM_ID_FILE)
}

/// The system id of the runner `name` of a coordinator with several
/// (`<state_dir>/system_id.<name>`): each runner's requests carry their
/// own, so GitLab lists each runner's manager apart.
///
/// # Errors
/// As [`load_or_create_system_id`].
pub fn load_or_create_runner_system_id(
    state_dir: &Path,
    name: &str,
) -> Result<String, GitLabError> {
    load_or_create_system_id_in(state_dir, &format!("{SYSTEM_ID_FILE}.{name}"))
}

fn load_or_create_system_id_in(state_dir: &Path, file: &str) -> Result<String, GitLabError> {
    let path = state_dir.join(file);
    let io = |source| GitLabError::SystemIdIo {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if is_valid_system_id(id) {
                Ok(id.to_owned())
            } else {
                Err(GitLabError::SystemIdInvalid { path })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(io)?;
            let id = new_system_id();
            // Write then rename so a crash never leaves a half-written id.
            let tmp = state_dir.join(format!("{file}.tmp"));
            std::fs::write(&tmp, format!("{id}\n")).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let id = load_or_create_system_id(&state).unwrap();
        assert!(is_valid_system_id(&id), "{id}");
        assert!(id.starts_with("s_"));
        assert_eq!(load_or_create_system_id(&state).unwrap(), id);
        assert_eq!(
            std::fs::read_to_string(state.join(SYSTEM_ID_FILE))
                .unwrap()
                .trim(),
            id
        );
    }

    #[test]
    fn garbage_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SYSTEM_ID_FILE), "hello").unwrap();
        let err = load_or_create_system_id(dir.path()).unwrap_err();
        assert!(err.to_string().contains("delete it"), "{err}");
    }

    #[test]
    fn format_check() {
        assert!(is_valid_system_id("s_0123456789ab"));
        assert!(is_valid_system_id("r_ABCDEFGHIJKL"));
        assert!(!is_valid_system_id("s_0123456789a"));
        assert!(!is_valid_system_id("x_0123456789ab"));
        assert!(!is_valid_system_id("s_0123456789a-"));
        assert_ne!(new_system_id(), new_system_id());
    }
}
