//! Webhook endpoints and their delivery attempts: what the api registers and lists, and what the
//! webhook-dispatcher leases, advances and records. The SQL is the same in MySQL and SQLite and
//! written once ([`webhook_store_impl!`]).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StorageError;
use crate::webhooks::events::EventTypes;
use crate::webhooks::secret::WebhookSecret;

/// One registered endpoint, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRow {
    pub id: u64,
    pub application_id: u64,
    pub url: String,
    pub description: String,
    /// [`EventTypes`] in their stored form.
    pub event_types: String,
    pub secret: String,
    /// The secret before the last rotation, which keeps signing until `previous_secret_until`.
    pub previous_secret: Option<String>,
    pub previous_secret_until: Option<DateTime<Utc>>,
    /// The application feed's position delivered through (its `application_sequence`).
    pub delivered_through: u64,
    /// Failed attempts of the delivery now due, and since when it fails.
    pub failed_attempts: u32,
    pub failing_since: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl EndpointRow {
    /// The secrets that sign a delivery now: the current one, and the previous one during its
    /// overlap.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<WebhookSecret> {
        let mut secrets = vec![WebhookSecret::from_stored(self.secret.clone())];
        if let (Some(previous), Some(until)) = (&self.previous_secret, self.previous_secret_until)
            && until > now
        {
            secrets.push(WebhookSecret::from_stored(previous.clone()));
        }
        secrets
    }
}

/// An endpoint to register.
#[derive(Debug)]
pub struct NewEndpoint<'a> {
    pub url: &'a str,
    pub description: &'a str,
    pub event_types: &'a EventTypes,
    pub secret: &'a WebhookSecret,
}

/// What a `PATCH` changes (None: unchanged).
#[derive(Debug, Default)]
pub struct EndpointChanges {
    pub url: Option<String>,
    pub description: Option<String>,
    pub event_types: Option<EventTypes>,
    /// `false` enables a disabled endpoint again: it resumes where it stopped.
    pub disabled: Option<bool>,
}

/// One recorded attempt (or the `webhook.disabled` record, with no status).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: u64,
    pub webhook_id: String,
    pub event_type: String,
    pub feed_position: u64,
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response: Option<String>,
    pub duration_ms: u32,
}

/// An attempt to record.
#[derive(Debug, Clone)]
pub struct NewAttempt {
    pub webhook_id: String,
    pub event_type: &'static str,
    pub feed_position: u64,
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response: Option<String>,
    pub duration_ms: u32,
}

/// Where a dispatcher left an endpoint: how far it delivered, and when the next attempt is due.
#[derive(Debug, Clone)]
pub struct DeliveryProgress {
    pub delivered_through: u64,
    pub failed_attempts: u32,
    pub failing_since: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    /// Set when the endpoint is disabled now, with why.
    pub disabled_reason: Option<String>,
    /// Keep the lease this much longer (more to deliver), or None to give it back.
    pub keep_lease: Option<Duration>,
}

/// The storage of webhook endpoints and attempts.
#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Registers an endpoint that starts after the application's latest change; None when the
    /// application has `limit` endpoints already.
    async fn create_endpoint(
        &self,
        application_id: u64,
        endpoint: NewEndpoint<'_>,
        limit: u64,
    ) -> Result<Option<EndpointRow>, StorageError>;

    async fn list_endpoints(&self, application_id: u64) -> Result<Vec<EndpointRow>, StorageError>;

    async fn find_endpoint(
        &self,
        application_id: u64,
        id: u64,
    ) -> Result<Option<EndpointRow>, StorageError>;

    /// None when there is no such endpoint. Every change hands the endpoint back to the next
    /// dispatcher that claims it (its lease ends), so a delivery in flight is not recorded over it.
    /// (A rotation does not: the previous secret keeps signing, and the dispatcher takes the new
    /// one at its next claim.)
    async fn change_endpoint(
        &self,
        application_id: u64,
        id: u64,
        changes: &EndpointChanges,
    ) -> Result<Option<EndpointRow>, StorageError>;

    async fn delete_endpoint(&self, application_id: u64, id: u64) -> Result<bool, StorageError>;

    /// A new secret; the current one keeps signing beside it until `previous_until`.
    async fn rotate_endpoint_secret(
        &self,
        application_id: u64,
        id: u64,
        secret: &WebhookSecret,
        previous_until: DateTime<Utc>,
    ) -> Result<Option<EndpointRow>, StorageError>;

    /// Delivers again everything after the feed position `after` (due at once).
    async fn replay_endpoint(
        &self,
        application_id: u64,
        id: u64,
        after: u64,
    ) -> Result<Option<EndpointRow>, StorageError>;

    /// The endpoint's attempts, newest first, before the attempt id `before`; None when there is
    /// no such endpoint.
    async fn list_attempts(
        &self,
        application_id: u64,
        endpoint_id: u64,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Option<Vec<AttemptRow>>, StorageError>;

    /// Leases up to `limit` enabled endpoints that are due and have changes after their position,
    /// for `lease`, to `owner`.
    async fn claim_due_endpoints(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<EndpointRow>, StorageError>;

    /// Records attempts and progress of an endpoint `owner` holds; false (nothing recorded) when
    /// it lost the lease (the endpoint was changed, replayed, deleted, or the lease expired).
    async fn record_deliveries(
        &self,
        endpoint_id: u64,
        owner: &str,
        progress: &DeliveryProgress,
        attempts: &[NewAttempt],
    ) -> Result<bool, StorageError>;

    /// Forgets the attempts made before `before`; returns how many.
    async fn prune_attempts(&self, before: DateTime<Utc>) -> Result<u64, StorageError>;
}

/// A new endpoint's id: random below 2^53, so that JavaScript clients read it exactly, and not
/// guessable from another's.
pub(super) fn new_endpoint_id() -> u64 {
    use rand::Rng as _;
    rand::rng().random_range(1..(1u64 << 53))
}

pub(super) const ENDPOINT_COLUMNS: &str = "id, application_id, url, description, event_types, \
     secret, previous_secret, previous_secret_until, delivered_through, failed_attempts, \
     failing_since, next_attempt_at, disabled_at, disabled_reason, created_at, updated_at";

/// Implements [`WebhookStore`] for an adapter with a `pool` field and a `begin_write` method (a
/// transaction that writes); the SQL is the same in MySQL and SQLite (see `storage_impl!` for
/// why a macro). An application's row is locked by updating it, which both dialects accept.
macro_rules! webhook_store_impl {
    ($adapter:ty, $database:ty) => {
        impl $adapter {
            /// Runs `update` (of the endpoint `id` of the application) and reads the endpoint as it
            /// left it, in one transaction; None when it matched no endpoint.
            async fn updated_endpoint<'q>(
                &self,
                update: sqlx::query::Query<'q, $database, <$database as sqlx::Database>::Arguments>,
                application_id: u64,
                id: u64,
            ) -> Result<Option<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let mut transaction = self.begin_write().await?;
                if update.execute(&mut *transaction).await?.rows_affected() == 0 {
                    return Ok(None);
                }
                let endpoint = Self::endpoint_in(&mut transaction, application_id, id).await?;
                transaction.commit().await?;
                Ok(endpoint)
            }

            async fn endpoint_in(
                executor: &mut <$database as sqlx::Database>::Connection,
                application_id: u64,
                id: u64,
            ) -> Result<Option<$crate::store::EndpointRow>, sqlx::Error> {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM webhook_endpoints WHERE application_id = ? AND id = ?",
                    $crate::store::webhooks::ENDPOINT_COLUMNS
                )))
                .bind(application_id as i64)
                .bind(id as i64)
                .fetch_optional(executor)
                .await
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::WebhookStore for $adapter {
            async fn create_endpoint(
                &self,
                application_id: u64,
                endpoint: $crate::store::NewEndpoint<'_>,
                limit: u64,
            ) -> Result<Option<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let now = $crate::store::now();
                let mut transaction = self.begin_write().await?;
                // The application's row, locked: its count of endpoints and its latest change
                // cannot move under this registration.
                let locked = sqlx::query(
                    "UPDATE applications SET last_change_sequence = last_change_sequence \
                     WHERE id = ? AND deleted_at IS NULL",
                )
                .bind(application_id as i64)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                if locked == 0 {
                    return Err($crate::store::StorageError::UnknownApplication(application_id));
                }
                let registered: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM webhook_endpoints WHERE application_id = ?",
                )
                .bind(application_id as i64)
                .fetch_one(&mut *transaction)
                .await?;
                if registered as u64 >= limit {
                    return Ok(None);
                }
                let id = $crate::store::webhooks::new_endpoint_id();
                sqlx::query(
                    "INSERT INTO webhook_endpoints \
                     (id, application_id, url, description, event_types, secret, \
                      delivered_through, next_attempt_at, created_at, updated_at) \
                     SELECT ?, id, ?, ?, ?, ?, last_change_sequence, ?, ?, ? \
                     FROM applications WHERE id = ?",
                )
                .bind(id as i64)
                .bind(endpoint.url)
                .bind(endpoint.description)
                .bind(endpoint.event_types.to_stored())
                .bind(endpoint.secret.expose())
                .bind(now)
                .bind(now)
                .bind(now)
                .bind(application_id as i64)
                .execute(&mut *transaction)
                .await?;
                let created = Self::endpoint_in(&mut transaction, application_id, id).await?;
                transaction.commit().await?;
                Ok(created)
            }

            async fn list_endpoints(
                &self,
                application_id: u64,
            ) -> Result<Vec<$crate::store::EndpointRow>, $crate::store::StorageError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM webhook_endpoints WHERE application_id = ? ORDER BY created_at, id",
                    $crate::store::webhooks::ENDPOINT_COLUMNS
                )))
                .bind(application_id as i64)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn find_endpoint(
                &self,
                application_id: u64,
                id: u64,
            ) -> Result<Option<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let mut connection = self.pool.acquire().await?;
                Ok(Self::endpoint_in(&mut connection, application_id, id).await?)
            }

            async fn change_endpoint(
                &self,
                application_id: u64,
                id: u64,
                changes: &$crate::store::EndpointChanges,
            ) -> Result<Option<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let now = $crate::store::now();
                // COALESCE keeps what the request leaves out. Enabling clears the failure, so the
                // delivery due is attempted at once; disabling says who did it.
                let (disable, enable) = match changes.disabled {
                    Some(true) => (1i64, 0i64),
                    Some(false) => (0, 1),
                    None => (0, 0),
                };
                let update = sqlx::query(
                    "UPDATE webhook_endpoints SET \
                     url = COALESCE(?, url), description = COALESCE(?, description), \
                     event_types = COALESCE(?, event_types), \
                     disabled_at = CASE WHEN ? = 1 THEN COALESCE(disabled_at, ?) WHEN ? = 1 THEN NULL ELSE disabled_at END, \
                     disabled_reason = CASE WHEN ? = 1 THEN COALESCE(disabled_reason, 'disabled by the application') WHEN ? = 1 THEN NULL ELSE disabled_reason END, \
                     failed_attempts = CASE WHEN ? = 1 THEN 0 ELSE failed_attempts END, \
                     failing_since = CASE WHEN ? = 1 THEN NULL ELSE failing_since END, \
                     next_attempt_at = CASE WHEN ? = 1 THEN ? ELSE next_attempt_at END, \
                     lease_owner = NULL, lease_until = NULL, updated_at = ? \
                     WHERE application_id = ? AND id = ?",
                )
                .bind(changes.url.as_deref())
                .bind(changes.description.as_deref())
                .bind(changes.event_types.as_ref().map(|kinds| kinds.to_stored()))
                .bind(disable)
                .bind(now)
                .bind(enable)
                .bind(disable)
                .bind(enable)
                .bind(enable)
                .bind(enable)
                .bind(enable)
                .bind(now)
                .bind(now)
                .bind(application_id as i64)
                .bind(id as i64);
                self.updated_endpoint(update, application_id, id).await
            }

            async fn delete_endpoint(
                &self,
                application_id: u64,
                id: u64,
            ) -> Result<bool, $crate::store::StorageError> {
                let mut transaction = self.begin_write().await?;
                let deleted = sqlx::query(
                    "DELETE FROM webhook_endpoints WHERE application_id = ? AND id = ?",
                )
                .bind(application_id as i64)
                .bind(id as i64)
                .execute(&mut *transaction)
                .await?
                .rows_affected()
                    > 0;
                if deleted {
                    sqlx::query("DELETE FROM webhook_attempts WHERE endpoint_id = ?")
                        .bind(id as i64)
                        .execute(&mut *transaction)
                        .await?;
                }
                transaction.commit().await?;
                Ok(deleted)
            }

            async fn rotate_endpoint_secret(
                &self,
                application_id: u64,
                id: u64,
                secret: &$crate::webhooks::secret::WebhookSecret,
                previous_until: DateTime<Utc>,
            ) -> Result<Option<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let now = $crate::store::now();
                let update = sqlx::query(
                    "UPDATE webhook_endpoints SET previous_secret = secret, \
                     previous_secret_until = ?, secret = ?, updated_at = ? \
                     WHERE application_id = ? AND id = ?",
                )
                .bind(previous_until)
                .bind(secret.expose())
                .bind(now)
                .bind(application_id as i64)
                .bind(id as i64);
                self.updated_endpoint(update, application_id, id).await
            }

            async fn replay_endpoint(
                &self,
                application_id: u64,
                id: u64,
                after: u64,
            ) -> Result<Option<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let now = $crate::store::now();
                let update = sqlx::query(
                    "UPDATE webhook_endpoints SET delivered_through = ?, failed_attempts = 0, \
                     failing_since = NULL, next_attempt_at = ?, lease_owner = NULL, \
                     lease_until = NULL, updated_at = ? WHERE application_id = ? AND id = ?",
                )
                .bind(after as i64)
                .bind(now)
                .bind(now)
                .bind(application_id as i64)
                .bind(id as i64);
                self.updated_endpoint(update, application_id, id).await
            }

            async fn list_attempts(
                &self,
                application_id: u64,
                endpoint_id: u64,
                before: Option<u64>,
                limit: u32,
            ) -> Result<Option<Vec<$crate::store::AttemptRow>>, $crate::store::StorageError> {
                if self.find_endpoint(application_id, endpoint_id).await?.is_none() {
                    return Ok(None);
                }
                let attempts = sqlx::query_as(
                    "SELECT id, webhook_id, event_type, feed_position, attempted_at, status_code, \
                     error, response, duration_ms FROM webhook_attempts \
                     WHERE endpoint_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
                )
                .bind(endpoint_id as i64)
                .bind(before.map_or(i64::MAX, |before| before as i64))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(Some(attempts))
            }

            async fn claim_due_endpoints(
                &self,
                owner: &str,
                lease: std::time::Duration,
                limit: u32,
            ) -> Result<Vec<$crate::store::EndpointRow>, $crate::store::StorageError> {
                let now = $crate::store::now();
                let due: Vec<u64> = sqlx::query_scalar(
                    "SELECT e.id FROM webhook_endpoints e JOIN applications a ON a.id = e.application_id \
                     WHERE e.disabled_at IS NULL AND e.next_attempt_at <= ? \
                     AND (e.lease_until IS NULL OR e.lease_until < ?) \
                     AND e.delivered_through < a.last_change_sequence \
                     ORDER BY e.next_attempt_at LIMIT ?",
                )
                .bind(now)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                if due.is_empty() {
                    return Ok(Vec::new());
                }
                let until = now + lease;
                let mut claimed = Vec::with_capacity(due.len());
                let mut transaction = self.begin_write().await?;
                for id in due {
                    // Another dispatcher may have taken it since the read: the condition again.
                    let taken = sqlx::query(
                        "UPDATE webhook_endpoints SET lease_owner = ?, lease_until = ? \
                         WHERE id = ? AND disabled_at IS NULL \
                         AND (lease_until IS NULL OR lease_until < ?)",
                    )
                    .bind(owner)
                    .bind(until)
                    .bind(id as i64)
                    .bind(now)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
                    if taken > 0 {
                        claimed.push(id);
                    }
                }
                let mut endpoints = Vec::with_capacity(claimed.len());
                for id in claimed {
                    let endpoint: Option<$crate::store::EndpointRow> =
                        sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT {} FROM webhook_endpoints WHERE id = ?",
                            $crate::store::webhooks::ENDPOINT_COLUMNS
                        )))
                        .bind(id as i64)
                        .fetch_optional(&mut *transaction)
                        .await?;
                    endpoints.extend(endpoint);
                }
                transaction.commit().await?;
                Ok(endpoints)
            }

            async fn record_deliveries(
                &self,
                endpoint_id: u64,
                owner: &str,
                progress: &$crate::store::DeliveryProgress,
                attempts: &[$crate::store::NewAttempt],
            ) -> Result<bool, $crate::store::StorageError> {
                let now = $crate::store::now();
                let mut transaction = self.begin_write().await?;
                let disabled = progress.disabled_reason.is_some();
                let lease_until = progress.keep_lease.map(|lease| now + lease);
                let kept = sqlx::query(
                    "UPDATE webhook_endpoints SET delivered_through = ?, failed_attempts = ?, \
                     failing_since = ?, next_attempt_at = ?, \
                     disabled_at = CASE WHEN ? = 1 THEN ? ELSE disabled_at END, \
                     disabled_reason = CASE WHEN ? = 1 THEN ? ELSE disabled_reason END, \
                     lease_owner = CASE WHEN ? IS NULL THEN NULL ELSE lease_owner END, \
                     lease_until = ?, updated_at = ? \
                     WHERE id = ? AND lease_owner = ?",
                )
                .bind(progress.delivered_through as i64)
                .bind(i64::from(progress.failed_attempts))
                .bind(progress.failing_since)
                .bind(progress.next_attempt_at)
                .bind(i64::from(disabled))
                .bind(now)
                .bind(i64::from(disabled))
                .bind(progress.disabled_reason.as_deref())
                .bind(lease_until)
                .bind(lease_until)
                .bind(now)
                .bind(endpoint_id as i64)
                .bind(owner)
                .execute(&mut *transaction)
                .await?
                .rows_affected()
                    > 0;
                if !kept {
                    return Ok(false);
                }
                for chunk in attempts.chunks(100) {
                    let mut insert = sqlx::QueryBuilder::<$database>::new(
                        "INSERT INTO webhook_attempts (endpoint_id, webhook_id, event_type, \
                         feed_position, attempted_at, status_code, error, response, duration_ms) ",
                    );
                    insert.push_values(chunk, |mut row, attempt| {
                        row.push_bind(endpoint_id as i64)
                            .push_bind(attempt.webhook_id.clone())
                            .push_bind(attempt.event_type)
                            .push_bind(attempt.feed_position as i64)
                            .push_bind(attempt.attempted_at)
                            .push_bind(attempt.status_code.map(i64::from))
                            .push_bind(attempt.error.clone())
                            .push_bind(attempt.response.clone())
                            .push_bind(i64::from(attempt.duration_ms));
                    });
                    insert.build().execute(&mut *transaction).await?;
                }
                transaction.commit().await?;
                Ok(true)
            }

            async fn prune_attempts(
                &self,
                before: DateTime<Utc>,
            ) -> Result<u64, $crate::store::StorageError> {
                Ok(sqlx::query("DELETE FROM webhook_attempts WHERE attempted_at < ?")
                    .bind(before)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }
        }
    };
}

pub(super) use webhook_store_impl;
