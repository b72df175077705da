//! Streaming secret masking for job logs: masked variable values, the job
//! token (also in its URL-encoded form, as it appears in clone URLs) and
//! tokens recognised by prefix (`glpat-…`) are replaced with `[MASKED]`
//! before a byte leaves the coordinator. Masking is the runner's job: GitLab
//! stores the log as sent.
//!
//! Output is split into chunks at arbitrary places, so the masker holds back
//! only the shortest tail that could still be the start of a secret and
//! releases it once later bytes (or the end of the log) decide it. The
//! result never depends on where the chunks were split.
//!
//! Every byte that belongs to an occurrence of any secret is hidden; a run
//! of hidden bytes becomes one `[MASKED]`, so overlapping secrets leak no
//! part of either. For a prefix token the prefix stays visible and the
//! token characters after it are hidden.
//!
//! Not responsible for deciding what is secret: [`Masker::for_job`] reads
//! that from the job.

use servitor_proto::job::JobPayload;

/// What a hidden run of bytes becomes.
pub const MASK: &[u8] = b"[MASKED]";

/// Token prefixes masked in every job (gitlab-runner's default: personal
/// access tokens).
pub const DEFAULT_TOKEN_PREFIXES: &[&str] = &["glpat-"];

/// Most token characters hidden after one prefix. Real tokens are far
/// shorter; the cap bounds how much output a never-ending run of token
/// characters can hold back.
pub const PREFIX_TOKEN_MAX_CHARS: usize = 4096;

/// Characters a prefixed token is made of (gitlab-runner's alphabet).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'=' | b'-')
}

/// A streaming masker for one log.
pub struct Masker {
    /// Literal secrets, longest first, no duplicates or empties.
    literals: Vec<Vec<u8>>,
    /// Token prefixes, no duplicates or empties.
    prefixes: Vec<Vec<u8>>,
    /// Bytes some pattern starts with; any other byte starts nothing.
    starts: [bool; 256],
    /// Input not yet released.
    pending: Vec<u8>,
    /// Hidden ranges `[from, to)` relative to `pending`, found by matches
    /// that started in bytes already released or being released.
    covers: Vec<(usize, usize)>,
    /// The last released byte was hidden, so a hidden byte right after it
    /// continues the same `[MASKED]`.
    in_mask: bool,
}

impl std::fmt::Debug for Masker {
    // Never print the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("secrets", &self.literals.len())
            .field("prefixes", &self.prefixes.len())
            .field("held_back", &self.pending.len())
            .finish()
    }
}

/// What the patterns say about the input starting at one position.
enum Decision {
    /// More input could still change the answer: hold back from here.
    Undecided,
    /// Decided; hidden ranges (absolute in `pending`) were recorded.
    Decided,
}

/// Percent-encodes everything but RFC 3986 unreserved characters, the form
/// a secret takes inside URL userinfo.
fn percent_encoded(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

impl Masker {
    /// A masker hiding each of `secrets` and the tokens after each of
    /// `prefixes`. Empty values are ignored.
    pub fn new<S, P>(
        secrets: impl IntoIterator<Item = S>,
        prefixes: impl IntoIterator<Item = P>,
    ) -> Self
    where
        S: AsRef<[u8]>,
        P: AsRef<[u8]>,
    {
        let mut literals: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        literals.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        literals.dedup();
        let mut prefixes: Vec<Vec<u8>> = prefixes
            .into_iter()
            .map(|p| p.as_ref().to_vec())
            .filter(|p| !p.is_empty())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        let mut starts = [false; 256];
        for pattern in literals.iter().chain(&prefixes) {
            starts[usize::from(pattern[0])] = true;
        }
        Self {
            literals,
            prefixes,
            starts,
            pending: Vec::new(),
            covers: Vec::new(),
            in_mask: false,
        }
    }

    /// The masker for a job's log: its masked variables, its token, their
    /// URL-encoded forms, and the default and job-given token prefixes.
    pub fn for_job(job: &JobPayload) -> Self {
        let mut secrets: Vec<Vec<u8>> = job
            .variables
            .iter()
            .filter(|v| v.masked)
            .map(|v| v.value.as_bytes().to_vec())
            .collect();
        secrets.push(job.token.as_bytes().to_vec());
        let encoded: Vec<Vec<u8>> = secrets.iter().map(|s| percent_encoded(s)).collect();
        secrets.extend(encoded);
        let prefixes = DEFAULT_TOKEN_PREFIXES
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .chain(
                job.features
                    .token_mask_prefixes
                    .iter()
                    .map(|p| p.trim().as_bytes().to_vec()),
            );
        Self::new(secrets, prefixes)
    }

    /// Masks the next chunk of output, returning what can be released now.
    pub fn write(&mut self, input: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(input);
        self.process(false)
    }

    /// Releases everything held back: the log has ended.
    pub fn flush(&mut self) -> Vec<u8> {
        let out = self.process(true);
        self.in_mask = false;
        out
    }

    /// Bytes received but not yet released.
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }

    /// Masks a whole text at once (no streaming state is touched).
    pub fn mask_all(&self, input: &[u8]) -> Vec<u8> {
        let mut one_shot = Self::new(&self.literals, &self.prefixes);
        let mut out = one_shot.write(input);
        out.extend(one_shot.flush());
        out
    }

    fn process(&mut self, at_end: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pending.len());
        let mut i = 0;
        while i < self.pending.len() {
            if self.covers.is_empty() {
                // Nothing hidden pending: copy the run of bytes that start
                // no pattern in one go.
                let run = self.pending[i..]
                    .iter()
                    .position(|&b| self.starts[usize::from(b)])
                    .unwrap_or(self.pending.len() - i);
                if run > 0 {
                    out.extend_from_slice(&self.pending[i..i + run]);
                    self.in_mask = false;
                    i += run;
                    continue;
                }
            }
            if self.starts[usize::from(self.pending[i])] {
                if let Decision::Undecided = self.decide(i, at_end) {
                    break;
                }
            }
            let hidden = self.covers.iter().any(|&(from, to)| from <= i && i < to);
            if hidden {
                if !self.in_mask {
                    out.extend_from_slice(MASK);
                    self.in_mask = true;
                }
            } else {
                out.push(self.pending[i]);
                self.in_mask = false;
            }
            i += 1;
            if !self.covers.is_empty() {
                self.covers.retain(|&(_, to)| to > i);
            }
        }
        self.pending.drain(..i);
        for cover in &mut self.covers {
            cover.0 = cover.0.saturating_sub(i);
            cover.1 -= i;
        }
        out
    }

    /// Checks every pattern at `pending[at..]`, recording hidden ranges when
    /// all of them are decided.
    fn decide(&mut self, at: usize, at_end: bool) -> Decision {
        let rest = &self.pending[at..];
        let mut found: Vec<(usize, usize)> = Vec::new();
        for literal in &self.literals {
            if rest.len() >= literal.len() {
                if rest.starts_with(literal) {
                    // Longest first: shorter literals here are inside this one.
                    found.push((at, at + literal.len()));
                    break;
                }
            } else if !at_end && literal.starts_with(rest) {
                return Decision::Undecided;
            }
        }
        for prefix in &self.prefixes {
            if rest.len() >= prefix.len() {
                if !rest.starts_with(prefix) {
                    continue;
                }
                let run = rest[prefix.len()..]
                    .iter()
                    .take(PREFIX_TOKEN_MAX_CHARS)
                    .take_while(|b| is_token_char(**b))
                    .count();
                let ran_out = prefix.len() + run == rest.len();
                if ran_out && run < PREFIX_TOKEN_MAX_CHARS && !at_end {
                    return Decision::Undecided;
                }
                if run > 0 {
                    let from = at + prefix.len();
                    found.push((from, from + run));
                }
            } else if !at_end && prefix.starts_with(rest) {
                return Decision::Undecided;
            }
        }
        self.covers.extend(found);
        Decision::Decided
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(secrets: &[&str], prefixes: &[&str]) -> Masker {
        Masker::new(secrets.iter(), prefixes.iter())
    }

    fn stream(m: &mut Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(m.write(chunk));
        }
        out.extend(m.flush());
        out
    }

    /// An independent, whole-input model of the masking rule.
    fn model(secrets: &[&str], prefixes: &[&str], input: &[u8]) -> Vec<u8> {
        let mut hidden = vec![false; input.len()];
        for i in 0..input.len() {
            for s in secrets.iter().filter(|s| !s.is_empty()) {
                if input[i..].starts_with(s.as_bytes()) {
                    hidden[i..i + s.len()].iter_mut().for_each(|h| *h = true);
                }
            }
            for p in prefixes.iter().filter(|p| !p.is_empty()) {
                if input[i..].starts_with(p.as_bytes()) {
                    let from = i + p.len();
                    let run = input[from..]
                        .iter()
                        .take(PREFIX_TOKEN_MAX_CHARS)
                        .take_while(|b| is_token_char(**b))
                        .count();
                    hidden[from..from + run].iter_mut().for_each(|h| *h = true);
                }
            }
        }
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            if hidden[i] {
                if i == 0 || !hidden[i - 1] {
                    out.extend_from_slice(MASK);
                }
            } else {
                out.push(*b);
            }
        }
        out
    }

    #[test]
    fn table() {
        let cases: &[(&[&str], &[&str], &str, &str)] = &[
            (&["hunter22"], &[], "pw=hunter22!", "pw=[MASKED]!"),
            (&["hunter22"], &[], "hunter2 hunter22", "hunter2 [MASKED]"),
            (&["abcd", "cdef"], &[], "xabcdefx", "x[MASKED]x"),
            (
                &["abc", "abcdef"],
                &[],
                "abcdeg abcdef",
                "[MASKED]deg [MASKED]",
            ),
            (&["aa"], &[], "aaa", "[MASKED]"),
            (
                &["s1", "s2"],
                &[],
                "s1s2 s1 s2",
                "[MASKED] [MASKED] [MASKED]",
            ),
            (
                &[],
                &["glpat-"],
                "tok glpat-AbC_1.2=3-x done",
                "tok glpat-[MASKED] done",
            ),
            (&[], &["glpat-"], "glpat- alone", "glpat- alone"),
            (&[], &["glpat-"], "end glpat-abc", "end glpat-[MASKED]"),
            (&["glpat-abc"], &["glpat-"], "glpat-abcdef", "[MASKED]"),
            (&[""], &[""], "nothing", "nothing"),
            (&["x"], &[], "axbxx", "a[MASKED]b[MASKED]"),
            (&["mañana"], &[], "é mañana ü", "é [MASKED] ü"),
        ];
        for (secrets, prefixes, input, want) in cases {
            let mut m = masker(secrets, prefixes);
            let got = stream(&mut m, &[input.as_bytes()]);
            assert_eq!(String::from_utf8_lossy(&got), *want, "{input:?}");
            assert_eq!(got, model(secrets, prefixes, input.as_bytes()), "{input:?}");
        }
    }

    #[test]
    fn secret_split_at_every_position_across_two_writes() {
        let secrets = ["s3cr3t-value", "glcbt-JOBTOKEN123"];
        let prefixes = ["glpat-", "glcbt-"];
        let input =
            b"a s3cr3t-value b http://gitlab-ci-token:glcbt-JOBTOKEN123@host/x glpat-ZZZ9 c";
        let want = model(&secrets, &prefixes, input);
        assert!(!String::from_utf8_lossy(&want).contains("s3cr3t"));
        for split in 0..=input.len() {
            let mut m = masker(&secrets, &prefixes);
            let got = stream(&mut m, &[&input[..split], &input[split..]]);
            assert_eq!(got, want, "split at {split}");
        }
    }

    #[test]
    fn holds_back_only_a_possible_secret_start() {
        let mut m = masker(&["password1"], &["glpat-"]);
        assert_eq!(m.write(b"hello pass"), b"hello ");
        assert_eq!(m.held_back(), 4);
        assert_eq!(m.write(b"port"), b"passport");
        assert_eq!(m.held_back(), 0);
        assert_eq!(m.write(b"x glp"), b"x ");
        assert_eq!(m.write(b"at-abc"), b"");
        assert_eq!(m.write(b"\n"), b"glpat-[MASKED]\n");
        assert_eq!(m.write(b"passw"), b"");
        assert_eq!(m.flush(), b"passw");
    }

    #[test]
    fn mask_continues_across_releases() {
        // "abcd" is released as hidden while "cdefgh" is still undecided;
        // when it completes the run stays one [MASKED].
        let mut m = masker(&["abcd", "cdefgh"], &[]);
        let mut out = m.write(b"abcdef");
        out.extend(m.write(b"gh!"));
        out.extend(m.flush());
        assert_eq!(out, b"[MASKED]!");
        let mut m = masker(&["abcd", "cdefgh"], &[]);
        let mut out = m.write(b"abcdef");
        out.extend(m.write(b"xy"));
        out.extend(m.flush());
        assert_eq!(out, b"[MASKED]efxy");
    }

    #[test]
    fn random_splits_match_the_model() {
        let secrets = ["abab", "bab", "aXb", "q", "longersecretvalue"];
        let prefixes = ["ab-", "glpat-"];
        let alphabet = b"abXq-_. \nglpat";
        for round in 0..400 {
            let len = rand::random_range(0..80usize);
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rand::random_range(0..alphabet.len())])
                .collect();
            if round % 3 == 0 {
                let at = rand::random_range(0..=input.len());
                input.splice(at..at, b"longersecretvalue".iter().copied());
            }
            let want = model(&secrets, &prefixes, &input);
            let mut m = masker(&secrets, &prefixes);
            let mut chunks = Vec::new();
            let mut rest: &[u8] = &input;
            while !rest.is_empty() {
                let n = rand::random_range(1..=rest.len().min(7));
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            let got = stream(&mut m, &chunks);
            assert_eq!(
                got,
                want,
                "input {:?} chunks {:?}",
                String::from_utf8_lossy(&input),
                chunks.len()
            );
            assert_eq!(m.mask_all(&input), want);
            assert_eq!(m.held_back(), 0);
        }
    }

    #[test]
    fn job_masker_hides_variables_token_and_url_forms() {
        let job: JobPayload = serde_json::from_value(serde_json::json!({
            "id": 1,
            "token": "glcbt-abc123",
            "variables": [
                {"key": "PW", "value": "p@ss:w0rd!", "masked": true, "public": false},
                {"key": "EMPTY", "value": "", "masked": true, "public": false},
                {"key": "OPEN", "value": "visible", "masked": false, "public": true}
            ],
            "features": {"token_mask_prefixes": ["glrt-"]}
        }))
        .unwrap();
        let mut m = Masker::for_job(&job);
        let text = b"clone http://gitlab-ci-token:glcbt-abc123@h/r.git pw p@ss:w0rd! url p%40ss%3Aw0rd%21 visible glrt-xyz glpat-q";
        let out = String::from_utf8(stream(&mut m, &[text])).unwrap();
        assert_eq!(
            out,
            "clone http://gitlab-ci-token:[MASKED]@h/r.git pw [MASKED] url [MASKED] visible glrt-[MASKED] glpat-[MASKED]"
        );
        assert!(!format!("{m:?}").contains("abc123"));
    }

    #[test]
    fn long_token_runs_are_capped() {
        let mut m = masker(&[], &["glpat-"]);
        let long = "a".repeat(PREFIX_TOKEN_MAX_CHARS + 10);
        let out = m.write(format!("glpat-{long}").as_bytes());
        // The capped run is decided without waiting for the run to end.
        assert!(out.starts_with(b"glpat-[MASKED]"));
        assert!(m.held_back() <= 10);
    }
}
