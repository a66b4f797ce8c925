//! The writer thread: group commit of queued operations, a savepoint per operation on a
//! failed batch, paced cleanup of expired tokens, and WAL checkpoints.

use std::{
    path::Path,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::super::{StoreError, StoreErrorKind, StoreResult, metrics::WriterQueueMetrics};
use super::{Durability, classify, sql_error};
use crate::{model::UnixMicros, model::clock::MonotonicClock};

pub(super) struct Op<T, F> {
    pub(super) op: F,
    pub(super) result: Option<rusqlite::Result<T>>,
    pub(super) reply: oneshot::Sender<StoreResult<T>>,
    /// The caller's deadline, if it has one.
    pub(super) deadline: Option<Instant>,
}

impl<T, F> WriteOp for Op<T, F>
where
    T: Send,
    F: FnMut(&Connection, UnixMicros) -> rusqlite::Result<T> + Send,
{
    fn run(&mut self, conn: &Connection, now: UnixMicros) -> bool {
        let result = (self.op)(conn, now);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn abandoned(&self, now: Instant) -> bool {
        self.reply.is_closed() || self.deadline.is_some_and(|deadline| now >= deadline)
    }

    fn abandon(self: Box<Self>) {
        let _ = self.reply.send(Err(StoreError::new(
            StoreErrorKind::Timeout,
            "the call's deadline passed before its write ran",
            None,
        )));
    }

    fn finish(self: Box<Self>, failure: Option<&rusqlite::Error>) {
        let answer = match (failure, self.result) {
            (Some(err), _) => Err(StoreError::new(
                classify(err),
                format!("commit failed: {err}"),
                None,
            )),
            (None, Some(result)) => result.map_err(sql_error),
            (None, None) => Err(StoreError::new(
                StoreErrorKind::Internal,
                "write was never run",
                None,
            )),
        };
        // The caller may have given up (deadline); its write is committed all the same.
        let _ = self.reply.send(answer);
    }
}

pub(super) enum Job {
    Write(Box<dyn WriteOp>),
    Close(oneshot::Sender<StoreResult<()>>),
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) jobs: mpsc::Receiver<Job>,
    /// Counts the jobs waiting in `jobs` and the writes dropped unrun.
    pub(super) queue: Arc<WriterQueueMetrics>,
    /// Stamps strictly increase, across restarts too (the clock starts at the latest time
    /// stored), so "issued before the watermark" and "issued after it" never tie, and a wall
    /// clock stepped back cannot stamp a token before a watermark already written.
    pub(super) clock: Arc<MonotonicClock>,
    pub(super) cleanup_interval: Duration,
    /// Where the cleanup pass under way continues: after this token id. `None` between passes.
    pub(super) cleanup_after: Option<String>,
    /// Dropped with the writer, which stops the checkpoint thread.
    pub(super) _stop_checkpoints: mpsc::Sender<()>,
}

impl Writer {
    pub(super) fn run(mut self) {
        let mut next_cleanup = Instant::now() + self.cleanup_interval;
        loop {
            // Checked before waiting for writes, not only when none arrive: under sustained
            // load the queue is never empty, and expired tokens must still be collected.
            if Instant::now() >= next_cleanup {
                let started = Instant::now();
                let more = self.collect_expired();
                next_cleanup = Instant::now()
                    + if more {
                        CLEANUP_PAUSE.max(started.elapsed() * CLEANUP_PAUSE_FACTOR)
                    } else {
                        self.cleanup_interval
                    };
            }
            let wait = next_cleanup.saturating_duration_since(Instant::now());
            let first = match self.jobs.recv_timeout(wait) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = Vec::with_capacity(16);
            let mut close = None;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                self.queue.length.get(()).dec();
                match job {
                    // A write whose caller has given up (its deadline passed, or it went
                    // away) is dropped unrun: nobody will see its answer, and under a flood
                    // that timed out in the queue, running it would only make the queue
                    // longer for the callers still waiting.
                    Job::Write(op) if op.abandoned(Instant::now()) => {
                        self.queue.abandoned.get(()).inc();
                        op.abandon();
                    }
                    Job::Write(op) => batch.push(op),
                    Job::Close(reply) => close = Some(reply),
                }
                if close.is_none() && batch.len() < MAX_BATCH {
                    next = self.jobs.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            if let Some(reply) = close {
                let result = self
                    .conn
                    .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                    .map_err(sql_error);
                info!("embedded store closed");
                let _ = reply.send(result);
                return;
            }
        }
    }

    pub(super) fn stamp(&self) -> UnixMicros {
        self.clock.stamp()
    }

    /// Runs a batch in one transaction.
    ///
    /// The operations first run back to back with nothing between them. A savepoint per
    /// operation would let one failed operation roll back alone, but it copies every page the
    /// operation touches into the savepoint journal, and a batch's operations touch the same
    /// few B-tree pages over and over: that copying cost more than the inserts. Operations
    /// fail only on SQLite errors, so when one does, the transaction is rolled back and the
    /// batch runs again, each operation in its own savepoint, so that the others still commit.
    pub(super) fn commit(&mut self, mut batch: Vec<Box<dyn WriteOp>>) {
        let outcome = self.run_batch(&mut batch, false).and_then(|all_ok| {
            if all_ok {
                return self.exec("COMMIT");
            }
            self.exec("ROLLBACK")?;
            if batch.len() == 1 {
                // Its own error is its answer; nothing else was in the transaction.
                return Ok(());
            }
            warn!(
                operations = batch.len(),
                "a write in the batch failed; running the batch again with savepoints"
            );
            self.run_batch(&mut batch, true)?;
            self.exec("COMMIT")
        });
        if let Err(err) = &outcome {
            error!(error = %err, "write transaction failed");
            let _ = self.exec("ROLLBACK");
        }
        let failure = outcome.as_ref().err();
        batch.into_iter().for_each(|op| op.finish(failure));
    }

    /// Begins a transaction and runs the operations of `batch` in it, each in its own
    /// savepoint if `savepoints`. Without savepoints it stops at the first failed operation and
    /// returns `false`; the caller then rolls the transaction back. With them, a failed
    /// operation's changes are undone and the others run on.
    pub(super) fn run_batch(
        &mut self,
        batch: &mut [Box<dyn WriteOp>],
        savepoints: bool,
    ) -> rusqlite::Result<bool> {
        self.exec("BEGIN IMMEDIATE")?;
        for op in batch.iter_mut() {
            let now = self.stamp();
            if !savepoints {
                if !op.run(&self.conn, now) {
                    return Ok(false);
                }
                continue;
            }
            self.exec("SAVEPOINT op")?;
            if !op.run(&self.conn, now) {
                self.exec("ROLLBACK TO op")?;
            }
            self.exec("RELEASE op")?;
        }
        Ok(true)
    }

    /// Runs a statement without parameters through the statement cache: the writer runs the
    /// same few transaction statements thousands of times a second.
    pub(super) fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Runs one step of a cleanup pass: deletes the expired tokens among the next
    /// [`CLEANUP_WINDOW`] tokens in id order. Returns whether the pass goes on (the table has
    /// tokens past this window).
    ///
    /// A pass walks the whole table rather than an index on expiry: keeping such an index cost
    /// every sign-in two more B-tree insertion points. Token ids begin with their issue time, so
    /// the oldest tokens, the likeliest to have expired, come first. A failed step is logged and
    /// ends the pass; the next one starts after `cleanup_interval`.
    pub(super) fn collect_expired(&mut self) -> bool {
        let now = self.stamp();
        let after = self.cleanup_after.take().unwrap_or_default();
        let step = || -> rusqlite::Result<(usize, Option<String>)> {
            // The window's last id; none when fewer tokens than a window remain.
            let last: Option<String> = self
                .conn
                .prepare_cached(
                    "SELECT id FROM tokens WHERE id > ?1 ORDER BY id LIMIT 1 OFFSET ?2",
                )?
                .query_row(params![after, CLEANUP_WINDOW - 1], |r| r.get(0))
                .optional()?;
            let deleted = self
                .conn
                .prepare_cached(
                    "DELETE FROM tokens WHERE id > ?1 AND (?2 IS NULL OR id <= ?2) \
                     AND expires_at <= ?3",
                )?
                .execute(params![after, last, now.0])?;
            Ok((deleted, last))
        };
        match step() {
            Ok((deleted, last)) => {
                if deleted > 0 {
                    debug!(deleted, "expired tokens collected");
                }
                self.cleanup_after = last;
                self.cleanup_after.is_some()
            }
            Err(err) => {
                warn!(error = %err, "expired token cleanup failed");
                false
            }
        }
    }
}

pub(super) fn open_writer(path: &Path, durability: Durability) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(sql_error)?;
    conn.set_prepared_statement_cache_capacity(64);
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    // Savepoint journals stay in memory (no temp file per batch).
    //
    // The writer's page cache is 8 MiB, not more. At every commit SQLite drops cached pages
    // past the end of the database, and a B-tree split briefly renumbers a page to the lock
    // page (page 262145 at 4 KiB), so that drop scans the cache's whole hash table: with a
    // 64 MiB cache that scan was a tenth of the broker's CPU under sign-in load. The pages a
    // sign-in touches (the right edges of the id-ordered indexes, one leaf of the email index)
    // stay cached either way, and the OS page cache holds the rest.
    //
    // Checkpoints mostly run on their own thread (see `Checkpointer`). The writer still
    // checkpoints once the WAL reaches 16000 pages (64 MiB), which finds little left to copy
    // and, being the writer, lets the WAL start over at its next commit. Without that the WAL
    // never resets under sustained writes (a background checkpoint cannot finish between two
    // commits) and grows without bound. At 4000 pages the writer checkpointed several times
    // a second under sign-in load, every caller in the batch waiting on it, and sign-ins were
    // measurably slower.
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
         PRAGMA busy_timeout = 5000; PRAGMA temp_store = MEMORY; \
         PRAGMA cache_size = -8192; PRAGMA wal_autocheckpoint = 16000;"
    ))
    .map_err(sql_error)?;
    Ok(conn)
}

/// Most operations committed in one transaction.
pub(super) const MAX_BATCH: usize = 512;
/// Most tokens one cleanup step looks at (and so deletes), so cleanup never holds the writer
/// for long.
pub(super) const CLEANUP_WINDOW: i64 = 2000;
/// While a cleanup pass is under way, the writer serves writes for at least this long between
/// two steps...
pub(super) const CLEANUP_PAUSE: Duration = Duration::from_millis(25);
/// ...and for at least this many times as long as the last step took, so a pass over a large
/// store takes at most 1/(1 + this) of the writer's time, and of a core (measured: an idle
/// broker holding a million tokens used 0.9% of a core). Expired tokens stay on disk that much
/// longer; they are inactive either way.
pub(super) const CLEANUP_PAUSE_FACTOR: u32 = 99;

/// A queued write.
pub(super) trait WriteOp: Send {
    /// Runs the operation inside the current transaction; returns whether it succeeded. A
    /// write may run again after its transaction was rolled back (see [`Writer::commit`]); the
    /// last run's result is the answer.
    fn run(&mut self, conn: &Connection, now: UnixMicros) -> bool;
    /// Whether the caller has given up on the answer, at `now`.
    fn abandoned(&self, now: Instant) -> bool;
    /// Answers a write that was dropped unrun.
    fn abandon(self: Box<Self>);
    /// Sends the reply once the transaction's fate is known.
    fn finish(self: Box<Self>, failure: Option<&rusqlite::Error>);
}

/// How often the checkpointer copies the WAL back into the database.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// Runs passive checkpoints on a connection of its own until its stop channel closes. A
/// passive checkpoint never blocks the writer or readers; it copies what it can.
pub(super) struct Checkpointer {
    pub(super) conn: Connection,
    pub(super) stop: mpsc::Receiver<()>,
}

impl Checkpointer {
    pub(super) fn run(self) {
        while let Err(mpsc::RecvTimeoutError::Timeout) = self.stop.recv_timeout(CHECKPOINT_INTERVAL)
        {
            if let Err(err) = self.conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
                warn!(error = %err, "wal checkpoint failed");
            }
        }
    }
}
