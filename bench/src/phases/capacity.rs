//! The limits the README's capacity plan ("Scaling") is built on, measured after the `POST`
//! phases (services only): the numbering script on one chat's counter (a chat's ceiling, since its
//! counter is one Redis key), one queue's confirmed publish of the api's own envelopes (one queue
//! is one process of RabbitMQ), and one hot chat's accept rate against the same load spread over
//! many chats, the workers running.

use std::time::{Duration, Instant};

use crate::load::Load;
use crate::phases::posting::post_messages_into;
use crate::raw;
use crate::report::ratio;
use crate::{Bench, Target};

impl Bench {
    pub async fn capacity_limits(
        &mut self,
        target: &Target,
        events_per_message: usize,
    ) -> anyhow::Result<()> {
        let Some(storage) = &target.services else {
            return Ok(());
        };
        let incr = self.raw_rate("INCR");
        let (numbering, measured) = self
            .measure(
                "raw numbering script on one chat's counter",
                raw::numbering_increments(&self.config),
            )
            .await?;
        let numbering_rate = numbering.rate();
        self.report.figure(
            measured.figure(
                format!(
                    "raw: redis numbering script, one chat's counter ({} concurrent)",
                    raw::REDIS_CLIENTS
                ),
                "numbers/s",
                "raw numbering",
            ),
            incr.map_or_else(String::new, |incr| ratio(numbering_rate, incr, "INCR")),
        );

        let publish = self.raw_rate("confirmed publish");
        let chat = storage.chat(u64::from(u32::MAX));
        let sequences: Vec<u64> = (0..events_per_message as u64).collect();
        let size = raw::envelope_of(chat, &sequences)?.0.len();
        let (envelopes, measured) = self
            .measure(
                "raw confirmed publish of the api's envelopes into one queue",
                raw::confirmed_envelopes(&self.config, chat, events_per_message),
            )
            .await?;
        let envelope_rate = envelopes.rate();
        self.report.figure(
            measured.figure(
                format!(
                    "raw: rabbitmq confirmed publish into one queue, envelopes of \
                     {events_per_message} events ({size} B), {} concurrent",
                    raw::PUBLISHERS
                ),
                "msg/s",
                "raw envelopes",
            ),
            publish.map_or_else(String::new, |publish| {
                ratio(envelope_rate, publish, "confirmed publish")
            }),
        );
        self.report.row(
            "one queue's ceiling in events (envelopes × events each)",
            format!("{:.0} events/s", envelope_rate * events_per_message as f64),
            "",
        );
        self.hot_chat(target).await
    }

    /// The rate of the raw limit of the accept path named `short_name`, when it was measured.
    fn raw_rate(&self, short_name: &str) -> Option<f64> {
        self.raw_limits
            .iter()
            .find(|raw| raw.short_name == short_name)
            .map(|raw| raw.rate)
    }

    /// `POST` with every connection on one chat, then the same load spread over one chat per
    /// connection, the workers running, each leg starting with the queues drained.
    async fn hot_chat(&mut self, target: &Target) -> anyhow::Result<()> {
        let messages = self.settings.hot_chat_messages;
        if messages == 0 {
            self.report
                .note("BENCH_HOT_CHAT_MESSAGES=0: the hot chat's accept rate skipped");
            return Ok(());
        }
        let connections = self.settings.connections;
        let hot = vec![self.stored_chat(&target.token).await?];
        let mut spread = Vec::with_capacity(connections);
        for _ in 0..connections {
            spread.push(self.stored_chat(&target.token).await?);
        }
        let (hot_rate, hot_latency) = self.hot_chat_leg(&target.token, &hot).await?;
        let (spread_rate, spread_latency) = self.hot_chat_leg(&target.token, &spread).await?;
        self.wait_until_queues_drained().await?;
        self.report.row(
            format!(
                "POST message, workers running, {messages} messages: all {connections} \
                 connections on one chat / spread over {} chats",
                spread.len()
            ),
            format!(
                "{hot_rate:.0} / {spread_rate:.0} req/s (p50 / p99 {hot_latency}; {spread_latency})"
            ),
            format!("{:.2} one chat / spread", hot_rate / spread_rate),
        );
        Ok(())
    }

    /// One leg of the hot-chat phase, once the queues are drained: its accept rate and latencies.
    async fn hot_chat_leg(&self, token: &str, chats: &[u64]) -> anyhow::Result<(f64, String)> {
        self.wait_until_queues_drained().await?;
        let settings = &self.settings;
        let load = Load {
            clients: settings.connections,
            max_operations: settings.hot_chat_messages,
            max_duration: settings.max_phase(),
            per_second: None,
        };
        let what = format!(
            "hot chat: posting {} messages into {} chats with {} connections, workers running",
            load.max_operations,
            chats.len(),
            load.clients
        );
        let (posted, _) = self
            .measure(&what, post_messages_into(&self.api, token, chats, load))
            .await?;
        Ok((posted.rate(), posted.latencies.p50_p99()))
    }

    /// Until the ingest and index queues hold no ready message (the legs of the hot-chat phase
    /// start alike), at most a phase's time.
    async fn wait_until_queues_drained(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.settings.max_phase();
        let topology = &self.config.topology;
        loop {
            let mut queued = 0;
            for queue in [&topology.ingest_queue, &topology.index_queue] {
                queued += raw::queue_depth(&self.config, queue).await?;
            }
            if queued == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{queued} events still queued after {:?}",
                self.settings.max_phase()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
