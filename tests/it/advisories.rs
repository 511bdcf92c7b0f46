//! `scripts/advisories`: Cargo.lock against the RustSec advisory database snapshot in `deny/`,
//! offline. It passes on the snapshot as it is, and a planted advisory against a crate of the lock
//! file (in a copy of the database) fails it.

use std::path::Path;
use std::process::Command;

use anyhow::ensure;
use system_tests::repo_root;

/// `scripts/advisories ARGS`: whether it passed, and all it printed.
fn advisories(args: &[&Path]) -> anyhow::Result<(bool, String)> {
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/advisories"))
        .args(args)
        .output()?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), printed))
}

const PLANTED: &str = r#"```toml
[advisory]
id = "RUSTSEC-2099-0001"
package = "anyhow"
date = "2099-01-01"
url = "https://example.invalid/planted"
categories = ["memory-corruption"]

[versions]
patched = []
```

# A planted advisory

Against every version of anyhow, to see the check fail.
"#;

#[test]
fn the_snapshot_passes_and_a_planted_advisory_fails_the_check() -> anyhow::Result<()> {
    let (passed, printed) = advisories(&[])?;
    ensure!(passed, "the snapshot finds an advisory: {printed}");

    let scratch = std::env::temp_dir().join(format!("advisories-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch)?;
    let snapshot = std::fs::read_dir(repo_root().join("deny"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.to_string_lossy().ends_with(".tar.gz"))
        .max()
        .ok_or_else(|| anyhow::anyhow!("no snapshot in deny/"))?;
    let extracted = Command::new("tar")
        .arg("-xzf")
        .arg(&snapshot)
        .arg("-C")
        .arg(&scratch)
        .status()?;
    ensure!(extracted.success(), "extracting {}", snapshot.display());
    let database = scratch.join("advisory-db");
    std::fs::create_dir_all(database.join("crates/anyhow"))?;
    std::fs::write(database.join("crates/anyhow/RUSTSEC-2099-0001.md"), PLANTED)?;

    let (passed, printed) = advisories(&[&database])?;
    std::fs::remove_dir_all(&scratch)?;
    ensure!(!passed, "the planted advisory went unnoticed: {printed}");
    ensure!(
        printed.contains("RUSTSEC-2099-0001"),
        "the failure names the advisory: {printed}"
    );
    Ok(())
}
