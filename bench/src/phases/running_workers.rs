//! `POST` with the workers running, then end to end: until every message is in the storage and
//! in the index.

use std::time::Instant;

use crate::phases::posting::Workers;
use crate::report::{END_TO_END, Measured};
use crate::{Bench, Target};

impl Bench {
    /// `POST` with the workers running, then the end-to-end rates until everything is stored and
    /// indexed. Returns the chat and its message count.
    pub async fn running_workers(&mut self, target: &Target) -> anyhow::Result<(u64, u64)> {
        let chat = self.stored_chat(&target.token).await?;
        // End to end counts from the start of the `POST` phase.
        let (before, started) = (self.processes.sample(), Instant::now());
        let posted = self
            .post_phase(&target.token, chat, Workers::Running)
            .await?;

        let count = posted.completed();
        eprintln!("bench: waiting until all {count} messages are stored and in the index");
        let persisted = self
            .watch(target, chat)
            .wait_until_persisted(count, self.settings.max_phase())
            .await?;
        let stored_rate = count as f64 / (persisted.stored.at - started).as_secs_f64();
        let end_to_end = Measured {
            count,
            elapsed: persisted.indexed.at - started,
            cpu: self.processes.cpu_between(&before, &persisted.indexed.cpu),
        };
        self.report.row(
            format!("end-to-end into the storage ({count} messages)"),
            format!("{stored_rate:.0} msg/s"),
            self.general_ratios(stored_rate),
        );
        self.report.row(
            "end-to-end into the index",
            format!("{:.0} msg/s", end_to_end.rate()),
            self.general_ratios(end_to_end.rate()),
        );
        self.report.cpu(END_TO_END, &end_to_end);
        Ok((chat, count))
    }
}
