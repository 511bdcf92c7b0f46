//! The chart and counter-sync's Lease against a real Kubernetes API server (`scripts/kube up`:
//! etcd, kube-apiserver with RBAC, controller-manager, scheduler and a kwok fake node, on
//! loopback). kwok marks pods Running without running containers: these tests prove the API
//! objects, hooks, rollouts, RBAC and the Lease, not the images.
//!
//! Each test works in namespaces of its own; the cluster is shared.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use counter_sync::lease::{Acquisition, LeaseConfig, LeaseLock};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize as _;
use system_tests::kube::{KillOnDrop, Namespace, Skaffold, helm, kubeconfig, kubectl, objects_in};
use system_tests::{repo_root, tool_path};

const RELEASE: &str = "chat";

fn chart() -> String {
    repo_root().join("charts/chat").display().to_string()
}

fn scenario(name: &str) -> String {
    repo_root()
        .join("charts/chat/ci")
        .join(name)
        .display()
        .to_string()
}

/// The file names of every scenario of `charts/chat/ci/`.
fn scenario_files() -> anyhow::Result<Vec<String>> {
    let mut files: Vec<String> = std::fs::read_dir(repo_root().join("charts/chat/ci"))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    files.sort();
    ensure!(files.len() >= 4, "the ci scenarios: {files:?}");
    Ok(files)
}

/// The Secrets and ConfigMap that a scenario names (in a real installation the platform team
/// creates them): the connection URLs and the CA of `production-values.yaml`, and for
/// `existing-secret-values.yaml` also the admin token (the others let the chart generate it).
fn create_prerequisites(namespace: &str, scenario: &str) -> anyhow::Result<()> {
    if scenario == "minimal-values.yaml" {
        // Its URLs are values: the chart makes the Secret.
        return Ok(());
    }
    if scenario == "embedded-values.yaml" {
        // No provisioner here: a volume bound in advance to the claim the chart creates.
        let volume = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": embedded_volume(namespace)},
            "spec": {
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": format!("/tmp/{namespace}-data")},
                "claimRef": {"namespace": namespace, "name": "chat-data"},
            }
        });
        let manifest = std::env::temp_dir().join(format!("{namespace}-volume.json"));
        std::fs::write(&manifest, volume.to_string())?;
        kubectl(&["apply", "-f", &manifest.to_string_lossy()])?;
        std::fs::remove_file(manifest)?;
        return Ok(());
    }
    let urls = [
        "--from-literal=DATABASE_URL=mysql://chat:secret@mysql:3306/chat",
        "--from-literal=REDIS_URL=redis://redis:6379/0",
        "--from-literal=AMQP_URL=amqp://chat:secret@rabbitmq:5672/%2f",
        "--from-literal=ELASTICSEARCH_URL=http://elasticsearch:9200",
    ];
    let mut connections = vec![
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "chat-connections",
    ];
    connections.extend(urls);
    kubectl(&connections)?;
    if scenario == "existing-secret-values.yaml" {
        kubectl(&[
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            "chat-admin-token",
            "--from-literal=CHAT_ADMIN_TOKEN=an-admin-token-of-the-platform-team",
        ])?;
    }
    kubectl(&[
        "-n",
        namespace,
        "create",
        "configmap",
        "data-services-ca",
        "--from-literal=ca.crt=-----BEGIN CERTIFICATE-----",
    ])?;
    Ok(())
}

fn embedded_volume(namespace: &str) -> String {
    format!("{namespace}-embedded-data")
}

fn deployment_replicas(namespace: &str, name: &str) -> anyhow::Result<String> {
    kubectl(&[
        "-n",
        namespace,
        "get",
        "deployment",
        name,
        "-o",
        "jsonpath={.spec.replicas}/{.status.readyReplicas}",
    ])
}

/// Waits until every wanted replica of the deployment is ready; returns `wanted/ready`.
fn deployment_fully_ready(namespace: &str, name: &str, within: Duration) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let replicas = deployment_replicas(namespace, name)?;
        let (wanted, ready) = replicas.split_once('/').context("replicas")?;
        if wanted == ready {
            return Ok(replicas);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{name}: {replicas} ready after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every scenario of `charts/chat/ci/` is installed (the migration hook included), upgraded, rolled
/// back and uninstalled on the API server, as an operator would.
#[test]
fn the_chart_installs_upgrades_rolls_back_and_uninstalls_in_every_scenario() -> anyhow::Result<()> {
    for file in scenario_files()? {
        let file = file.as_str();
        let embedded = file == "embedded-values.yaml";
        let namespace = Namespace::create("live")?;
        let ns = namespace.0.as_str();
        create_prerequisites(ns, file)?;
        let values = scenario(file);
        let install = [
            "install",
            RELEASE,
            &chart(),
            "-n",
            ns,
            "-f",
            &values,
            "--wait",
            "--wait-for-jobs",
            "--timeout",
            "3m",
        ];
        helm(&install).with_context(|| format!("install {file}"))?;
        let api = format!("{RELEASE}-api");
        // With autoscaling the chart leaves the replicas to the HPA, which raises them to its
        // minimum after --wait saw the first one ready: those must become ready too.
        let installed = deployment_fully_ready(ns, &api, Duration::from_secs(120))
            .with_context(|| format!("{file}: api after --wait"))?;
        let objects: &[&str] = if embedded {
            // The whole system in the api; its claim bound (--wait waits for that too).
            &["service/chat-api", "persistentvolumeclaim/chat-data"]
        } else {
            &[
                "deployment/chat-ingest-worker",
                "deployment/chat-indexer",
                "deployment/chat-webhook-dispatcher",
                "cronjob/chat-counter-sync",
                "cronjob/chat-replay-dead-letters",
                "cronjob/chat-reindex",
                "serviceaccount/chat-counter-sync",
                "role/chat-counter-sync",
                "service/chat-api",
            ]
        };
        for object in objects {
            kubectl(&["-n", ns, "get", object]).with_context(|| format!("{file}: {object}"))?;
        }
        if !embedded {
            // An operator command is one `kubectl create job --from`, with the release's settings.
            kubectl(&[
                "-n",
                ns,
                "create",
                "job",
                "--from=cronjob/chat-reindex",
                "reindex-now",
            ])?;
            let job = kubectl(&[
                "-n",
                ns,
                "get",
                "job",
                "reindex-now",
                "-o",
                "jsonpath={.spec.template.spec.containers[0].args[0]} {.spec.template.spec.containers[0].envFrom[0].configMapRef.name}",
            ])?;
            assert_eq!(job.trim(), "reindex chat-config", "{file}: the reindex Job");
        }
        let notes = helm(&["get", "notes", RELEASE, "-n", ns])?;
        if file == "production-values.yaml" {
            ensure!(
                notes.contains("\n  https://chat.acme.example/api/v1\n"),
                "{file}: one line per ingress host in NOTES:\n{notes}"
            );
        }
        ensure!(
            notes.contains("EMBEDDED MODE") == embedded,
            "{file}: NOTES say whether it is the embedded mode"
        );
        let status = helm(&["status", RELEASE, "-n", ns, "-o", "json"])?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        assert_eq!(status["info"]["status"], "deployed", "{file}");

        helm(&[
            "upgrade",
            RELEASE,
            &chart(),
            "-n",
            ns,
            "-f",
            &values,
            "--set",
            "api.replicaCount=3",
            "--set",
            "api.autoscaling.enabled=false",
            "--wait",
            "--timeout",
            "3m",
        ])
        .with_context(|| format!("upgrade {file}"))?;
        let upgraded = if embedded { "1/1" } else { "3/3" };
        assert_eq!(deployment_replicas(ns, &api)?, upgraded, "{file}: upgraded");
        if file == "minimal-values.yaml" {
            // A new password in the chart's Secret alone rolls the pods that read it.
            let template = |name: &str| {
                kubectl(&[
                    "-n",
                    ns,
                    "get",
                    "deployment",
                    name,
                    "-o",
                    "jsonpath={.spec.template.metadata.annotations.checksum/connections}",
                ])
            };
            let before = [template(&api)?, template("chat-indexer")?];
            let rotated = [
                "upgrade",
                RELEASE,
                &chart(),
                "-n",
                ns,
                "-f",
                &values,
                "--reuse-values",
                "--set",
                "connections.databaseUrl=mysql://chat:rotated@mysql:3306/chat",
                "--wait",
                "--timeout",
                "3m",
            ];
            helm(&rotated).context("upgrade with a rotated password")?;
            let after = [template(&api)?, template("chat-indexer")?];
            ensure!(
                before
                    .iter()
                    .zip(&after)
                    .all(|(b, a)| !b.is_empty() && b != a),
                "the pod templates changed with the Secret: {before:?} -> {after:?}"
            );
            let revisions = kubectl(&["-n", ns, "get", "replicasets", "-o", "name"])?;
            ensure!(
                revisions
                    .lines()
                    .filter(|r| r.contains("chat-api-"))
                    .count()
                    >= 2,
                "a new api ReplicaSet rolled out: {revisions}"
            );
            helm(&[
                "rollback",
                RELEASE,
                "2",
                "-n",
                ns,
                "--wait",
                "--timeout",
                "3m",
            ])?;
        }
        helm(&[
            "rollback",
            RELEASE,
            "1",
            "-n",
            ns,
            "--wait",
            "--timeout",
            "3m",
        ])
        .with_context(|| format!("rollback {file}"))?;
        assert_eq!(
            deployment_fully_ready(ns, &api, Duration::from_secs(120))?,
            installed,
            "{file}: rolled back"
        );
        let history = helm(&["history", RELEASE, "-n", ns, "-o", "json"])?;
        let history: Vec<serde_json::Value> = serde_json::from_str(&history)?;
        // minimal-values.yaml also rotated a password and rolled that back.
        let revisions = if file == "minimal-values.yaml" { 5 } else { 3 };
        assert_eq!(
            history.len(),
            revisions,
            "{file}: install, upgrade(s), rollback(s)"
        );

        helm(&["uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "2m"])?;
        let left = kubectl(&[
            "-n",
            ns,
            "get",
            "deployments,cronjobs,services",
            "-o",
            "name",
        ])?;
        assert_eq!(left.trim(), "", "{file}: left behind {left}");
        if embedded {
            // The data outlives an uninstall (helm.sh/resource-policy: keep).
            kubectl(&["-n", ns, "get", "persistentvolumeclaim", "chat-data"])?;
            kubectl(&[
                "delete",
                "persistentvolume",
                &embedded_volume(ns),
                "--wait=false",
            ])?;
        }
    }
    Ok(())
}

/// What helm renders is accepted by the API server itself, strictly (unknown fields fail), and so
/// are the development manifests.
#[test]
fn the_rendered_chart_and_the_dev_manifests_pass_the_servers_strict_validation()
-> anyhow::Result<()> {
    let namespace = Namespace::create("dry-run")?;
    for file in scenario_files()? {
        let rendered = helm(&[
            "template",
            RELEASE,
            &chart(),
            "-n",
            &namespace.0,
            "-f",
            &scenario(&file),
        ])?;
        let path = std::env::temp_dir().join(format!("{}-{file}", namespace.0));
        std::fs::write(&path, rendered)?;
        let applied = kubectl(&[
            "apply",
            "-n",
            &namespace.0,
            "--dry-run=server",
            "--validate=strict",
            "-f",
            &path.display().to_string(),
        ]);
        std::fs::remove_file(&path)?;
        applied.with_context(|| format!("server-side dry run of {file}"))?;
    }
    kubectl(&[
        "apply",
        "-n",
        &namespace.0,
        "--dry-run=server",
        "--validate=strict",
        "-f",
        &repo_root().join("k8s/dev").display().to_string(),
    ])
    .context("server-side dry run of k8s/dev")?;
    Ok(())
}

/// The chart's ServiceMonitor and PrometheusRule are left out on a cluster without the Prometheus
/// operator's CRDs (the install succeeds), and created once the CRDs exist.
#[test]
fn monitoring_objects_follow_their_crds() -> anyhow::Result<()> {
    let namespace = Namespace::create("monitoring")?;
    let ns = namespace.0.as_str();
    create_prerequisites(ns, "production-values.yaml")?;
    let values = scenario("production-values.yaml");
    let crds = repo_root().join("tests/fixtures/monitoring-crds.yaml");
    let crds = crds.display().to_string();
    // The CRDs are cluster-wide: this test alone adds and removes them.
    let _ = kubectl(&["delete", "-f", &crds, "--ignore-not-found", "--wait=true"]);
    helm(&[
        "install",
        RELEASE,
        &chart(),
        "-n",
        ns,
        "-f",
        &values,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let none = kubectl(&[
        "api-resources",
        "--api-group=monitoring.coreos.com",
        "-o",
        "name",
    ])?;
    assert_eq!(none.trim(), "", "no monitoring API yet");
    let manifest = helm(&["get", "manifest", RELEASE, "-n", ns])?;
    assert!(!manifest.contains("kind: ServiceMonitor"));

    kubectl(&["apply", "-f", &crds])?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
        "--timeout=60s",
    ])?;
    helm(&[
        "upgrade",
        RELEASE,
        &chart(),
        "-n",
        ns,
        "-f",
        &values,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let monitoring = kubectl(&[
        "-n",
        ns,
        "get",
        "servicemonitors,prometheusrules",
        "-o",
        "name",
    ])?;
    assert!(
        monitoring.contains("servicemonitor") && monitoring.contains("prometheusrule"),
        "created once the CRDs exist: {monitoring:?}"
    );
    helm(&["uninstall", RELEASE, "-n", ns, "--wait"])?;
    kubectl(&["delete", "-f", &crds, "--wait=false"])?;
    Ok(())
}

/// The workers' KEDA objects against KEDA's own CRDs (its Go module's `config/crd/bases`, pinned in
/// `scripts/tools keda-crds`): refused with a message where the cluster lacks KEDA's API; with the
/// CRDs applied, installed, every object passing the API server's structural schema and strict
/// field validation, and the chart's HPA left out for the worker KEDA scales.
#[test]
fn keda_objects_pass_kedas_crd_schemas() -> anyhow::Result<()> {
    let crds = tool_path("KEDA_CRDS", "keda-crds")?;
    let crds: Vec<String> = [
        "keda.sh_scaledobjects.yaml",
        "keda.sh_triggerauthentications.yaml",
    ]
    .iter()
    .map(|file| crds.join(file).display().to_string())
    .collect();
    let namespace = Namespace::create("keda")?;
    let ns = namespace.0.as_str();
    let minimal = scenario("minimal-values.yaml");
    let install = [
        "install",
        RELEASE,
        &chart(),
        "-n",
        ns,
        "-f",
        &minimal,
        "--set",
        "ingestWorker.keda.enabled=true,indexer.keda.enabled=true,indexer.autoscaling.enabled=true",
        "--set",
        "webhookDispatcher.autoscaling.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ];
    // The CRDs are cluster-wide: this test alone adds and removes them.
    for crd in &crds {
        kubectl(&["delete", "-f", crd, "--ignore-not-found", "--wait=true"])?;
    }
    let refused = helm(&install)
        .err()
        .context("installed without KEDA's API")?;
    assert!(
        format!("{refused:#}").contains(".keda.enabled needs KEDA on the cluster"),
        "{refused:#}"
    );

    for crd in &crds {
        kubectl(&["apply", "--server-side", "-f", crd])?;
    }
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/scaledobjects.keda.sh",
        "crd/triggerauthentications.keda.sh",
        "--timeout=60s",
    ])?;
    // Strictly, as the server sees it (unknown or misplaced fields fail), then for real.
    // `helm template` asks no cluster: it is told KEDA's API exists.
    let rendered = helm(
        &[
            &[
                "template",
                "--api-versions",
                "keda.sh/v1alpha1/ScaledObject",
            ],
            &install[1..11],
        ]
        .concat(),
    )?;
    let path = std::env::temp_dir().join(format!("{ns}-keda.yaml"));
    std::fs::write(&path, &rendered)?;
    let applied = kubectl(&[
        "apply",
        "-n",
        ns,
        "--dry-run=server",
        "--validate=strict",
        "-f",
        &path.display().to_string(),
    ]);
    // The schema is in force: a ScaledObject without a trigger (minItems 1) is refused.
    let scaled_object = rendered
        .split("\n---\n")
        .find(|document| document.contains("kind: ScaledObject"))
        .context("a ScaledObject")?;
    let (head, _) = scaled_object
        .split_once("  triggers:")
        .context("its triggers")?;
    std::fs::write(&path, format!("{head}  triggers: []\n"))?;
    let without_trigger = kubectl(&[
        "apply",
        "-n",
        ns,
        "--dry-run=server",
        "-f",
        &path.display().to_string(),
    ]);
    std::fs::remove_file(&path)?;
    applied.context("server-side dry run with KEDA on")?;
    let refused = without_trigger
        .err()
        .context("a ScaledObject without a trigger")?;
    assert!(
        format!("{refused:#}").contains("spec.triggers"),
        "{refused:#}"
    );

    helm(&install)?;
    let objects = kubectl(&[
        "-n",
        ns,
        "get",
        "scaledobjects,triggerauthentications,hpa",
        "-o",
        "name",
    ])?;
    let mut objects: Vec<&str> = objects.lines().collect();
    objects.sort_unstable();
    assert_eq!(
        objects,
        [
            "horizontalpodautoscaler.autoscaling/chat-webhook-dispatcher",
            "scaledobject.keda.sh/chat-indexer",
            "scaledobject.keda.sh/chat-ingest-worker",
            "triggerauthentication.keda.sh/chat-keda-rabbitmq",
        ]
    );
    helm(&["uninstall", RELEASE, "-n", ns, "--wait"])?;
    for crd in &crds {
        kubectl(&["delete", "-f", crd, "--wait=false"])?;
    }
    Ok(())
}

/// The cluster of the kubeconfig, as its admin.
async fn cluster_config() -> anyhow::Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()?)?;
    let options = kube::config::KubeConfigOptions::default();
    Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?)
}

/// A client of the API server authenticated as the chart's counter-sync ServiceAccount (a token
/// from the TokenRequest API), so that every call meets the chart's own Role.
async fn counter_sync_client(namespace: &str) -> anyhow::Result<Client> {
    let token = kubectl(&[
        "-n",
        namespace,
        "create",
        "token",
        "chat-counter-sync",
        "--duration=10m",
    ])?;
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()?)?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.trim().to_owned().into()),
        ..kube::config::AuthInfo::default()
    };
    Ok(Client::try_from(config)?)
}

fn lease_settings(namespace: &str, holder: &str, seconds: u64) -> LeaseConfig {
    LeaseConfig {
        namespace: namespace.to_owned(),
        name: "chat-counter-sync".to_owned(),
        holder: holder.to_owned(),
        job: Some("chat-counter-sync-29001".to_owned()),
        duration: Duration::from_secs(seconds),
    }
}

/// The Lease, live, under the chart's Role: acquire, held by another, renew, takeover after
/// expiry, release, a stale write refused, the repair Event, 403 outside the namespace, and the
/// failure paths of a run.
#[tokio::test]
async fn the_lease_works_live_under_the_charts_own_role() -> anyhow::Result<()> {
    let namespace = Namespace::create("lease")?;
    let ns = namespace.0.as_str();
    helm(&[
        "install",
        RELEASE,
        &chart(),
        "-n",
        ns,
        "-f",
        &scenario("minimal-values.yaml"),
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let client = counter_sync_client(ns).await?;
    let first = LeaseLock::new(
        client.clone(),
        lease_settings(ns, "chat-counter-sync-29001-aaaaa", 2),
    );
    let second = LeaseLock::new(
        client.clone(),
        lease_settings(ns, "chat-counter-sync-29002-bbbbb", 2),
    );

    assert_eq!(
        first.try_acquire(Timestamp::now()).await?,
        Acquisition::Acquired
    );
    assert_eq!(
        second.try_acquire(Timestamp::now()).await?,
        Acquisition::HeldBy("chat-counter-sync-29001-aaaaa".to_owned())
    );
    assert!(first.renew(Timestamp::now()).await?, "renewed");
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let held = leases.get("chat-counter-sync").await?;
    let spec = held.spec.clone().context("spec")?;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some("chat-counter-sync-29001-aaaaa")
    );
    assert_eq!(spec.lease_duration_seconds, Some(2));

    // A write with the resourceVersion read before another write is refused (409): what makes
    // two runs racing for the Lease safe.
    assert!(first.renew(Timestamp::now()).await?);
    let stale = leases
        .replace("chat-counter-sync", &PostParams::default(), &held)
        .await
        .expect_err("a stale resourceVersion");
    assert!(
        matches!(&stale, kube::Error::Api(status) if status.code == 409),
        "{stale:?}"
    );

    // Not renewed for longer than its duration: the second run takes it over.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        second.try_acquire(Timestamp::now()).await?,
        Acquisition::Acquired
    );
    assert!(
        !first.renew(Timestamp::now()).await?,
        "the first run lost it"
    );
    let taken = leases
        .get("chat-counter-sync")
        .await?
        .spec
        .context("spec")?;
    assert_eq!(taken.lease_transitions, Some(1));

    second
        .record_repair(Timestamp::now(), "application 1: chats_count 2 -> 3")
        .await?;
    // The Role may create Events, not read them: the operator's view.
    let admin = Client::try_from(cluster_config().await?)?;
    let events: Api<Event> = Api::namespaced(admin, ns);
    let recorded = events.list(&ListParams::default()).await?;
    assert!(
        recorded
            .items
            .iter()
            .any(|event| event.reason.as_deref() == Some("CounterRepaired")
                && event.message.as_deref() == Some("application 1: chats_count 2 -> 3"))
    );

    second.release().await?;
    let released = leases
        .get("chat-counter-sync")
        .await?
        .spec
        .context("spec")?;
    assert_eq!(released.holder_identity, None);

    // The Role opens this namespace only.
    let elsewhere = LeaseLock::new(
        client.clone(),
        lease_settings("default", "chat-counter-sync-1-x", 60),
    );
    let forbidden = elsewhere
        .try_acquire(Timestamp::now())
        .await
        .expect_err("outside its namespace");
    assert!(
        matches!(&forbidden, kube::Error::Api(status) if status.code == 403),
        "{forbidden:?}"
    );

    // A run that fails gives the Lease back; a run that finds the Lease of a dead earlier pod of
    // its own Job fails instead of reporting success.
    let unreachable =
        chatcore::Config::from_map(&std::collections::HashMap::<String, String>::from_iter(
            [
                ("DATABASE_URL", "mysql://chat:chat@127.0.0.1:1/chat"),
                ("REDIS_URL", "redis://127.0.0.1:1/0"),
                ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
                ("ELASTICSEARCH_URL", "http://127.0.0.1:1"),
                ("CHAT_CONNECT_TIMEOUT_MS", "500"),
            ]
            .map(|(name, value)| (name.to_owned(), value.to_owned())),
        ))?;
    let failing = LeaseLock::new(
        client.clone(),
        lease_settings(ns, "chat-counter-sync-29001-ccccc", 60),
    );
    assert!(
        counter_sync::run_holding(&unreachable, &failing)
            .await
            .is_err()
    );
    let after_failure = leases
        .get("chat-counter-sync")
        .await?
        .spec
        .context("spec")?;
    assert_eq!(after_failure.holder_identity, None, "given back");

    let dead = LeaseLock::new(
        client.clone(),
        lease_settings(ns, "chat-counter-sync-29001-ddddd", 60),
    );
    assert_eq!(
        dead.try_acquire(Timestamp::now()).await?,
        Acquisition::Acquired
    );
    // The pod dies here without releasing; the Job's next pod starts.
    let retry = LeaseLock::new(
        client,
        lease_settings(ns, "chat-counter-sync-29001-eeeee", 60),
    );
    let outcome = counter_sync::run_holding(&unreachable, &retry).await;
    let error = outcome.expect_err("a dead predecessor's Lease is no success");
    assert!(
        error.to_string().contains("chat-counter-sync-29001-ddddd"),
        "{error}"
    );
    helm(&["uninstall", RELEASE, "-n", ns])?;
    Ok(())
}

/// The development services' objects in a render: `k8s/dev` labels every object so.
fn dev_only_objects(rendered: &str) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for document in serde_yaml::Deserializer::from_str(rendered) {
        let object = serde_json::Value::deserialize(document)?;
        let labels = &object["metadata"]["labels"];
        if labels["environment"] == "dev-only" || labels["app.kubernetes.io/part-of"] == "chat-dev"
        {
            found.push(format!(
                "{}/{}",
                object["kind"].as_str().unwrap_or_default(),
                object["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    Ok(found)
}

/// `skaffold render` and `skaffold deploy` of `skaffold.yaml` (the development services of
/// `k8s/dev`, then the chart) against the live API server, with prebuilt image tags: what
/// `skaffold dev` does after its build, without a Docker engine. skaffold's own parser accepts
/// the file (`diagnose --yaml-only` fails on an unknown field), with and without the profile.
#[test]
fn skaffold_renders_and_deploys_the_development_setup() -> anyhow::Result<()> {
    let namespace = Namespace::create("skaffold")?;
    let ns = namespace.0.as_str();
    kubectl(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "chat-dev-credentials",
        "--from-literal=password=a-dev-password",
    ])?;
    let skaffold = Skaffold::new(ns, Some("a-dev-password"))?;
    let effective = skaffold.run(&["diagnose", "--yaml-only"])?;
    for expected in [
        "k8s/dev/rabbitmq.yaml",
        "image: chat-tour",
        "kubernetesCluster",
    ] {
        ensure!(
            effective.contains(expected),
            "{expected} in the effective configuration:\n{effective}"
        );
    }
    let embedded = skaffold.run(&["diagnose", "--yaml-only", "-p", "embedded"])?;
    ensure!(
        !embedded.contains("k8s/dev") && embedded.contains("embedded.enabled"),
        "the embedded profile's effective configuration:\n{embedded}"
    );
    // -p local (`skaffold dev` on the real node without Docker; run for real by the real_node
    // test): scripts/images builds the six artifacts and loads them into the node before each
    // deploy; the manifests stay the default profile's.
    let local = skaffold.run(&["diagnose", "--yaml-only", "-p", "local"])?;
    ensure!(
        local
            .matches("buildCommand: scripts/images skaffold-build")
            .count()
            == 6
            && local.contains("skaffold-load")
            && local.contains("k8s/dev/rabbitmq.yaml"),
        "the local profile's effective configuration:\n{local}"
    );
    let rendered_local = skaffold.run(&[
        "render",
        "--offline=true",
        "--digest-source=tag",
        "-t",
        "test",
        "-p",
        "local",
    ])?;
    ensure!(
        rendered_local.contains("chat-api:test") && dev_only_objects(&rendered_local)?.len() >= 8,
        "-p local renders the chart and k8s/dev:\n{rendered_local}"
    );
    let modes: serde_json::Value = serde_json::from_str(&skaffold.run(&[
        "inspect",
        "executionModes",
        "list",
        "--format",
        "json",
    ])?)?;
    ensure!(
        modes["verifyExecutionModes"]["tour"] == "kubernetesCluster",
        "{modes}"
    );
    let rendered = skaffold.run(&[
        "render",
        "--offline=true",
        "--digest-source=tag",
        "-t",
        "test",
    ])?;
    for image in [
        "chat-api:test",
        "chat-ingest-worker:test",
        "chat-indexer:test",
        "chat-webhook-dispatcher:test",
        "chat-counter-sync:test",
    ] {
        assert!(rendered.contains(image), "{image} in the render");
    }
    ensure!(
        dev_only_objects(&rendered)?.len() >= 8,
        "k8s/dev's Services and Deployments in the render"
    );
    skaffold.run(&["deploy", "-t", "test", "-n", ns, "--status-check=true"])?;
    let deployments = kubectl(&["-n", ns, "get", "deployments", "-o", "name"])?;
    for name in [
        "deployment.apps/chat-api",
        "deployment.apps/chat-ingest-worker",
        "deployment.apps/chat-indexer",
        "deployment.apps/chat-webhook-dispatcher",
        "deployment.apps/rabbitmq",
    ] {
        assert!(deployments.contains(name), "{name} deployed: {deployments}");
    }
    // `skaffold delete` (what Ctrl-C of `skaffold dev` runs) leaves what the developer made alone.
    skaffold.run(&["delete", "-n", ns])?;
    let releases = helm(&["list", "-a", "-q", "-n", ns])?;
    ensure!(releases.trim().is_empty(), "releases left: {releases}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = objects_in(ns)?;
        if left == ["secret/chat-dev-credentials"] {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "left 120 s after skaffold delete: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// `skaffold render -p embedded` and `skaffold deploy -p embedded`: the chart alone, no `k8s/dev`
/// object, and neither the Secret chat-dev-credentials nor CHAT_DEV_PASSWORD needed.
#[test]
fn skaffold_embedded_profile_renders_and_deploys_the_chart_alone() -> anyhow::Result<()> {
    let namespace = Namespace::create("skaffold-embedded")?;
    let ns = namespace.0.as_str();
    let skaffold = Skaffold::new(ns, None)?;
    let rendered = skaffold.run(&[
        "render",
        "--offline=true",
        "--digest-source=tag",
        "-t",
        "test",
        "-p",
        "embedded",
    ])?;
    ensure!(rendered.contains("chat-api:test"), "the api in the render");
    let dev_only = dev_only_objects(&rendered)?;
    ensure!(
        dev_only.is_empty(),
        "k8s/dev objects under -p embedded: {dev_only:?}"
    );
    skaffold.run(&[
        "deploy",
        "-t",
        "test",
        "-n",
        ns,
        "--status-check=true",
        "-p",
        "embedded",
    ])?;
    let deployments = kubectl(&["-n", ns, "get", "deployments", "-o", "name"])?;
    ensure!(
        deployments.contains("deployment.apps/chat-api"),
        "the api deployed: {deployments}"
    );
    for name in ["mysql", "redis", "rabbitmq", "elasticsearch"] {
        ensure!(
            !deployments.contains(&format!("deployment.apps/{name}\n")),
            "{name} deployed under -p embedded: {deployments}"
        );
    }
    Ok(())
}

/// `skaffold verify` starts the README's tour as a Job in the cluster: the built tour image,
/// CHAT_URL of the api Service and nothing else from the developer's environment, no retry, non-root.
/// kwok marks the Job's pod Succeeded without running it (and skaffold then waits for logs that
/// never come), so this proves the Job skaffold makes, not the tour's run: the tour itself runs
/// in tests/it/tour.rs.
#[test]
fn skaffold_verify_starts_the_tour_as_a_job_in_the_cluster() -> anyhow::Result<()> {
    let namespace = Namespace::create("skaffold-verify")?;
    let ns = namespace.0.as_str();
    let skaffold = Skaffold::new(ns, Some("a-dev-password"))?;
    // What `skaffold build --file-output` writes.
    let builds = skaffold.scratch.join("build.json");
    std::fs::write(
        &builds,
        r#"{"builds": [{"imageName": "chat-tour", "tag": "chat-tour:test"}]}"#,
    )?;
    let builds = builds.display().to_string();
    let _verify = KillOnDrop(
        skaffold
            .command(&["verify", "-a", &builds, "-n", ns])?
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let mut job = None;
    for _ in 0..120 {
        if let Ok(json) = kubectl(&["-n", ns, "get", "job", "tour", "-o", "json"]) {
            job = Some(serde_json::from_str::<serde_json::Value>(&json)?);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let job = job.context("skaffold verify created no Job tour within 60 s")?;
    let spec = &job["spec"];
    let pod = &spec["template"]["spec"];
    let containers = pod["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1, "{pod}");
    ensure!(
        containers[0]["image"] == "chat-tour:test",
        "{}",
        containers[0]
    );
    ensure!(
        containers[0]["env"]
            == serde_json::json!([{"name": "CHAT_URL", "value": "http://chat-api"}]),
        "the Job's environment: {}",
        containers[0]["env"]
    );
    ensure!(
        spec["backoffLimit"] == 0
            && pod["restartPolicy"] == "Never"
            && pod["securityContext"]["runAsNonRoot"] == true,
        "{spec}"
    );
    Ok(())
}
