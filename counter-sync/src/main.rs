//! `counter-sync`: one reconciliation pass; prints every repair, exits 0 on success. In a
//! Kubernetes cluster it holds a Lease while it runs and records each repair as an Event.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = chatcore::telemetry::init("counter-sync");
    let config = Config::from_env()?;
    let Some(report) = counter_sync::run_exclusively(&config).await? else {
        println!("another counter-sync run holds the lease; nothing done");
        return Ok(());
    };
    for repair in &report.repairs {
        println!("repaired {repair}");
    }
    if let Ok(gateway) = std::env::var("CHAT_PUSHGATEWAY_URL")
        && !gateway.is_empty()
    {
        counter_sync::push_metrics(&gateway, &report).await?;
    }
    println!(
        "checked {} applications and {} chats, made {} repairs",
        report.applications_checked,
        report.chats_checked,
        report.repairs.len()
    );
    Ok(())
}
