//! The client's pure JavaScript (resampler, sample codecs) under Node's own test runner:
//! `node --test tests/js/`. Node is a test-time tool only (the server embeds the files as they
//! are); `scripts/test.sh` makes sure it is installed. Without Node the test says it was
//! skipped, unless `DUPLEX_TEST_BROWSER=1` (set by `scripts/test.sh`) demands it.

use std::process::Command;

#[test]
fn javascript_unit_tests_pass_under_node() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = match Command::new("node")
        .arg("--test")
        .arg(dir.join("tests/js"))
        .current_dir(dir)
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var("DUPLEX_TEST_BROWSER").as_deref() != Ok("1") => {
            eprintln!("skipped: node is not installed ({e}); scripts/test.sh installs it");
            return;
        }
        Err(e) => panic!("node: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node --test failed");
    // The runner's summary: every test file ran and passed.
    let count = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no `{key}` line in node's output"))
    };
    assert!(count("# pass ") >= 8, "{stdout}");
    assert_eq!(count("# fail "), 0, "{stdout}");
}
