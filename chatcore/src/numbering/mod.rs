//! Per-parent sequential numbers: a fast counter hands them out ([`SharedState`]: Redis, or memory
//! in the embedded process), the database makes sure none is ever reused ([`Storage`]: MySQL or
//! SQLite). The protocol below is the same for every pair of adapters.
//!
//! Each scope (the chats of one application, the messages of one chat) has one counter with
//! `next` (last number handed out), `ceiling` (highest number durably reserved) and `epoch`. A
//! number is handed out only when it is at most a ceiling that the database has committed in the
//! `number_reservations` row of the scope, under the same epoch.
//!
//! When the counter is lost (Redis FLUSHALL or restart without persistence, a restart of the
//! embedded process, kill -9 included), the next caller *seeds* it: in one transaction it bumps the
//! epoch and reserves a fresh block above everything ever reserved, then installs that block as the
//! counter. Bumping the epoch makes every extension still in flight from the old counter fail, so
//! the old and the new counter can never hand out the same number. Numbers may skip (the rest of a
//! block is lost with the counter); they are never reused.
//!
//! A counter set back in place (a key-level restore: same server, same epoch) would hand out its
//! recent numbers again. Each process remembers what it handed out lately ([`handed_out`]) and,
//! meeting a number again, raises the counter above it instead of handing it out; numbers handed
//! out twice across replicas are caught by the ingest-worker, which raises the counter too.

mod handed_out;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::domain::Number;
pub use crate::domain::Scope;
use crate::retry::{self, Backoff, Stopped, Transient};
use crate::state::{Counter, SharedState, StateError};
use crate::store::{Storage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum AllocationError {
    #[error("counter: {0}")]
    State(#[from] StateError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("number allocation kept racing with a concurrent reseed")]
    Contended,
    #[error("the numbers of this scope are exhausted")]
    Exhausted,
    #[error("a reservation stopped before its end: {0}")]
    ReservationFailed(String),
}

impl Transient for AllocationError {
    fn is_transient(&self) -> bool {
        match self {
            Self::State(error) => error.is_transient(),
            Self::Storage(error) => error.is_transient(),
            Self::Contended => true,
            Self::Exhausted | Self::ReservationFailed(_) => false,
        }
    }
}

/// Rounds of one allocation at most, and the pause between them: long enough in total (about
/// 0.7 s) for a dropped Redis connection to come back.
const MAX_ROUNDS: u32 = 8;
const ROUND_BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));

#[derive(Clone)]
pub struct NumberAllocator {
    counters: Arc<dyn SharedState>,
    reservations: Arc<dyn Storage>,
    key_prefix: String,
    block_size: u64,
    reservation_locks: Arc<[tokio::sync::Mutex<()>]>,
    handed_out: Arc<handed_out::HandedOut>,
    /// Allocations are never cut short by shutdown: a request in flight finishes.
    never_cancelled: CancellationToken,
}

/// How long a replica that died while seeding a counter keeps the others from seeding it.
const SEEDING_LEASE: Duration = Duration::from_secs(5);
const SEEDING_POLL: Duration = Duration::from_millis(10);

/// Stripes of the per-scope reservation lock.
const RESERVATION_LOCK_STRIPES: usize = 256;

fn number(value: u64) -> Result<Number, AllocationError> {
    Number::new(value).ok_or(AllocationError::Exhausted)
}

impl NumberAllocator {
    pub fn new(
        counters: Arc<dyn SharedState>,
        reservations: Arc<dyn Storage>,
        key_prefix: &str,
        block_size: u64,
    ) -> Self {
        Self {
            counters,
            reservations,
            key_prefix: key_prefix.to_owned(),
            block_size,
            reservation_locks: (0..RESERVATION_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            handed_out: Arc::new(handed_out::HandedOut::new()),
            never_cancelled: CancellationToken::new(),
        }
    }

    fn key(&self, scope: &Scope) -> String {
        format!("{}:numbers:{}", self.key_prefix, scope.id())
    }

    /// Hands out the next number of the scope; never one handed out before. A round that races
    /// with a reservation of another replica, or meets a dropped counter connection (a Redis
    /// restart: it reconnects in the background), is tried again a moment later.
    #[tracing::instrument(name = "allocate number", skip_all, fields(otel.kind = "client", scope = %scope.id()))]
    pub async fn allocate(&self, scope: &Scope) -> Result<Number, AllocationError> {
        let key = self.key(scope);
        let allocated = retry::retry(
            ROUND_BACKOFF,
            &self.never_cancelled,
            || self.allocate_round(scope, &key),
            |error, round, _| {
                let again = round < MAX_ROUNDS && error.is_transient();
                if again {
                    tracing::debug!(%error, round, "number allocation round failed, retrying");
                }
                again
            },
        )
        .await;
        allocated.map_err(|stopped| match stopped {
            Stopped::GaveUp(error) => error,
            Stopped::Interrupted => AllocationError::Contended,
        })
    }

    /// One round: increments the counter, extending the reservation or seeding the counter when
    /// due. `Contended` when another reservation got in the way, or when the counter handed out a
    /// number again (after raising it).
    async fn allocate_round(&self, scope: &Scope, key: &str) -> Result<Number, AllocationError> {
        let mut seeded = false;
        loop {
            let counter = self.counters.increment(key).await?;
            if let Some(Counter { next, .. }) = counter
                && let Err(highest) = self.handed_out.record(scope, next)
            {
                tracing::warn!(
                    scope = %scope.id(),
                    number = next,
                    highest,
                    "number counter went back in time: raised above the numbers handed out here"
                );
                self.counters
                    .raise_next(&[(key.to_owned(), highest)])
                    .await?;
                return Err(AllocationError::Contended);
            }
            match counter {
                Some(Counter {
                    next,
                    ceiling,
                    epoch,
                }) if next <= ceiling => {
                    if ceiling - next == self.block_size / 2 {
                        self.reserve_ahead(scope, key, ceiling, epoch);
                    }
                    return number(next);
                }
                Some(Counter { next, epoch, .. }) => {
                    let (allocator, scope, key) = (self.clone(), *scope, key.to_owned());
                    let extended = detached(async move {
                        allocator.extend_serialized(&scope, &key, next, epoch).await
                    });
                    return if extended.await? {
                        number(next)
                    } else {
                        Err(AllocationError::Contended)
                    };
                }
                None if !seeded => {
                    let (allocator, scope, key) = (self.clone(), *scope, key.to_owned());
                    detached(async move { allocator.seed_serialized(&scope, &key).await }).await?;
                    seeded = true;
                }
                None => return Err(AllocationError::Contended),
            }
        }
    }

    /// Reserves the block after `ceiling` in the background, half a block before the counter
    /// reaches it, so that no request waits for a reservation while the scope is busy. Exactly
    /// one request sees each half-way number (the counter hands every number out once). If the
    /// reservation is slow or fails, a request past the ceiling makes it as before.
    fn reserve_ahead(&self, scope: &Scope, key: &str, ceiling: u64, epoch: u64) {
        let (allocator, scope, key) = (self.clone(), *scope, key.to_owned());
        tokio::spawn(async move {
            if let Err(error) = allocator
                .extend_serialized(&scope, &key, ceiling + 1, epoch)
                .await
            {
                tracing::debug!(%error, scope = %scope.id(), "reserving numbers ahead failed");
            }
        });
    }

    /// The stripe lock of a scope: reservations of one scope run one at a time in this process,
    /// so a burst of requests on a fresh or exhausted scope makes one reservation, not hundreds.
    fn reservation_lock(&self, scope: &Scope) -> &tokio::sync::Mutex<()> {
        &self.reservation_locks[scope.stripe(self.reservation_locks.len())]
    }

    async fn seed_serialized(&self, scope: &Scope, key: &str) -> Result<(), AllocationError> {
        let _serialized = self.reservation_lock(scope).lock().await;
        // Replicas seeding one scope at once would each reserve a fresh block, and the newest
        // epoch's counter would replace the one whose first numbers were already handed out: a
        // whole block skipped. One replica seeds under a lease; the others wait for its counter.
        let seeding = format!("{key}:seeding");
        let deadline = tokio::time::Instant::now() + SEEDING_LEASE;
        loop {
            if self.counters.counter(key).await?.is_some() {
                // Seeded by a request that held a lock before us.
                return Ok(());
            }
            if self
                .counters
                .set_if_absent(&seeding, "1", SEEDING_LEASE)
                .await?
            {
                // Seeded by a replica whose lease ended after our first look: the lease is
                // released only once the counter is there.
                let seeded = match self.counters.counter(key).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => self.seed(scope, key).await,
                    Err(error) => Err(error.into()),
                };
                if let Err(error) = self.counters.delete(&seeding).await {
                    tracing::debug!(%error, scope = %scope.id(), "seeding lease left to expire");
                }
                return seeded;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AllocationError::Contended);
            }
            tokio::time::sleep(SEEDING_POLL).await;
        }
    }

    /// Returns true when `number` is now covered by a reservation of `epoch`.
    async fn extend_serialized(
        &self,
        scope: &Scope,
        key: &str,
        number: u64,
        epoch: u64,
    ) -> Result<bool, AllocationError> {
        let _serialized = self.reservation_lock(scope).lock().await;
        if let Some(current) = self.counters.counter(key).await?
            && current.epoch == epoch
            && number <= current.ceiling
        {
            // Extended by a request that held the lock before us.
            return Ok(true);
        }
        self.extend(scope, key, number, epoch).await
    }

    /// The highest number that may have been handed out in the scope (an upper bound).
    pub async fn handed_out_up_to(&self, scope: &Scope) -> Result<u64, AllocationError> {
        if let Some(counter) = self.counters.counter(&self.key(scope)).await? {
            return Ok(counter.next);
        }
        Ok(self
            .reservations
            .reserved_until(&scope.id())
            .await?
            .unwrap_or(0))
    }

    /// Makes sure no scope will hand out its number, or anything below it, again: raises the
    /// reservations and the counters that are behind. Returns the scopes that were behind.
    pub async fn ensure_beyond(
        &self,
        highest: &[(Scope, u64)],
    ) -> Result<Vec<Scope>, AllocationError> {
        let by_scope: Vec<(String, u64)> = highest
            .iter()
            .map(|(scope, number)| (scope.id(), *number))
            .collect();
        let behind_in_database = self.reservations.raise_reservations(&by_scope).await?;
        let by_key: Vec<(String, u64)> = highest
            .iter()
            .map(|(scope, number)| (self.key(scope), *number))
            .collect();
        let raised = self.counters.raise_next(&by_key).await?;
        Ok(highest
            .iter()
            .zip(&by_scope)
            .zip(raised)
            .filter(|((_, (id, _)), raised)| *raised || behind_in_database.contains(id))
            .map(|(((scope, _), _), _)| *scope)
            .collect())
    }

    /// Reserves a fresh block above every earlier reservation, under a new epoch, and installs it.
    async fn seed(&self, scope: &Scope, key: &str) -> Result<(), AllocationError> {
        let reserved = self
            .reservations
            .reserve_fresh_block(&scope.id(), self.block_size)
            .await?;
        let start = reserved.reserved_until - self.block_size;
        self.counters
            .seed(
                key,
                Counter {
                    next: start,
                    ceiling: reserved.reserved_until,
                    epoch: reserved.epoch,
                },
            )
            .await?;
        tracing::info!(scope = %scope.id(), epoch = reserved.epoch, start, "seeded number counter");
        Ok(())
    }

    /// Durably reserves a block that covers `number`, if the epoch is still current.
    async fn extend(
        &self,
        scope: &Scope,
        key: &str,
        number: u64,
        epoch: u64,
    ) -> Result<bool, AllocationError> {
        let Some(ceiling) = self
            .reservations
            .extend_reservation(&scope.id(), number, epoch, self.block_size)
            .await?
        else {
            return Ok(false);
        };
        self.counters.raise_ceiling(key, ceiling, epoch).await?;
        Ok(true)
    }
}

/// Runs a reservation (the storage's record, then the counter's seed or ceiling) in a task of its
/// own, so that it finishes even when the request waiting for it is cancelled (its timeout):
/// cut off between the two writes, it would leave the block reserved and the counter behind it,
/// and the next allocation would skip the whole block.
async fn detached<T: Send + 'static>(
    reservation: impl Future<Output = Result<T, AllocationError>> + Send + 'static,
) -> Result<T, AllocationError> {
    tokio::spawn(reservation.in_current_span())
        .await
        .unwrap_or_else(|error| Err(AllocationError::ReservationFailed(error.to_string())))
}
