//! `counter-sync`: one reconciliation pass; prints every repair, exits 0 on success. In a
//! Kubernetes cluster it holds a Lease while it runs and records each repair as an Event.

use chatcore::Config;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "counter-sync",
    version,
    about = "One reconciliation pass of counts and number counters (run by a Kubernetes CronJob)"
)]
struct Cli {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Cli::parse();
    let config = Config::from_env()?;
    let _telemetry = chatcore::telemetry::init("counter-sync", config.trace_export.as_ref());
    let Some(report) = counter_sync::run_exclusively(&config).await? else {
        println!("another counter-sync run holds the lease; nothing done");
        return Ok(());
    };
    for repair in &report.repairs {
        println!("repaired {repair}");
    }
    if let Some(gateway) = &config.counter_sync.pushgateway_url {
        counter_sync::push_metrics(gateway, &report).await?;
    }
    println!(
        "checked {} applications and {} chats, made {} repairs, re-indexed {} recently edited messages",
        report.applications_checked,
        report.chats_checked,
        report.repairs.len(),
        report.reindexed
    );
    Ok(())
}
