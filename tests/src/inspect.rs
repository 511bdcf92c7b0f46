//! What a test reads of its environment's services: rows of its database, documents of its
//! index, its RabbitMQ queues and connections.

use anyhow::Context as _;
use chatcore::events::Consumer;
use chatcore::metrics::Metrics;
use serde_json::Value;
use sqlx::{Connection as _, Row as _};

use crate::env::{Database, Stack, TestEnv};

impl TestEnv {
    /// Runs a query that answers one integer column (the SQL must mean the same in MySQL and
    /// SQLite) on the test's database.
    async fn integers(&self, sql: &str, binds: &[&str]) -> anyhow::Result<Vec<i64>> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.database {
            Database::MySql(pool) => {
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                // Ids and numbers are BIGINT UNSIGNED, counts BIGINT.
                query
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| {
                        row.try_get::<i64, _>(0)
                            .or_else(|_| row.try_get::<u64, _>(0).map(|value| value as i64))
                            .context("an integer column")
                    })
                    .collect()
            }
            Database::Embedded(data_dir) => {
                let file = if sql.0.contains("search_documents") {
                    "search.db"
                } else {
                    "chat.db"
                };
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(data_dir.join(file))
                    .read_only(true);
                let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
                let mut query = sqlx::query_scalar::<_, i64>(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                let values = query.fetch_all(&mut connection).await?;
                connection.close().await?;
                Ok(values)
            }
        }
    }

    pub async fn count(&self, sql: &'static str, binds: &[u64]) -> anyhow::Result<i64> {
        let binds: Vec<String> = binds.iter().map(u64::to_string).collect();
        let binds: Vec<&str> = binds.iter().map(String::as_str).collect();
        self.integers(sql, &binds)
            .await?
            .first()
            .copied()
            .context("the count answered no row")
    }

    /// A count of rows, with text binds.
    pub async fn count_where(&self, sql: &'static str, binds: &[&str]) -> anyhow::Result<i64> {
        self.integers(sql, binds)
            .await?
            .first()
            .copied()
            .context("the count answered no row")
    }

    /// Internal id of an application, for assertions on the tables.
    pub async fn application_id(&self, token: &str) -> anyhow::Result<u64> {
        // The tables hold the token's digest, never the token.
        let digest: String = chatcore::domain::ApplicationToken::parse(token)?
            .digest()
            .as_bytes()
            .iter()
            .map(|byte| format!("{byte:02X}"))
            .collect();
        let ids = self
            .integers(
                "SELECT application_id FROM application_tokens WHERE HEX(digest) = ?",
                &[&digest],
            )
            .await?;
        Ok(u64::try_from(*ids.first().context("no such application")?)?)
    }

    /// Message numbers of one chat as stored, ascending.
    pub async fn stored_message_numbers(
        &self,
        token: &str,
        chat_number: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let application_id = self.application_id(token).await?;
        let numbers = self
            .integers(
                "SELECT m.number FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? ORDER BY m.number",
                &[&application_id.to_string(), &chat_number.to_string()],
            )
            .await?;
        Ok(numbers.into_iter().map(|n| n as u64).collect())
    }

    /// A client of the test's Elasticsearch index, and its URL, every write so far searchable.
    async fn refreshed_index(&self) -> anyhow::Result<(reqwest::Client, String)> {
        let http = reqwest::Client::new();
        let index = format!(
            "{}/{}-messages",
            self.settings["ELASTICSEARCH_URL"], self.id
        );
        http.post(format!("{index}/_refresh"))
            .send()
            .await?
            .error_for_status()?;
        Ok((http, index))
    }

    /// Documents of one application in the search index (after a refresh).
    pub async fn indexed_documents_of(&self, application_id: u64) -> anyhow::Result<u64> {
        if self.stack() == Stack::Embedded {
            let count = self
                .count(
                    "SELECT COUNT(*) FROM search_documents WHERE application_id = ?",
                    &[application_id],
                )
                .await?;
            return Ok(u64::try_from(count)?);
        }
        let (http, index) = self.refreshed_index().await?;
        let response: Value = http
            .post(format!("{index}/_count"))
            .json(&serde_json::json!({"query": {"term": {"application_id": application_id}}}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        response["count"].as_u64().context("count")
    }

    /// Message numbers of one chat in the search index, ascending (after a refresh).
    pub async fn indexed_message_numbers(
        &self,
        token: &str,
        chat_number: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let application_id = self.application_id(token).await?;
        if self.stack() == Stack::Embedded {
            let numbers = self
                .integers(
                    "SELECT number FROM search_documents WHERE application_id = ? \
                     AND chat_number = ? ORDER BY number",
                    &[&application_id.to_string(), &chat_number.to_string()],
                )
                .await?;
            return Ok(numbers.into_iter().map(|n| n as u64).collect());
        }
        let (http, index) = self.refreshed_index().await?;
        // Pages of 10,000 (the result window) after the last number seen.
        let mut numbers: Vec<u64> = Vec::new();
        loop {
            let mut query = serde_json::json!({
                "size": 10_000,
                "_source": ["number"],
                "query": {"term": {"chat": format!("{application_id}:{chat_number}")}},
                "sort": [{"number": "asc"}],
            });
            if let Some(last) = numbers.last() {
                query["search_after"] = serde_json::json!([last]);
            }
            let response: Value = http
                .post(format!("{index}/_search"))
                .json(&query)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let hits = response["hits"]["hits"].as_array().context("hits")?;
            if hits.is_empty() {
                return Ok(numbers);
            }
            numbers.extend(
                hits.iter()
                    .filter_map(|hit| hit["_source"]["number"].as_u64()),
            );
        }
    }

    /// A connection to the test's RabbitMQ, for publishing what the api never would.
    pub async fn amqp_connection(&self) -> anyhow::Result<lapin::Connection> {
        let nodes = self.config().require_amqp_url()?.clone();
        Ok(lapin::Connection::connect(
            nodes.first().expose(),
            lapin::ConnectionProperties::default(),
        )
        .await?)
    }

    /// Unbinds `routing_key` from the queue of `consumer`: its events reach that queue no more
    /// (they are returned to the publisher), as a mistaken topology change would do.
    pub async fn unroute(&self, consumer: Consumer, routing_key: &str) -> anyhow::Result<()> {
        self.set_route(consumer, routing_key, false).await
    }

    /// Binds `routing_key` to the queue of `consumer` again, as it was before [`Self::unroute`].
    pub async fn route(&self, consumer: Consumer, routing_key: &str) -> anyhow::Result<()> {
        self.set_route(consumer, routing_key, true).await
    }

    async fn set_route(
        &self,
        consumer: Consumer,
        routing_key: &str,
        bound: bool,
    ) -> anyhow::Result<()> {
        let config = self.config();
        let connection = self.amqp_connection().await?;
        let channel = connection.create_channel().await?;
        let (queue, exchange) = (
            config.topology.queue(consumer),
            config.topology.exchange.as_str(),
        );
        let arguments = lapin::types::FieldTable::default();
        if bound {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    routing_key.into(),
                    lapin::options::QueueBindOptions::default(),
                    arguments,
                )
                .await?;
        } else {
            channel
                .queue_unbind(queue.into(), exchange.into(), routing_key.into(), arguments)
                .await?;
        }
        connection.close(200, "routes set".into()).await?;
        Ok(())
    }

    /// Closes, from the broker's side, the RabbitMQ connections whose name starts with `prefix`
    /// (as a broker restart or a network cut would); returns how many.
    pub async fn drop_amqp_connections(&self, prefix: &str) -> anyhow::Result<usize> {
        let http = reqwest::Client::new();
        let api = &self.services.amqp_management_url;
        let connections: Vec<Value> = http
            .get(format!("{api}/connections"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut closed = 0;
        for connection in connections {
            let named = connection["client_properties"]["connection_name"]
                .as_str()
                .is_some_and(|name| name.starts_with(prefix));
            let Some(name) = connection["name"].as_str().filter(|_| named) else {
                continue;
            };
            let mut url = reqwest::Url::parse(&format!("{api}/connections/"))?;
            url.path_segments_mut()
                .map_err(|()| anyhow::anyhow!("base url"))?
                .pop_if_empty()
                .push(name);
            http.delete(url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await?
                .error_for_status()?;
            closed += 1;
        }
        Ok(closed)
    }

    /// The type of a RabbitMQ queue (`classic`, `quorum`), from the management API.
    pub async fn queue_type(&self, queue: &str) -> anyhow::Result<String> {
        let mut url =
            reqwest::Url::parse(&format!("{}/queues/", self.services.amqp_management_url))?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("base url"))?
            .pop_if_empty()
            .push("/")
            .push(queue);
        let described: Value = reqwest::Client::new()
            .get(url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(described["type"].as_str().context("type")?.to_owned())
    }

    /// Depth of a queue (messages ready).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let queue_of = chatcore::adapters::queue(&self.config(), &Metrics::new()).await?;
        Ok(u32::try_from(queue_of.depth(queue).await?)?)
    }
}
