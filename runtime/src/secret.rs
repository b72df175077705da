//! Secrets read from files (runner token, join token): they print as `***`
//! in Debug output and error messages, so they never reach a log line.

use std::path::Path;

/// A secret string. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call only where it is sent or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file, trimming surrounding white space.
    ///
    /// # Errors
    /// The message names the file, what went wrong and, for `what`, which
    /// setting pointed at it.
    pub fn from_file(path: &Path, what: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => "create it or point the setting at the right file",
                std::io::ErrorKind::PermissionDenied => {
                    "make it readable by the user the service runs as"
                }
                _ => "check the file",
            };
            format!("{what} {} is not readable ({e}); {hint}", path.display())
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(format!(
                "{what} {} is empty; put the secret in it",
                path.display()
            ));
        }
        Ok(Self(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("glrt-supersecret");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }

    #[test]
    fn missing_file_error_names_file_and_fix() {
        let err =
            Secret::from_file(Path::new("/nonexistent/token"), "gitlab.token_file").unwrap_err();
        assert!(
            err.contains("gitlab.token_file /nonexistent/token"),
            "{err}"
        );
        assert!(err.contains("create it"), "{err}");
    }
}
