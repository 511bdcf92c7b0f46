//! The chart's configuration against the declarations of `chatcore::config::settings`: every
//! variable the chart sets is declared, and the chart's defaults are the declared ones except
//! where it deliberately differs (listed here with the reason).

use std::collections::{BTreeMap, HashMap};

use chatcore::config::Config;
use chatcore::config::settings::{ALL, Setting, WhenUnset};

use crate::kubernetes::{config_data, render_minimal_with};

/// Chart defaults that differ from the binaries' defaults on purpose.
const DELIBERATE_DIFFERENCES: &[(&str, &str)] = &[
    // A cluster of more than one Elasticsearch node keeps a copy of each shard.
    ("CHAT_ES_REPLICAS", "1"),
    // A deployment reachable by the public hides the docs unless the operator opens them.
    ("CHAT_DOCS_ENABLED", "false"),
];

fn declaration(name: &str) -> Option<&'static Setting> {
    ALL.iter().copied().find(|setting| setting.name == name)
}

fn config_debug(values: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let values: HashMap<String, String> = values.clone().into_iter().collect();
    Ok(format!("{:?}", Config::from_map(&values)?))
}

#[test]
fn the_charts_configuration_is_declared_and_its_defaults_are_the_declared_ones()
-> anyhow::Result<()> {
    let rendered = render_minimal_with("declared-defaults", "{}")?;
    for (owner, pod, _, _) in rendered.pod_specs() {
        let variables = pod.containers.iter().flat_map(|c| c.env.iter().flatten());
        for variable in variables.filter(|variable| variable.name.starts_with("CHAT_")) {
            anyhow::ensure!(
                declaration(&variable.name).is_some(),
                "{owner} sets {}, which no binary reads",
                variable.name
            );
        }
    }
    let data = config_data(&rendered)?;
    let mut derived = data.clone();
    for (name, value) in &data {
        let setting = declaration(name)
            .ok_or_else(|| anyhow::anyhow!("the chart sets {name}, which no binary reads"))?;
        match setting.when_unset {
            WhenUnset::Value(default) => {
                let expected = DELIBERATE_DIFFERENCES
                    .iter()
                    .find(|(deliberate, _)| deliberate == name)
                    .map_or(default, |(_, chart_value)| chart_value);
                assert_eq!(value, expected, "the chart's default of {name}");
            }
            WhenUnset::Derived(_) => {
                derived.remove(name);
            }
            WhenUnset::Nothing(_) => {}
        }
    }
    // A derived default the chart spells out must be what the binaries derive themselves.
    assert_eq!(
        config_debug(&data)?,
        config_debug(&derived)?,
        "the chart's values of derived settings"
    );
    Ok(())
}
