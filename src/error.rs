//! Errors said in one sentence: an error's own words, then each of its causes after a colon
//! (`cannot lock config/.logon-gate.lock: Permission denied (os error 13)`). Error types keep
//! their causes as `#[source]`; only the sentence flattens them.

/// `e` and its causes, each after a colon.
pub fn sentence(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot lock x")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_after_colons() {
        let e = Outer(std::io::Error::other("busy"));
        assert_eq!(super::sentence(&e), "cannot lock x: busy");
    }
}
