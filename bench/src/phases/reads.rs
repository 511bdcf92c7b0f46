//! The reads of a chat through the api, `GET` one message and a page of messages, each against
//! the raw rate of its SELECT at the same concurrency (services only).

use crate::load::{self, Load, scatter};
use crate::raw;
use crate::report::{Measured, met};
use crate::{Bench, Target};

/// The most api CPU verifying a client token may add to a request (issue #29), in µs.
const CLIENT_TOKEN_GOAL_MICROS: f64 = 20.0;

/// Messages per page of the list phase (the api's largest page).
const LIST_PER_PAGE: u32 = 100;

impl Bench {
    /// GET one message and a list page through the api, each against the raw rate of its SELECT,
    /// at the same concurrency.
    pub async fn reads(&mut self, target: &Target, chat: u64, stored: u64) -> anyhow::Result<()> {
        let load = Load::timed(self.settings.connections, self.settings.read_phase());
        let messages_url = self.api.url(&format!(
            "/applications/{}/chats/{chat}/messages",
            target.token
        ));
        let bounds = format!("{} connections, {:?}", load.clients, load.max_duration);

        let url = messages_url.clone();
        let one = self
            .timed_gets(
                &format!("GET one message ({bounds})"),
                load,
                None,
                move |sequence| format!("{url}/{}", scatter(sequence, stored)),
            )
            .await?;
        self.client_token_cost(target, chat, stored, load).await?;
        let one_label = format!(
            "GET one message, {} connections (chat of {stored})",
            load.clients
        );
        let one = one.figure(one_label, "req/s", "GET message");
        let what = format!("GET a page of {LIST_PER_PAGE} messages ({bounds})");
        let page = self
            .timed_gets(&what, load, None, move |sequence| {
                let after = raw::page_after(sequence, stored, LIST_PER_PAGE);
                format!("{messages_url}?per_page={LIST_PER_PAGE}&after={after}")
            })
            .await?;
        let page_label = format!(
            "GET a page of {LIST_PER_PAGE} messages (after=), {} connections",
            load.clients
        );
        let page = page.figure(page_label, "req/s", "list page");

        let Some(storage) = &target.services else {
            let no_raw = "n/a (raw SELECT: services only)";
            self.report.figure(one, no_raw);
            self.report.figure(page, no_raw);
            return Ok(());
        };
        let (pool, chat_ref) = (&storage.pool, storage.chat(chat));
        let (_, raw_one) = self
            .measure(
                &format!("raw SELECT of one message ({bounds})"),
                raw::message_lookups(pool, chat_ref, stored, load),
            )
            .await?;
        let (_, raw_page) = self
            .measure(
                &format!("raw SELECT of a page ({bounds})"),
                raw::page_lookups(pool, chat_ref, (stored, LIST_PER_PAGE), load),
            )
            .await?;

        let pool_size = self.config.database_max_connections;
        let raw_one_label = format!(
            "raw: SELECT one message by key, sqlx ({} concurrent, pool of {pool_size})",
            load.clients
        );
        let raw_one = raw_one.figure(raw_one_label, "/s", "raw GET");
        self.report.against_raw(one, raw_one, "raw SELECT");
        let raw_page_label = format!(
            "raw: SELECT a page of {LIST_PER_PAGE} after a key, sqlx ({} concurrent, pool of \
             {pool_size})",
            load.clients
        );
        let raw_page = raw_page.figure(raw_page_label, "/s", "raw list");
        self.report.against_raw(page, raw_page, "raw page SELECT");
        Ok(())
    }

    /// The api's CPU per `GET` of one message with the application's token and with a client
    /// token, both in `Authorization: Bearer` on the same URLs: what verifying a client token
    /// costs (goal: at most [`CLIENT_TOKEN_GOAL_MICROS`] more).
    async fn client_token_cost(
        &mut self,
        target: &Target,
        chat: u64,
        stored: u64,
        load: Load,
    ) -> anyhow::Result<()> {
        let client_token = self.api.mint_client_token(&target.token, chat).await?;
        let url = self.api.url(&format!("/chats/{chat}/messages"));
        let mut micros = Vec::new();
        for (credential, name) in [
            (target.token.clone(), "the application token"),
            (client_token, "a client token"),
        ] {
            let url = url.clone();
            let measured = self
                .timed_gets(
                    &format!("GET one message with {name} in Authorization"),
                    load,
                    Some(credential),
                    move |sequence| format!("{url}/{}", scatter(sequence, stored)),
                )
                .await?;
            let Some(cpu) = self.processes.cpu_of("api", &measured.cpu) else {
                self.report
                    .note("client token cost: no api pid in BENCH_PROCESSES, its CPU not measured");
                return Ok(());
            };
            micros.push(cpu.as_secs_f64() * 1e6 / measured.count.max(1) as f64);
        }
        let (application, client) = (micros[0], micros[1]);
        let added = client - application;
        self.report.row(
            format!(
                "api CPU per GET of one message: application token / client token ({} connections)",
                load.clients
            ),
            format!("{application:.0} / {client:.0} µs"),
            format!(
                "{added:+.1} µs with a client token (goal ≤ {CLIENT_TOKEN_GOAL_MICROS} µs): {}",
                met(added <= CLIENT_TOKEN_GOAL_MICROS)
            ),
        );
        Ok(())
    }

    /// `GET`s through the api of the URL `url_of(sequence)` under `load` (announced as `what`),
    /// with `credential` in `Authorization: Bearer` when given.
    async fn timed_gets(
        &self,
        what: &str,
        load: Load,
        credential: Option<String>,
        url_of: impl Fn(u64) -> String + Send + Sync + 'static,
    ) -> anyhow::Result<Measured> {
        let api = self.api.clone();
        let gets = load::run(load, move |sequence| {
            let (api, url, credential) = (api.clone(), url_of(sequence), credential.clone());
            async move {
                match credential {
                    Some(credential) => api.get_as(&url, &credential).await.map(drop),
                    None => api.get(&url).await.map(drop),
                }
            }
        });
        let (_, measured) = self.measure(what, gets).await?;
        Ok(measured)
    }
}
