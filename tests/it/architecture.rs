//! The rules of ARCHITECTURE.md that keep the structure so, checked on the code itself: which
//! crate may depend on which, that the code above the adapters' traits names no technology, that
//! the api's use cases name no HTTP, and that no crate's files import each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use system_tests::repo_root;

const SERVICES: [&str; 5] = [
    "api",
    "ingest-worker",
    "indexer",
    "webhook-dispatcher",
    "counter-sync",
];
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
        "chatcore/src/webhooks",
        "chatcore/src/numbering",
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

/// The module path of a source file below `src` (`http/middleware/mod.rs` -> `http::middleware`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("a file below src");
    let mut segments: Vec<String> = relative
        .iter()
        .map(|segment| segment.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(
        segments.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        segments.pop();
    }
    segments
}

/// The paths a piece of code names from its own crate, as written (`crate::a::{b, c::D}` gives
/// `crate::a::b` and `crate::a::c::D`).
fn crate_paths(code: &str) -> BTreeSet<Vec<String>> {
    /// Reads one item (or a `{...}` group of them) after `prefix`, into `paths`.
    fn expand(
        prefix: &[String],
        text: &mut std::str::Chars<'_>,
        paths: &mut BTreeSet<Vec<String>>,
    ) {
        let mut current = prefix.to_vec();
        let mut word = String::new();
        let mut grouped = false;
        loop {
            let next = text.next();
            match next {
                Some(c) if c.is_alphanumeric() || c == '_' => word.push(c),
                Some(c) if c == ':' || c.is_whitespace() => {
                    current.extend((!word.is_empty()).then(|| std::mem::take(&mut word)));
                }
                Some('{') => {
                    current.extend((!word.is_empty()).then(|| std::mem::take(&mut word)));
                    expand(&current, text, paths);
                    grouped = true;
                }
                end => {
                    current.extend((!word.is_empty()).then(|| std::mem::take(&mut word)));
                    if !grouped && current.len() > prefix.len() {
                        paths.insert(current.clone());
                    }
                    if end != Some(',') {
                        return;
                    }
                    current = prefix.to_vec();
                    grouped = false;
                }
            }
        }
    }
    let mut paths = BTreeSet::new();
    // `use child::...` names a module below this one without `crate::` or `super::`.
    for start in ["crate::", "super::", "use "] {
        for (index, _) in code.match_indices(start) {
            let preceded_by_word = code[..index]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if !preceded_by_word {
                let path = code[index..].trim_start_matches("use ");
                expand(&[], &mut path.chars(), &mut paths);
            }
        }
    }
    paths
}

/// File-to-file imports of one crate's sources. A module's use of its own ancestors (the modules
/// it lives in) is not an import between rooms: it is where it stands.
fn imports_between_files(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let files = rust_files(src);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|file| (module_path(src, file), file.clone()))
        .collect();
    let mut imports = BTreeMap::new();
    for file in &files {
        let here = module_path(src, file);
        let text = std::fs::read_to_string(file).expect("readable source");
        // The unit tests at the end of a file are not part of its structure.
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let mut targets = BTreeSet::new();
        for path in crate_paths(&code) {
            let mut absolute = Vec::new();
            let mut segments = path.iter().peekable();
            match segments.next().map(String::as_str) {
                Some("crate") => {}
                Some("super") => {
                    absolute = here.clone();
                    absolute.pop();
                    while segments.peek().is_some_and(|segment| *segment == "super") {
                        segments.next();
                        absolute.pop();
                    }
                }
                Some("self") => absolute = here.clone(),
                Some(first) if modules.contains_key(&[&here[..], &[first.to_owned()]].concat()) => {
                    absolute = [&here[..], &[first.to_owned()]].concat();
                }
                _ => continue,
            }
            absolute.extend(segments.cloned());
            let target = (0..=absolute.len())
                .rev()
                .find_map(|length| modules.get(&absolute[..length]));
            let Some(target) = target else { continue };
            let target_module = module_path(src, target);
            let is_ancestor = here.starts_with(&target_module);
            if target != file && !is_ancestor {
                targets.insert(target.clone());
            }
        }
        imports.insert(file.clone(), targets);
    }
    imports
}

/// A loop of imports, if any: each file of it imports the next, the last the first.
fn import_circle(imports: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        file: &PathBuf,
        imports: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        path: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        if let Some(start) = path.iter().position(|on_path| on_path == file) {
            return Some(path[start..].to_vec());
        }
        if done.contains(file) {
            return None;
        }
        path.push(file.clone());
        for target in imports.get(file).into_iter().flatten() {
            if let Some(circle) = visit(target, imports, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(file.clone());
        None
    }
    let mut done = BTreeSet::new();
    imports
        .keys()
        .find_map(|file| visit(file, imports, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_path_resolution_sees_grouped_and_relative_imports() {
    let paths =
        crate_paths("use crate::http::{error::ApiError, state::AppState};\nsuper::reader::Reader");
    let written: Vec<String> = paths.iter().map(|path| path.join("::")).collect();
    // Sorted: a set.
    assert_eq!(
        written,
        [
            "crate::http::error::ApiError",
            "crate::http::state::AppState",
            "super::reader::Reader"
        ]
    );
}

/// ARCHITECTURE.md: no import circle in any crate (file to file; a module's use of the modules
/// it lives in does not count).
#[test]
fn no_crate_has_an_import_circle() {
    let root = repo_root();
    let sources = [
        "api/src",
        "chatcore/src",
        "counter-sync/src",
        "bench/src",
        "ingest-worker/src",
        "indexer/src",
        "tests/src",
    ];
    let mut imports_read = 0;
    for src in sources {
        let imports = imports_between_files(&root.join(src));
        imports_read += imports.values().map(BTreeSet::len).sum::<usize>();
        if let Some(circle) = import_circle(&imports) {
            panic!("{src} has an import circle: {circle:#?}");
        }
    }
    assert!(imports_read > 0, "no import between files read");
}
