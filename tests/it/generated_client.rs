//! `docs/openapi.json` as a new user meets it: two OpenAPI 3.1 validators accept it; the README's
//! tour runs through a Python client that openapi-python-client generates from it
//! (`tests/client/tour.py`), on both stacks; and the TypeScript client of `clients/typescript`
//! (types that openapi-typescript generates from it, checked in) is what the document generates
//! today, type-checks strictly with its tour (`examples/tour.ts`), and the tour runs with Node on
//! both stacks. The tools are pinned in `scripts/tools openapi-tools`, `scripts/tools redocly` and
//! `scripts/tools typescript-client` (the client's own lock); `scripts/test` exports their paths.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use system_tests::{Scratch, TestEnv, both_stacks, repo_root, run_to_end, tool_path};
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

/// The folder whose `node_modules` holds what `clients/typescript/package-lock.json` pins
/// (openapi-typescript, openapi-fetch, typescript, @types/node).
fn typescript_client_tools() -> anyhow::Result<PathBuf> {
    tool_path("TYPESCRIPT_CLIENT", "typescript-client")
}

fn typescript_client() -> PathBuf {
    repo_root().join("clients/typescript")
}

#[tokio::test]
async fn the_openapi_document_passes_two_openapi_validators() -> anyhow::Result<()> {
    run_to_end(Command::new(openapi_tools()?.join("openapi-spec-validator")).arg(document()))
        .await?;
    // Redocly's own parser and rules (not the Python validator's schema), warnings counted too.
    let report = run_to_end(
        Command::new(redocly()?)
            .args(["lint", "--extends=recommended", "--format=json"])
            .arg(document())
            // No network here: no telemetry, no update check.
            .env("REDOCLY_TELEMETRY", "off")
            .env("REDOCLY_SUPPRESS_UPDATE_NOTICE", "true"),
    )
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
        let generated = run_to_end(
            Command::new(tools.join("openapi-python-client"))
                .args(["generate", "--meta", "none", "--fail-on-warning", "--path"])
                .arg(&document)
                .arg("--config")
                .arg(&config)
                .arg("--output-path")
                .arg(scratch.join("chat_client")),
        )
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
    let output = run_to_end(
        Command::new(tools.join("python"))
            .arg(repo_root().join("tests/client/tour.py"))
            .arg(&origin)
            .env("PYTHONPATH", &client),
    )
    .await?;
    ensure!(output.contains("every step passed"), "tour.py: {output}");
    workers.stop().await?;
    api.stop().await
}

#[tokio::test]
async fn the_typescript_clients_types_are_what_the_document_generates() -> anyhow::Result<()> {
    let tools = typescript_client_tools()?;
    let scratch = Scratch::new("typescript-schema")?;
    let generated = scratch.0.join("schema.d.ts");
    // The command of the package's `npm run generate`, from its folder, into the scratch folder.
    run_to_end(
        Command::new(tools.join("node_modules/.bin/openapi-typescript"))
            .arg("../../docs/openapi.json")
            .arg("--output")
            .arg(&generated)
            .current_dir(typescript_client()),
    )
    .await?;
    let checked_in_path = typescript_client().join("src/schema.d.ts");
    let checked_in = std::fs::read_to_string(&checked_in_path)
        .with_context(|| format!("reading {}", checked_in_path.display()))?;
    let generated = std::fs::read_to_string(&generated)?;
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(old, new)| old != new)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        bail!(
            "clients/typescript/src/schema.d.ts is not what openapi-typescript generates from \
             docs/openapi.json (first difference at line {}): regenerate it with \
             `cd clients/typescript && npm ci && npm run generate` and commit it",
            line + 1
        );
    }
    Ok(())
}

/// A copy of the client's sources and configuration in a scratch folder, beside a link to the
/// pinned `node_modules` (a checkout has none; tsc and Node look for it beside the sources).
fn typescript_client_copy(tools: &Path) -> anyhow::Result<Scratch> {
    let scratch = Scratch::new("typescript-client")?;
    let status = std::process::Command::new("cp")
        .arg("-R")
        .args(
            ["package.json", "tsconfig.json", "src", "examples"]
                .map(|name| typescript_client().join(name)),
        )
        .arg(&scratch.0)
        .status()
        .context("running cp")?;
    ensure!(status.success(), "copying clients/typescript: {status}");
    std::os::unix::fs::symlink(tools.join("node_modules"), scratch.0.join("node_modules"))?;
    Ok(scratch)
}

/// `tsc` of the pinned typescript, on the copy's tsconfig.json (strict), with `args`.
async fn tsc(
    copy: &Scratch,
    tools: &Path,
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> anyhow::Result<String> {
    run_to_end(
        Command::new(tools.join("node_modules/.bin/tsc"))
            .arg("-p")
            .arg(copy.0.join("tsconfig.json"))
            .args(args),
    )
    .await
}

#[tokio::test]
async fn the_typescript_client_and_its_tour_type_check_strictly() -> anyhow::Result<()> {
    let tsconfig: Value =
        serde_json::from_slice(&std::fs::read(typescript_client().join("tsconfig.json"))?)?;
    ensure!(
        tsconfig["compilerOptions"]["strict"] == true,
        "clients/typescript/tsconfig.json must be strict: {tsconfig}"
    );
    let tools = typescript_client_tools()?;
    let copy = typescript_client_copy(&tools)?;
    tsc(&copy, &tools, ["--noEmit"]).await?;
    Ok(())
}

/// The tour's own waits are 30 s each; this bounds the whole run.
const TYPESCRIPT_TOUR_TIMEOUT: Duration = Duration::from_secs(180);

both_stacks!(the_readme_tour_runs_through_the_typescript_client);

async fn the_readme_tour_runs_through_the_typescript_client(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    // Rate limits on (high enough for the tour), so the RateLimit-* headers are there to check.
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS", "1000");
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS_BURST", "2000");
    let tools = typescript_client_tools()?;
    let copy = typescript_client_copy(&tools)?;
    // Node 20 runs JavaScript only: compiled first, into the copy (where Node finds node_modules
    // and the package's `"type": "module"`); a type error fails the build.
    let compiled = copy.0.join("dist");
    tsc(
        &copy,
        &tools,
        [
            Path::new("--noEmitOnError"),
            Path::new("--outDir"),
            &compiled,
        ],
    )
    .await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let origin = api.origin().to_owned();
    let output = tokio::time::timeout(
        TYPESCRIPT_TOUR_TIMEOUT,
        run_to_end(
            Command::new("node")
                .arg(compiled.join("examples/tour.js"))
                .arg(&origin),
        ),
    )
    .await
    .context("the TypeScript tour did not finish in time")??;
    ensure!(
        output.contains("tour: every step passed"),
        "tour.ts: {output}"
    );
    workers.stop().await?;
    api.stop().await
}
