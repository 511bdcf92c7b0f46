//! The Kubernetes side, checked without a cluster: the chart is linted and rendered by a real helm
//! for every scenario of `charts/chat/ci/`, every object is parsed into its `k8s-openapi` type and
//! compared back (a field the type does not know fails), and the invariants a cluster would
//! otherwise reveal late are asserted. `k8s/dev` and `skaffold.yaml` are checked the same way.
//!
//! What one template renders for given values (a value to a field, a refused render, a schema
//! refusal) is asserted by the helm-unittest suites of `charts/chat/unittests/`
//! (`the_helm_unittest_suites_pass`); here stays what spans objects: references that resolve,
//! selectors that match, hardening on every container, alerted metrics that exist, strict schemas.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, Pod, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use system_tests::kube::stdout_of;
use system_tests::{repo_root, tool_path};

pub(crate) const KUBE_VERSION: &str = "1.33.0";
pub(crate) const RELEASE: &str = "chat";
const REQUIRED_LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
];

pub(crate) fn helm() -> anyhow::Result<PathBuf> {
    tool_path("HELM", "helm")
}

pub(crate) fn chart() -> PathBuf {
    repo_root().join("charts/chat")
}

/// `None` is the chart's defaults; otherwise a file of `charts/chat/ci/`.
fn scenarios() -> anyhow::Result<Vec<Option<PathBuf>>> {
    let mut scenarios = vec![None];
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    ensure!(
        files.len() >= 3,
        "expected at least three ci scenarios, found {files:?}"
    );
    scenarios.extend(files.into_iter().map(Some));
    Ok(scenarios)
}

/// The APIs of the CRDs the chart may use: the renders stand for a cluster that has them (the chart
/// leaves its monitoring objects out where the Prometheus operator's are missing, and refuses
/// `*.keda.enabled` where KEDA's are).
const CRD_APIS: [&str; 3] = [
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
    "keda.sh/v1alpha1/ScaledObject",
];

pub(crate) fn run_helm(args: &[&str], values: Option<&Path>) -> anyhow::Result<String> {
    run_helm_with(args, values.as_slice())
}

/// helm with several values files, later ones winning.
pub(crate) fn run_helm_with(args: &[&str], values: &[&Path]) -> anyhow::Result<String> {
    run_helm_for(KUBE_VERSION, args, values)
}

/// helm as on a cluster of `kube_version`.
pub(crate) fn run_helm_for(
    kube_version: &str,
    args: &[&str],
    values: &[&Path],
) -> anyhow::Result<String> {
    let mut command = Command::new(helm()?);
    command
        .args(args)
        .arg(chart())
        .args(["--kube-version", kube_version]);
    if args.first() == Some(&"template") {
        // `helm lint` takes no API versions.
        command.args(CRD_APIS.iter().flat_map(|api| ["--api-versions", api]));
    }
    for values in values {
        command.arg("--values").arg(values);
    }
    stdout_of(command, &format!("helm {args:?} {values:?}"))
}

/// A values file in the temporary directory, deleted when dropped (names are unique per test).
pub(crate) struct ScratchValues(pub(crate) PathBuf);

impl ScratchValues {
    pub(crate) fn new(name: &str, yaml: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("chat-values-{name}-{}.yaml", std::process::id()));
        std::fs::write(&path, yaml)?;
        Ok(Self(path))
    }
}

impl Drop for ScratchValues {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `helm template` of `ci/minimal-values.yaml` (the smallest values that render) plus `extra`.
pub(crate) fn render_minimal_with(name: &str, extra: &str) -> anyhow::Result<Rendered> {
    let minimal = chart().join("ci/minimal-values.yaml");
    let extra = ScratchValues::new(name, extra)?;
    let yaml = run_helm_with(
        &["template", RELEASE, "--namespace", "chat"],
        &[&minimal, &extra.0],
    )?;
    Rendered::parse(&parse_documents(&yaml)?)
}

pub(crate) fn parse_documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Paths present in `original` that the typed round trip lost or changed.
fn differences(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => {
            for (key, value) in original {
                let child = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed_value) => differences(value, typed_value, &child, out),
                    None if value.is_null() => {}
                    None => out.push(format!("{child} (unknown field)")),
                }
            }
        }
        (Value::Array(original), Value::Array(typed)) if original.len() == typed.len() => {
            for (index, (original, typed)) in original.iter().zip(typed).enumerate() {
                differences(original, typed, &format!("{path}[{index}]"), out);
            }
        }
        (original, typed) if original == typed => {}
        (original, typed) => out.push(format!("{path}: {original} became {typed}")),
    }
}

fn round_trip<T: DeserializeOwned + serde::Serialize>(document: &Value) -> anyhow::Result<T> {
    let typed: T = serde_json::from_value(document.clone())?;
    let mut lost = Vec::new();
    differences(document, &serde_json::to_value(&typed)?, "", &mut lost);
    ensure!(
        lost.is_empty(),
        "fields the type does not know or changes: {lost:?}"
    );
    Ok(typed)
}

/// Every object of a render, parsed into its type.
#[derive(Default)]
pub(crate) struct Rendered {
    pub(crate) names: BTreeMap<String, BTreeSet<String>>,
    pub(crate) deployments: Vec<Deployment>,
    pub(crate) services: Vec<Service>,
    pub(crate) cron_jobs: Vec<CronJob>,
    pub(crate) jobs: Vec<Job>,
    pub(crate) pods: Vec<Pod>,
    pub(crate) hpas: Vec<HorizontalPodAutoscaler>,
    pub(crate) pdbs: Vec<PodDisruptionBudget>,
    pub(crate) ingresses: Vec<Ingress>,
    pub(crate) network_policies: Vec<NetworkPolicy>,
    pub(crate) role_bindings: Vec<RoleBinding>,
    pub(crate) config_maps: Vec<ConfigMap>,
    pub(crate) secrets: Vec<Secret>,
    pub(crate) service_monitors: Vec<monitoring::ServiceMonitor>,
    pub(crate) prometheus_rules: Vec<monitoring::PrometheusRule>,
    pub(crate) scaled_objects: Vec<keda::ScaledObject>,
    pub(crate) trigger_authentications: Vec<keda::TriggerAuthentication>,
    pub(crate) labels: Vec<(String, BTreeMap<String, String>)>,
}

impl Rendered {
    pub(crate) fn parse(documents: &[Value]) -> anyhow::Result<Self> {
        let mut rendered = Self::default();
        for document in documents {
            let kind = document["kind"].as_str().context("kind")?.to_owned();
            let name = document["metadata"]["name"]
                .as_str()
                .context("metadata.name")?
                .to_owned();
            let labels: BTreeMap<String, String> =
                serde_json::from_value(document["metadata"]["labels"].clone()).unwrap_or_default();
            rendered.labels.push((format!("{kind}/{name}"), labels));
            rendered
                .names
                .entry(kind.clone())
                .or_default()
                .insert(name.clone());
            let parsed = match kind.as_str() {
                "Deployment" => round_trip(document).map(|d| rendered.deployments.push(d)),
                "Service" => round_trip(document).map(|s| rendered.services.push(s)),
                "CronJob" => round_trip(document).map(|c| rendered.cron_jobs.push(c)),
                "Job" => round_trip(document).map(|j| rendered.jobs.push(j)),
                "Pod" => round_trip(document).map(|p| rendered.pods.push(p)),
                "HorizontalPodAutoscaler" => round_trip(document).map(|h| rendered.hpas.push(h)),
                "PodDisruptionBudget" => round_trip(document).map(|p| rendered.pdbs.push(p)),
                "Ingress" => round_trip(document).map(|i| rendered.ingresses.push(i)),
                "NetworkPolicy" => round_trip(document).map(|n| rendered.network_policies.push(n)),
                "RoleBinding" => round_trip(document).map(|r| rendered.role_bindings.push(r)),
                "Role" => round_trip::<Role>(document).map(drop),
                "ConfigMap" => round_trip(document).map(|c| rendered.config_maps.push(c)),
                "Secret" => round_trip(document).map(|s| rendered.secrets.push(s)),
                "ServiceAccount" => round_trip::<ServiceAccount>(document).map(drop),
                "PersistentVolumeClaim" => round_trip::<PersistentVolumeClaim>(document).map(drop),
                "ServiceMonitor" => round_trip(document).map(|m| rendered.service_monitors.push(m)),
                "PrometheusRule" => round_trip(document).map(|r| rendered.prometheus_rules.push(r)),
                "ScaledObject" => round_trip(document).map(|o| rendered.scaled_objects.push(o)),
                "TriggerAuthentication" => {
                    round_trip(document).map(|a| rendered.trigger_authentications.push(a))
                }
                other => bail!("{other}/{name}: a kind this check does not know; add it"),
            };
            parsed.with_context(|| format!("{kind}/{name}"))?;
        }
        Ok(rendered)
    }

    pub(crate) fn exists(&self, kind: &str, name: &str) -> bool {
        self.names
            .get(kind)
            .is_some_and(|names| names.contains(name))
    }

    /// Pod templates of every workload, with their owner's name and whether it runs to completion.
    pub(crate) fn pod_specs(&self) -> Vec<(String, &PodSpec, BTreeMap<String, String>, bool)> {
        let mut specs = Vec::new();
        for deployment in &self.deployments {
            let spec = deployment.spec.as_ref().expect("deployment spec");
            let template = &spec.template;
            specs.push((
                format!(
                    "Deployment/{}",
                    deployment.metadata.name.clone().unwrap_or_default()
                ),
                template.spec.as_ref().expect("pod spec"),
                template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default(),
                false,
            ));
        }
        for cron_job in &self.cron_jobs {
            let template = &cron_job
                .spec
                .as_ref()
                .expect("spec")
                .job_template
                .spec
                .as_ref()
                .expect("job spec")
                .template;
            specs.push((
                format!(
                    "CronJob/{}",
                    cron_job.metadata.name.clone().unwrap_or_default()
                ),
                template.spec.as_ref().expect("pod spec"),
                template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default(),
                true,
            ));
        }
        for job in &self.jobs {
            let template = &job.spec.as_ref().expect("spec").template;
            specs.push((
                format!("Job/{}", job.metadata.name.clone().unwrap_or_default()),
                template.spec.as_ref().expect("pod spec"),
                template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default(),
                true,
            ));
        }
        for pod in &self.pods {
            specs.push((
                format!("Pod/{}", pod.metadata.name.clone().unwrap_or_default()),
                pod.spec.as_ref().expect("pod spec"),
                pod.metadata.labels.clone().unwrap_or_default(),
                true,
            ));
        }
        specs
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

fn check_container_hardening(
    owner: &str,
    pod: &PodSpec,
    container: &Container,
) -> anyhow::Result<()> {
    let context = container
        .security_context
        .as_ref()
        .with_context(|| format!("{owner}: no securityContext"))?;
    ensure!(
        context.run_as_non_root == Some(true),
        "{owner}: runAsNonRoot"
    );
    ensure!(
        context.read_only_root_filesystem == Some(true),
        "{owner}: readOnlyRootFilesystem"
    );
    ensure!(
        context.allow_privilege_escalation == Some(false),
        "{owner}: allowPrivilegeEscalation"
    );
    ensure!(context.privileged != Some(true), "{owner}: privileged");
    let drops = context
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    ensure!(
        drops.iter().any(|d| d == "ALL"),
        "{owner}: capabilities must drop ALL"
    );
    let seccomp = context
        .seccomp_profile
        .as_ref()
        .or_else(|| {
            pod.security_context
                .as_ref()
                .and_then(|p| p.seccomp_profile.as_ref())
        })
        .map(|profile| profile.type_.as_str());
    ensure!(
        seccomp == Some("RuntimeDefault"),
        "{owner}: seccomp RuntimeDefault"
    );
    let resources = container
        .resources
        .as_ref()
        .with_context(|| format!("{owner}: no resources"))?;
    ensure!(
        resources.requests.as_ref().is_some_and(|r| !r.is_empty()),
        "{owner}: resource requests"
    );
    ensure!(
        resources.limits.as_ref().is_some_and(|l| !l.is_empty()),
        "{owner}: resource limits"
    );
    Ok(())
}

/// Objects the chart refers to but expects to exist already (named in the values).
#[derive(Default)]
struct Existing {
    secrets: Vec<String>,
    config_maps: Vec<String>,
}

impl Existing {
    fn from_values(values: &Value) -> Self {
        let name = |value: &Value| value.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        Self {
            secrets: [
                &values["connections"]["existingSecret"],
                &values["auth"]["existingSecret"],
                &values["connections"]["tls"]["caSecret"],
            ]
            .into_iter()
            .filter_map(name)
            .collect(),
            config_maps: name(&values["connections"]["tls"]["caConfigMap"])
                .into_iter()
                .collect(),
        }
    }
}

fn check_chart_invariants(rendered: &Rendered, existing: &Existing) -> anyhow::Result<()> {
    for (object, labels) in &rendered.labels {
        for label in REQUIRED_LABELS {
            ensure!(
                labels.contains_key(label),
                "{object}: missing label {label}"
            );
        }
        ensure!(
            labels["app.kubernetes.io/instance"] == RELEASE,
            "{object}: instance label"
        );
    }
    let secret_exists =
        |name: &str| rendered.exists("Secret", name) || existing.secrets.iter().any(|s| s == name);
    let config_map_exists = |name: &str| {
        rendered.exists("ConfigMap", name) || existing.config_maps.iter().any(|c| c == name)
    };
    for (owner, pod, labels, completes) in rendered.pod_specs() {
        ensure!(
            pod.security_context
                .as_ref()
                .and_then(|c| c.run_as_non_root)
                == Some(true),
            "{owner}: pod runAsNonRoot"
        );
        if let Some(account) = &pod.service_account_name {
            ensure!(
                rendered.exists("ServiceAccount", account),
                "{owner}: service account {account} is not rendered"
            );
        }
        for label in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        ] {
            ensure!(labels.contains_key(label), "{owner}: pod label {label}");
        }
        let volumes: Vec<&str> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        for volume in pod.volumes.iter().flatten() {
            if let Some(name) = volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref())
            {
                ensure!(secret_exists(name), "{owner}: volume secret {name}");
            }
            if let Some(config_map) = &volume.config_map {
                ensure!(
                    config_map_exists(&config_map.name),
                    "{owner}: volume configmap {}",
                    config_map.name
                );
            }
            if let Some(claim) = &volume.persistent_volume_claim {
                ensure!(
                    rendered.exists("PersistentVolumeClaim", &claim.claim_name),
                    "{owner}: volume claim {} is not rendered",
                    claim.claim_name
                );
            }
        }
        for container in &pod.containers {
            let owner = format!("{owner}/{}", container.name);
            check_container_hardening(&owner, pod, container)?;
            for mount in container.volume_mounts.iter().flatten() {
                ensure!(
                    volumes.contains(&mount.name.as_str()),
                    "{owner}: mounts undeclared volume {}",
                    mount.name
                );
            }
            if !completes {
                ensure!(container.liveness_probe.is_some(), "{owner}: livenessProbe");
                ensure!(
                    container.readiness_probe.is_some(),
                    "{owner}: readinessProbe"
                );
            }
            for env in container.env.iter().flatten() {
                let Some(source) = &env.value_from else {
                    continue;
                };
                if let Some(secret) = &source.secret_key_ref {
                    ensure!(
                        secret_exists(&secret.name),
                        "{owner}: secret {} is neither rendered nor existingSecret",
                        secret.name
                    );
                }
                if let Some(config_map) = &source.config_map_key_ref {
                    ensure!(
                        config_map_exists(&config_map.name),
                        "{owner}: configmap {}",
                        config_map.name
                    );
                }
            }
            for source in container.env_from.iter().flatten() {
                if let Some(config_map) = &source.config_map_ref {
                    ensure!(
                        rendered.exists("ConfigMap", &config_map.name),
                        "{owner}: configmap {}",
                        config_map.name
                    );
                }
                if let Some(secret) = &source.secret_ref {
                    ensure!(
                        secret_exists(&secret.name),
                        "{owner}: secret {}",
                        secret.name
                    );
                }
            }
        }
    }
    for deployment in &rendered.deployments {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let spec = deployment.spec.as_ref().context("spec")?;
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        ensure!(
            selects(&selector, &labels),
            "Deployment/{name}: selector does not match its pod labels"
        );
        ensure!(
            selector.keys().all(|key| [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component"
            ]
            .contains(&key.as_str())),
            "Deployment/{name}: selector must only use name, instance and component (immutable)"
        );
    }
    let pod_labels: Vec<BTreeMap<String, String>> = rendered
        .pod_specs()
        .into_iter()
        .map(|(_, _, labels, _)| labels)
        .collect();
    for service in &rendered.services {
        let selector = service
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        ensure!(
            pod_labels.iter().any(|labels| selects(&selector, labels)),
            "Service/{:?} selects no pod",
            service.metadata.name
        );
    }
    for pdb in &rendered.pdbs {
        let selector = pdb
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        ensure!(
            pod_labels.iter().any(|labels| selects(&selector, labels)),
            "PDB/{:?} selects no pod",
            pdb.metadata.name
        );
    }
    for hpa in &rendered.hpas {
        let target = &hpa.spec.as_ref().context("hpa spec")?.scale_target_ref;
        ensure!(
            rendered.exists(&target.kind, &target.name),
            "HPA targets missing {}/{}",
            target.kind,
            target.name
        );
    }
    for scaled in &rendered.scaled_objects {
        let target = &scaled.spec.scale_target_ref;
        ensure!(
            rendered.exists(&target.kind, &target.name),
            "ScaledObject targets missing {}/{}",
            target.kind,
            target.name
        );
        // KEDA makes an HPA of its own from the ScaledObject: two would fight over the replicas.
        ensure!(
            !rendered.hpas.iter().any(|hpa| hpa
                .spec
                .as_ref()
                .is_some_and(|spec| spec.scale_target_ref.name == target.name)),
            "{}: both an HPA and a ScaledObject",
            target.name
        );
        for trigger in &scaled.spec.triggers {
            if let Some(auth) = &trigger.authentication_ref {
                ensure!(
                    rendered.exists("TriggerAuthentication", &auth.name),
                    "ScaledObject/{:?}: TriggerAuthentication {} is not rendered",
                    scaled.metadata.name,
                    auth.name
                );
            }
        }
    }
    for auth in &rendered.trigger_authentications {
        for reference in &auth.spec.secret_target_ref {
            ensure!(
                secret_exists(&reference.name),
                "TriggerAuthentication/{:?}: secret {}",
                auth.metadata.name,
                reference.name
            );
        }
    }
    for ingress in &rendered.ingresses {
        for rule in ingress
            .spec
            .as_ref()
            .and_then(|s| s.rules.clone())
            .unwrap_or_default()
        {
            for path in rule.http.map(|h| h.paths).unwrap_or_default() {
                let service = path.backend.service.context("ingress backend service")?;
                ensure!(
                    rendered.exists("Service", &service.name),
                    "Ingress backend {} is not rendered",
                    service.name
                );
            }
        }
    }
    for policy in &rendered.network_policies {
        let selector = policy
            .spec
            .as_ref()
            .context("spec")?
            .pod_selector
            .clone()
            .unwrap_or_default();
        let selects_something = match (&selector.match_labels, &selector.match_expressions) {
            (Some(labels), _) => pod_labels.iter().any(|pod| selects(labels, pod)),
            (None, Some(expressions)) => pod_labels.iter().any(|pod| {
                expressions.iter().all(|e| {
                    pod.get(&e.key)
                        .is_some_and(|v| e.values.iter().flatten().any(|allowed| allowed == v))
                })
            }),
            (None, None) => true,
        };
        ensure!(
            selects_something,
            "NetworkPolicy/{:?} selects no pod",
            policy.metadata.name
        );
    }
    for binding in &rendered.role_bindings {
        ensure!(
            rendered.exists("Role", &binding.role_ref.name),
            "RoleBinding refers to missing Role {}",
            binding.role_ref.name
        );
        for subject in binding.subjects.iter().flatten() {
            ensure!(
                rendered.exists("ServiceAccount", &subject.name),
                "RoleBinding subject {} is not rendered",
                subject.name
            );
        }
    }
    // counter-sync, and the two suspended operator templates (none in embedded mode).
    ensure!(
        [0, 1, 3].contains(&rendered.cron_jobs.len()),
        "counter-sync and the operator CronJobs: {:?}",
        rendered.names.get("CronJob")
    );
    for cron_job in &rendered.cron_jobs {
        ensure!(
            cron_job
                .spec
                .as_ref()
                .and_then(|s| s.concurrency_policy.as_deref())
                == Some("Forbid"),
            "CronJob must Forbid overlap"
        );
    }
    Ok(())
}

#[test]
fn the_chart_lints_renders_and_keeps_its_invariants_in_every_scenario() -> anyhow::Result<()> {
    for scenario in scenarios()? {
        let label = scenario
            .as_deref()
            .map_or("defaults".to_owned(), |p| p.display().to_string());
        run_helm(&["lint", "--strict"], scenario.as_deref()).with_context(|| label.clone())?;
        // The defaults carry no connection URLs, so they only lint (their refusal:
        // `unittests/connections_test.yaml`).
        let Some(path) = scenario.as_deref() else {
            continue;
        };
        let yaml = run_helm(&["template", RELEASE, "--namespace", "chat"], Some(path))?;
        let rendered = Rendered::parse(&parse_documents(&yaml)?).with_context(|| label.clone())?;
        let values: Value = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
        let existing = Existing::from_values(&values);
        check_chart_invariants(&rendered, &existing).with_context(|| label.clone())?;
        // Deployments come from two templates, so their count is checked here (what else each
        // scenario promises: `unittests/scenarios_test.yaml`).
        let embedded = values["embedded"]["enabled"].as_bool() == Some(true);
        let deployments = if embedded { 1 } else { 4 };
        ensure!(
            rendered.names["Deployment"].len() == deployments,
            "{label}: api, ingest-worker, indexer and webhook-dispatcher; the api alone in embedded mode"
        );
    }
    Ok(())
}

/// The defaults ship no credentials (that they do not render without the URLs that carry them:
/// `unittests/connections_test.yaml`; the values the schema refuses: `unittests/schema_test.yaml`).
#[test]
fn the_default_values_ship_no_credentials() -> anyhow::Result<()> {
    let values = std::fs::read_to_string(chart().join("values.yaml"))?;
    for credentials in ["chat:chat@", "guest:guest@"] {
        ensure!(
            !values.contains(credentials),
            "values.yaml ships {credentials}"
        );
    }
    Ok(())
}

pub(crate) fn api_container(rendered: &Rendered) -> anyhow::Result<&Container> {
    rendered
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("chat-api"))
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == "api"))
        .context("the api container")
}

pub(crate) fn config_data(rendered: &Rendered) -> anyhow::Result<BTreeMap<String, String>> {
    rendered
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("chat-config"))
        .and_then(|c| c.data.clone())
        .context("ConfigMap chat-config")
}

pub(crate) fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The generated admin token stays in its Secret: no ConfigMap holds it, and of every workload's
/// containers only the api's reads it, from that Secret (the token, a given one, an existing
/// Secret and the api's env: `unittests/security_test.yaml`).
#[test]
fn the_admin_token_reaches_only_the_api_and_no_config_map() -> anyhow::Result<()> {
    let rendered = render_minimal_with("admin-generated", "{}")?;
    let secret = rendered
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("chat-admin-token"))
        .context("the generated admin token Secret")?;
    let data = secret
        .data
        .as_ref()
        .context("the admin token Secret's data")?;
    let token = data
        .get("CHAT_ADMIN_TOKEN")
        .context("key CHAT_ADMIN_TOKEN")?;
    let token = String::from_utf8(token.0.clone())?;
    for config_map in &rendered.config_maps {
        for (key, value) in config_map.data.iter().flatten() {
            ensure!(
                key != "CHAT_ADMIN_TOKEN" && !value.contains(&token),
                "ConfigMap {:?} holds the admin token",
                config_map.metadata.name
            );
        }
    }
    for (owner, pod, _, _) in rendered.pod_specs() {
        for container in &pod.containers {
            let source = container
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "CHAT_ADMIN_TOKEN");
            if container.name == "api" {
                let reference = source
                    .and_then(|e| e.value_from.as_ref())
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .context("the api reads CHAT_ADMIN_TOKEN from a Secret")?;
                ensure!(
                    secret.metadata.name.as_deref() == Some(reference.name.as_str())
                        && data.contains_key(&reference.key),
                    "{owner}: {reference:?} is not the Secret that holds the token"
                );
            } else {
                ensure!(
                    source.is_none(),
                    "{owner}/{}: only the api gets the admin token",
                    container.name
                );
            }
        }
    }
    Ok(())
}

/// The ServiceMonitor scrapes each component's metrics Service and no other, each on the health
/// port only (the api's ports and probes, the public Service, the endpoint and the NetworkPolicy:
/// `unittests/health-port_test.yaml`).
#[test]
fn the_service_monitor_scrapes_each_component_on_its_health_port_only() -> anyhow::Result<()> {
    let production = chart().join("ci/production-values.yaml");
    let yaml = run_helm(
        &["template", RELEASE, "--namespace", "chat"],
        Some(&production),
    )?;
    let rendered = Rendered::parse(&parse_documents(&yaml)?)?;
    let monitor = rendered
        .service_monitors
        .first()
        .context("the ServiceMonitor")?;
    let selector = monitor
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    let scraped: Vec<&Service> = rendered
        .services
        .iter()
        .filter(|s| selects(&selector, &s.metadata.labels.clone().unwrap_or_default()))
        .collect();
    let names: BTreeSet<&str> = scraped
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    ensure!(
        names
            == BTreeSet::from([
                "chat-api-metrics",
                "chat-ingest-worker-metrics",
                "chat-indexer-metrics",
                "chat-webhook-dispatcher-metrics"
            ]),
        "scraped Services: {names:?}"
    );
    for service in scraped {
        let spec = service.spec.as_ref().context("spec")?;
        for port in spec.ports.iter().flatten() {
            ensure!(
                port.name.as_deref() == Some("metrics")
                    && port.target_port == Some(IntOrString::String("health".into())),
                "{:?}: scraped port must target the health port",
                service.metadata.name
            );
        }
    }
    Ok(())
}

#[test]
fn the_tls_ca_is_mounted_into_every_pod() -> anyhow::Result<()> {
    for (name, values, kind) in [
        (
            "ca-secret",
            "connections: {tls: {caSecret: data-ca, caKey: bundle.pem}}",
            "secret",
        ),
        (
            "ca-config-map",
            "connections: {tls: {caConfigMap: data-ca}}",
            "configMap",
        ),
    ] {
        let rendered = render_minimal_with(name, values)?;
        let file = config_data(&rendered)?
            .get("CHAT_TLS_CA_FILE")
            .cloned()
            .context("CHAT_TLS_CA_FILE in the ConfigMap")?;
        let specs = rendered.pod_specs();
        let mut owners = BTreeSet::new();
        for (owner, pod, _, _) in &specs {
            if owner.starts_with("Pod/") {
                continue; // the `helm test` pod talks to the api only
            }
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "tls-ca")
                .with_context(|| format!("{owner}: the CA volume"))?;
            let key = match kind {
                "secret" => {
                    let secret = volume.secret.as_ref().context("secret volume")?;
                    ensure!(secret.secret_name.as_deref() == Some("data-ca"), "{owner}");
                    secret.items.clone().unwrap_or_default()
                }
                _ => {
                    let config_map = volume.config_map.as_ref().context("configMap volume")?;
                    ensure!(config_map.name == "data-ca", "{owner}");
                    config_map.items.clone().unwrap_or_default()
                }
            };
            let expected_key = if kind == "secret" {
                "bundle.pem"
            } else {
                "ca.crt"
            };
            ensure!(
                key.len() == 1 && key[0].key == expected_key,
                "{owner}: caKey"
            );
            for container in &pod.containers {
                let mount = container
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == "tls-ca")
                    .with_context(|| format!("{owner}/{}: CA mount", container.name))?;
                ensure!(mount.read_only == Some(true), "{owner}: read-only");
                ensure!(
                    file == format!("{}/{}", mount.mount_path, key[0].path),
                    "{owner}: CHAT_TLS_CA_FILE={file} is not the mounted file"
                );
            }
            owners.insert(owner.clone());
        }
        ensure!(
            owners
                == BTreeSet::from([
                    "Deployment/chat-api".to_owned(),
                    "Deployment/chat-ingest-worker".to_owned(),
                    "Deployment/chat-indexer".to_owned(),
                    "Deployment/chat-webhook-dispatcher".to_owned(),
                    "CronJob/chat-counter-sync".to_owned(),
                    "CronJob/chat-replay-dead-letters".to_owned(),
                    "CronJob/chat-reindex".to_owned(),
                    "Job/chat-migrate".to_owned(),
                ]),
            "{owners:?}"
        );
        // The migration hook gets its settings as env, not from the ConfigMap.
        let migrate = rendered.jobs.first().context("migrate job")?;
        let container = &migrate
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("migrate pod")?
            .containers[0];
        ensure!(
            env_value(container, "CHAT_TLS_CA_FILE") == Some(file.as_str()),
            "migrate: CHAT_TLS_CA_FILE"
        );
    }
    Ok(())
}

#[test]
fn dev_manifests_parse_into_their_types() -> anyhow::Result<()> {
    let directory = repo_root().join("k8s/dev");
    let mut files = 0;
    for entry in std::fs::read_dir(&directory)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        files += 1;
        let documents = parse_documents(&std::fs::read_to_string(&path)?)?;
        let rendered = Rendered::parse(&documents).with_context(|| path.display().to_string())?;
        for (object, labels) in &rendered.labels {
            ensure!(
                labels.get("environment").map(String::as_str) == Some("dev-only"),
                "{object} must be labelled dev-only"
            );
        }
        // No password is written in the manifests: they come from the Secret the developer creates.
        for (owner, pod, _, _) in rendered.pod_specs() {
            for env in pod.containers.iter().flat_map(|c| c.env.iter().flatten()) {
                if env.name.contains("PASS") && !env.name.contains("RANDOM") {
                    let reference = env
                        .value_from
                        .as_ref()
                        .and_then(|v| v.secret_key_ref.as_ref())
                        .with_context(|| {
                            format!("{owner}: {} must come from a Secret", env.name)
                        })?;
                    ensure!(
                        reference.name == "chat-dev-credentials" && reference.key == "password",
                        "{owner}: {} from {reference:?}",
                        env.name
                    );
                }
            }
        }
        let pod_labels: Vec<_> = rendered
            .pod_specs()
            .into_iter()
            .map(|(_, _, labels, _)| labels)
            .collect();
        for service in &rendered.services {
            let selector = service
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            ensure!(
                pod_labels.iter().any(|labels| selects(&selector, labels)),
                "{}: service selects no pod",
                path.display()
            );
        }
    }
    ensure!(files == 4, "mysql, redis, rabbitmq and elasticsearch");
    Ok(())
}

/// The fields of the Prometheus Operator's `monitoring.coreos.com/v1` resources this chart uses
/// (not in k8s-openapi); unknown fields fail.
mod monitoring {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use serde::{Deserialize, Serialize};

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitor {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: ServiceMonitorSpec,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ServiceMonitorSpec {
        pub selector: LabelSelector,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct Endpoint {
        pub port: String,
        pub path: String,
        pub interval: String,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PrometheusRule {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: PrometheusRuleSpec,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct PrometheusRuleSpec {
        pub groups: Vec<RuleGroup>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct RuleGroup {
        pub name: String,
        pub rules: Vec<Rule>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rule {
        pub alert: String,
        pub expr: String,
        #[serde(rename = "for")]
        pub for_: String,
        pub labels: BTreeMap<String, String>,
        pub annotations: BTreeMap<String, String>,
    }
}

/// The fields of KEDA's `keda.sh/v1alpha1` resources this chart uses (not in k8s-openapi); unknown
/// fields fail. Their full schema is KEDA's CRDs', which the API server applies in
/// `kubernetes_live::keda_objects_pass_kedas_crd_schemas`.
mod keda {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::{Deserialize, Serialize};

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ScaledObject {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: ScaledObjectSpec,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ScaledObjectSpec {
        pub scale_target_ref: ScaleTarget,
        pub min_replica_count: u32,
        pub max_replica_count: u32,
        pub polling_interval: u32,
        pub cooldown_period: u32,
        pub triggers: Vec<Trigger>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ScaleTarget {
        pub api_version: String,
        pub kind: String,
        pub name: String,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Trigger {
        #[serde(rename = "type")]
        pub type_: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub metric_type: Option<String>,
        pub metadata: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub authentication_ref: Option<AuthenticationRef>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct AuthenticationRef {
        pub name: String,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct TriggerAuthentication {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: TriggerAuthenticationSpec,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct TriggerAuthenticationSpec {
        pub secret_target_ref: Vec<SecretTargetRef>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct SecretTargetRef {
        pub parameter: String,
        pub name: String,
        pub key: String,
    }
}

/// With KEDA on, each queue consumer scales on its own queue (the names the workers read from the
/// chart's settings) through the connections Secret's AMQP URL, and the chart's HPAs remain for the
/// components KEDA does not scale only (the rest of the render: `unittests/keda_test.yaml`).
#[test]
fn keda_scales_each_queue_consumer_on_its_own_queue_instead_of_an_hpa() -> anyhow::Result<()> {
    let extra = "config: {amqpPrefix: tenant7}\n\
        api: {autoscaling: {enabled: true}}\n\
        webhookDispatcher: {autoscaling: {enabled: true}}\n\
        ingestWorker: {autoscaling: {enabled: true}, keda: {enabled: true}}\n\
        indexer: {keda: {enabled: true, minReplicas: 0, maxReplicas: 3}}\n";
    let rendered = render_minimal_with("keda", extra)?;
    check_chart_invariants(&rendered, &Existing::default())?;
    let prefix = config_data(&rendered)?["CHAT_AMQP_PREFIX"].clone();
    let mut queues = BTreeMap::new();
    for scaled in &rendered.scaled_objects {
        let rabbitmq = scaled
            .spec
            .triggers
            .iter()
            .find(|trigger| trigger.type_ == "rabbitmq")
            .context("a rabbitmq trigger")?;
        queues.insert(
            scaled.spec.scale_target_ref.name.clone(),
            rabbitmq.metadata["queueName"].clone(),
        );
    }
    assert_eq!(
        queues,
        BTreeMap::from([
            ("chat-indexer".to_owned(), format!("{prefix}.index")),
            ("chat-ingest-worker".to_owned(), format!("{prefix}.ingest")),
        ])
    );
    let [auth] = rendered.trigger_authentications.as_slice() else {
        bail!("one TriggerAuthentication for both");
    };
    let [reference] = auth.spec.secret_target_ref.as_slice() else {
        bail!("the AMQP URL alone");
    };
    assert_eq!(
        (reference.parameter.as_str(), reference.key.as_str()),
        ("host", "AMQP_URL")
    );
    let secret = rendered
        .secrets
        .iter()
        .find(|secret| secret.metadata.name.as_deref() == Some(reference.name.as_str()))
        .context("the connections Secret")?;
    assert!(
        secret
            .string_data
            .as_ref()
            .is_some_and(|data| data["AMQP_URL"].starts_with("amqp")),
        "the Secret holds the AMQP URL the workers read"
    );
    let hpa_targets: BTreeSet<String> = rendered
        .hpas
        .iter()
        .filter_map(|hpa| Some(hpa.spec.as_ref()?.scale_target_ref.name.clone()))
        .collect();
    assert_eq!(
        hpa_targets,
        BTreeSet::from(["chat-api".to_owned(), "chat-webhook-dispatcher".to_owned()])
    );
    for deployment in &rendered.deployments {
        let name = deployment.metadata.name.as_deref().unwrap_or_default();
        let replicas = deployment.spec.as_ref().and_then(|spec| spec.replicas);
        assert_eq!(
            replicas, None,
            "{name}: its autoscaler owns the replica count"
        );
    }
    Ok(())
}

/// Metric names the services register (from the `# TYPE` lines; a family shows once it has a series).
fn exposed_metric_families() -> BTreeSet<String> {
    use chatcore::metrics::{
        DependencyLabels, HttpLabels, OutcomeLabels, QueueLabels, RepairLabels,
    };
    let metrics = chatcore::metrics::Metrics::new();
    let http = HttpLabels {
        method: "GET".into(),
        route: "/".into(),
        status: 200,
    };
    let queue = QueueLabels { queue: "q".into() };
    metrics.http_requests.get_or_create(&http).inc();
    metrics
        .http_request_duration
        .get_or_create(&http)
        .observe(0.1);
    metrics
        .publish_confirm_duration
        .get_or_create(&OutcomeLabels {
            outcome: "confirmed",
        })
        .observe(0.1);
    metrics
        .dependency_duration
        .get_or_create(&DependencyLabels {
            dependency: "redis",
            operation: "x",
        })
        .observe(0.1);
    metrics.batch_size.get_or_create(&queue).observe(1.0);
    metrics.batch_duration.get_or_create(&queue).observe(0.1);
    metrics.events_processed.get_or_create(&queue).inc();
    metrics.events_failed.get_or_create(&queue).inc();
    metrics.events_dead_lettered.get_or_create(&queue).inc();
    metrics.queue_depth.get_or_create(&queue).set(1);
    metrics
        .counter_sync_repairs
        .get_or_create(&RepairLabels { kind: "counter" })
        .inc();
    metrics
        .webhook_attempts
        .get_or_create(&OutcomeLabels {
            outcome: "delivered",
        })
        .inc();
    metrics.webhook_delivery_lag.observe(0.1);
    metrics
        .encode()
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `chat_*` names used in a PromQL text, with the suffixes Prometheus adds to families removed.
fn referenced_metric_families(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = promql;
    while let Some(start) = rest.find("chat_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alerts_and_dashboard_only_use_metrics_the_services_expose() -> anyhow::Result<()> {
    let exposed = exposed_metric_families();
    ensure!(
        exposed.contains("chat_http_requests") && exposed.contains("chat_queue_depth"),
        "{exposed:?}"
    );
    let production = chart().join("ci/production-values.yaml");
    let yaml = run_helm(
        &["template", RELEASE, "--namespace", "chat"],
        Some(&production),
    )?;
    let rendered = Rendered::parse(&parse_documents(&yaml)?)?;
    let rules: Vec<&monitoring::Rule> = rendered
        .prometheus_rules
        .iter()
        .flat_map(|rule| &rule.spec.groups)
        .flat_map(|group| &group.rules)
        .collect();
    // Which alerts there are: `unittests/monitoring_test.yaml`.
    ensure!(!rules.is_empty(), "production renders no alert");
    let dashboard = std::fs::read_to_string(chart().join("files/dashboard.json"))?;
    let _: Value = serde_json::from_str(&dashboard)?;
    for (source, text) in rules
        .iter()
        .map(|rule| (rule.alert.as_str(), rule.expr.as_str()))
        .chain([("dashboard", dashboard.as_str())])
    {
        let referenced = referenced_metric_families(text);
        ensure!(!referenced.is_empty(), "{source} uses no metric");
        for name in referenced {
            ensure!(
                exposed.contains(&name),
                "{source} uses {name}, which no service exposes"
            );
        }
    }
    Ok(())
}

/// The subset of skaffold's `skaffold/v4beta11` schema this project uses; unknown fields fail.
mod skaffold {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    pub const API_VERSION: &str = "skaffold/v4beta11";

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Config {
        pub api_version: String,
        pub kind: String,
        pub metadata: Metadata,
        #[serde(default)]
        pub requires: Vec<Requires>,
        pub build: Option<Build>,
        pub manifests: Option<Manifests>,
        pub deploy: Option<Deploy>,
        #[serde(default)]
        pub port_forward: Vec<PortForward>,
        #[serde(default)]
        pub verify: Vec<VerifyTestCase>,
        #[serde(default)]
        pub profiles: Vec<Profile>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Metadata {
        pub name: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Requires {
        pub configs: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Build {
        pub artifacts: Vec<Artifact>,
        pub local: Option<Local>,
        pub tag_policy: Option<BTreeMap<String, serde_json::Value>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Artifact {
        pub image: String,
        /// The default: the Dockerfile's stage.
        pub docker: Option<Docker>,
        /// Profile `local`: this repository's real node, no Docker (scripts/images).
        pub custom: Option<Custom>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Custom {
        pub build_command: String,
        pub dependencies: CustomDependencies,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CustomDependencies {
        pub paths: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Docker {
        pub dockerfile: String,
        pub target: String,
    }

    /// No `push` by default: skaffold decides (no push to a local cluster, a push to a remote
    /// one); profile `local` says `push: false` (the images go into the node's containerd).
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Local {
        pub use_buildkit: Option<bool>,
        pub push: Option<bool>,
        pub concurrency: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Manifests {
        pub raw_yaml: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Deploy {
        pub kubectl: Option<BTreeMap<String, serde_json::Value>>,
        pub helm: Option<Helm>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Helm {
        pub releases: Vec<Release>,
        /// Profile `local`: the built images go into the node's containerd before each deploy.
        pub hooks: Option<serde_json::Value>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Release {
        pub name: String,
        pub chart_path: String,
        #[serde(default)]
        pub set_value_templates: BTreeMap<String, String>,
        #[serde(default)]
        pub set_values: BTreeMap<String, serde_json::Value>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PortForward {
        pub resource_type: String,
        pub resource_name: String,
        pub port: u16,
        pub local_port: u16,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct VerifyTestCase {
        pub name: String,
        /// Seconds.
        pub timeout: Option<u64>,
        pub container: VerifyContainer,
        pub execution_mode: ExecutionMode,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VerifyContainer {
        pub name: String,
        pub image: String,
        #[serde(default)]
        pub env: Vec<EnvVar>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct EnvVar {
        pub name: String,
        pub value: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ExecutionMode {
        pub kubernetes_cluster: Option<KubernetesCluster>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct KubernetesCluster {
        /// JSON merged into the Job skaffold generates.
        pub overrides: Option<String>,
    }

    /// Only named profiles (`-p`): none activates itself.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Profile {
        pub name: String,
        /// Replaces the config's `build` (profile `local`).
        pub build: Option<serde_json::Value>,
        pub patches: Vec<Patch>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Patch {
        pub op: String,
        pub path: String,
        pub value: Option<serde_json::Value>,
    }
}

/// Applies JSON patches (`add`, `replace` and `remove` of map members, as skaffold's profiles do) to
/// one config document.
fn apply_patches(document: &mut Value, patches: &[skaffold::Patch]) -> anyhow::Result<()> {
    for patch in patches {
        let (parent, key) = patch
            .path
            .rsplit_once('/')
            .with_context(|| format!("{}: not a JSON pointer", patch.path))?;
        let key = key.replace("~1", "/").replace("~0", "~");
        let members = document
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .with_context(|| format!("{}: no map at {parent}", patch.path))?;
        let value = || {
            patch
                .value
                .clone()
                .with_context(|| format!("{}: {} without a value", patch.path, patch.op))
        };
        match patch.op.as_str() {
            "remove" => ensure!(
                members.remove(&key).is_some(),
                "{}: nothing to remove",
                patch.path
            ),
            "replace" => {
                ensure!(
                    members.contains_key(&key),
                    "{}: nothing to replace",
                    patch.path
                );
                members.insert(key, value()?);
            }
            "add" => {
                members.insert(key, value()?);
            }
            op => bail!("{}: operation {op} is not used here", patch.path),
        }
    }
    Ok(())
}

/// The configs of `skaffold.yaml` (`dev-services`, then `chat`), with `profile`'s patches applied
/// to each config that has it, as `skaffold -p <profile>` sees them.
fn skaffold_configs(profile: Option<&str>) -> anyhow::Result<Vec<skaffold::Config>> {
    let text = std::fs::read_to_string(repo_root().join("skaffold.yaml"))?;
    let mut configs = Vec::new();
    for mut document in parse_documents(&text)? {
        if let Some(profile) = profile {
            let profiles: Vec<skaffold::Profile> = match &document["profiles"] {
                Value::Null => Vec::new(),
                profiles => serde_json::from_value(profiles.clone())?,
            };
            if let Some(found) = profiles.iter().find(|p| p.name == profile) {
                if let Some(build) = &found.build {
                    document["build"] = build.clone();
                }
                apply_patches(&mut document, &found.patches)?;
            }
        }
        configs.push(skaffold::Config::deserialize(document)?);
    }
    let names: Vec<&str> = configs.iter().map(|c| c.metadata.name.as_str()).collect();
    ensure!(names == ["dev-services", "chat"], "configs: {names:?}");
    Ok(configs)
}

fn chat_release(chat: &skaffold::Config) -> anyhow::Result<&skaffold::Release> {
    let releases = &chat
        .deploy
        .as_ref()
        .and_then(|d| d.helm.as_ref())
        .context("helm deploy")?
        .releases;
    ensure!(releases.len() == 1, "one helm release");
    Ok(&releases[0])
}

/// `helm template` of the release with the values skaffold sets, its templates filled in as
/// skaffold would, with stand-ins (`{{.IMAGE_TAG_chat_api}}` becomes `image-tag-chat-api`).
fn render_release(release: &skaffold::Release) -> anyhow::Result<Rendered> {
    let mut args = vec!["template".to_owned(), release.name.clone()];
    for (key, value) in &release.set_values {
        args.push("--set".into());
        args.push(format!(
            "{key}={}",
            value.as_str().map_or(value.to_string(), str::to_owned)
        ));
    }
    for (key, template) in &release.set_value_templates {
        let mut value = template.clone();
        while let Some(start) = value.find("{{.") {
            let end = value[start..]
                .find("}}")
                .map(|end| start + end + 2)
                .with_context(|| format!("{key}: unclosed template"))?;
            let name = value[start + 3..end - 2]
                .to_ascii_lowercase()
                .replace('_', "-");
            value.replace_range(start..end, &name);
        }
        args.push("--set".into());
        args.push(format!("{key}={value}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Rendered::parse(&parse_documents(&run_helm(&args, None)?)?)
}

/// The component whose image values each built image goes to (the tour image is not deployed: it
/// is `verify`'s).
const INJECTED_IMAGES: [(&str, &str); 5] = [
    ("chat-api", "api"),
    ("chat-ingest-worker", "ingestWorker"),
    ("chat-indexer", "indexer"),
    ("chat-webhook-dispatcher", "webhookDispatcher"),
    ("chat-counter-sync", "counterSync"),
];

fn ensure_images_injected(release: &skaffold::Release) -> anyhow::Result<()> {
    for (image, component) in INJECTED_IMAGES {
        let template_name = image.replace('-', "_");
        ensure!(
            release
                .set_value_templates
                .get(&format!("{component}.image.repository"))
                == Some(&format!("{{{{.IMAGE_REPO_{template_name}}}}}")),
            "{component} repository is not injected"
        );
        ensure!(
            release
                .set_value_templates
                .get(&format!("{component}.image.tag"))
                == Some(&format!("{{{{.IMAGE_TAG_{template_name}}}}}")),
            "{component} tag is not injected"
        );
    }
    Ok(())
}

#[test]
fn skaffold_builds_every_image_and_deploys_through_the_chart() -> anyhow::Result<()> {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("skaffold.yaml"))?;
    // skaffold decides about pushing: images built for a local cluster (minikube, kind, k3d,
    // Docker Desktop) are not pushed anywhere; a forced push broke every local cluster but kind.
    // Only profile `local` (this repository's real node) says `push: false`.
    ensure!(!text.contains("/push"), "a profile's patch forces pushing");
    let configs = skaffold_configs(None)?;
    for config in &configs {
        let push = config
            .build
            .as_ref()
            .and_then(|b| b.local.as_ref())
            .and_then(|l| l.push);
        ensure!(
            push.is_none(),
            "{}: build.local.push is set",
            config.metadata.name
        );
    }
    let names: Vec<&str> = configs.iter().map(|c| c.metadata.name.as_str()).collect();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile"))?;
    for config in &configs {
        ensure!(
            config.api_version == skaffold::API_VERSION && config.kind == "Config",
            "pinned schema version"
        );
        for required in config.requires.iter().flat_map(|r| &r.configs) {
            ensure!(
                names.contains(&required.as_str()),
                "requires unknown config {required}"
            );
        }
        for raw in config.manifests.iter().flat_map(|m| &m.raw_yaml) {
            ensure!(root.join(raw).exists(), "manifest {raw} is missing");
        }
        // Profiles named on the command line (`-p embedded`, and `-p local` for the chart's
        // images on this repository's real node); none for a kind of cluster.
        let profiles: Vec<&str> = config.profiles.iter().map(|p| p.name.as_str()).collect();
        let expected: &[&str] = if config.metadata.name == "chat" {
            &["embedded", "local"]
        } else {
            &["embedded"]
        };
        ensure!(
            profiles == expected,
            "{}: profiles {profiles:?}",
            config.metadata.name
        );
    }
    let chat = &configs[1];
    ensure!(
        chat.requires.iter().any(|r| r.configs == ["dev-services"]),
        "the chart needs the development services by default"
    );
    let build = chat.build.as_ref().context("build")?;
    let images: Vec<&str> = build.artifacts.iter().map(|a| a.image.as_str()).collect();
    ensure!(
        images
            == [
                "chat-api",
                "chat-ingest-worker",
                "chat-indexer",
                "chat-webhook-dispatcher",
                "chat-counter-sync",
                "chat-tour"
            ],
        "{images:?}"
    );
    for artifact in &build.artifacts {
        let docker = artifact
            .docker
            .as_ref()
            .context("a Dockerfile's stage by default")?;
        ensure!(root.join(&docker.dockerfile).exists(), "Dockerfile missing");
        ensure!(
            dockerfile.contains(&format!(" AS {}\n", docker.target)),
            "Dockerfile has no target {}",
            docker.target
        );
    }
    // Profile `local`: the same images, each by scripts/images, from the sources it depends on.
    let local_configs = skaffold_configs(Some("local"))?;
    let local_build = local_configs[1]
        .build
        .as_ref()
        .context("-p local's build")?;
    let local_images: Vec<&str> = local_build
        .artifacts
        .iter()
        .map(|a| a.image.as_str())
        .collect();
    ensure!(local_images == images, "-p local builds {local_images:?}");
    for artifact in &local_build.artifacts {
        let custom = artifact.custom.as_ref().context("-p local's builder")?;
        ensure!(
            custom.build_command == "scripts/images skaffold-build",
            "{}: {}",
            artifact.image,
            custom.build_command
        );
        for path in &custom.dependencies.paths {
            ensure!(
                root.join(path).exists(),
                "{}: {path} is missing",
                artifact.image
            );
        }
    }
    ensure!(
        local_build.local.as_ref().and_then(|l| l.push) == Some(false),
        "-p local never pushes"
    );
    // One build at a time (the five binaries come from one cargo build), each tagged by a digest
    // of its sources.
    ensure!(
        local_build.local.as_ref().and_then(|l| l.concurrency) == Some(1),
        "-p local builds one image at a time"
    );
    ensure!(
        local_build
            .tag_policy
            .as_ref()
            .is_some_and(|policy| policy.contains_key("inputDigest")),
        "-p local tags by the sources' digest"
    );
    let hooks = local_configs[1]
        .deploy
        .as_ref()
        .and_then(|d| d.helm.as_ref())
        .and_then(|h| h.hooks.as_ref())
        .context("-p local's deploy hooks")?;
    ensure!(
        hooks["before"][0]["host"]["command"]
            == serde_json::json!(["scripts/images", "skaffold-load"]),
        "-p local loads the images into the node before each deploy: {hooks}"
    );
    let local = build.local.as_ref().context("build.local")?;
    ensure!(local.use_buildkit == Some(true), "BuildKit images");
    let release = chat_release(chat)?;
    ensure!(
        root.join(&release.chart_path).join("Chart.yaml").exists(),
        "chart path"
    );
    // Every deployed image is injected into the chart under its component's image values.
    ensure_images_injected(release)?;
    // No credentials are written in skaffold.yaml: the URLs that carry them take the password of
    // the developer's Secret from the environment (k8s/dev/README.md).
    for (key, value) in &release.set_values {
        let value = value.as_str().map_or(value.to_string(), str::to_owned);
        ensure!(
            !value.contains('@'),
            "{key}: credentials in skaffold.yaml's setValues"
        );
    }
    for key in ["connections.databaseUrl", "connections.amqpUrl"] {
        let template = release
            .set_value_templates
            .get(key)
            .with_context(|| format!("{key} in setValueTemplates"))?;
        ensure!(
            template.contains(":{{.CHAT_DEV_PASSWORD}}@"),
            "{key} takes its password from CHAT_DEV_PASSWORD"
        );
    }
    ensure!(
        release.set_values.get("api.docs.enabled") == Some(&Value::Bool(true)),
        "skaffold serves the docs"
    );
    // The values skaffold sets render.
    let rendered = render_release(release)?;
    ensure!(
        config_data(&rendered)?
            .get("CHAT_DOCS_ENABLED")
            .map(String::as_str)
            == Some("true"),
        "skaffold renders docs on"
    );
    let dev_services = &configs[0];
    ensure!(
        dev_services
            .deploy
            .as_ref()
            .is_some_and(|d| d.kubectl.is_some()),
        "dev services are applied with kubectl"
    );
    Ok(())
}

/// The ports a developer looks at are forwarded to 127.0.0.1, each to a port that exists: the API
/// (the api Service), the api's internal port of /metrics, /livez and /readyz (not in the Service,
/// so from the Deployment), RabbitMQ's management UI and Elasticsearch (Services of `k8s/dev`).
#[test]
fn skaffold_forwards_what_a_developer_looks_at() -> anyhow::Result<()> {
    let configs = skaffold_configs(None)?;
    let forwards = |config: &skaffold::Config| -> Vec<(String, String, u16, u16)> {
        config
            .port_forward
            .iter()
            .map(|f| {
                (
                    f.resource_type.clone(),
                    f.resource_name.clone(),
                    f.port,
                    f.local_port,
                )
            })
            .collect()
    };
    let owned = |forwards: &[(&str, &str, u16, u16)]| -> Vec<(String, String, u16, u16)> {
        forwards
            .iter()
            .map(|(kind, name, port, local)| ((*kind).into(), (*name).into(), *port, *local))
            .collect()
    };
    let (dev_services, chat) = (&configs[0], &configs[1]);
    ensure!(
        forwards(chat)
            == owned(&[
                ("service", "chat-api", 80, 3000),
                ("deployment", "chat-api", 9090, 9090),
            ]),
        "chat forwards: {:?}",
        forwards(chat)
    );
    ensure!(
        forwards(dev_services)
            == owned(&[
                ("service", "rabbitmq", 15672, 15672),
                ("service", "elasticsearch", 9200, 9200),
            ]),
        "dev-services forwards: {:?}",
        forwards(dev_services)
    );
    let mut local_ports: Vec<u16> = configs
        .iter()
        .flat_map(|c| &c.port_forward)
        .map(|f| f.local_port)
        .collect();
    local_ports.sort_unstable();
    local_ports.dedup();
    ensure!(local_ports.len() == 4, "one local port each");

    // The chart's api Service has the public port, the api's pods also the internal one.
    let rendered = render_release(chat_release(chat)?)?;
    let service_ports = |services: &[Service], name: &str| -> Vec<i32> {
        services
            .iter()
            .filter(|s| s.metadata.name.as_deref() == Some(name))
            .flat_map(|s| s.spec.iter().flat_map(|spec| spec.ports.iter().flatten()))
            .map(|p| p.port)
            .collect()
    };
    ensure!(
        service_ports(&rendered.services, "chat-api") == [80],
        "the api Service exposes the public port only"
    );
    let api = rendered
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("chat-api"))
        .context("Deployment chat-api")?;
    let container_ports: Vec<i32> = api
        .spec
        .iter()
        .flat_map(|spec| spec.template.spec.iter())
        .flat_map(|pod| &pod.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| p.container_port)
        .collect();
    ensure!(
        container_ports.contains(&9090),
        "the api's pods listen on the health port: {container_ports:?}"
    );

    // The development services expose what is forwarded.
    let mut dev = Vec::new();
    for raw in dev_services.manifests.iter().flat_map(|m| &m.raw_yaml) {
        let text = std::fs::read_to_string(repo_root().join(raw))?;
        dev.extend(Rendered::parse(&parse_documents(&text)?)?.services);
    }
    for (_, name, port, _) in forwards(dev_services) {
        ensure!(
            service_ports(&dev, &name).contains(&i32::from(port)),
            "k8s/dev: the Service {name} has no port {port}"
        );
    }
    Ok(())
}

/// `skaffold verify` runs the README's tour: the `chat-tour` artifact (the Dockerfile's `tour`
/// stage: scripts/tour in a pinned curl image, non-root) as a Job in the cluster, against the
/// chart's api Service.
#[test]
fn skaffold_verify_runs_the_tour_against_the_api_service() -> anyhow::Result<()> {
    let root = repo_root();
    let configs = skaffold_configs(None)?;
    let chat = &configs[1];
    ensure!(
        configs[0].verify.is_empty() && chat.verify.len() == 1,
        "one verify test"
    );
    let tour = &chat.verify[0];
    ensure!(
        tour.name == "tour" && tour.container.name == "tour",
        "named tour"
    );
    ensure!(
        tour.container.image == "chat-tour",
        "verify runs {}",
        tour.container.image
    );
    let artifact = chat
        .build
        .iter()
        .flat_map(|b| &b.artifacts)
        .find(|a| a.image == tour.container.image)
        .context("verify's image is built by skaffold")?;
    let target = artifact.docker.as_ref().map(|d| d.target.as_str());
    ensure!(target == Some("tour"), "{target:?}");
    // Its waits are 30 s each: the Job gets time for all of them.
    ensure!(
        tour.timeout.is_some_and(|seconds| seconds >= 120),
        "verify timeout {:?}",
        tour.timeout
    );
    // In the cluster (a Job): no Docker needed on the developer's machine, and the Service's DNS
    // name resolves. The Job fails at once and runs as non-root.
    let cluster = tour
        .execution_mode
        .kubernetes_cluster
        .as_ref()
        .context("executionMode kubernetesCluster")?;
    let overrides: Value = serde_json::from_str(
        cluster
            .overrides
            .as_deref()
            .context("overrides of the Job")?,
    )
    .context("the Job's overrides are JSON")?;
    ensure!(
        overrides["spec"]["backoffLimit"] == 0
            && overrides["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] == true,
        "{overrides}"
    );
    let env: BTreeMap<&str, &str> = tour
        .container
        .env
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_str()))
        .collect();
    let rendered = render_release(chat_release(chat)?)?;
    ensure!(
        rendered.exists("Service", "chat-api"),
        "the chart's api Service"
    );
    ensure!(
        env == BTreeMap::from([("CHAT_URL", "http://chat-api")]),
        "the tour runs against the api Service on its port 80: {env:?}"
    );

    // The Dockerfile's stage: a small curl image pinned by tag, the script, non-root.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile"))?;
    let stage: Vec<&str> = dockerfile
        .lines()
        .skip_while(|line| !(line.starts_with("FROM ") && line.ends_with(" AS tour")))
        .take_while(|line| !line.is_empty())
        .collect();
    let from = stage.first().context("the Dockerfile has a tour stage")?;
    let image = from
        .trim_start_matches("FROM ")
        .trim_end_matches(" AS tour");
    let (name, tag) = image.split_once(':').context("the tour image is pinned")?;
    ensure!(
        name == "curlimages/curl"
            && tag.split('.').count() == 3
            && tag.split('.').all(|part| part.parse::<u32>().is_ok()),
        "a pinned curl image: {image}"
    );
    for line in [
        "COPY scripts/tour /tour",
        "USER 65532:65532",
        r#"ENTRYPOINT ["sh", "/tour"]"#,
    ] {
        ensure!(stage.contains(&line), "tour stage: {line} missing");
    }
    // The build context keeps scripts/ out, except the tour.
    let ignore = std::fs::read_to_string(root.join(".dockerignore"))?;
    let lines: Vec<&str> = ignore.lines().collect();
    let excluded = lines.iter().position(|l| *l == "scripts/");
    let included = lines.iter().position(|l| *l == "!scripts/tour");
    ensure!(
        matches!((excluded, included), (Some(e), Some(i)) if i > e),
        ".dockerignore must let scripts/tour into the build context"
    );
    Ok(())
}

/// `-p embedded`: the chart alone, as the single process (chart value `embedded.enabled`), one
/// replica, no connection URL, and none of the development services (`dev-services` is emptied
/// by its own `embedded` profile, and `chat` no longer requires it).
#[test]
fn skaffold_embedded_profile_deploys_the_chart_alone() -> anyhow::Result<()> {
    let configs = skaffold_configs(Some("embedded"))?;
    let (dev_services, chat) = (&configs[0], &configs[1]);
    ensure!(
        dev_services.manifests.is_none()
            && dev_services.deploy.is_none()
            && dev_services.port_forward.is_empty(),
        "embedded deploys and forwards no development service"
    );
    ensure!(
        chat.requires.is_empty(),
        "embedded requires no dev services"
    );
    let release = chat_release(chat)?;
    ensure!(
        release.set_values.get("embedded.enabled") == Some(&Value::Bool(true)),
        "embedded.enabled: {:?}",
        release.set_values
    );
    ensure!(
        release.set_values.get("api.replicaCount") == Some(&Value::from(1)),
        "one api replica: the data directory belongs to one process"
    );
    for key in release
        .set_values
        .keys()
        .chain(release.set_value_templates.keys())
    {
        ensure!(
            !key.starts_with("connections.") && key != "config.elasticsearchReplicas",
            "{key}: a backing service's setting in the embedded profile"
        );
    }
    ensure!(
        release
            .set_value_templates
            .values()
            .all(|template| !template.contains("CHAT_DEV_PASSWORD")),
        "embedded needs no development password"
    );
    ensure_images_injected(release)?;
    // The chat config keeps its forwards and its verify stage.
    ensure!(chat.port_forward.len() == 2 && chat.verify.len() == 1);
    // The chart renders these values (needs the chart's `embedded` values).
    let rendered = render_release(release)?;
    let api = rendered
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("chat-api"))
        .context("Deployment chat-api")?;
    ensure!(
        api.spec.as_ref().and_then(|s| s.replicas) == Some(1),
        "one api replica"
    );
    Ok(())
}

/// Every object of every scenario, and the development manifests, against the Kubernetes JSON
/// schemas of the chart's minimum version, strictly (unknown fields fail): `kubernetes-validate`
/// (PyPI, `scripts/tools kubernetes-validate`), offline.
#[test]
fn every_rendered_object_passes_the_strict_kubernetes_schemas() -> anyhow::Result<()> {
    let validator = tool_path("KUBERNETES_VALIDATE", "kubernetes-validate")?;
    let scratch = std::env::temp_dir().join(format!("chart-schemas-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut files = Vec::new();
    for scenario in scenarios()?.into_iter().flatten() {
        let rendered = run_helm(
            &["template", RELEASE, "--namespace", "chat"],
            Some(&scenario),
        )?;
        let file = scratch.join(scenario.file_name().context("a file name")?);
        std::fs::write(&file, rendered)?;
        files.push(file);
    }
    for manifest in std::fs::read_dir(repo_root().join("k8s/dev"))? {
        let path = manifest?.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "yaml")
        {
            files.push(path);
        }
    }
    let output = Command::new(&validator)
        .args(["--kubernetes-version", KUBE_VERSION, "--strict", "--quiet"])
        .args(&files)
        .output()?;
    std::fs::remove_dir_all(&scratch)?;
    ensure!(
        output.status.success(),
        "kubernetes-validate --strict failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The helm-unittest suites of `charts/chat/unittests/` (template-level rules written as
/// assertions on the rendered YAML).
#[test]
fn the_helm_unittest_suites_pass() -> anyhow::Result<()> {
    let unittest = tool_path("HELM_UNITTEST", "helm-unittest")?;
    let output = Command::new(&unittest)
        .args(["--file", "unittests/*_test.yaml"])
        .arg(chart())
        .output()?;
    ensure!(
        output.status.success(),
        "helm-unittest failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("Test Suites:") && !report.contains("failed"),
        "{report}"
    );
    Ok(())
}
