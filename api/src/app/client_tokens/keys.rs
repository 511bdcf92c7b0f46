//! Which key id is each application's current one, as this replica knows it, so that verifying a
//! client token needs no database round trip: read once per application, then kept current by
//! reading every replica's changes (revoke-all, deletion) every `CHAT_CLIENT_TOKEN_REVOCATION_POLL_MS`.
//! While those reads fail for [`STALE_AFTER_POLLS`] intervals, each check reads the database
//! instead: a revoked token is never accepted for longer than that.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chatcore::store::{ClientKeyRow, Storage, StorageError};
use chrono::{DateTime, SubsecRound as _, Utc};
use quick_cache::sync::Cache;
use tokio_util::sync::CancellationToken;

/// Applications whose key id a replica keeps (one forgotten is read again when needed).
const KNOWN_KEYS: usize = 100_000;
/// Polls missed before the replica stops trusting what it knows.
const STALE_AFTER_POLLS: u32 = 4;
/// How far back each read of the changes reaches before the previous read's start: a change is
/// stamped by the clock of the replica that made it and may commit a moment after its stamp.
const CHANGE_OVERLAP: Duration = Duration::from_secs(10);

/// A key id as this replica knows it (None: no client token is valid for the application).
#[derive(Clone)]
struct KnownKey {
    key_id: Option<String>,
    changed_at: Option<DateTime<Utc>>,
}

pub(super) struct KeyRegistry {
    storage: Arc<dyn Storage>,
    known: Cache<u64, KnownKey>,
    /// When the last successful read of the changes started.
    last_read: Mutex<Option<Instant>>,
    stale_after: Duration,
}

impl KeyRegistry {
    pub(super) fn new(storage: Arc<dyn Storage>, poll: Duration) -> Self {
        Self {
            storage,
            known: Cache::new(KNOWN_KEYS),
            last_read: Mutex::new(None),
            stale_after: poll * STALE_AFTER_POLLS,
        }
    }

    /// Whether the key id is the application's current one. A token of another key id issued
    /// after the last change this replica knows of may be of a key made since on another
    /// replica (not read here yet): the database decides; an older one is revoked, at no cost.
    pub(super) async fn is_current(
        &self,
        application_id: u64,
        key_id: &str,
        issued_at: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        if self.is_fresh()
            && let Some(known) = self.known.get(&application_id)
        {
            let maybe_newer = known
                .changed_at
                .is_none_or(|changed_at| issued_at >= changed_at.trunc_subsecs(0));
            if known.key_id.as_deref() == Some(key_id) || !maybe_newer {
                return Ok(known.key_id.as_deref() == Some(key_id));
            }
        }
        let row = self.storage.client_key(application_id).await?;
        let known = KnownKey {
            key_id: row.as_ref().and_then(|row| row.key_id.clone()),
            changed_at: row.and_then(|row| row.rotated_at),
        };
        self.known.insert(application_id, known.clone());
        Ok(known.key_id.as_deref() == Some(key_id))
    }

    /// Takes a key id read or written by this replica.
    pub(super) fn learn(&self, row: &ClientKeyRow) {
        let newer = self
            .known
            .get(&row.application_id)
            .is_none_or(|known| known.changed_at.is_none() || row.rotated_at >= known.changed_at);
        if newer {
            self.known.insert(
                row.application_id,
                KnownKey {
                    key_id: row.key_id.clone(),
                    changed_at: row.rotated_at,
                },
            );
        }
    }

    fn is_fresh(&self) -> bool {
        self.last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|started| started.elapsed() < self.stale_after)
    }

    /// Reads the changes of every replica every `poll` until `shutdown`.
    pub(super) fn follow_changes(
        self: &Arc<Self>,
        poll: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            let mut since = Utc::now() - CHANGE_OVERLAP;
            let mut interval = tokio::time::interval(poll);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let (started, started_at) = (Instant::now(), Utc::now());
                match registry.storage.client_keys_changed_since(since).await {
                    Ok(rows) => {
                        rows.iter().for_each(|row| registry.learn(row));
                        *registry
                            .last_read
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(started);
                        since = started_at - CHANGE_OVERLAP;
                        if failing {
                            tracing::info!("client token revocations are read again");
                            failing = false;
                        }
                    }
                    Err(error) if !failing => {
                        tracing::warn!(%error, "could not read the client token revocations; checking each client token in the database until this recovers");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
    }
}
