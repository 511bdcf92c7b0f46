use super::*;

#[test]
fn a_refused_admin_token_is_not_repeated_in_the_error() {
    let refused = "short-secret";
    let error = Config::from_map(&HashMap::from([(
        "CHAT_ADMIN_TOKEN".to_owned(),
        refused.to_owned(),
    )]))
    .expect_err("too short");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("CHAT_ADMIN_TOKEN"), "{shown}");
    assert!(!shown.contains(refused), "{shown}");
}

#[test]
fn the_token_settings_parse_and_are_bounded() {
    let config = Config::from_map(&HashMap::from([(
        "CHAT_APPLICATION_CREATION".to_owned(),
        "admin".to_owned(),
    )]))
    .expect("valid");
    assert_eq!(config.api.application_creation, ApplicationCreation::Admin);
    assert_eq!(
        config.api.token_rotation_overlap,
        Duration::from_secs(86_400)
    );
    for (name, value) in [
        ("CHAT_APPLICATION_CREATION", "anyone"),
        ("CHAT_TOKEN_ROTATION_OVERLAP_SECONDS", "31536001"),
    ] {
        let error = Config::from_map(&HashMap::from([(name.to_owned(), value.to_owned())]))
            .expect_err("refused");
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn the_client_token_settings_parse_and_a_refused_secret_is_not_repeated() {
    let config = Config::from_map(&HashMap::from([(
        "CHAT_CORS_ALLOWED_ORIGINS".to_owned(),
        "https://app.example.com".to_owned(),
    )]))
    .expect("valid");
    let client_tokens = &config.api.client_tokens;
    assert!(client_tokens.secret.is_none());
    assert_eq!(client_tokens.max_lifetime, Duration::from_secs(86_400));
    assert_eq!(client_tokens.revocation_poll, Duration::from_millis(250));
    assert!(
        config
            .api
            .cors_allowed_origins
            .allows("https://app.example.com")
    );
    let refused = "too-short-a-secret";
    let error = Config::from_map(&HashMap::from([(
        "CHAT_CLIENT_TOKEN_SECRET".to_owned(),
        refused.to_owned(),
    )]))
    .expect_err("too short");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("CHAT_CLIENT_TOKEN_SECRET"), "{shown}");
    assert!(!shown.contains(refused), "{shown}");
    for (name, value) in [
        ("CHAT_CLIENT_TOKEN_MAX_LIFETIME_SECONDS", "0"),
        ("CHAT_CLIENT_TOKEN_REVOCATION_POLL_MS", "0"),
        ("CHAT_CORS_ALLOWED_ORIGINS", "https://app.example.com/"),
    ] {
        let error = Config::from_map(&HashMap::from([(name.to_owned(), value.to_owned())]))
            .expect_err("refused");
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn secret_url_redacts_password() {
    let url = SecretUrl::new("mysql://chat:hunter2@db:3306/chat");
    assert_eq!(url.to_string(), "mysql://chat:***@db:3306/chat");
    assert!(!format!("{url:?}").contains("hunter2"));
    assert_eq!(url.expose(), "mysql://chat:hunter2@db:3306/chat");
}

#[test]
fn amqp_url_lists_the_nodes_of_a_cluster_in_order() {
    let config = Config::from_map(&HashMap::from([
        (
            "AMQP_URL".to_owned(),
            "amqp://chat:hunter2@rabbit-0:5672/%2f, amqps://chat:hunter2@rabbit-1/%2f".to_owned(),
        ),
        ("DATABASE_URL".to_owned(), "mysql://db/chat".to_owned()),
        ("ELASTICSEARCH_URL".to_owned(), "http://es:9200".to_owned()),
    ]))
    .expect("valid");
    let nodes = config.require_amqp_url().expect("set");
    let hosts: Vec<(&str, u16)> = nodes
        .nodes()
        .iter()
        .map(|node| {
            (
                node.uri().authority.host.as_str(),
                node.uri().authority.port,
            )
        })
        .collect();
    assert_eq!(hosts, [("rabbit-0", 5672), ("rabbit-1", 5671)]);
    assert_eq!(
        nodes.first().expose(),
        "amqp://chat:hunter2@rabbit-0:5672/%2f"
    );
    let shown = format!("{config:?} {nodes}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn an_amqp_node_asks_for_a_10_second_heartbeat_unless_its_url_names_one() {
    let nodes: AmqpNodes = "amqp://rabbit-0/%2f,amqp://rabbit-1/%2f?heartbeat=30"
        .parse()
        .expect("valid");
    let heartbeats: Vec<Option<u16>> = nodes
        .nodes()
        .iter()
        .map(|node| node.uri().query.heartbeat)
        .collect();
    assert_eq!(heartbeats, [Some(10), Some(30)]);
}

#[test]
fn a_refused_amqp_url_names_the_node_without_its_password() {
    for (value, reason) in [
        (
            "amqp://chat:hunter2@rabbit-0/%2f,,amqp://rabbit-2",
            "node 2 is empty",
        ),
        (
            "amqp://chat:hunter2@rabbit-0/%2f,http://chat:hunter2@rabbit-1",
            "node 2",
        ),
        ("amqp://chat:hunter2@rabbit-0:port/%2f", "node 1"),
    ] {
        let error = Config::from_map(&HashMap::from([("AMQP_URL".to_owned(), value.to_owned())]))
            .expect_err("refused");
        let shown = format!("{error} {error:?}");
        assert!(
            shown.contains("AMQP_URL") && shown.contains(reason),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

#[test]
fn defaults_apply_and_overrides_parse() {
    let mut values = HashMap::new();
    values.insert("CHAT_BATCH_MAX_SIZE".to_owned(), "42".to_owned());
    values.insert("CHAT_AMQP_PREFIX".to_owned(), "t1".to_owned());
    let config = Config::from_map(&values).expect("valid config");
    assert_eq!(config.consumer.batch_max_size, 42);
    assert_eq!(config.topology.ingest_queue, "t1.ingest");
    assert_eq!(config.api.max_page_size, 100);
    assert!(config.is_fully_embedded());
    assert_eq!(config.data_dir, PathBuf::from("data"));
}

#[test]
fn separate_workers_need_the_real_database_and_index() {
    let mut values = HashMap::new();
    values.insert("AMQP_URL".to_owned(), "amqp://127.0.0.1".to_owned());
    let error = Config::from_map(&values).expect_err("must fail");
    assert!(error.to_string().contains("DATABASE_URL"));
    values.insert(
        "DATABASE_URL".to_owned(),
        "mysql://127.0.0.1/chat".to_owned(),
    );
    values.insert(
        "ELASTICSEARCH_URL".to_owned(),
        "http://127.0.0.1:9200".to_owned(),
    );
    let config = Config::from_map(&values).expect("valid config");
    assert!(!config.is_fully_embedded());
    assert!(config.require_redis_url().is_err());
}

#[test]
fn invalid_number_names_the_variable() {
    for name in [
        "CHAT_CONSUMER_PREFETCH",
        "CHAT_MIGRATE_WAIT_SECONDS",
        "CHAT_LEASE_DURATION_SECONDS",
        "CHAT_REQUEST_TIMEOUT_MS",
    ] {
        let values = HashMap::from([(name.to_owned(), "lots".to_owned())]);
        let error = Config::from_map(&values).expect_err("must fail");
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn deliveries_in_flight_fit_in_the_memory_bound() {
    let config = Config::from_map(&HashMap::new()).expect("valid config");
    // 64 MiB of 257 KiB events.
    assert_eq!(config.consumer.prefetch, 255);
    let values = HashMap::from([
        (
            "CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT".to_owned(),
            "1".to_owned(),
        ),
        ("CHAT_BATCH_MAX_SIZE".to_owned(), "20".to_owned()),
    ]);
    let config = Config::from_map(&values).expect("valid config");
    assert_eq!(config.consumer.prefetch, 1, "at least one");
    let roomy = HashMap::from([(
        "CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT".to_owned(),
        (1u64 << 40).to_string(),
    )]);
    assert_eq!(
        Config::from_map(&roomy).expect("valid").consumer.prefetch,
        1000
    );
}

#[test]
fn every_setting_of_the_other_binaries_is_read_here() {
    let values: HashMap<String, String> = [
        ("CHAT_MIGRATE_WAIT_SECONDS", "30"),
        ("CHAT_PUSHGATEWAY_URL", "http://pushgateway:9091"),
        ("POD_NAMESPACE", "chat"),
        ("POD_NAME", "counter-sync-1"),
        ("CHAT_LEASE_NAME", "lease"),
        ("CHAT_LEASE_DURATION_SECONDS", "15"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    let config = Config::from_map(&values).expect("valid config");
    assert_eq!(config.migrate_wait, Duration::from_secs(30));
    assert_eq!(
        config.counter_sync.pushgateway_url.as_deref(),
        Some("http://pushgateway:9091")
    );
    assert_eq!(
        config.counter_sync.lease,
        LeaseConfig {
            namespace: "chat".into(),
            name: "lease".into(),
            holder: "counter-sync-1".into(),
            job: None,
            duration: Duration::from_secs(15),
        }
    );
    assert_eq!(
        config.trace_export.map(|export| export.endpoint).as_deref(),
        Some("http://collector:4317")
    );
    let zero_lease = HashMap::from([("CHAT_LEASE_DURATION_SECONDS".to_owned(), "0".to_owned())]);
    assert!(Config::from_map(&zero_lease).is_err());
}

#[test]
fn every_number_outside_its_declared_bounds_is_refused_by_name() {
    let bounded = ALL
        .iter()
        .filter(|setting| setting.bounds.min > 0 || setting.bounds.max < u64::MAX);
    for setting in bounded {
        let outside = if setting.bounds.min > 0 {
            setting.bounds.min - 1
        } else {
            setting.bounds.max + 1
        };
        // Quorum queues, so that their delivery limit is read too.
        let values = HashMap::from([
            (setting.name.to_owned(), outside.to_string()),
            ("CHAT_AMQP_QUEUE_TYPE".to_owned(), "quorum".to_owned()),
        ]);
        let error = Config::from_map(&values).expect_err(setting.name);
        assert!(error.to_string().contains(setting.name), "{error}");
    }
}

/// The README's table is rendered from the declarations; `CHAT_UPDATE_README=1 cargo test -p
/// chatcore readme` writes it after a declaration changed.
#[test]
fn the_readme_configuration_table_is_rendered_from_the_declarations() {
    const BEGIN: &str = "<!-- settings table: rendered from chatcore/src/config/settings.rs -->\n";
    const END: &str = "<!-- end of settings table -->";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let start = readme.find(BEGIN).expect("the table's opening marker") + BEGIN.len();
    let end = readme.find(END).expect("the table's closing marker");
    let rendered = markdown_table();
    if std::env::var_os("CHAT_UPDATE_README").is_some() {
        let updated = format!("{}{rendered}{}", &readme[..start], &readme[end..]);
        std::fs::write(&path, updated).expect("README.md written");
        return;
    }
    assert_eq!(
        readme[start..end],
        rendered,
        "README.md's configuration table differs from the declarations: run \
         CHAT_UPDATE_README=1 cargo test -p chatcore readme"
    );
}

fn trace_export(values: &[(&str, &str)]) -> Result<Option<TraceExport>, ConfigError> {
    let values: HashMap<String, String> = values
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    Config::from_map(&values).map(|config| config.trace_export)
}

#[test]
fn the_traces_endpoint_follows_the_otlp_rules_of_each_protocol() {
    let endpoint = |values: &[(&str, &str)]| {
        trace_export(values)
            .expect("valid config")
            .map(|export| (export.protocol, export.endpoint))
    };
    assert_eq!(endpoint(&[]), None, "tracing is off without an endpoint");
    let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
    assert_eq!(
        endpoint(&[base]),
        Some((OtlpProtocol::Grpc, "http://collector:4317".to_owned())),
        "grpc is the default and takes the base as is"
    );
    let http = ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    for base in ["http://collector:4318", "http://collector:4318/"] {
        assert_eq!(
            endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base), http]),
            Some((
                OtlpProtocol::HttpProtobuf,
                "http://collector:4318/v1/traces".to_owned()
            )),
            "http/protobuf appends the signal's path to {base}"
        );
    }
    let traces = (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "https://traces.example/otlp/spans",
    );
    for protocol in [("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), http] {
        assert_eq!(
            endpoint(&[base, traces, protocol]).map(|(_, endpoint)| endpoint),
            Some("https://traces.example/otlp/spans".to_owned()),
            "the traces endpoint is used as is and wins ({protocol:?})"
        );
    }
}

#[test]
fn an_unknown_protocol_or_sampler_is_refused_at_start() {
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "HTTP"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "half"),
    ] {
        let error = trace_export(&[(name, value)]).expect_err(value).to_string();
        assert!(error.contains(name), "{error}");
    }
    let error = trace_export(&[
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
    ])
    .expect_err("a ratio above 1")
    .to_string();
    assert!(error.contains("between 0 and 1"), "{error}");
}

#[test]
fn every_sampler_of_the_specification_is_offered() {
    let sampler = |name: &str, arg: &str| {
        let export = trace_export(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_TRACES_SAMPLER", name),
            ("OTEL_TRACES_SAMPLER_ARG", arg),
        ])
        .expect("valid config")
        .expect("an export");
        format!("{:?}", export.sampler)
    };
    let default = trace_export(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")])
        .expect("valid config")
        .expect("an export");
    assert_eq!(format!("{:?}", default.sampler), "ParentBased(AlwaysOn)");
    for (name, arg, expected) in [
        ("always_on", "", "AlwaysOn"),
        ("always_off", "", "AlwaysOff"),
        ("traceidratio", "0.25", "TraceIdRatioBased(0.25)"),
        ("traceidratio", "", "TraceIdRatioBased(1.0)"),
        ("parentbased_always_on", "", "ParentBased(AlwaysOn)"),
        ("parentbased_always_off", "", "ParentBased(AlwaysOff)"),
        (
            "parentbased_traceidratio",
            "0",
            "ParentBased(TraceIdRatioBased(0.0))",
        ),
    ] {
        assert_eq!(sampler(name, arg), expected, "{name} {arg}");
    }
}

#[test]
fn a_redis_url_that_does_not_parse_stops_the_start_without_its_password() {
    let error = Config::from_map(&HashMap::from([(
        "REDIS_URL".to_owned(),
        "redis+sentinel://chat:hunter2@s1:26379,s2:26379".to_owned(),
    )]))
    .expect_err("no master name");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("REDIS_URL"), "{shown}");
    assert!(shown.contains("names no master"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    let config = Config::from_map(&HashMap::from([(
        "REDIS_URL".to_owned(),
        "redis+cluster://chat:hunter2@n1:7000,n2:7000".to_owned(),
    )]))
    .expect("a cluster");
    assert!(matches!(
        config.redis_url.map(|url| url.topology),
        Some(RedisTopology::Cluster { .. })
    ));
}
