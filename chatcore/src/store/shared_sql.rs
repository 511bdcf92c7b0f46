//! The SQL the MySQL and SQLite adapters share, written once ([`storage_impl!`]).

/// Implements [`Storage`] for an adapter with a `pool` field: the reads are the same SQL in MySQL
/// and SQLite and are written here once; the adapter passes its kind (the label of its metrics and
/// readiness check) and the methods whose SQL differs. Integers are bound as i64, which both
/// drivers encode.
///
/// Why a macro and not generics over `sqlx::Database`: the generic form needs a higher-ranked
/// where-clause naming every type bound or decoded (`for<'c> &'c mut DB::Connection: Executor`,
/// `IntoArguments`, `Encode + Type` of i64, bytes, text and timestamps, `FromRow` of each row
/// type) on every generic item, since Rust does not carry such bounds through a trait alias; and
/// the adapters would each repeat one delegating method per shared query to fill the trait. The
/// macro keeps one copy of each query and of each method signature, checked against both drivers
/// on every build.
macro_rules! storage_impl {
    ($adapter:ty, $database:ty, $kind:literal, { $($dialect_methods:tt)* }) => {
        impl $adapter {
            /// Records `token` (its digest) as a key of the application, its hint as the newest.
            async fn insert_token(
                transaction: &mut sqlx::Transaction<'static, $database>,
                application_id: u64,
                token: &ApplicationToken,
                now: DateTime<Utc>,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO application_tokens (digest, application_id, created_at) \
                     VALUES (?, ?, ?)",
                )
                .bind(token.digest().as_bytes())
                .bind(application_id as i64)
                .bind(now)
                .execute(&mut **transaction)
                .await?;
                sqlx::query("UPDATE applications SET token_hint = ?, updated_at = ? WHERE id = ?")
                    .bind(token.hint())
                    .bind(now)
                    .bind(application_id as i64)
                    .execute(&mut **transaction)
                    .await?;
                Ok(())
            }

            /// Takes the next `count` change sequences of a chat or an application (`table`: `chats`
            /// or `applications`); returns the first. The row stays locked until the transaction
            /// ends, so the changes of one chat (one application) are logged one transaction after
            /// another, in sequence order.
            async fn take_change_sequences(
                transaction: &mut sqlx::Transaction<'static, $database>,
                table: &'static str,
                id: u64,
                count: u64,
            ) -> Result<u64, sqlx::Error> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {table} SET last_change_sequence = last_change_sequence + ? WHERE id = ?"
                )))
                .bind(count as i64)
                .bind(id as i64)
                .execute(&mut **transaction)
                .await?;
                let last: u64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT last_change_sequence FROM {table} WHERE id = ?"
                )))
                .bind(id as i64)
                .fetch_one(&mut **transaction)
                .await?;
                Ok(last + 1 - count)
            }

            /// Logs the creation of a chat in its application's feed (the chat's own log holds
            /// its messages' changes: the creation takes sequence 0 there, before every one).
            async fn log_chat_created(
                transaction: &mut sqlx::Transaction<'static, $database>,
                (application_id, chat_id): (u64, u64),
                created_at: DateTime<Utc>,
            ) -> Result<(), sqlx::Error> {
                let application_sequence =
                    Self::take_change_sequences(transaction, "applications", application_id, 1).await?;
                sqlx::query(
                    "INSERT INTO message_changes \
                     (chat_id, sequence, application_id, application_sequence, number, version, \
                     kind, body, message_created_at, occurred_at) \
                     VALUES (?, 0, ?, ?, 0, 0, ?, '', ?, ?)",
                )
                .bind(chat_id as i64)
                .bind(application_id as i64)
                .bind(application_sequence as i64)
                .bind($crate::store::ChangeKind::ChatCreated.as_str())
                .bind(created_at)
                .bind($crate::store::now())
                .execute(&mut **transaction)
                .await?;
                Ok(())
            }

            /// The events of `scope` in `taken` (number and event id, each number stored under
            /// another event), as conflicts with the scope's highest stored number.
            async fn number_conflicts(
                transaction: &mut sqlx::Transaction<'static, $database>,
                scope: $crate::domain::Scope,
                taken: Vec<($crate::domain::Number, uuid::Uuid)>,
            ) -> Result<Vec<$crate::store::NumberConflict>, sqlx::Error> {
                if taken.is_empty() {
                    return Ok(Vec::new());
                }
                let highest: u64 = match scope {
                    $crate::domain::Scope::ChatsOf { application_id } => sqlx::query_scalar(
                        "SELECT CAST(COALESCE(MAX(number), 0) AS UNSIGNED) FROM chats \
                         WHERE application_id = ?",
                    )
                    .bind(application_id as i64),
                    $crate::domain::Scope::MessagesOf {
                        application_id,
                        chat_number,
                    } => sqlx::query_scalar(
                        "SELECT CAST(COALESCE(MAX(m.number), 0) AS UNSIGNED) FROM messages m \
                         JOIN chats c ON c.id = m.chat_id WHERE c.application_id = ? AND c.number = ?",
                    )
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64),
                }
                .fetch_one(&mut **transaction)
                .await?;
                Ok(taken
                    .into_iter()
                    .map(|(number, event_id)| $crate::store::NumberConflict {
                        scope,
                        number,
                        event_id,
                        highest,
                    })
                    .collect())
            }

            /// Gives a chat stored earlier by a message that came first the id of its own event,
            /// and its title and metadata; a chat some event gave details already (before the
            /// event id was kept) stays as it is.
            async fn claim_chat(
                transaction: &mut sqlx::Transaction<'static, $database>,
                (application_id, number): $crate::store::ChatKey,
                event_id: uuid::Uuid,
                chat: &$crate::store::NewChat<'_>,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "UPDATE chats SET event_id = ?, title = ?, metadata = ? \
                     WHERE application_id = ? AND number = ? AND event_id IS NULL \
                     AND title IS NULL AND metadata IS NULL",
                )
                .bind(event_id.as_bytes().as_slice())
                .bind(chat.title.map($crate::domain::ChatTitle::as_str))
                .bind(chat.metadata.map($crate::domain::Metadata::as_str))
                .bind(application_id as i64)
                .bind(number.get() as i64)
                .execute(&mut **transaction)
                .await?;
                Ok(())
            }

            /// Logs one change of a message (as it left the message) under the next sequences of
            /// its chat and of its application. In MySQL the caller has locked the application's
            /// row first, as a batch write does, so the two rows taken here cannot deadlock.
            async fn log_change(
                transaction: &mut sqlx::Transaction<'static, $database>,
                (application_id, chat_id): (u64, u64),
                kind: $crate::store::ChangeKind,
                message: MessageRow,
            ) -> Result<$crate::store::ChangeRow, sqlx::Error> {
                let sequence = Self::take_change_sequences(transaction, "chats", chat_id, 1).await?;
                let application_sequence =
                    Self::take_change_sequences(transaction, "applications", application_id, 1).await?;
                sqlx::query(
                    "INSERT INTO message_changes \
                     (chat_id, sequence, application_id, application_sequence, number, version, \
                     kind, body, message_created_at, occurred_at, sender, metadata, edited_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(chat_id as i64)
                .bind(sequence as i64)
                .bind(application_id as i64)
                .bind(application_sequence as i64)
                .bind(message.number as i64)
                .bind(message.version as i64)
                .bind(kind.as_str())
                .bind(&message.body)
                .bind(message.created_at)
                .bind(message.updated_at)
                .bind(&message.sender)
                .bind(&message.metadata)
                .bind(message.edited_at)
                .execute(&mut **transaction)
                .await?;
                Ok($crate::store::ChangeRow { sequence, kind, message })
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Storage for $adapter {
            fn kind(&self) -> &'static str {
                $kind
            }

            fn webhooks(&self) -> &dyn $crate::store::WebhookStore {
                self
            }

            async fn ping(&self) -> Result<(), StorageError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn find_application(
                &self,
                application_id: u64,
            ) -> Result<Option<ApplicationRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications WHERE id = ? AND deleted_at IS NULL",
                        $crate::store::APPLICATION_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn list_applications(
                &self,
                page: PageRequest,
            ) -> Result<Vec<ApplicationRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications WHERE id BETWEEN ? AND ? AND deleted_at IS NULL \
                         ORDER BY id {} LIMIT ? OFFSET ?",
                        $crate::store::APPLICATION_COLUMNS,
                        $crate::store::direction(page)
                    )))
                    .bind(page.key_bounds().0 as i64)
                    .bind(page.key_bounds().1 as i64)
                    .bind(page.fetch_limit() as i64)
                    .bind(page.offset() as i64)
                    .fetch_all(&self.pool)
                    .await
                })
                .await
            }

            async fn resolve_token(
                &self,
                digest: &TokenDigest,
            ) -> Result<Option<TokenGrant>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(
                        "SELECT application_id, expires_at FROM application_tokens \
                         WHERE digest = ? AND (expires_at IS NULL OR expires_at > ?)",
                    )
                    .bind(digest.as_bytes())
                    .bind($crate::store::now())
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn replace_tokens(
                &self,
                application_id: u64,
                token: &ApplicationToken,
                others_valid_until: Option<DateTime<Utc>>,
            ) -> Result<bool, StorageError> {
                with_storage_errors(async {
                    let now = $crate::store::now();
                    let mut transaction = self.begin_write().await?;
                    let known: i64 =
                        sqlx::query_scalar(
                            "SELECT COUNT(*) FROM applications WHERE id = ? AND deleted_at IS NULL",
                        )
                            .bind(application_id as i64)
                            .fetch_one(&mut *transaction)
                            .await?;
                    if known == 0 {
                        return Ok(false);
                    }
                    match others_valid_until {
                        // Only shortened: a token already due earlier keeps its end.
                        Some(until) => sqlx::query(
                            "UPDATE application_tokens SET expires_at = ? \
                             WHERE application_id = ? AND (expires_at IS NULL OR expires_at > ?)",
                        )
                        .bind(until)
                        .bind(application_id as i64)
                        .bind(until),
                        None => sqlx::query(
                            "UPDATE application_tokens SET expires_at = ? WHERE application_id = ?",
                        )
                        .bind(now)
                        .bind(application_id as i64),
                    }
                    .execute(&mut *transaction)
                    .await?;
                    sqlx::query(
                        "DELETE FROM application_tokens WHERE application_id = ? AND expires_at <= ?",
                    )
                    .bind(application_id as i64)
                    .bind(now)
                    .execute(&mut *transaction)
                    .await?;
                    Self::insert_token(&mut transaction, application_id, token, now).await?;
                    transaction.commit().await?;
                    Ok::<_, sqlx::Error>(true)
                })
                .await
            }

            async fn delete_application(&self, application_id: u64) -> Result<bool, StorageError> {
                with_storage_errors(async {
                    let now = $crate::store::now();
                    let mut transaction = self.begin_write().await?;
                    // Its client tokens end too: the key id is cleared, as a change every
                    // replica reads.
                    let deleted = sqlx::query(
                        "UPDATE applications SET name = '', token_hint = '', deleted_at = ?, updated_at = ?, \
                         client_token_key_id = NULL, client_token_key_rotated_at = ? \
                         WHERE id = ? AND deleted_at IS NULL",
                    )
                    .bind(now)
                    .bind(now)
                    .bind(now)
                    .bind(application_id as i64)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected()
                        > 0;
                    sqlx::query("DELETE FROM application_tokens WHERE application_id = ?")
                        .bind(application_id as i64)
                        .execute(&mut *transaction)
                        .await?;
                    // A deleted application's webhooks stop at once.
                    sqlx::query(
                        "DELETE FROM webhook_attempts WHERE endpoint_id IN \
                         (SELECT id FROM webhook_endpoints WHERE application_id = ?)",
                    )
                    .bind(application_id as i64)
                    .execute(&mut *transaction)
                    .await?;
                    sqlx::query("DELETE FROM webhook_endpoints WHERE application_id = ?")
                        .bind(application_id as i64)
                        .execute(&mut *transaction)
                        .await?;
                    transaction.commit().await?;
                    Ok::<_, sqlx::Error>(deleted)
                })
                .await
            }

            async fn purge_application(&self, application_id: u64) -> Result<u64, StorageError> {
                with_storage_errors(async {
                    let deleted: Option<i64> = sqlx::query_scalar(
                        "SELECT 1 FROM applications WHERE id = ? AND deleted_at IS NOT NULL",
                    )
                    .bind(application_id as i64)
                    .fetch_optional(&self.pool)
                    .await?;
                    if deleted.is_none() {
                        return Ok(0);
                    }
                    let mut purged = 0;
                    // Bounded statements, each its own transaction: no lock is held for long.
                    // The change log first (it refers to the chats); its rows are not counted.
                    let statements = [
                        (Self::PURGE_CHANGES, false),
                        (Self::PURGE_MESSAGES, true),
                        (Self::PURGE_CHATS, true),
                    ];
                    for (statement, counted) in statements {
                        loop {
                            let rows = sqlx::query(statement)
                                .bind(application_id as i64)
                                .bind(i64::from($crate::store::PURGE_ROWS_PER_STATEMENT))
                                .execute(&self.pool)
                                .await?
                                .rows_affected();
                            if counted {
                                purged += rows;
                            }
                            if rows < u64::from($crate::store::PURGE_ROWS_PER_STATEMENT) {
                                break;
                            }
                        }
                    }
                    sqlx::query("DELETE FROM number_reservations WHERE scope = ? OR scope LIKE ?")
                        .bind(format!("chats:{application_id}"))
                        .bind(format!("messages:{application_id}:%"))
                        .execute(&self.pool)
                        .await?;
                    Ok::<_, sqlx::Error>(purged)
                })
                .await
            }

            async fn applications_deleted_since(
                &self,
                since: DateTime<Utc>,
                limit: u32,
            ) -> Result<Vec<u64>, StorageError> {
                with_storage_errors(async {
                    let ids: Vec<u64> = sqlx::query_scalar(
                        "SELECT id FROM applications WHERE deleted_at >= ? ORDER BY deleted_at LIMIT ?",
                    )
                    .bind(since)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                    Ok::<_, sqlx::Error>(ids)
                })
                .await
            }

            async fn client_key(
                &self,
                application_id: u64,
            ) -> Result<Option<$crate::store::ClientKeyRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications WHERE id = ?",
                        $crate::store::CLIENT_KEY_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn ensure_client_key(
                &self,
                application_id: u64,
                first: &$crate::domain::ClientKeyId,
            ) -> Result<Option<$crate::store::ClientKeyRow>, StorageError> {
                with_storage_errors(async {
                    // Set only where none is: replicas minting at once agree on the first one.
                    sqlx::query(
                        "UPDATE applications SET client_token_key_id = ?, client_token_key_rotated_at = ? \
                         WHERE id = ? AND client_token_key_id IS NULL AND deleted_at IS NULL",
                    )
                    .bind(first.as_str())
                    .bind($crate::store::now())
                    .bind(application_id as i64)
                    .execute(&self.pool)
                    .await?;
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications WHERE id = ? AND deleted_at IS NULL",
                        $crate::store::CLIENT_KEY_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn rotate_client_key(
                &self,
                application_id: u64,
                key_id: &$crate::domain::ClientKeyId,
            ) -> Result<bool, StorageError> {
                with_storage_errors(async {
                    let rotated = sqlx::query(
                        "UPDATE applications SET client_token_key_id = ?, client_token_key_rotated_at = ? \
                         WHERE id = ? AND deleted_at IS NULL",
                    )
                    .bind(key_id.as_str())
                    .bind($crate::store::now())
                    .bind(application_id as i64)
                    .execute(&self.pool)
                    .await?;
                    Ok::<_, sqlx::Error>(rotated.rows_affected() > 0)
                })
                .await
            }

            async fn client_keys_changed_since(
                &self,
                since: DateTime<Utc>,
            ) -> Result<Vec<$crate::store::ClientKeyRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications WHERE client_token_key_rotated_at >= ?",
                        $crate::store::CLIENT_KEY_COLUMNS
                    )))
                    .bind(since)
                    .fetch_all(&self.pool)
                    .await
                })
                .await
            }

            async fn find_chat(
                &self,
                application_id: u64,
                number: Number,
            ) -> Result<Option<ChatRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM chats WHERE application_id = ? AND number = ?",
                        $crate::store::CHAT_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .bind(number.get() as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn list_chats(
                &self,
                application_id: u64,
                page: PageRequest,
            ) -> Result<Vec<ChatRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM chats WHERE application_id = ? \
                         AND number BETWEEN ? AND ? ORDER BY number {} LIMIT ? OFFSET ?",
                        $crate::store::CHAT_COLUMNS,
                        $crate::store::direction(page)
                    )))
                    .bind(application_id as i64)
                    .bind(page.key_bounds().0 as i64)
                    .bind(page.key_bounds().1 as i64)
                    .bind(page.fetch_limit() as i64)
                    .bind(page.offset() as i64)
                    .fetch_all(&self.pool)
                    .await
                })
                .await
            }

            async fn find_message(
                &self,
                application_id: u64,
                chat_number: Number,
                number: Number,
            ) -> Result<Option<MessageRow>, StorageError> {
                with_storage_errors(async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM messages m JOIN chats c ON c.id = m.chat_id \
                         WHERE c.application_id = ? AND c.number = ? AND m.number = ? AND m.deleted_at IS NULL",
                        $crate::store::MESSAGE_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64)
                    .bind(number.get() as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn message_deletion(
                &self,
                application_id: u64,
                chat_number: Number,
                number: Number,
            ) -> Result<Option<$crate::store::ChangeRow>, StorageError> {
                // The tombstone's change: the one of its version (one change per version).
                with_storage_errors(
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT mc.sequence, mc.kind, {} \
                         FROM messages m JOIN chats c ON c.id = m.chat_id \
                         JOIN message_changes mc ON mc.chat_id = m.chat_id \
                         AND mc.number = m.number AND mc.version = m.version \
                         WHERE c.application_id = ? AND c.number = ? AND m.number = ? \
                         AND m.deleted_at IS NOT NULL",
                        $crate::store::CHANGED_MESSAGE_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64)
                    .bind(number.get() as i64)
                    .fetch_optional(&self.pool),
                )
                .await
            }

            async fn list_messages(
                &self,
                application_id: u64,
                chat_number: Number,
                sender: Option<&Sender>,
                page: PageRequest,
            ) -> Result<Vec<MessageRow>, StorageError> {
                // A condition only when filtering: the (chat, sender, number) index serves it.
                let of_sender = if sender.is_some() { "AND m.sender = ?" } else { "" };
                let mut rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM messages m JOIN chats c ON c.id = m.chat_id \
                     WHERE c.application_id = ? AND c.number = ? {of_sender} \
                     AND m.number BETWEEN ? AND ? \
                     AND m.deleted_at IS NULL ORDER BY m.number {} LIMIT ? OFFSET ?",
                    $crate::store::MESSAGE_COLUMNS,
                    $crate::store::direction(page)
                )))
                .bind(application_id as i64)
                .bind(chat_number.get() as i64);
                if let Some(sender) = sender {
                    rows = rows.bind(sender.as_str());
                }
                with_storage_errors(
                    rows.bind(page.key_bounds().0 as i64)
                        .bind(page.key_bounds().1 as i64)
                        .bind(page.fetch_limit() as i64)
                        .bind(page.offset() as i64)
                        .fetch_all(&self.pool),
                )
                .await
            }

            async fn list_changes(
                &self,
                application_id: u64,
                chat_number: Number,
                selection: $crate::store::ChangeSelection,
                after: u64,
                limit: u32,
            ) -> Result<Vec<$crate::store::ChangeRow>, StorageError> {
                // The state at a sequence: a change no later change of its message up to that
                // sequence replaced, unless it deleted the message.
                let (up_to, state_only) = match selection {
                    $crate::store::ChangeSelection::Every => (i64::MAX, ""),
                    $crate::store::ChangeSelection::StateAt(as_of) => (
                        as_of as i64,
                        "AND mc.kind <> 'deleted' AND NOT EXISTS (SELECT 1 FROM message_changes later \
                         WHERE later.chat_id = mc.chat_id AND later.number = mc.number \
                         AND later.sequence > mc.sequence AND later.sequence <= ?)",
                    ),
                };
                let query = format!(
                    "SELECT mc.sequence, mc.kind, {} \
                     FROM message_changes mc JOIN chats c ON c.id = mc.chat_id \
                     WHERE c.application_id = ? AND c.number = ? AND mc.sequence > ? \
                     AND mc.sequence <= ? {state_only} ORDER BY mc.sequence LIMIT ?",
                    $crate::store::CHANGED_MESSAGE_COLUMNS
                );
                let mut rows = sqlx::query_as(sqlx::AssertSqlSafe(query))
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64)
                    .bind(after as i64)
                    .bind(up_to);
                if !state_only.is_empty() {
                    rows = rows.bind(up_to);
                }
                with_storage_errors(rows.bind(i64::from(limit)).fetch_all(&self.pool)).await
            }

            async fn list_application_changes(
                &self,
                application_id: u64,
                after: u64,
                limit: u32,
            ) -> Result<Vec<$crate::store::ApplicationChangeRow>, StorageError> {
                with_storage_errors(
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT mc.application_sequence, c.number AS chat_number, \
                         c.title AS chat_title, c.metadata AS chat_metadata, mc.sequence, mc.kind, {} \
                         FROM message_changes mc JOIN chats c ON c.id = mc.chat_id \
                         WHERE mc.application_id = ? AND mc.application_sequence > ? \
                         ORDER BY mc.application_sequence LIMIT ?",
                        $crate::store::CHANGED_MESSAGE_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .bind(after as i64)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool),
                )
                .await
            }

            async fn client_token_secret(&self, candidate: &str) -> Result<String, StorageError> {
                // The first replica's candidate stays; every other one reads it.
                sqlx::query(Self::INSERT_CLIENT_TOKEN_SECRET)
                    .bind(candidate)
                    .bind($crate::store::now())
                    .execute(&self.pool)
                    .await?;
                Ok(
                    sqlx::query_scalar("SELECT secret FROM client_token_secret WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?,
                )
            }

            async fn reserved_until(&self, scope: &str) -> Result<Option<u64>, StorageError> {
                with_storage_errors(sqlx::query_scalar("SELECT reserved_until FROM number_reservations WHERE scope = ?")
                    .bind(scope)
                    .fetch_optional(&self.pool))
                .await
            }

            async fn count_figures(
                &self,
                level: CountLevel,
                after_id: u64,
                limit: u32,
            ) -> Result<Vec<CountFigures>, StorageError> {
                with_storage_errors(sqlx::query_as(level.figures_query())
                    .bind(after_id as i64)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool))
                .await
            }

            async fn messages_to_index(
                &self,
                scope: ReindexScope,
                after: ReindexCursor,
                limit: u32,
            ) -> Result<Vec<MessageToIndex>, StorageError> {
                let (filter, scope_binds) = scope.filter();
                let query = format!(
                    "SELECT m.chat_id, c.application_id, c.number AS chat_number, m.number, m.body, \
                     m.version, m.created_at, m.sender, m.metadata, m.edited_at \
                     FROM messages m JOIN chats c ON c.id = m.chat_id \
                     WHERE (m.chat_id > ? OR (m.chat_id = ? AND m.number > ?)) AND {filter} \
                     ORDER BY m.chat_id, m.number LIMIT ?"
                );
                let mut rows = sqlx::query_as(sqlx::AssertSqlSafe(query))
                    .bind(after.chat_id as i64)
                    .bind(after.chat_id as i64)
                    .bind(after.number as i64);
                for bind in scope_binds {
                    rows = match bind {
                        ScopeBind::Id(id) => rows.bind(id as i64),
                        ScopeBind::Time(at) => rows.bind(at),
                    };
                }
                with_storage_errors(rows.bind(i64::from(limit)).fetch_all(&self.pool)).await
            }

            async fn recount(&self, level: CountLevel, id: u64) -> Result<u64, StorageError> {
                let (update, select) = level.recount_queries();
                let mut transaction = self.pool.begin().await?;
                sqlx::query(update)
                    .bind(id as i64)
                    .bind(id as i64)
                    .execute(&mut *transaction)
                    .await?;
                let count: u64 = sqlx::query_scalar(select)
                    .bind(id as i64)
                    .fetch_one(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                Ok(count)
            }

            $($dialect_methods)*
        }
    };
}
pub(super) use storage_impl;
