//! `scripts/tour`, the README's tour as a POSIX sh script (what `skaffold verify` runs in the
//! cluster from the `tour` image), run for real by `/bin/sh` with curl against the api on both
//! stacks: every step must answer what the script expects, and it must say so.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use system_tests::{TestEnv, both_stacks, repo_root};
use tokio::process::Command;

/// The script's own waits are 30 s each; this bounds the whole run.
const TOUR_TIMEOUT: Duration = Duration::from_secs(120);

both_stacks!(the_readme_tour_script_passes_against_the_api);

async fn the_readme_tour_script_passes_against_the_api(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let origin = api.origin().to_owned();
    let run = Command::new("/bin/sh")
        .arg(repo_root().join("scripts/tour"))
        .env("CHAT_URL", &origin)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TOUR_TIMEOUT, run)
        .await
        .context("scripts/tour did not finish in time")?
        .context("running scripts/tour with /bin/sh")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && stdout.contains("tour: every step passed"),
        "scripts/tour failed ({}):\n{stdout}{stderr}",
        output.status
    );
    // Each step of the README's tour was walked, in order.
    let mut rest = stdout.as_ref();
    for step in [
        "create an application",
        "create a chat",
        "post two messages",
        "wait until they are persisted",
        "get one",
        "update one",
        "search by a word prefix",
        "delete one",
    ] {
        let at = rest
            .find(&format!("== {step}"))
            .with_context(|| format!("step {step:?} missing or out of order:\n{stdout}"))?;
        rest = &rest[at..];
    }
    workers.stop().await?;
    api.stop().await
}

/// The script stops at the first unexpected answer, exits non-zero and names the step: pointed at
/// the api's internal port, `/readyz` answers 200 but there is no API, so creating the application
/// answers 404.
#[tokio::test]
async fn the_tour_script_fails_loudly_on_an_unexpected_status() -> anyhow::Result<()> {
    let env = TestEnv::embedded().await?;
    let api = env.spawn_api().await?;
    let output = tokio::time::timeout(
        TOUR_TIMEOUT,
        Command::new("/bin/sh")
            .arg(repo_root().join("scripts/tour"))
            .env("CHAT_URL", &api.internal_url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("scripts/tour did not finish in time")?
    .context("running scripts/tour with /bin/sh")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success()
            && stderr.contains("tour: FAILED: create an application: expected 201, got 404"),
        "expected the tour to fail at its first step, got {}:\n{}{stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    api.stop().await
}
