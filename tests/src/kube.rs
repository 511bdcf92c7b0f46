//! Helpers of the tests against the local Kubernetes cluster (`scripts/kube up`, with the kwok node
//! or the real one): the pinned kubectl, helm and skaffold with the cluster's kubeconfig, and
//! namespaces of a test's own.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, ensure};

use crate::{repo_root, tool_path};

/// The cluster's kubeconfig: `KUBECONFIG` (scripts/test exports it) or `scripts/kube up`'s.
pub fn kubeconfig() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("KUBECONFIG").map_or_else(
        || repo_root().join(".services/kube/kubeconfig"),
        PathBuf::from,
    );
    ensure!(
        path.exists(),
        "KUBECONFIG: {} not found (scripts/test starts the cluster with scripts/kube up)",
        path.display()
    );
    Ok(path)
}

/// Runs `command`: its stdout, or a failure naming `what` with all it printed.
pub fn stdout_of(mut command: Command, what: &str) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    ensure!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Runs a command with the cluster's kubeconfig; its stdout, or the failure with its output.
pub fn run(program: &PathBuf, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(program);
    command.args(args).env("KUBECONFIG", kubeconfig()?);
    stdout_of(command, &format!("{} {args:?}", program.display()))
}

pub fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    run(&tool_path("KUBECTL", "kubectl")?, args)
}

pub fn helm(args: &[&str]) -> anyhow::Result<String> {
    run(&tool_path("HELM", "helm")?, args)
}

/// A namespace of this test, deleted (without waiting) when dropped.
pub struct Namespace(pub String);

impl Namespace {
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let name = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        kubectl(&["create", "namespace", &name])?;
        Ok(Self(name))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.0, "--wait=false"]);
    }
}

/// Every object in `namespace` of the kinds a chart or a manifest makes, as `kind/name`, less the
/// two every namespace gets (its default ServiceAccount and the cluster's CA ConfigMap).
pub fn objects_in(namespace: &str) -> anyhow::Result<Vec<String>> {
    let listed = kubectl(&[
        "-n",
        namespace,
        "get",
        "deployments,statefulsets,replicasets,pods,services,configmaps,secrets,\
         persistentvolumeclaims,jobs,cronjobs,serviceaccounts,roles,rolebindings,\
         poddisruptionbudgets,networkpolicies,ingresses,horizontalpodautoscalers",
        "-o",
        "name",
    ])?;
    Ok(listed
        .lines()
        .filter(|name| !["serviceaccount/default", "configmap/kube-root-ca.crt"].contains(name))
        .map(str::to_owned)
        .collect())
}

/// skaffold as a developer runs it, from the repository's root: the cluster's kubeconfig, helm and
/// kubectl on PATH, and a HOME of its own for its settings (removed when dropped). With
/// `dev_password`, CHAT_DEV_PASSWORD is set as the README says; without, it is unset.
pub struct Skaffold {
    binary: PathBuf,
    /// Its HOME, also a place for files a test hands it (removed when dropped).
    pub scratch: PathBuf,
    path: String,
    dev_password: Option<String>,
}

impl Skaffold {
    pub fn new(namespace: &str, dev_password: Option<&str>) -> anyhow::Result<Self> {
        let scratch = std::env::temp_dir().join(format!("skaffold-{namespace}"));
        let bin = scratch.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::os::unix::fs::symlink(tool_path("HELM", "helm")?, bin.join("helm"))?;
        std::os::unix::fs::symlink(tool_path("KUBECTL", "kubectl")?, bin.join("kubectl"))?;
        let skaffold = Self {
            binary: tool_path("SKAFFOLD", "skaffold")?,
            path: format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            scratch,
            dev_password: dev_password.map(str::to_owned),
        };
        skaffold.run(&["config", "set", "--global", "collect-metrics", "false"])?;
        Ok(skaffold)
    }

    pub fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .current_dir(repo_root())
            .env("KUBECONFIG", kubeconfig()?)
            .env("PATH", &self.path)
            .env("HOME", &self.scratch)
            .env("SKAFFOLD_UPDATE_CHECK", "false");
        match &self.dev_password {
            Some(password) => command.env("CHAT_DEV_PASSWORD", password),
            None => command.env_remove("CHAT_DEV_PASSWORD"),
        };
        Ok(command)
    }

    /// Its stdout, or the failure with all it printed.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        stdout_of(self.command(args)?, &format!("skaffold {args:?}"))
    }
}

impl Drop for Skaffold {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
