//! The Lease logic against recorded Kubernetes API exchanges, served through kube's own client
//! (a tower mock stands where the API server would): acquire, renew, another holder, expiry, races,
//! release and the repair Events. No cluster was available to record them live; the request paths
//! and bodies are those of the coordination.k8s.io/v1 and core/v1 APIs.

use std::time::Duration;

use counter_sync::lease::{Acquisition, LeaseConfig, LeaseLock};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/chat/leases/chat-counter-sync";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/chat/leases";
const EVENTS_PATH: &str = "/api/v1/namespaces/chat/events";

/// A fixed instant with microsecond precision, as MicroTime serializes it.
fn base_time() -> Timestamp {
    "2026-11-24T05:00:00.123456Z".parse().expect("timestamp")
}

fn settings() -> LeaseConfig {
    LeaseConfig {
        namespace: "chat".into(),
        name: "chat-counter-sync".into(),
        holder: "counter-sync-28551-abcde".into(),
        job: Some("counter-sync-28551".into()),
        duration: Duration::from_secs(60),
    }
}

fn lock() -> (LeaseLock, Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        LeaseLock::new(Client::new(service, "chat"), settings()),
        handle,
    )
}

fn lease(holder: Option<&str>, renewed: Timestamp, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "chat-counter-sync", "namespace": "chat", "resourceVersion": "4711"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 60,
            "acquireTime": renewed.to_string(),
            "renewTime": renewed.to_string(),
            "leaseTransitions": transitions,
        },
    })
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": reason, "reason": reason, "code": code})
}

/// Answers the next request after checking its method and path; returns its JSON body.
async fn exchange(
    handle: &mut Handle<Request<Body>, Response<Body>>,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Value {
    let (request, respond) = handle
        .next_request()
        .await
        .expect("the client sent a request");
    assert_eq!(request.method(), method, "method of {}", request.uri());
    assert_eq!(request.uri().path(), path);
    let body = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let sent = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).expect("json body")
    };
    respond.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&reply).expect("json")))
            .expect("response"),
    );
    sent
}

#[tokio::test]
async fn a_missing_lease_is_created_and_held() {
    let (lock, mut api) = lock();
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::NOT_FOUND,
            status(404, "NotFound"),
        )
        .await;
        let created = exchange(
            &mut api,
            Method::POST,
            LEASES_PATH,
            StatusCode::CREATED,
            lease(Some("x"), Timestamp::now(), 0),
        )
        .await;
        assert_eq!(
            created["spec"]["holderIdentity"],
            "counter-sync-28551-abcde"
        );
        assert_eq!(created["spec"]["leaseDurationSeconds"], 60);
        assert_eq!(created["metadata"]["name"], "chat-counter-sync");
    });
    assert_eq!(
        lock.try_acquire(now).await.expect("acquire"),
        Acquisition::Acquired
    );
    server.await.expect("server");
}

#[tokio::test]
async fn our_own_lease_is_renewed() {
    let (lock, mut api) = lock();
    let now = base_time();
    let earlier = now - SignedDuration::from_secs(20);
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("counter-sync-28551-abcde"), earlier, 3),
        )
        .await;
        let replaced = exchange(
            &mut api,
            Method::PUT,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("counter-sync-28551-abcde"), now, 3),
        )
        .await;
        // Optimistic concurrency: the write carries the version that was read.
        assert_eq!(replaced["metadata"]["resourceVersion"], "4711");
        assert_eq!(replaced["spec"]["renewTime"], now.to_string());
        assert_eq!(
            replaced["spec"]["leaseTransitions"], 3,
            "renewing is not a transition"
        );
    });
    assert!(lock.renew(now).await.expect("renew"));
    server.await.expect("server");
}

#[tokio::test]
async fn a_lease_held_by_another_run_is_left_alone() {
    let (lock, mut api) = lock();
    let recently = Timestamp::now() - SignedDuration::from_secs(10);
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("counter-sync-manual-xyz"), recently, 1),
        )
        .await;
        // No write may follow.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), api.next_request())
                .await
                .is_err()
        );
    });
    assert_eq!(
        lock.try_acquire(Timestamp::now()).await.expect("acquire"),
        Acquisition::HeldBy("counter-sync-manual-xyz".into())
    );
    server.await.expect("server");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over() {
    let (lock, mut api) = lock();
    let now = base_time();
    let long_ago = now - SignedDuration::from_secs(600);
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("crashed-run"), long_ago, 4),
        )
        .await;
        let replaced = exchange(
            &mut api,
            Method::PUT,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("x"), now, 5),
        )
        .await;
        assert_eq!(
            replaced["spec"]["holderIdentity"],
            "counter-sync-28551-abcde"
        );
        assert_eq!(replaced["spec"]["leaseTransitions"], 5);
        assert_eq!(replaced["spec"]["acquireTime"], now.to_string());
    });
    assert_eq!(
        lock.try_acquire(now).await.expect("acquire"),
        Acquisition::Acquired
    );
    server.await.expect("server");
}

#[tokio::test]
async fn losing_a_race_for_the_lease_is_not_an_error() {
    let (lock, mut api) = lock();
    let long_ago = Timestamp::now() - SignedDuration::from_secs(600);
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::NOT_FOUND,
            status(404, "NotFound"),
        )
        .await;
        exchange(
            &mut api,
            Method::POST,
            LEASES_PATH,
            StatusCode::CONFLICT,
            status(409, "AlreadyExists"),
        )
        .await;
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("crashed-run"), long_ago, 1),
        )
        .await;
        exchange(
            &mut api,
            Method::PUT,
            LEASE_PATH,
            StatusCode::CONFLICT,
            status(409, "Conflict"),
        )
        .await;
    });
    assert_eq!(
        lock.try_acquire(Timestamp::now())
            .await
            .expect("create race"),
        Acquisition::LostRace
    );
    assert_eq!(
        lock.try_acquire(Timestamp::now())
            .await
            .expect("takeover race"),
        Acquisition::LostRace
    );
    server.await.expect("server");
}

#[tokio::test]
async fn renewal_fails_once_another_run_took_over() {
    let (lock, mut api) = lock();
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("newer-run"), Timestamp::now(), 2),
        )
        .await;
    });
    assert!(!lock.renew(Timestamp::now()).await.expect("renew"));
    server.await.expect("server");
}

#[tokio::test]
async fn release_frees_the_lease_and_repairs_become_events() {
    let (lock, mut api) = lock();
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        let event = exchange(&mut api, Method::POST, EVENTS_PATH, StatusCode::CREATED, json!({"kind": "Event", "apiVersion": "v1", "metadata": {"name": "e1"}, "involvedObject": {}})).await;
        assert_eq!(event["reason"], "CounterRepaired");
        assert_eq!(event["message"], "application 5: chats_count 42 -> 1");
        assert_eq!(event["involvedObject"]["kind"], "Lease");
        assert_eq!(event["involvedObject"]["name"], "chat-counter-sync");
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("counter-sync-28551-abcde"), now, 1),
        )
        .await;
        let released = exchange(
            &mut api,
            Method::PUT,
            LEASE_PATH,
            StatusCode::OK,
            lease(None, now, 1),
        )
        .await;
        assert_eq!(released["spec"]["holderIdentity"], Value::Null);
    });
    lock.record_repair(now, "application 5: chats_count 42 -> 1")
        .await
        .expect("event");
    lock.release().await.expect("release");
    server.await.expect("server");
}

#[test]
fn renewal_happens_well_within_the_lease_duration() {
    let (service, _handle) = mock::pair::<Request<Body>, Response<Body>>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let lock = LeaseLock::new(Client::new(service, "chat"), settings());
    assert_eq!(lock.renew_interval(), Duration::from_secs(20));
}

#[tokio::test]
async fn a_run_that_fails_gives_the_lease_back() {
    let (lock, mut api) = lock();
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::NOT_FOUND,
            status(404, "NotFound"),
        )
        .await;
        exchange(
            &mut api,
            Method::POST,
            LEASES_PATH,
            StatusCode::CREATED,
            lease(Some("counter-sync-28551-abcde"), now, 0),
        )
        .await;
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("counter-sync-28551-abcde"), now, 0),
        )
        .await;
        let released = exchange(
            &mut api,
            Method::PUT,
            LEASE_PATH,
            StatusCode::OK,
            lease(None, now, 0),
        )
        .await;
        assert_eq!(released["spec"]["holderIdentity"], Value::Null);
    });
    // Nothing listens on port 1: the pass fails at once, as with a database that is down.
    let unreachable: std::collections::HashMap<String, String> = [
        ("DATABASE_URL", "mysql://chat:chat@127.0.0.1:1/chat"),
        ("REDIS_URL", "redis://127.0.0.1:1/0"),
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("ELASTICSEARCH_URL", "http://127.0.0.1:1"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    let config = chatcore::Config::from_map(&unreachable).expect("valid config");
    let outcome = counter_sync::run_holding(&config, &lock).await;
    assert!(outcome.is_err(), "the pass cannot reach its database");
    server.await.expect("the lease was given back");
}

#[tokio::test]
async fn a_lease_left_by_a_dead_pod_of_the_same_job_fails_the_run() {
    let (lock, mut api) = lock();
    assert!(lock.is_own_predecessor("counter-sync-28551-zzzzz"));
    assert!(
        !lock.is_own_predecessor("counter-sync-28551-abcde"),
        "itself"
    );
    assert!(
        !lock.is_own_predecessor("counter-sync-28552-zzzzz"),
        "another Job"
    );
    assert!(!lock.is_own_predecessor("counter-sync-285510-zzzzz"));
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        exchange(
            &mut api,
            Method::GET,
            LEASE_PATH,
            StatusCode::OK,
            lease(Some("counter-sync-28551-zzzzz"), now, 0),
        )
        .await;
    });
    let config = chatcore::Config::from_map(&std::collections::HashMap::new()).expect("valid");
    let outcome = counter_sync::run_holding(&config, &lock).await;
    let error = outcome.expect_err("a dead predecessor's lease is not success");
    assert!(
        error.to_string().contains("counter-sync-28551-zzzzz"),
        "{error}"
    );
    server.await.expect("one read, no write");
}
