//! Expanding job variables in the values gitlab-runner expands on the
//! runner side (artifact names and paths, cache keys): `$NAME` and
//! `${NAME}`, with unknown names empty, as Go's `os.Expand` does.
//!
//! Not responsible for the script's own expansion (its shell does that).

use servitor_proto::job::JobPayload;

/// Expands `$NAME` and `${NAME}` in `text` against `job`'s variables (the
/// last definition of a name wins). `$$` is a literal `$`; a `$` that starts
/// no name is kept.
pub fn expand(text: &str, job: &JobPayload) -> String {
    expand_with(text, |name| job.variable(name).map(str::to_owned))
}

/// [`expand`] with any lookup.
pub fn expand_with(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => {
                    out.push_str(&lookup(&braced[..end]).unwrap_or_default());
                    rest = &braced[end + 1..];
                }
                None => {
                    out.push_str(&rest[at..]);
                    rest = "";
                }
            }
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(&lookup(&after[..len]).unwrap_or_default());
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "CI_JOB_NAME" => Some("build".into()),
            "REF" => Some("main".into()),
            _ => None,
        }
    }

    #[test]
    fn names_in_both_spellings_expand_and_unknown_ones_vanish() {
        let cases = [
            ("$CI_JOB_NAME-$REF", "build-main"),
            ("${CI_JOB_NAME}_x", "build_x"),
            ("out/$MISSING/x", "out//x"),
            ("cost $$5", "cost $5"),
            ("a $ b", "a $ b"),
            ("trailing $", "trailing $"),
            ("${unclosed", "${unclosed"),
            ("plain", "plain"),
        ];
        for (text, want) in cases {
            assert_eq!(expand_with(text, lookup), want, "{text}");
        }
    }
}
