//! `POST` with the workers stopped (SIGSTOP), then the drain of that backlog by each downstream
//! leg alone (one worker resumed at a time), and each leg against its raw limit: a lapin + sqlx
//! consumer into the storage, a raw `_bulk` into the index.

use std::time::{Duration, Instant};

use crate::persisted::Leg;
use crate::phases::posting::Workers;
use crate::processes::PausedWorkers;
use crate::raw;
use crate::report::{Figure, Measured, RAW_BULK, RAW_INGEST};
use crate::settings::MAX_STOPPED_SECONDS;
use crate::{Bench, ServiceStorage, Target};

/// The workers held still while the api accepts a backlog.
const WORKERS: [&str; 2] = ["ingest-worker", "indexer"];

/// The backlog the api accepted with the workers stopped.
pub struct Backlog {
    pub chat: u64,
    pub count: u64,
    /// The ingest leg's drain of it, in messages per second.
    pub ingest_rate: f64,
    /// Events per AMQP message of the ingest queue (the api's envelopes).
    pub events_per_message: usize,
}

impl Bench {
    /// `POST` with the workers stopped, the drain of that backlog by each leg, and the raw legs
    /// with as many messages. Returns the backlog, or None when skipped.
    pub async fn stopped_workers(&mut self, target: &Target) -> anyhow::Result<Option<Backlog>> {
        let Some(storage) = &target.services else {
            self.report.note(
                "embedded stack: POST with the workers stopped, the downstream legs and their raw \
                 limits skipped (the workers run inside the api process)",
            );
            return Ok(None);
        };
        let worker_pids: Option<Vec<u32>> = WORKERS
            .iter()
            .map(|name| self.processes.pid(name))
            .collect();
        let Some(worker_pids) = worker_pids else {
            self.report.note(
                "no pid of ingest-worker or indexer in BENCH_PROCESSES: POST with the workers \
                 stopped, the downstream legs and their raw limits skipped",
            );
            return Ok(None);
        };
        if self.settings.stopped_phase() > Duration::from_secs(MAX_STOPPED_SECONDS) {
            self.report.note(format!(
                "BENCH_STOPPED_SECONDS above {MAX_STOPPED_SECONDS}: the stopped workers may miss \
                 RabbitMQ heartbeats and reconnect, which the legs then include"
            ));
        }
        let chat = self.stored_chat(&target.token).await?;
        self.post_floor(target, chat).await?;

        let mut paused = PausedWorkers::stop(&worker_pids)?;
        let posted = self
            .post_phase(&target.token, chat, Workers::Stopped)
            .await?;
        self.post_against_floor(&posted);

        let count = posted.completed();
        // The api's envelopes: how many events an AMQP message of the ingest queue carries (the
        // raw ingest leg gets its events packed alike).
        let ingest_queue = &self.config.topology.ingest_queue;
        let queued = raw::queue_depth(&self.config, ingest_queue).await?;
        let events_per_message = (count as f64 / queued.max(1) as f64).round().max(1.0);
        self.report.row(
            "events per AMQP message of the ingest queue (the api's envelopes)",
            format!("{events_per_message:.0} ({count} events in {queued} messages)"),
            "",
        );
        // One leg at a time, as their raw limits are measured: the ingest-worker first, the
        // indexer once the storage holds the whole backlog (both at once would share the cores,
        // and each would measure the other's cost).
        let [ingest_pid, indexer_pid] = [worker_pids[0], worker_pids[1]];
        let ingest = self
            .drain_leg(&mut paused, ingest_pid, Leg::Storage, target, (chat, count))
            .await?;
        let index = self
            .drain_leg(&mut paused, indexer_pid, Leg::Index, target, (chat, count))
            .await?;

        // The raw ingest leg writes into `messages` under a chat of its own (empty, as the backlog's
        // chat was before the backlog).
        let raw_ingest_chat = self.stored_chat(&target.token).await?;
        let ingest_rate = ingest.rate();
        self.legs_against_raw(
            storage,
            (chat, raw_ingest_chat),
            (ingest, index),
            events_per_message as usize,
        )
        .await?;
        Ok(Some(Backlog {
            chat,
            count,
            ingest_rate,
            events_per_message: events_per_message as usize,
        }))
    }

    /// Resumes the worker of `leg` and measures it until the chat's backlog of `count` messages
    /// has gone through it.
    async fn drain_leg(
        &self,
        paused: &mut PausedWorkers,
        worker_pid: u32,
        leg: Leg,
        target: &Target,
        (chat, count): (u64, u64),
    ) -> anyhow::Result<Measured> {
        eprintln!("bench: {leg:?} leg resumed, draining the backlog of {count} messages");
        let resumed = self.processes.sample();
        let resumed_at = Instant::now();
        paused.resume(worker_pid)?;
        let done = self
            .watch(target, chat)
            .wait_until_leg_done(leg, count, self.settings.max_phase())
            .await?;
        Ok(Measured {
            count,
            elapsed: done.at - resumed_at,
            cpu: self.processes.cpu_between(&resumed, &done.cpu),
        })
    }

    /// The raw ingest and index legs with the messages of the backlog, and the rows of both legs
    /// against them.
    async fn legs_against_raw(
        &mut self,
        storage: &ServiceStorage,
        (chat, raw_ingest_chat): (u64, u64),
        (ingest, index): (Measured, Measured),
        events_per_message: usize,
    ) -> anyhow::Result<()> {
        let count = ingest.count;
        let chat_ref = storage.chat(chat);
        let raw_ingest_chat_id: u64 =
            sqlx::query_scalar("SELECT id FROM chats WHERE application_id = ? AND number = ?")
                .bind(storage.application_id)
                .bind(raw_ingest_chat)
                .fetch_one(&storage.pool)
                .await?;
        eprintln!("bench: raw ingest leg ({count} events, lapin + sqlx)");
        let raw_ingest = raw::ingest_leg(
            &self.config,
            &self.processes,
            (storage.chat(raw_ingest_chat), raw_ingest_chat_id),
            count,
            events_per_message,
        )
        .await?;
        eprintln!("bench: raw index leg ({count} documents, _bulk)");
        let raw_bulk = raw::bulk_leg(
            &self.config,
            self.api.http(),
            &self.processes,
            chat_ref,
            (count, events_per_message),
        )
        .await?;

        let consumer = &self.config.consumer;
        let raw_ingest_label = format!(
            "raw: ingest, lapin + sqlx multi-row INSERT IGNORE into the same table (a chat of its \
             own), {events_per_message} events an AMQP message, batches of at most {} events and \
             {} messages",
            consumer.batch_max_size, consumer.prefetch
        );
        let raw_bulk_label = format!(
            "raw: `_bulk` into the same index (a chat of its own), one at a time, batches of {} \
             (the indexer's: CHAT_BATCH_MAX_SIZE {}, prefetch {} messages of \
             {events_per_message} events), until searchable",
            raw::batch_size(&self.config, events_per_message),
            consumer.batch_max_size,
            consumer.prefetch
        );
        self.leg_against_raw(
            Leg::Storage,
            &ingest,
            raw_ingest.figure(raw_ingest_label, "msg/s", RAW_INGEST),
        );
        self.leg_against_raw(
            Leg::Index,
            &index,
            raw_bulk.figure(raw_bulk_label, "docs/s", RAW_BULK),
        );
        Ok(())
    }

    /// The row of a leg's drain of the backlog against its raw limit `raw`, and their CPU
    /// columns.
    fn leg_against_raw(&mut self, leg: Leg, drained: &Measured, raw: Figure<'_>) {
        let (name, into) = match leg {
            Leg::Storage => ("ingest leg", "storage"),
            Leg::Index => ("index leg", "index"),
        };
        let label = format!(
            "{name}: backlog of {} into the {into}, alone after SIGCONT",
            drained.count
        );
        let raw_name = raw.column();
        self.report
            .against_raw(drained.figure(label, "msg/s", name), raw, raw_name);
    }
}
