//! An error and its causes as one line, for the binaries' last word before they exit.

use std::error::Error;

/// The error and its causes joined by ": ", each said once.
///
/// Many errors already print their cause (the agent's store errors, so that one log line is
/// complete; kube's config errors, in parentheses), and anyhow's `{:#}` would print it again.
/// A cause whose text is already in the line adds nothing, so it is skipped, while the causes
/// under it still get their say.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;

    /// An error with a message and an optional cause.
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn e(msg: &'static str, cause: Option<E>) -> E {
        E(msg, cause.map(Box::new))
    }

    #[test]
    fn each_cause_is_said_once() {
        // A wrapper that ends with its cause.
        let err = e(
            "database error on x.db: disk full",
            Some(e("disk full", None)),
        );
        assert_eq!(chain(&err), "database error on x.db: disk full");
        // Causes that say nothing twice are all printed.
        let err = e("reading", Some(e("no shadow", None)));
        assert_eq!(chain(&err), "reading: no shadow");
        // A cause quoted inside its wrapper (kube's config errors), with a new cause below.
        let err = e(
            "kubeconfig: (cannot read 'k': gone), in-cluster: (no env)",
            Some(e("cannot read 'k': gone", Some(e("os error 2", None)))),
        );
        assert_eq!(
            chain(&err),
            "kubeconfig: (cannot read 'k': gone), in-cluster: (no env): os error 2"
        );
    }
}
