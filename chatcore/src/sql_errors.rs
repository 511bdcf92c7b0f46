//! Which SQL errors pass by themselves, for every part that keeps its data in MySQL or SQLite (the
//! storage, and the embedded queue, counters and search index).

/// MySQL / MariaDB errors that pass by themselves: the server is busy, restarting or switching
/// over, or this connection was killed.
const TRANSIENT_MYSQL_ERRORS: [u16; 10] = [
    1040, // ER_CON_COUNT_ERROR: too many connections
    1053, // ER_SERVER_SHUTDOWN: shutdown in progress
    1205, // ER_LOCK_WAIT_TIMEOUT
    1213, // ER_LOCK_DEADLOCK
    1290, // ER_OPTION_PREVENTS_STATEMENT: --read-only, during a switchover
    1317, // ER_QUERY_INTERRUPTED
    1836, // ER_READ_ONLY_MODE
    1927, // ER_CONNECTION_KILLED (MariaDB)
    2006, // CR_SERVER_GONE_ERROR
    2013, // CR_SERVER_LOST
];

/// Whether a database error is worth retrying (connection trouble, a server restarting or
/// read-only during a switchover, deadlock, lock wait timeout, a busy SQLite file).
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database_error) => {
            if let Some(mysql) =
                database_error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            {
                return TRANSIENT_MYSQL_ERRORS.contains(&mysql.number());
            }
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
            database_error
                .code()
                .and_then(|code| code.parse::<u32>().ok())
                .is_some_and(|code| matches!(code & 0xff, 5 | 6))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
