//! The machine-level tool cache of `scripts/tools` (and the switch `scripts/test` gives it): a tool is
//! installed once per key, the key follows its pins and its recipe, a damaged install is found and
//! installed anew, and a cold run reads nothing of the machine's cache. On the smallest tool, the
//! pods' pause program (a Go build of a few seconds), each in caches of the test's own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};
use system_tests::{Scratch, repo_root};

/// A cache folder of the test's own and the `scripts/tools` that fills it (a copy, when the test
/// changes a pin or a recipe).
struct Tools {
    script: PathBuf,
    cache: PathBuf,
    report: PathBuf,
    _scratch: Scratch,
}

impl Tools {
    fn new(name: &str) -> anyhow::Result<Self> {
        let scratch = Scratch::new(name)?;
        Ok(Self {
            script: repo_root().join("scripts/tools"),
            cache: scratch.0.join("cache"),
            report: scratch.0.join("report"),
            _scratch: scratch,
        })
    }

    /// The same cache, through a copy of `scripts/tools` with `from` replaced by `to` (in a
    /// `scripts/` folder of its own, beside the `lib/common` it sources).
    fn edited(&self, from: &str, to: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(&self.script)?;
        ensure!(text.contains(from), "scripts/tools has no {from:?}");
        let scratch = Scratch::new("tools-copy")?;
        let scripts = scratch.0.join("scripts");
        std::fs::create_dir_all(scripts.join("lib"))?;
        std::fs::copy(
            repo_root().join("scripts/lib/common"),
            scripts.join("lib/common"),
        )?;
        let script = scripts.join("tools");
        std::fs::write(&script, text.replacen(from, to, 1))?;
        Ok(Self {
            script,
            cache: self.cache.clone(),
            report: self.report.clone(),
            _scratch: scratch,
        })
    }

    /// `scripts/tools ARGS` on this cache: what it printed.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new("bash");
        command
            .arg(&self.script)
            .args(args)
            .env("CHAT_TOOLS_CACHE", &self.cache)
            .env("CHAT_TOOLS_REPORT", &self.report);
        system_tests::kube::stdout_of(command, "scripts/tools").map(|out| out.trim().to_owned())
    }

    /// The pause program's path and whether this call installed it (rather than found it).
    fn pause(&self) -> anyhow::Result<(PathBuf, bool)> {
        let _ = std::fs::remove_file(&self.report);
        let path = PathBuf::from(self.run(&["pause"])?);
        let report = std::fs::read_to_string(&self.report).context("reading the tools' report")?;
        Ok((path, report.contains("installed in")))
    }
}

fn folder_of(path: &Path) -> PathBuf {
    path.parent()
        .expect("a tool's file is in its folder")
        .to_path_buf()
}

#[test]
fn a_tool_is_installed_once_and_found_in_the_cache_afterwards() -> anyhow::Result<()> {
    let tools = Tools::new("tool-cache-once")?;
    let (first, installed) = tools.pause()?;
    ensure!(installed, "the first call installs the tool");
    ensure!(
        first.starts_with(&tools.cache),
        "{} is in the cache",
        first.display()
    );
    let (again, installed) = tools.pause()?;
    ensure!(!installed, "the second call finds it in the cache");
    ensure!(again == first, "the same folder both times");
    ensure!(
        tools.run(&["key", "pause"])? == folder_of(&first).display().to_string(),
        "`key` names the folder without installing"
    );
    Ok(())
}

#[test]
fn a_changed_pin_or_recipe_makes_a_new_key_and_a_new_build() -> anyhow::Result<()> {
    let tools = Tools::new("tool-cache-keys")?;
    let (original, _) = tools.pause()?;

    let pinned = tools.edited("pause_version=3.10", "pause_version=3.11")?;
    let (repinned, installed) = pinned.pause()?;
    ensure!(installed, "another pin is built anew");
    ensure!(
        folder_of(&repinned) != folder_of(&original),
        "another pin, another key"
    );

    // Another flag of the build (a recipe's source) with the same pins.
    let recipe = tools.edited(
        r#"go_env go build -ldflags "-s -w" -o "$1/pause""#,
        r#"go_env go build -ldflags "-s -w -X main.build=other" -o "$1/pause""#,
    )?;
    let (rebuilt, installed) = recipe.pause()?;
    ensure!(installed, "another recipe is built anew");
    ensure!(
        folder_of(&rebuilt) != folder_of(&original),
        "another recipe, another key"
    );
    ensure!(
        folder_of(&rebuilt) != folder_of(&repinned),
        "keys differ for each change"
    );

    let (unchanged, installed) = tools.pause()?;
    ensure!(
        !installed && unchanged == original,
        "the original pins still find their build"
    );
    Ok(())
}

#[test]
fn a_truncated_binary_in_the_cache_is_installed_anew_not_used() -> anyhow::Result<()> {
    let tools = Tools::new("tool-cache-corrupt")?;
    let (pause, _) = tools.pause()?;
    let length = std::fs::metadata(&pause)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pause)?
        .set_len(length / 2)?;

    let (again, installed) = tools.pause()?;
    ensure!(installed, "a damaged install is installed anew");
    ensure!(
        again == pause,
        "in the same folder (the key did not change)"
    );
    ensure!(std::fs::metadata(&again)?.len() == length, "whole again");
    Ok(())
}

/// `CHAT_TOOLS_CACHE=off` (scripts/test's switch, through `scripts/lib/cache-env`): a temporary
/// cache and cargo target, even though the machine's cache holds the tool.
#[test]
fn a_cold_run_reads_nothing_of_the_machines_cache() -> anyhow::Result<()> {
    let machine = Scratch::new("tool-cache-machine")?;
    let machine_cache = machine.0.join("chat-platform/tools");
    let warm = Tools {
        script: repo_root().join("scripts/tools"),
        cache: machine_cache.clone(),
        report: machine.0.join("report"),
        _scratch: Scratch::new("tool-cache-unused")?,
    };
    warm.pause()?;

    let script = format!(
        r#"set -euo pipefail
. "{root}/scripts/lib/cache-env"
tool_cache_environment "{root}"
trap 'chmod -R u+w "$cold_run_dir"; rm -rf "$cold_run_dir"' EXIT
export CHAT_TOOLS_REPORT="$cold_run_dir/report"
echo "cache=$CHAT_TOOLS_CACHE"
echo "target=$CARGO_TARGET_DIR"
echo "pause=$(bash "{root}/scripts/tools" pause)"
echo "report=$(cat "$CHAT_TOOLS_REPORT")"
"#,
        root = repo_root().display()
    );
    let mut command = Command::new("bash");
    command
        .args(["-c", &script])
        .env("CHAT_TOOLS_CACHE", "off")
        .env("XDG_CACHE_HOME", &machine.0)
        .env_remove("CARGO_TARGET_DIR");
    let output = system_tests::kube::stdout_of(command, "a cold run's environment")?;
    let value = |name: &str| {
        output
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
            .with_context(|| format!("no {name} in {output}"))
    };
    for name in ["cache", "target", "pause"] {
        let path = value(name)?;
        ensure!(
            !Path::new(&path).starts_with(&machine.0),
            "{name} {path} is inside the machine's cache"
        );
    }
    ensure!(
        value("report")?.contains("installed in"),
        "the cold run installed pause itself"
    );
    Ok(())
}
