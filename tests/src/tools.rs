//! The repository and its pinned tools.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context as _;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A pinned tool's path: from `variable` (`scripts/test` exports it), or what `scripts/tools <tool>`
/// prints (it installs the tool into the machine's tool cache first when the cache lacks it). A
/// missing tool is an error, never a skipped test.
pub fn tool_path(variable: &str, tool: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(variable).filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.exists(), "{variable}: {} not found", path.display());
        return Ok(path);
    }
    let output = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/tools"))
        .arg(tool)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running scripts/tools {tool}"))?;
    anyhow::ensure!(
        output.status.success(),
        "scripts/tools {tool} failed: {}",
        output.status
    );
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

/// A temporary folder, deleted on drop (made writable first: the Go module cache in one is
/// read-only).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command to its end; its stdout, or the failure with all it printed.
pub async fn run_to_end(command: &mut tokio::process::Command) -> anyhow::Result<String> {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {command:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}
