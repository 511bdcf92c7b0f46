//! The rules of ARCHITECTURE.md that keep the structure so, checked on the code itself: which
//! crate may depend on which, that the code above the adapters' traits names no technology, and
//! that the api's use cases name no HTTP.

use std::path::{Path, PathBuf};

use serde_json::Value;
use system_tests::repo_root;

const SERVICES: [&str; 4] = ["api", "ingest-worker", "indexer", "counter-sync"];
const SHARED: &str = "chatcore";

/// `(package, its normal dependencies)` of every workspace member.
fn workspace_dependencies() -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let output = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1", "--locked"])
        .current_dir(repo_root())
        .output()?;
    anyhow::ensure!(output.status.success(), "cargo metadata failed");
    let metadata: Value = serde_json::from_slice(&output.stdout)?;
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    Ok(packages
        .iter()
        .map(|package| {
            let dependencies = package["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|dependency| dependency["kind"].is_null())
                .filter_map(|dependency| dependency["name"].as_str().map(str::to_owned))
                .collect();
            (
                package["name"].as_str().unwrap_or_default().to_owned(),
                dependencies,
            )
        })
        .collect())
}

#[test]
fn services_depend_on_the_shared_crate_and_never_on_each_other() -> anyhow::Result<()> {
    let packages = workspace_dependencies()?;
    for service in SERVICES {
        let (_, dependencies) = packages
            .iter()
            .find(|(name, _)| name == service)
            .unwrap_or_else(|| panic!("{service} is a workspace member"));
        assert!(
            dependencies.iter().any(|name| name == SHARED),
            "{service} uses {SHARED}"
        );
        let other_services: Vec<&String> = dependencies
            .iter()
            .filter(|name| SERVICES.contains(&name.as_str()))
            .collect();
        assert!(
            other_services.is_empty(),
            "{service} depends on the services {other_services:?}"
        );
    }
    let (_, shared) = packages
        .iter()
        .find(|(name, _)| name == SHARED)
        .expect("the shared crate is a member");
    assert!(
        shared.iter().all(|name| !SERVICES.contains(&name.as_str())),
        "{SHARED} imports a service: {shared:?}"
    );
    Ok(())
}

/// Names of the technologies behind the traits, as code would spell them.
const TECHNOLOGY_NAMES: [&str; 10] = [
    "sqlx",
    "lapin",
    "redis::",
    "elasticsearch::",
    "MySql",
    "Sqlite",
    "Redis",
    "RabbitMq",
    "Elasticsearch",
    "InProcess",
];

/// Rust files under `path` (a file or a folder).
fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|entry| rust_files(&entry.path()))
        .filter(|file| file.extension().is_some_and(|extension| extension == "rs"))
        .collect()
}

/// The code lines (comments left out) under `paths` that contain one of `names`, as
/// `file:line: name`.
fn lines_naming(paths: &[&str], names: &[&str]) -> Vec<String> {
    let root = repo_root();
    let mut found = Vec::new();
    for path in paths {
        let files = rust_files(&root.join(path));
        assert!(!files.is_empty(), "{path} has Rust files");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            for (index, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if let Some(name) = names.iter().find(|name| code.contains(*name)) {
                    found.push(format!("{}:{}: {name}", file.display(), index + 1));
                }
            }
        }
    }
    found
}

#[test]
fn code_above_the_adapters_names_no_technology() {
    let above_the_traits = [
        "api/src",
        "ingest-worker/src",
        "indexer/src",
        "counter-sync/src/lib.rs",
        "chatcore/src/pipeline",
        "chatcore/src/numbering.rs",
    ];
    let found = lines_naming(&above_the_traits, &TECHNOLOGY_NAMES);
    assert!(
        found.is_empty(),
        "only chatcore::adapters picks technologies: {found:#?}"
    );
}

/// The api's use cases (`api/src/app`) know nothing of HTTP: the `http` layer parses, calls them
/// and maps their `AppError` to an answer in one place.
#[test]
fn the_use_cases_name_no_http() {
    let found = lines_naming(
        &["api/src/app"],
        &[
            "axum",
            "hyper",
            "http::",
            "StatusCode",
            "ApiError",
            "HeaderMap",
        ],
    );
    assert!(found.is_empty(), "HTTP in the use cases: {found:#?}");
}
