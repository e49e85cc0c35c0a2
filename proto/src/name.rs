//! Agent and service names: DNS labels.

/// Whether `name` is acceptable as an agent or service name: 1–63 characters of `a-z`, `0-9` and `-`,
/// not starting or ending with `-` (a DNS label, so it can sit in a certificate SAN and a Service name).
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "winbox", "mssql-2022", "x1"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Winbox", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
