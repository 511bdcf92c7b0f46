//! The whole system on a real node (`scripts/kube up --real-node`: containerd, kubelet, kube-proxy,
//! CoreDNS and a CNI bridge inside the cluster's network namespace), with the images of
//! `scripts/images`: `k8s/dev`'s services and the chart run as containers, so this proves the
//! images, probes, Services, DNS and rollouts that the kwok node cannot.
//!
//! One test, in phases that build on each other (each prints how long it took): the dev services,
//! `helm install --wait`, `helm test` (a message posted and found by search), counter-sync's CronJob
//! repairing a drift, the api's readiness following RabbitMQ's pod out and back, a rolling upgrade
//! under load losing nothing, `skaffold deploy` of the same, and `skaffold dev -p local` following a
//! change of a copy of the tree (skaffold_dev.rs). Run alone by scripts/test, after
//! `scripts/kube down` and `scripts/kube up --real-node` (`cargo test --workspace --test
//! real_node`).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use system_tests::kube::{KillOnDrop, Namespace, Skaffold, helm, kubectl};
use system_tests::repo_root;

mod skaffold_dev;

const NODE: &str = "chat-node-0";
const RELEASE: &str = "chat";
const DEV_DEPLOYMENTS: [&str; 4] = ["mysql", "redis", "rabbitmq", "elasticsearch"];

/// The chart's appVersion: the tag of the application images `scripts/images` built.
fn app_version() -> anyhow::Result<String> {
    let chart = std::fs::read_to_string(repo_root().join("charts/chat/Chart.yaml"))?;
    let chart: Value = serde_yaml::from_str(&chart)?;
    chart["appVersion"]
        .as_str()
        .map(str::to_owned)
        .context("Chart.yaml's appVersion")
}

/// Runs `what`, printing and returning how long it took.
fn timed<T>(what: &str, run: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let started = Instant::now();
    let value = run().with_context(|| what.to_owned())?;
    let took = started.elapsed();
    eprintln!("real node: {what}: {:.1} s", took.as_secs_f64());
    Ok((value, took))
}

/// Checks `check` every 200 ms until it holds; an error after `within`.
fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let last = check();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?} (last check: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A password for the dev services, as `k8s/dev/README.md` has the developer make one.
fn dev_password() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `k8s/dev` in `namespace` with its Secret, waited for until every Deployment is available.
fn dev_services_up(namespace: &str, password: &str) -> anyhow::Result<()> {
    kubectl(&[
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "chat-dev-credentials",
        &format!("--from-literal=password={password}"),
    ])?;
    let dev = repo_root().join("k8s/dev").display().to_string();
    kubectl(&["-n", namespace, "apply", "-f", &dev])?;
    for deployment in DEV_DEPLOYMENTS {
        kubectl(&[
            "-n",
            namespace,
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout=300s",
        ])?;
    }
    Ok(())
}

/// The `helm upgrade --install` arguments of the chart against `k8s/dev` (as its README shows), with
/// the images of `scripts/images`.
fn chart_arguments(namespace: &str, password: &str) -> anyhow::Result<Vec<String>> {
    Ok([
        "upgrade",
        "--install",
        RELEASE,
        &repo_root().join("charts/chat").display().to_string(),
        "-n",
        namespace,
        "--set",
        "image.registry=localhost",
        "--set",
        &format!("image.tag={}", app_version()?),
        "--set",
        &format!("connections.databaseUrl=mysql://chat:{password}@mysql:3306/chat"),
        "--set",
        &format!("connections.amqpUrl=amqp://chat:{password}@rabbitmq:5672/%2f"),
        "--set",
        "connections.redisUrl=redis://redis:6379/0",
        "--set",
        "connections.elasticsearchUrl=http://elasticsearch:9200",
        "--set",
        "config.elasticsearchReplicas=0",
        "--wait",
        "--wait-for-jobs",
        "--timeout=10m",
    ]
    .map(str::to_owned)
    .to_vec())
}

fn helm_with(arguments: &[String], extra: &[&str]) -> anyhow::Result<String> {
    let mut all: Vec<&str> = arguments.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    helm(&all)
}

/// The api's Service, reached from the host: the host drops the cluster's ranges (scripts/kube), so
/// a socat on 127.0.0.1 hands each connection to a socat inside the cluster's network namespace,
/// which connects to the Service's ClusterIP (kube-proxy's rules pick a ready pod, through rollouts).
struct ApiForward {
    base_url: String,
    _socat: KillOnDrop,
}

impl ApiForward {
    fn start(namespace: &str) -> anyhow::Result<Self> {
        let service = format!("{RELEASE}-api");
        let cluster_ip = kubectl(&[
            "-n",
            namespace,
            "get",
            "service",
            &service,
            "-o",
            "jsonpath={.spec.clusterIP}:{.spec.ports[0].port}",
        ])?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let netns = std::env::var("KUBE_NETNS").unwrap_or_else(|_| "chat-kube".to_owned());
        let socat = Command::new("socat")
            .arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=256"
            ))
            .arg(format!(
                "EXEC:ip netns exec {netns} socat STDIO TCP\\:{}",
                cluster_ip.replace(':', "\\:")
            ))
            .spawn()
            .context("socat (scripts/kube installs it)")?;
        let forward = Self {
            base_url: format!("http://127.0.0.1:{port}"),
            _socat: KillOnDrop(socat),
        };
        wait_for("the forwarder listens", Duration::from_secs(10), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        Ok(forward)
    }
}

/// The api through the forwarder.
#[derive(Clone)]
struct Api {
    base_url: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            base_url: format!("{base_url}/api/v1"),
            // Below the api's keep-alive limit (5 s), so that no request goes out on a connection
            // the api is closing.
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        self.post_with_key(path, body, None).await
    }

    async fn post_with_key(
        &self,
        path: &str,
        body: Value,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(&body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// A GET; sent again (it changes nothing) when the connection it went out on was closed
    /// under it: after a rolling upgrade a pooled connection may lead to a pod that is gone.
    async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.base_url);
        let mut attempts = 0;
        let response = loop {
            attempts += 1;
            match self.http.get(&url).send().await {
                Ok(response) => break response,
                Err(error) if attempts < 3 && (error.is_request() || error.is_connect()) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error.into()),
            }
        };
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// A new application and a chat in it: (token, chat number).
    async fn new_chat(&self, name: &str) -> anyhow::Result<(String, u64)> {
        let (status, application) = self.post("/applications", json!({ "name": name })).await?;
        ensure!(
            status == 201,
            "create an application: {status} {application}"
        );
        let token = application["token"].as_str().context("token")?.to_owned();
        let (status, chat) = self
            .post(&format!("/applications/{token}/chats"), json!({}))
            .await?;
        ensure!(status == 202, "create a chat: {status} {chat}");
        Ok((token, chat["number"].as_u64().context("number")?))
    }

    /// The numbers of every stored message of a chat (following the pages).
    async fn stored_numbers(&self, token: &str, chat: u64) -> anyhow::Result<BTreeSet<u64>> {
        let mut numbers = BTreeSet::new();
        let mut after = 0;
        loop {
            let (status, page) = self
                .get(&format!(
                    "/applications/{token}/chats/{chat}/messages?after={after}&per_page=100"
                ))
                .await?;
            ensure!(status == 200, "list messages: {status} {page}");
            let items = page["messages"].as_array().context("messages")?;
            if items.is_empty() {
                return Ok(numbers);
            }
            for item in items {
                after = item["number"].as_u64().context("number")?;
                numbers.insert(after);
            }
        }
    }
}

/// What a load of posters saw: the numbers accepted (202), the attempts that failed and were
/// retried with the same key (a connection closed by a pod that goes, a 503), and the messages
/// that were still not accepted after their retries.
#[derive(Default)]
struct LoadOutcome {
    accepted: Vec<u64>,
    retried: Vec<String>,
    failed: Vec<String>,
}

/// Posts one message as a careful client does (README, "Idempotent retries"): with an
/// Idempotency-Key, retried with that key after a transport error, a 409 or a 5xx (at most 5 tries).
async fn post_message(api: &Api, path: &str, body: Value, outcome: &mut LoadOutcome) {
    let key = uuid::Uuid::new_v4().to_string();
    for attempt in 1..=5 {
        let last = attempt == 5;
        let problem = match api.post_with_key(path, body.clone(), Some(&key)).await {
            Ok((202, accepted)) => match accepted["number"].as_u64() {
                Some(number) => return outcome.accepted.push(number),
                None => format!("202 without a number: {accepted}"),
            },
            Ok((status @ (409 | 500..), answer)) => format!("{status} {answer}"),
            Ok((status, answer)) => return outcome.failed.push(format!("{status} {answer}")),
            Err(error) => format!("{error:#}"),
        };
        if last {
            return outcome.failed.push(problem);
        }
        outcome.retried.push(problem);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `clients` posters, each posting one message after another to the chat until `stop` is set.
async fn post_until(
    api: Api,
    token: String,
    chat: u64,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> LoadOutcome {
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let mut posters = Vec::new();
    for client in 0..clients {
        let (api, path, stop) = (api.clone(), path.clone(), stop.clone());
        posters.push(tokio::spawn(async move {
            let mut outcome = LoadOutcome::default();
            let mut sent = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let body = json!({ "body": format!("rolling upgrade {client} {sent}") });
                post_message(&api, &path, body, &mut outcome).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcome
        }));
    }
    let mut all = LoadOutcome::default();
    for poster in posters {
        if let Ok(outcome) = poster.await {
            all.accepted.extend(outcome.accepted);
            all.retried.extend(outcome.retried);
            all.failed.extend(outcome.failed);
        }
    }
    all
}

/// The Ready condition of every api pod ("True", "False"), space-separated.
fn api_readiness(namespace: &str) -> anyhow::Result<String> {
    kubectl(&[
        "-n",
        namespace,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=api",
        "-o",
        "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
    ])
}

/// A SQL statement run by the `mariadb` client inside the dev MySQL pod (`kubectl exec`).
fn mysql(namespace: &str, password: &str, sql: &str) -> anyhow::Result<String> {
    kubectl(&[
        "-n",
        namespace,
        "exec",
        "deploy/mysql",
        "--",
        "mariadb",
        "-h127.0.0.1",
        "-uchat",
        &format!("-p{password}"),
        "-N",
        "chat",
        "-e",
        sql,
    ])
}

#[test]
fn the_system_runs_on_a_real_node() -> anyhow::Result<()> {
    let ready = kubectl(&[
        "get",
        "node",
        NODE,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ])
    .context("the real node (scripts/kube up --real-node)")?;
    ensure!(ready == "True", "node {NODE} is not Ready: {ready}");
    let runtime = tokio::runtime::Runtime::new()?;

    let namespace = Namespace::create("real-node")?;
    let ns = namespace.0.as_str();
    let password = dev_password();
    timed("k8s/dev's four services Available", || {
        dev_services_up(ns, &password)
    })?;
    let chart = chart_arguments(ns, &password)?;
    timed(
        "helm install --wait --wait-for-jobs (every pod Ready)",
        || helm_with(&chart, &[]),
    )?;
    let (test_output, _) = timed("helm test (a message posted and found by search)", || {
        // A failed test pod stays (hook-succeeded deletes only a passed one): its output says
        // which step failed.
        helm(&["test", RELEASE, "-n", ns, "--timeout=5m"]).map_err(|error| {
            let said = kubectl(&["-n", ns, "logs", "chat-test"]).unwrap_or_default();
            error.context(format!("the test pod said:\n{said}"))
        })
    })?;
    // (Its pod is deleted once it succeeded: hook-delete-policy hook-succeeded.)
    ensure!(
        test_output.contains("Phase:          Succeeded"),
        "helm test: {test_output}"
    );
    // helm test leaves no tenant behind: its application (the only one yet) is deleted and its
    // chat and message are purged.
    wait_for(
        "helm test's application deleted and purged",
        Duration::from_secs(60),
        || {
            let left = "SELECT (SELECT COUNT(*) FROM applications WHERE deleted_at IS NULL) \
                        + (SELECT COUNT(*) FROM chats) + (SELECT COUNT(*) FROM messages)";
            Ok(mysql(ns, &password, left)?.trim() == "0")
        },
    )?;

    let forward = ApiForward::start(ns)?;
    let api = Api::new(&forward.base_url)?;

    // counter-sync's CronJob, run for real: a drift made in MySQL is repaired by a Job from it.
    let (token, chat) = runtime.block_on(api.new_chat("counter-sync on a real node"))?;
    for text in ["one", "two", "three"] {
        let (status, body) = runtime.block_on(api.post(
            &format!("/applications/{token}/chats/{chat}/messages"),
            json!({ "body": text }),
        ))?;
        ensure!(status == 202, "post: {status} {body}");
    }
    let count_sql = format!(
        "SELECT c.messages_count FROM chats c JOIN application_tokens t ON t.application_id = \
         c.application_id WHERE t.digest = UNHEX(SHA2('{token}', 256)) AND c.number = {chat}"
    );
    wait_for(
        "the three messages stored and counted",
        Duration::from_secs(60),
        || Ok(mysql(ns, &password, &count_sql)?.trim() == "3"),
    )?;
    mysql(
        ns,
        &password,
        &format!(
            "UPDATE chats c JOIN application_tokens t ON t.application_id = c.application_id \
             SET c.messages_count = 45 WHERE t.digest = UNHEX(SHA2('{token}', 256)) \
             AND c.number = {chat}"
        ),
    )?;
    timed(
        "counter-sync's Job from its CronJob repairs the drift",
        || {
            kubectl(&[
                "-n",
                ns,
                "create",
                "job",
                "counter-sync-now",
                &format!("--from=cronjob/{RELEASE}-counter-sync"),
            ])?;
            kubectl(&[
                "-n",
                ns,
                "wait",
                "--for=condition=complete",
                "job/counter-sync-now",
                "--timeout=180s",
            ])
        },
    )?;
    let repaired = mysql(ns, &password, &count_sql)?;
    ensure!(
        repaired.trim() == "3",
        "messages_count after counter-sync: {repaired}"
    );
    let job_log = kubectl(&["-n", ns, "logs", "job/counter-sync-now"])?;
    ensure!(
        job_log.contains("messages_count 45 -> 3"),
        "counter-sync's log names the repair: {job_log}"
    );

    // The api's readiness follows RabbitMQ: not ready while it is away, ready again after. Away
    // until the api has noticed (scaled to 0, then back): a replaced pod may come back faster than
    // the readiness probe's two failures (5 s apart) on a quiet machine.
    ensure!(
        !api_readiness(ns)?.contains("False"),
        "every api pod is ready before"
    );
    let started = Instant::now();
    let scale_rabbitmq = |replicas: &str| {
        kubectl(&[
            "-n",
            ns,
            "scale",
            "deployment/rabbitmq",
            &format!("--replicas={replicas}"),
        ])
    };
    scale_rabbitmq("0")?;
    wait_for(
        "an api pod not ready while RabbitMQ is away",
        Duration::from_secs(120),
        || Ok(api_readiness(ns)?.contains("False")),
    )?;
    let not_ready_after = started.elapsed();
    scale_rabbitmq("1")?;
    wait_for(
        "every api pod ready again with the new RabbitMQ",
        Duration::from_secs(240),
        || {
            let readiness = api_readiness(ns)?;
            Ok(!readiness.is_empty() && !readiness.contains("False"))
        },
    )?;
    eprintln!(
        "real node: RabbitMQ scaled to 0: an api pod not ready after {:.1} s; back to 1: all ready again after {:.1} s",
        not_ready_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // A rolling upgrade (every Deployment of the chart gets new pods) under a small load.
    let (token, chat) = runtime.block_on(api.new_chat("rolling upgrade under load"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = runtime.spawn(post_until(
        api.clone(),
        token.clone(),
        chat,
        4,
        stop.clone(),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let rollout = format!("rollout={}", uuid::Uuid::new_v4().simple());
    let annotations: Vec<String> = ["api", "ingestWorker", "indexer"]
        .iter()
        .map(|component| format!("{component}.podAnnotations.{rollout}"))
        .collect();
    let mut upgrade = Vec::new();
    for annotation in &annotations {
        upgrade.extend(["--set", annotation.as_str()]);
    }
    let (_, upgrade_took) = timed("helm upgrade --wait under load", || {
        helm_with(&chart, &upgrade)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let outcome = runtime.block_on(load)?;
    let accepted: BTreeSet<u64> = outcome.accepted.iter().copied().collect();
    ensure!(
        accepted.len() == outcome.accepted.len(),
        "a number was given to two messages"
    );
    ensure!(
        accepted.len() > 50,
        "too little load: {} accepted",
        accepted.len()
    );
    let mut missing = accepted.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !missing.is_empty() && Instant::now() < deadline {
        let stored = runtime.block_on(api.stored_numbers(&token, chat))?;
        missing.retain(|number| !stored.contains(number));
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "real node: rolling upgrade under load ({:.1} s): {} accepted, {} lost, {} attempts retried \
         with their key {:?}, {} not accepted {:?}",
        upgrade_took.as_secs_f64(),
        accepted.len(),
        missing.len(),
        outcome.retried.len(),
        outcome.retried.iter().take(3).collect::<Vec<_>>(),
        outcome.failed.len(),
        outcome.failed.iter().take(3).collect::<Vec<_>>()
    );
    ensure!(missing.is_empty(), "accepted but never stored: {missing:?}");
    ensure!(
        outcome.failed.is_empty(),
        "messages not accepted even after retries with their key: {:?}",
        outcome.failed
    );
    drop(forward);
    // Its pods go (the node has two cores' worth of CPU requests) before skaffold deploys anew.
    let first_namespace = format!("namespace/{ns}");
    drop(namespace);
    kubectl(&["wait", "--for=delete", &first_namespace, "--timeout=300s"])?;

    // `skaffold deploy` of the same, in a namespace of its own, with the images it would have built.
    let skaffold_namespace = Namespace::create("real-node-skaffold")?;
    let skaffold_ns = skaffold_namespace.0.as_str();
    let skaffold_password = dev_password();
    kubectl(&[
        "-n",
        skaffold_ns,
        "create",
        "secret",
        "generic",
        "chat-dev-credentials",
        &format!("--from-literal=password={skaffold_password}"),
    ])?;
    let version = app_version()?;
    let images = [
        "api",
        "ingest-worker",
        "indexer",
        "webhook-dispatcher",
        "counter-sync",
        "tour",
    ]
    .iter()
    .map(|name| format!("chat-{name}=localhost/chat-{name}:{version}"))
    .collect::<Vec<_>>()
    .join(",");
    let skaffold = Skaffold::new(skaffold_ns, Some(&skaffold_password))?;
    timed(
        "skaffold deploy (its status check: every Deployment Ready)",
        || {
            skaffold.run(&[
                "deploy",
                "--images",
                &images,
                "-n",
                skaffold_ns,
                "--status-check=true",
            ])
        },
    )?;
    let readiness = api_readiness(skaffold_ns)?;
    ensure!(
        !readiness.is_empty() && !readiness.contains("False"),
        "the api deployed by skaffold is ready: {readiness}"
    );
    // `skaffold verify`: the README's tour as a Job in the cluster, against what skaffold deployed.
    let builds = skaffold.scratch.join("build.json");
    std::fs::write(
        &builds,
        json!({ "builds": [{ "imageName": "chat-tour", "tag": format!("localhost/chat-tour:{version}") }] })
            .to_string(),
    )?;
    let builds = builds.display().to_string();
    let (tour, _) = timed("skaffold verify (the README's tour as a Job)", || {
        skaffold.run(&["verify", "-a", &builds, "-n", skaffold_ns])
    })?;
    ensure!(tour.contains("tour: every step passed"), "the tour: {tour}");
    drop(skaffold);
    let skaffold_namespace_name = format!("namespace/{skaffold_ns}");
    drop(skaffold_namespace);
    kubectl(&[
        "wait",
        "--for=delete",
        &skaffold_namespace_name,
        "--timeout=300s",
    ])?;

    skaffold_dev::skaffold_dev_follows_a_change()
}
