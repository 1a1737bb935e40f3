//! The SQLite file shared by the store and the queue: opening (WAL, busy
//! timeout, schema), a small connection pool, and running statements off the
//! async runtime's threads.

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Failure to open or use the database file.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open SQLite database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("SQLite statement failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error("SQLite worker thread failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("SQLite connection pool is poisoned")]
    Poisoned,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    key      TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    status   TEXT NOT NULL,
    record   TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    body          TEXT NOT NULL,
    sent_at       INTEGER NOT NULL,
    visible_at    INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_visible ON jobs (visible_at, id);
CREATE TABLE IF NOT EXISTS dead_jobs (
    id            INTEGER PRIMARY KEY,
    body          TEXT NOT NULL,
    sent_at       INTEGER NOT NULL,
    receive_count INTEGER NOT NULL,
    dead_at       INTEGER NOT NULL
);
";

const POOL_SIZE: usize = 4;

/// One SQLite database file and a pool of connections to it.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    pool: Vec<Mutex<Connection>>,
}

fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + NORMAL: a process crash never loses a committed transaction; a
    // power cut may lose the last few, never corrupts the file.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

impl Db {
    /// Opens (creating if needed) the database file and its schema.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let open_err = |source| DbError::Open { path: path.to_owned(), source };
        let first = connect(path).map_err(open_err)?;
        first.execute_batch(SCHEMA).map_err(open_err)?;
        let mut pool = vec![Mutex::new(first)];
        for _ in 1..POOL_SIZE {
            pool.push(Mutex::new(connect(path).map_err(open_err)?));
        }
        Ok(Db { inner: Arc::new(Inner { path: path.to_owned(), pool }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with a pooled connection on a blocking thread.
    pub async fn run<R, F>(&self, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, DbError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            for slot in &inner.pool {
                if let Ok(mut conn) = slot.try_lock() {
                    return f(&mut conn);
                }
            }
            let mut conn = inner.pool[0].lock().map_err(|_| DbError::Poisoned)?;
            f(&mut conn)
        })
        .await?
    }
}
