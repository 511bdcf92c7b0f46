//! `docs/openapi.json` as a new user meets it: two OpenAPI 3.1 validators accept it, and the
//! README's tour runs through a Python client that openapi-python-client generates from it
//! (`tests/client/tour.py`), on both stacks. The tools are pinned in `scripts/tools openapi-tools`
//! and `scripts/tools redocly`; `scripts/test` exports their paths.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use system_tests::{TestEnv, both_stacks, repo_root, tool_path};
use tokio::process::Command;

/// The bin folder of the virtualenv with openapi-spec-validator and openapi-python-client.
fn openapi_tools() -> anyhow::Result<PathBuf> {
    tool_path("OPENAPI_TOOLS", "openapi-tools")
}

fn redocly() -> anyhow::Result<PathBuf> {
    tool_path("REDOCLY", "redocly")
}

fn document() -> PathBuf {
    repo_root().join("docs/openapi.json")
}

/// Runs a command to its end; its stdout, or the failure with all it printed.
async fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test]
async fn the_openapi_document_passes_two_openapi_validators() -> anyhow::Result<()> {
    run(Command::new(openapi_tools()?.join("openapi-spec-validator")).arg(document())).await?;
    // Redocly's own parser and rules (not the Python validator's schema), warnings counted too.
    let report = run(Command::new(redocly()?)
        .args(["lint", "--extends=recommended", "--format=json"])
        .arg(document())
        // No network here: no telemetry, no update check.
        .env("REDOCLY_TELEMETRY", "off")
        .env("REDOCLY_SUPPRESS_UPDATE_NOTICE", "true"))
    .await?;
    let report: Value = serde_json::from_str(&report).context("redocly's JSON report")?;
    ensure!(
        report["totals"]["errors"] == 0 && report["totals"]["warnings"] == 0,
        "redocly lint: {report:#}"
    );
    Ok(())
}

/// The client package generated from `docs/openapi.json`, in a folder of the temporary directory
/// named by the hash of the document, the generator's configuration and the tools' folder (reused
/// while none changes). Returns the folder to put on PYTHONPATH; the package is `chat_client`.
async fn generated_client(tools: &Path) -> anyhow::Result<PathBuf> {
    let document = document();
    let config = repo_root().join("tests/client/openapi-python-client.yaml");
    let mut hasher = DefaultHasher::new();
    std::fs::read(&document)?.hash(&mut hasher);
    std::fs::read(&config)?.hash(&mut hasher);
    tools.hash(&mut hasher);
    let folder = std::env::temp_dir().join(format!("chat-openapi-client-{:016x}", hasher.finish()));
    let package = folder.join("chat_client");
    if !package.exists() {
        // Generated aside and renamed into place, so a concurrent test never sees half a package
        // (when it renames its copy first, ours is dropped).
        let scratch = folder.with_extension(uuid::Uuid::new_v4().simple().to_string());
        let generated = run(Command::new(tools.join("openapi-python-client"))
            .args(["generate", "--meta", "none", "--fail-on-warning", "--path"])
            .arg(&document)
            .arg("--config")
            .arg(&config)
            .arg("--output-path")
            .arg(scratch.join("chat_client")))
        .await;
        if generated.is_ok() {
            let _ = std::fs::rename(&scratch, &folder);
        }
        let _ = std::fs::remove_dir_all(&scratch);
        generated?;
    }
    ensure!(
        package.exists(),
        "no generated client at {}",
        package.display()
    );
    Ok(folder)
}

both_stacks!(the_readme_tour_runs_through_a_generated_python_client);

async fn the_readme_tour_runs_through_a_generated_python_client(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    // Rate limits on (high enough for the tour), so the RateLimit-* headers are there to check.
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS", "1000");
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS_BURST", "2000");
    // The tour reads a stream whole through the generated client: it must end.
    env.set("CHAT_STREAM_MAX_LIFETIME_SECONDS", "2");
    let tools = openapi_tools()?;
    let client = generated_client(&tools).await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let origin = api.origin().to_owned();
    let output = run(Command::new(tools.join("python"))
        .arg(repo_root().join("tests/client/tour.py"))
        .arg(&origin)
        .env("PYTHONPATH", &client))
    .await?;
    ensure!(output.contains("every step passed"), "tour.py: {output}");
    workers.stop().await?;
    api.stop().await
}
