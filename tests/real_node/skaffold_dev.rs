//! `skaffold dev -p local,embedded` (README "Kubernetes") in a copy of the tree: the first deploy,
//! the tour against skaffold's forwarded api port, a change to the `/livez` body rebuilt and served
//! by the new pod, Ctrl-C (SIGINT) leaving nothing of skaffold's in the namespace, and
//! `scripts/images skaffold-prune` removing the images it built from the store and the node.
//!
//! The copy builds into a private cargo target whose compiled dependencies are hard links to the
//! shared target's (only the changed crate compiles): the shared target's binaries are what the
//! other tests run, so the changed source must never reach it, and its lock (held by the whole CI
//! run) is not taken. Files that cargo rewrites in place (fingerprints, dep-info, build script
//! outputs) are real copies, so nothing is written through a link into the shared target.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use system_tests::kube::{KillOnDrop, Namespace, Skaffold, helm, objects_in, stdout_of};
use system_tests::repo_root;

use super::{timed, wait_for};

/// What the test writes into the copy's `/livez` body: the new pod serves it after the rebuild.
const CHANGE: &str = "changed-by-skaffold-dev-test";

/// A directory removed (with all it holds) when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The repository's working files (not .git, .services or a target) copied to `into`, with their
/// modification times (cargo compares them with the shared target's fingerprints).
fn copy_tree(into: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(into)?;
    let mut command = Command::new("cp");
    command.arg("-a");
    for entry in fs::read_dir(repo_root())? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default();
        if ![".git", ".services", "target"]
            .iter()
            .any(|skip| name == *skip)
        {
            command.arg(path);
        }
    }
    command.arg(into);
    stdout_of(command, "copying the tree")?;
    Ok(())
}

/// The debug directory of the cargo target this test binary was built into (target/debug/deps/..).
fn shared_debug_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .context("the test binary's target directory")
}

/// `private` (a target's debug/) made from `shared`'s: compiled artifacts (deps/, incremental/)
/// hard-linked, what cargo rewrites in place (.fingerprint/, build/, *.d, locks) copied with its
/// modification time; the top-level binaries are left for cargo to link anew.
fn link_target(shared: &Path, private: &Path) -> anyhow::Result<(usize, usize)> {
    let (mut linked, mut copied) = (0, 0);
    for top in ["deps", "incremental", "build", ".fingerprint"] {
        let mut pending = vec![PathBuf::from(top)];
        while let Some(relative) = pending.pop() {
            fs::create_dir_all(private.join(&relative))?;
            let entries = match fs::read_dir(shared.join(&relative)) {
                Err(error) if error.kind() == ErrorKind::NotFound => continue,
                entries => entries?,
            };
            for entry in entries {
                let entry = entry?;
                let relative = relative.join(entry.file_name());
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    pending.push(relative);
                    continue;
                }
                let (from, to) = (entry.path(), private.join(&relative));
                let name = entry.file_name().to_string_lossy().into_owned();
                let rewritten = matches!(top, "build" | ".fingerprint")
                    || name.ends_with(".d")
                    || name.ends_with(".lock");
                if kind.is_symlink() {
                    std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
                } else if rewritten {
                    fs::copy(&from, &to)?;
                    let modified = entry.metadata()?.modified()?;
                    File::options()
                        .write(true)
                        .open(&to)?
                        .set_modified(modified)?;
                    copied += 1;
                } else {
                    fs::hard_link(&from, &to)?;
                    linked += 1;
                }
            }
        }
    }
    Ok((linked, copied))
}

/// Runs scripts/images with `args` against the test's image store (SERVICES_DIR as scripts/test's).
fn scripts_images(args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(repo_root().join("scripts/images"));
    command.args(args);
    stdout_of(command, &format!("scripts/images {args:?}"))
}

/// podman's Docker-compatible API for skaffold, stopped and skaffold's images pruned when dropped.
struct DockerApi(String);

impl DockerApi {
    fn start() -> anyhow::Result<Self> {
        Ok(Self(scripts_images(&["docker-api"])?.trim().to_owned()))
    }
}

impl Drop for DockerApi {
    fn drop(&mut self) {
        let _ = scripts_images(&["skaffold-prune"]);
        let _ = scripts_images(&["docker-api", "stop"]);
    }
}

/// The local port of skaffold's latest forward of the api Service (port 80), from its output.
fn forwarded_api_port(log: &Path) -> anyhow::Result<Option<u16>> {
    const FORWARD: &str = "remote port 80 -> http://127.0.0.1:";
    let output = fs::read_to_string(log)?;
    Ok(output.rsplit_once(FORWARD).and_then(|(_, rest)| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }))
}

/// The api's `/livez` body through skaffold's forward, if it answers.
fn livez(log: &Path) -> anyhow::Result<Option<String>> {
    let Some(port) = forwarded_api_port(log)? else {
        return Ok(None);
    };
    let output = Command::new("curl")
        .args(["-fsS", "--max-time", "3"])
        .arg(format!("http://127.0.0.1:{port}/livez"))
        .output()?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// Fails with skaffold's output when it has exited.
fn still_running(dev: &mut KillOnDrop, log: &Path) -> anyhow::Result<()> {
    if let Some(status) = dev.0.try_wait()? {
        bail!(
            "skaffold dev exited ({status}):\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(())
}

pub fn skaffold_dev_follows_a_change() -> anyhow::Result<()> {
    let namespace = Namespace::create("real-node-skaffold-dev")?;
    let ns = namespace.0.as_str();
    let work = std::env::temp_dir().join(format!("skaffold-dev-{ns}"));
    let _work = RemoveOnDrop(work.clone());
    let tree = work.join("tree");
    let target = work.join("target");
    timed(
        "skaffold dev: a copy of the tree and a private cargo target",
        || {
            copy_tree(&tree)?;
            let (linked, copied) = link_target(&shared_debug_dir()?, &target.join("debug"))?;
            eprintln!("real node: private target: {linked} files linked, {copied} copied");
            Ok(())
        },
    )?;
    let docker_api = DockerApi::start()?;
    let skaffold = Skaffold::new(ns, None)?;
    let home = std::env::var("HOME").context("HOME")?;
    let log = work.join("skaffold-dev.log");
    let mut command = skaffold.command(&[
        "dev",
        "-p",
        "local,embedded",
        "-n",
        ns,
        "--port-forward=user",
    ])?;
    // What cargo set for this test (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...) would reach the
    // builder's cargo, whose build scripts (ring's, cc's) rerun when such a variable changed: every
    // dependency would compile anew.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name == "CARGO"
            || name == "OUT_DIR"
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_CRATE_")
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    // Skaffold's HOME is a scratch one: cargo and rustup need the machine's.
    command
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", &target)
        .env(
            "SERVICES_DIR",
            std::env::var_os("SERVICES_DIR")
                .unwrap_or_else(|| repo_root().join(".services").into()),
        )
        .env("DOCKER_HOST", &docker_api.0)
        .env(
            "RUSTUP_HOME",
            std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{home}/.rustup")),
        )
        .env(
            "CARGO_HOME",
            std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo")),
        );
    let output = File::create(&log)?;
    command.stdout(output.try_clone()?).stderr(output);
    let mut dev = KillOnDrop(command.spawn().context("skaffold dev")?);

    timed(
        "skaffold dev: first build, load and deploy, the api answering on the forwarded port",
        || {
            wait_for(
                "the api through skaffold's forward",
                Duration::from_secs(600),
                || {
                    still_running(&mut dev, &log)?;
                    Ok(livez(&log)?.is_some())
                },
            )
        },
    )?;
    timed("skaffold dev: the tour against the forwarded port", || {
        let port = forwarded_api_port(&log)?.context("the forwarded port")?;
        let mut tour = Command::new("sh");
        tour.arg(tree.join("scripts/tour"))
            .env("CHAT_URL", format!("http://127.0.0.1:{port}"));
        let said = stdout_of(tour, "scripts/tour")?;
        ensure!(said.contains("tour: every step passed"), "the tour: {said}");
        Ok(())
    })?;

    let health = tree.join("api/src/http/routes/health.rs");
    let source = fs::read_to_string(&health)?;
    let old_body = r#"Json(json!({"status": "ok"}))"#;
    ensure!(
        source.contains(old_body),
        "{} has changed: update this test",
        health.display()
    );
    fs::write(
        &health,
        source.replace(
            old_body,
            &format!(r#"Json(json!({{"status": "ok", "build": "{CHANGE}"}}))"#),
        ),
    )?;
    timed(
        "skaffold dev: the change rebuilt, loaded, rolled out and served",
        || {
            wait_for("the new /livez body", Duration::from_secs(600), || {
                still_running(&mut dev, &log)?;
                Ok(livez(&log)?.is_some_and(|body| body.contains(CHANGE)))
            })
        },
    )?;

    timed("skaffold dev: Ctrl-C, the release uninstalled", || {
        let pid = dev.0.id().to_string();
        stdout_of(
            {
                let mut kill = Command::new("kill");
                kill.args(["-INT", &pid]);
                kill
            },
            "kill -INT skaffold",
        )?;
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Some(status) = dev.0.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "skaffold dev still runs 180 s after SIGINT"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let output = fs::read_to_string(&log)?;
        ensure!(
            status.success(),
            "skaffold dev after SIGINT: {status}:\n{output}"
        );
        let releases = helm(&["list", "-a", "-q", "-n", ns])?;
        ensure!(releases.trim().is_empty(), "releases left: {releases}");
        wait_for(
            "every object skaffold made gone",
            Duration::from_secs(120),
            || Ok(objects_in(ns)?.is_empty()),
        )
    })?;

    // The images stay as skaffold's build cache (as in Docker) until pruned.
    let built = scripts_images(&["skaffold-list"])?;
    ensure!(
        built
            .lines()
            .any(|image| image.starts_with("localhost/chat-api:"))
            && built
                .lines()
                .any(|image| image.starts_with("docker.io/library/chat-api:")),
        "skaffold's api image in the store and on the node: {built}"
    );
    scripts_images(&["skaffold-prune"])?;
    let left = scripts_images(&["skaffold-list"])?;
    ensure!(left.trim().is_empty(), "left after skaffold-prune: {left}");
    Ok(())
}
