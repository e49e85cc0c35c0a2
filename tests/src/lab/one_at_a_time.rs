//! Lab tests measure times, so on two cores they run one at a time: the nextest filter of the
//! `lab` test group must name every test binary that builds a lab.

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The binaries a filter like `binary(/lab/) | binary(replicas)` names: regexes and names.
    fn matches(filter: &str, binary: &str) -> bool {
        filter.split('|').map(str::trim).any(|term| {
            let inner = term.trim_start_matches("binary(").trim_end_matches(')');
            match inner.strip_prefix('/').and_then(|r| r.strip_suffix('/')) {
                // The filters here use plain substrings as regexes.
                Some(part) => binary.contains(part),
                None => binary == inner,
            }
        })
    }

    #[test]
    fn lab_tests_run_one_at_a_time() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
        let config = std::fs::read_to_string(root.join(".config/nextest.toml")).expect("nextest.toml");
        let filters: Vec<&str> = config
            .split("[[profile.")
            .filter(|section| section.contains("test-group = \"lab\""))
            .filter_map(|section| section.lines().find_map(|l| l.strip_prefix("filter = ")))
            .map(|f| f.trim_matches('"'))
            .collect();
        assert!(filters.len() >= 2, "the lab group's filters in nextest.toml: {filters:?}");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(root.join("tests/tests")).expect("tests/tests") {
            let path = entry.expect("entry").path();
            let source = std::fs::read_to_string(&path).expect("test source");
            let builds_a_lab = ["lab_or_skip!", "Lab::", "LabCluster::"].iter().any(|m| source.contains(m));
            let binary = path.file_stem().expect("stem").to_string_lossy().into_owned();
            for filter in &filters {
                if builds_a_lab && !matches(filter, &binary) {
                    missing.push(format!("{binary} in `{filter}`"));
                }
            }
        }
        assert!(missing.is_empty(), "lab test binaries outside the lab test group: {missing:?}");
    }
}
