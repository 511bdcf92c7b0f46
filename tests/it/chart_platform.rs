//! What a platform team relies on when it installs the chart, on helm's render: rollouts that drop
//! no request, pods that roll when their Secrets change, a quick start without any service, use as
//! a subchart, digests and a global registry, the usual extension points, a `helm test` that only
//! reads, and the operator commands as Job templates.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};

use super::kubernetes::{
    RELEASE, Rendered, ScratchValues, api_container, chart, env_value, helm, parse_documents,
    render_minimal_with, run_helm_for, run_helm_with,
};

/// `helm template` of `extra` alone (no connection URLs unless it has them) on `kube_version`.
fn render_on(kube_version: &str, name: &str, extra: &str) -> anyhow::Result<Rendered> {
    let extra = ScratchValues::new(name, extra)?;
    let yaml = run_helm_for(
        kube_version,
        &["template", RELEASE, "--namespace", "chat"],
        &[&extra.0],
    )?;
    Rendered::parse(&parse_documents(&yaml)?)
}

/// The error of a render of `ci/minimal-values.yaml` plus `extra` that must fail.
fn minimal_render_error(name: &str, extra: &str) -> anyhow::Result<String> {
    let minimal = chart().join("ci/minimal-values.yaml");
    let extra = ScratchValues::new(name, extra)?;
    run_helm_with(&["template", RELEASE], &[&minimal, &extra.0])
        .err()
        .map(|error| error.to_string())
        .with_context(|| format!("{name}: the render must fail"))
}

fn deployment<'a>(rendered: &'a Rendered, name: &str) -> anyhow::Result<&'a Deployment> {
    rendered
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(name))
        .with_context(|| format!("Deployment {name}"))
}

fn pod_spec<'a>(rendered: &'a Rendered, name: &str) -> anyhow::Result<&'a PodSpec> {
    deployment(rendered, name)?
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .with_context(|| format!("{name}: pod spec"))
}

fn pod_annotations(rendered: &Rendered, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(deployment(rendered, name)?
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default())
}

fn pre_stop_sleep(container: &Container) -> Option<i64> {
    container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .map(|s| s.seconds)
}

const WORKERS: [&str; 2] = ["chat-ingest-worker", "chat-indexer"];

#[test]
fn a_terminating_api_waits_unready_before_it_drains_within_its_grace_period() -> anyhow::Result<()>
{
    // Kubernetes 1.30+ sleeps natively before SIGTERM; the process does not wait again.
    let native = render_minimal_with("termination-native", "{}")?;
    let api = api_container(&native)?;
    ensure!(pre_stop_sleep(api) == Some(10), "preStop sleep of 10 s");
    ensure!(env_value(api, "CHAT_SHUTDOWN_DELAY_MS").is_none());
    ensure!(
        pod_spec(&native, "chat-api")?.termination_grace_period_seconds == Some(40),
        "grace period above the delay plus the 15 s drain"
    );
    for worker in WORKERS {
        ensure!(
            pod_spec(&native, worker)?.termination_grace_period_seconds == Some(60),
            "{worker}: time to hand its batch back"
        );
    }

    // Older clusters have no sleep action: the api waits itself after SIGTERM.
    let minimal = chart().join("ci/minimal-values.yaml");
    let yaml = run_helm_for(
        "1.29.0",
        &["template", RELEASE, "--namespace", "chat"],
        &[&minimal],
    )?;
    let older = Rendered::parse(&parse_documents(&yaml)?)?;
    let api = api_container(&older)?;
    ensure!(api.lifecycle.is_none(), "no sleep action before 1.30");
    ensure!(env_value(api, "CHAT_SHUTDOWN_DELAY_MS") == Some("10000"));

    let off = render_minimal_with("termination-off", "api: {shutdownDelaySeconds: 0}")?;
    let api = api_container(&off)?;
    ensure!(api.lifecycle.is_none() && env_value(api, "CHAT_SHUTDOWN_DELAY_MS").is_none());

    let error = minimal_render_error(
        "grace-too-short",
        "api: {terminationGracePeriodSeconds: 20}",
    )?;
    ensure!(
        error.contains("api.terminationGracePeriodSeconds (20) must exceed")
            && error.contains("api.shutdownDelaySeconds (10)")
            && error.contains("(15 s)"),
        "the failure names the values: {error}"
    );
    Ok(())
}

#[test]
fn pods_roll_when_the_secrets_the_chart_writes_change() -> anyhow::Result<()> {
    let before = render_minimal_with("checksum-before", "{}")?;
    let after = render_minimal_with(
        "checksum-after",
        "connections: {databaseUrl: 'mysql://chat:rotated@mysql:3306/chat'}",
    )?;
    for name in [
        "chat-api",
        WORKERS[0],
        WORKERS[1],
        "chat-webhook-dispatcher",
    ] {
        let (old, new) = (
            pod_annotations(&before, name)?,
            pod_annotations(&after, name)?,
        );
        ensure!(
            old.contains_key("checksum/connections") && old.contains_key("checksum/config"),
            "{name}: {old:?}"
        );
        ensure!(
            old["checksum/connections"] != new["checksum/connections"],
            "{name}: a new password rolls the pods"
        );
        ensure!(old["checksum/config"] == new["checksum/config"]);
    }

    let own_secret = render_minimal_with(
        "checksum-existing",
        "connections: {existingSecret: chat-connections}",
    )?;
    ensure!(
        !pod_annotations(&own_secret, "chat-api")?.contains_key("checksum/connections"),
        "a Secret of the user's is not read by the chart"
    );
    let token = render_minimal_with(
        "checksum-token",
        "auth: {adminToken: an-admin-token-of-the-platform-team}",
    )?;
    let annotations = pod_annotations(&token, "chat-api")?;
    let checksum = annotations
        .get("checksum/admin-token")
        .context("the pods roll when the admin token changes")?;
    // Not the bare hash of the token: salted, so no precomputed table finds it.
    let bare = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(b"an-admin-token-of-the-platform-team")?;
            child.wait_with_output()
        })?;
    let bare = String::from_utf8(bare.stdout)?;
    ensure!(
        !bare.starts_with(checksum.as_str()),
        "the bare hash of the token: {checksum}"
    );
    Ok(())
}

#[test]
fn the_embedded_mode_installs_without_any_service() -> anyhow::Result<()> {
    let rendered = render_on("1.33.0", "embedded", "embedded: {enabled: true}")?;
    ensure!(
        rendered.names["Deployment"].len() == 1,
        "the api alone: {:?}",
        rendered.names
    );
    let spec = deployment(&rendered, "chat-api")?
        .spec
        .as_ref()
        .context("spec")?;
    ensure!(spec.replicas == Some(1), "one process owns the database");
    ensure!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate"),
        "never two processes at once"
    );
    let api = api_container(&rendered)?;
    for url in ["DATABASE_URL", "REDIS_URL", "AMQP_URL", "ELASTICSEARCH_URL"] {
        ensure!(
            !api.env.iter().flatten().any(|e| e.name == url),
            "{url} would leave the embedded mode"
        );
    }
    ensure!(env_value(api, "CHAT_DATA_DIR") == Some("/data"));
    let volumes = pod_spec(&rendered, "chat-api")?
        .volumes
        .clone()
        .unwrap_or_default();
    let data = volumes
        .iter()
        .find(|v| v.name == "data")
        .context("data volume")?;
    ensure!(
        data.empty_dir.is_some(),
        "no persistence by default: an emptyDir"
    );
    for kind in [
        "CronJob",
        "Job",
        "PersistentVolumeClaim",
        "Role",
        "HorizontalPodAutoscaler",
    ] {
        ensure!(
            !rendered.names.contains_key(kind),
            "{kind}: {:?}",
            rendered.names.get(kind)
        );
    }
    ensure!(
        rendered.secrets.len() == 1 && rendered.exists("Secret", "chat-admin-token"),
        "only the admin token"
    );

    let persistent = render_on(
        "1.33.0",
        "embedded-persistent",
        "embedded: {enabled: true, persistence: {enabled: true, size: 5Gi, storageClass: fast}}",
    )?;
    ensure!(persistent.exists("PersistentVolumeClaim", "chat-data"));
    let claim = pod_spec(&persistent, "chat-api")?
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.persistent_volume_claim.as_ref())
        .context("claim volume")?;
    ensure!(claim.claim_name == "chat-data");
    let existing = render_on(
        "1.33.0",
        "embedded-existing-claim",
        "embedded: {enabled: true, persistence: {enabled: true, existingClaim: my-data}}",
    )?;
    ensure!(!existing.names.contains_key("PersistentVolumeClaim"));

    let error = minimal_render_error(
        "embedded-autoscaled",
        "embedded: {enabled: true}\napi: {autoscaling: {enabled: true}}",
    )?;
    ensure!(
        error.contains("turn api.autoscaling.enabled off"),
        "{error}"
    );
    Ok(())
}

/// Copies a directory tree (the chart into an umbrella chart's `charts/`).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn the_chart_works_as_a_subchart_with_global_values() -> anyhow::Result<()> {
    let umbrella = std::env::temp_dir().join(format!("chat-umbrella-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&umbrella);
    copy_tree(&chart(), &umbrella.join("charts/chat"))?;
    std::fs::write(
        umbrella.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: chat\n    version: 0.1.0\n    condition: chat.enabled\n",
    )?;
    // What umbrella charts, Argo CD and Flux pass: globals (ours and other charts'), the
    // subchart's condition, and its values.
    std::fs::write(
        umbrella.join("values.yaml"),
        r#"global:
  imageRegistry: mirror.example.com
  imagePullSecrets: [{name: mirror-pull}]
  storageClass: fast
chat:
  enabled: true
  connections:
    existingSecret: chat-connections
"#,
    )?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let output = Command::new(helm()?)
            .args(args)
            .arg(&umbrella)
            .args(["--kube-version", "1.33.0"])
            .output()?;
        ensure!(
            output.status.success(),
            "helm {args:?} of the umbrella chart failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };
    run(&["lint", "--strict"])?;
    let rendered = Rendered::parse(&parse_documents(&run(&["template", RELEASE])?)?)?;
    std::fs::remove_dir_all(&umbrella)?;
    let specs = rendered.pod_specs();
    ensure!(specs.len() >= 6, "every workload renders: {}", specs.len());
    for (owner, pod, _, _) in specs {
        if owner.starts_with("Pod/") {
            continue; // the helm test pod's image is tests.image
        }
        for container in &pod.containers {
            let image = container.image.as_deref().unwrap_or_default();
            ensure!(
                image.starts_with("mirror.example.com/chat-"),
                "{owner}: {image} is not from global.imageRegistry"
            );
        }
        ensure!(
            pod.image_pull_secrets
                .iter()
                .flatten()
                .any(|s| s.name == "mirror-pull"),
            "{owner}: global.imagePullSecrets"
        );
    }
    Ok(())
}

#[test]
fn an_image_digest_wins_over_the_tag() -> anyhow::Result<()> {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let rendered = render_minimal_with(
        "digest",
        &format!(
            "image: {{registry: registry.example.com/chat, tag: '9.9.9'}}\napi: {{image: {{repository: chat-api, digest: '{digest}'}}}}"
        ),
    )?;
    ensure!(
        api_container(&rendered)?.image.as_deref()
            == Some(format!("registry.example.com/chat/chat-api@{digest}").as_str())
    );
    let indexer = &pod_spec(&rendered, "chat-indexer")?.containers[0];
    ensure!(indexer.image.as_deref() == Some("registry.example.com/chat/chat-indexer:9.9.9"));
    Ok(())
}

#[test]
fn extension_points_reach_every_workload() -> anyhow::Result<()> {
    let extensions = r#"
  podLabels: {team: messaging}
  extraEnv: [{name: EXTRA_SETTING, value: "on"}]
  extraEnvFrom: [{configMapRef: {name: extra-settings}}]
  extraVolumes: [{name: extra, emptyDir: {}}]
  extraVolumeMounts: [{name: extra, mountPath: /extra}]
  priorityClassName: chat-high
  topologySpreadConstraints:
    - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}
"#;
    let values: String = [
        "api",
        "ingestWorker",
        "indexer",
        "webhookDispatcher",
        "counterSync",
        "operations",
    ]
    .iter()
    .map(|component| format!("{component}:{extensions}"))
    .collect();
    let rendered = render_minimal_with("extensions", &values)?;
    let specs = rendered.pod_specs();
    let mut checked = 0;
    for (owner, pod, labels, _) in specs {
        if owner.starts_with("Pod/") || owner.starts_with("Job/") {
            continue; // the helm test pod and the migration hook have their own settings
        }
        checked += 1;
        ensure!(
            labels.get("team").map(String::as_str) == Some("messaging"),
            "{owner}: podLabels"
        );
        ensure!(
            pod.priority_class_name.as_deref() == Some("chat-high"),
            "{owner}"
        );
        ensure!(
            pod.topology_spread_constraints
                .as_ref()
                .is_some_and(|t| t.len() == 1),
            "{owner}: topologySpreadConstraints"
        );
        ensure!(
            pod.volumes.iter().flatten().any(|v| v.name == "extra"),
            "{owner}: extraVolumes"
        );
        let container = &pod.containers[0];
        ensure!(
            env_value(container, "EXTRA_SETTING") == Some("on"),
            "{owner}: extraEnv"
        );
        ensure!(
            container.env_from.iter().flatten().any(|e| e
                .config_map_ref
                .as_ref()
                .is_some_and(|c| c.name == "extra-settings")),
            "{owner}: extraEnvFrom"
        );
        ensure!(
            container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/extra"),
            "{owner}: extraVolumeMounts"
        );
        if owner.starts_with("Deployment/") {
            let startup = container.startup_probe.as_ref().context("startupProbe")?;
            ensure!(
                startup.failure_threshold == Some(24) && startup.period_seconds == Some(5),
                "{owner}: startup probe of 2 minutes"
            );
        }
    }
    ensure!(
        checked == 7,
        "api, 2 workers, the webhook-dispatcher, counter-sync and 2 operator CronJobs: {checked}"
    );
    Ok(())
}

/// The rendered `helm test` script (the first pod's first container's args).
fn helm_test_script(name: &str, values: &str) -> anyhow::Result<String> {
    let rendered = render_minimal_with(name, values)?;
    let pod = rendered.pods.first().context("the helm test pod")?;
    pod.spec
        .as_ref()
        .and_then(|s| s.containers[0].args.as_ref())
        .map(|args| args.join(" "))
        .context("test script")
}

#[test]
fn helm_test_only_reads_without_post_message() -> anyhow::Result<()> {
    for (docs, expected) in [(false, "HTTP/1.1 404"), (true, "/api/v1/openapi.json")] {
        let script = helm_test_script(
            &format!("helm-test-{docs}"),
            &format!("api: {{docs: {{enabled: {docs}}}}}\ntests: {{postMessage: false}}"),
        )?;
        ensure!(script.contains("/readyz") && script.contains(expected));
        for write in ["--post-data", "--method", "-X ", "PUT", "DELETE"] {
            ensure!(
                !script.contains(write),
                "the test writes ({write}): {script}"
            );
        }
    }
    Ok(())
}

#[test]
fn helm_test_posts_a_message_and_finds_it_by_search_by_default() -> anyhow::Result<()> {
    let script = helm_test_script("helm-test-post", "tests: {searchTimeoutSeconds: 17}")?;
    for step in [
        "/readyz",
        "--post-data",
        "/api/v1/applications",
        "/chats",
        "/messages",
        "/search?query=$word",
        "-lt 17",
    ] {
        ensure!(script.contains(step), "no {step} in: {script}");
    }
    Ok(())
}

#[test]
fn operator_commands_are_suspended_cron_job_templates() -> anyhow::Result<()> {
    let rendered = render_minimal_with("operations", "networkPolicy: {enabled: true}")?;
    for command in ["replay-dead-letters", "reindex"] {
        let name = format!("chat-{command}");
        let cron_job = rendered
            .cron_jobs
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(&name))
            .with_context(|| format!("CronJob {name}"))?;
        let spec = cron_job.spec.as_ref().context("spec")?;
        ensure!(
            spec.suspend == Some(true),
            "{name}: never runs on a schedule"
        );
        let pod = spec
            .job_template
            .spec
            .as_ref()
            .and_then(|j| j.template.spec.as_ref())
            .context("pod")?;
        let container = &pod.containers[0];
        ensure!(container.args.as_deref() == Some(&[command.to_owned()][..]));
        ensure!(container.image.as_deref() == Some("chat-api:0.1.0"));
        let secret_refs: Vec<&str> = container
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|s| s.name.as_str())
            .collect();
        ensure!(
            secret_refs.len() == 4 && secret_refs.iter().all(|s| *s == "chat-connections"),
            "{name}: the release's connection URLs: {secret_refs:?}"
        );
        // Its egress is allowed like counter-sync's.
        ensure!(
            rendered.network_policies.iter().any(|policy| {
                policy
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_selector.as_ref()?.match_expressions.clone())
                    .into_iter()
                    .flatten()
                    .any(|e| e.values.iter().flatten().any(|v| v == command))
            }),
            "{name}: no NetworkPolicy selects it"
        );
    }
    let off = render_minimal_with("operations-off", "operations: {enabled: false}")?;
    ensure!(off.cron_jobs.len() == 1, "counter-sync alone");
    Ok(())
}
