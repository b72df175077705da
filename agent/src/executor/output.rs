//! Writing an attempt's job log: raw bytes from the job, plus the lines the
//! executor adds itself in gitlab-runner's style (coloured notices, section
//! markers that GitLab folds in its log view).
//!
//! Not responsible for masking secrets (the coordinator masks) or for where
//! the bytes go after the [`OutputSink`].

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::OutputSink;

/// Bold green: gitlab-runner's colour for notices and echoed commands.
pub const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
/// Yellow: gitlab-runner's colour for warnings.
pub const ANSI_YELLOW: &str = "\x1b[0;33m";
/// Bold red: gitlab-runner's colour for errors.
pub const ANSI_BOLD_RED: &str = "\x1b[31;1m";
/// Bold cyan: gitlab-runner's colour for section headers.
pub const ANSI_BOLD_CYAN: &str = "\x1b[36;1m";
/// Resets colours, spelled as gitlab-runner spells it.
pub const ANSI_RESET: &str = "\x1b[0;m";
/// Erases to the end of the line; GitLab's log view hides section markers
/// followed by it.
pub const ANSI_CLEAR_LINE: &str = "\x1b[0K";

/// The job log of one attempt.
#[derive(Clone, Debug)]
pub struct JobOutput {
    sink: OutputSink,
    sections: bool,
}

impl JobOutput {
    /// Writes to `sink`; section markers only when `sections` is set (the
    /// job's `features.trace_sections`).
    pub fn new(sink: OutputSink, sections: bool) -> Self {
        Self { sink, sections }
    }

    /// Writes bytes as they are. A closed receiver is not the job's problem:
    /// the job keeps running and the bytes are dropped.
    pub async fn write(&self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.sink.send(bytes).await.is_err() {
            tracing::debug!("job output receiver is gone; dropping output");
        }
    }

    /// Writes one plain line.
    pub async fn line(&self, text: &str) {
        self.write(Bytes::from(format!("{text}\n"))).await;
    }

    /// Writes a notice in bold green.
    pub async fn info(&self, text: &str) {
        self.coloured(ANSI_BOLD_GREEN, text).await;
    }

    /// Writes `WARNING: <text>` in yellow.
    pub async fn warning(&self, text: &str) {
        self.coloured(ANSI_YELLOW, &format!("WARNING: {text}"))
            .await;
    }

    /// Writes `ERROR: <text>` in bold red.
    pub async fn error(&self, text: &str) {
        self.coloured(ANSI_BOLD_RED, &format!("ERROR: {text}"))
            .await;
    }

    async fn coloured(&self, colour: &str, text: &str) {
        self.write(Bytes::from(format!("{colour}{text}{ANSI_RESET}\n")))
            .await;
    }

    /// Opens section `name` with a header line, as gitlab-runner does.
    pub async fn section_start(&self, name: &str, header: &str) {
        let marker = if self.sections {
            format!("section_start:{}:{name}\r{ANSI_CLEAR_LINE}", unix_now())
        } else {
            String::new()
        };
        self.write(Bytes::from(format!(
            "{marker}{ANSI_CLEAR_LINE}{ANSI_BOLD_CYAN}{header}{ANSI_RESET}\n"
        )))
        .await;
    }

    /// Closes section `name`.
    pub async fn section_end(&self, name: &str) {
        if self.sections {
            self.write(Bytes::from(format!(
                "section_end:{}:{name}\r{ANSI_CLEAR_LINE}",
                unix_now()
            )))
            .await;
        }
    }
}

fn unix_now() -> u64 {
    // A clock before 1970 is a broken host; a zero timestamp only skews the
    // section's displayed duration.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on anything unexpected
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    async fn collect(sections: bool) -> String {
        let (tx, mut rx) = mpsc::channel(16);
        let out = JobOutput::new(tx, sections);
        out.section_start("step_script", "Executing step").await;
        out.line("hello").await;
        out.section_end("step_script").await;
        drop(out);
        let mut text = Vec::new();
        while let Some(chunk) = rx.recv().await {
            text.extend_from_slice(&chunk);
        }
        String::from_utf8(text).unwrap()
    }

    #[tokio::test]
    async fn sections_are_marked_only_when_the_job_asks() {
        let with = collect(true).await;
        assert!(with.starts_with("section_start:"), "{with:?}");
        assert!(with.contains(":step_script\r\x1b[0K"), "{with:?}");
        assert!(with.contains("hello\nsection_end:"), "{with:?}");
        let without = collect(false).await;
        assert!(!without.contains("section_"), "{without:?}");
        assert!(without.contains("Executing step"), "{without:?}");
    }
}
