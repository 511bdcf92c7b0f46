//! `counter-sync`: one reconciliation pass; prints every repair, exits 0 on success.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::telemetry::init("counter-sync");
    let config = Config::from_env()?;
    let report = counter_sync::run(&config).await?;
    for repair in &report.repairs {
        println!("repaired {repair}");
    }
    println!(
        "checked {} applications and {} chats, made {} repairs",
        report.applications_checked,
        report.chats_checked,
        report.repairs.len()
    );
    Ok(())
}
