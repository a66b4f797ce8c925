//! Introspect lookups gathered into one statement.
//!
//! Introspect is the broker's most frequent call and its cheapest statement: a primary-key
//! read. Sent one per call, most of its cost is per statement, on both sides (a wake-up, a
//! round trip, the protocol's messages, the executor's start and end), not per row. So
//! concurrent lookups share statements: a call queues its token id, and when no statement is in
//! flight the queue goes at once as one `WHERE t.id = ANY($1)` ([`sql::LOAD_TOKENS`]) of at
//! most `max_ids` ids. Calls that arrive while one is in flight wait for it to answer, and the
//! next statement takes all of them. With `max_ids` 1 (`introspect_batch = 1`) nothing is
//! shared: every call sends its own statement at once.
//!
//! Nothing waits on a timer: an idle broker sends each lookup alone and at once, and a lookup
//! never waits longer than the statement before it. A statement that has not answered within
//! [`STALL`] (a lost connection, a blocked server) gives up its turn: the next one goes on
//! another connection while it keeps waiting for its own answer.
//!
//! Every statement is sent after each of its callers queued, so it reads the database as of a
//! moment after the call began: a revocation acknowledged before the call is seen.
//!
//! A statement runs in a task of its own, so a caller that gives up (its deadline passed, its
//! client went away) costs the others nothing. The statement gets the latest deadline among its
//! callers; each caller still stops waiting at its own.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, oneshot},
    time::Instant,
};
use tokio_postgres::Row;

use super::{Database, ID_COLUMN, deadline_passed, sql, token_row};
use crate::{
    model::{TokenId, deadline},
    store::{StoreError, StoreResult, embedded::TokenRow},
};

/// How long a statement keeps its turn before the next one may go without it.
pub(super) const STALL: Duration = Duration::from_millis(20);

/// The rows one statement answered, shared by its callers.
type Answer = Result<Arc<Vec<Row>>, Arc<StoreError>>;

/// The queue of lookups, and the turn to send the next statement.
pub(super) struct Lookups {
    queue: Mutex<Vec<Waiting>>,
    /// One permit: held by the statement in flight, until it answers or stalls.
    turn: Arc<Semaphore>,
    max_ids: usize,
    /// Statements sent and the ids they carried, since the store opened.
    statements: AtomicU64,
    ids: AtomicU64,
}

struct Waiting {
    id: String,
    deadline: Instant,
    answer: oneshot::Sender<Answer>,
}

impl Lookups {
    /// Statements of at most `max_ids` ids (at least 1).
    pub(super) fn new(max_ids: usize) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            turn: Arc::new(Semaphore::new(1)),
            max_ids: max_ids.max(1),
            statements: AtomicU64::new(0),
            ids: AtomicU64::new(0),
        }
    }

    /// Returns how many statements were sent and how many ids they carried, since the store
    /// opened.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.statements.load(Ordering::Relaxed),
            self.ids.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads the token `id` with its account, in a statement shared with concurrent lookups;
/// `Ok(None)` when no such token is stored.
pub(super) async fn load(
    db: &Arc<Database>,
    lookups: &Arc<Lookups>,
    id: &str,
) -> StoreResult<Option<(TokenId, TokenRow)>> {
    if lookups.max_ids == 1 {
        // Nothing to share: every call its own statement, as many at once as the pool allows.
        lookups.statements.fetch_add(1, Ordering::Relaxed);
        lookups.ids.fetch_add(1, Ordering::Relaxed);
        let rows = db.query(sql::LOAD_TOKENS, &[&[id].as_slice()]).await?;
        return find(&rows, id);
    }
    let deadline = Instant::now() + deadline::remaining().unwrap_or(db.default_timeout);
    let (answer, answered) = oneshot::channel();
    lookups.lock().push(Waiting {
        id: id.to_owned(),
        deadline,
        answer,
    });
    dispatch(db, lookups);
    let rows = match tokio::time::timeout_at(deadline, answered).await {
        Ok(Ok(Ok(rows))) => rows,
        Ok(Ok(Err(err))) => return Err(shared_error(&err)),
        // The statement's task ended without answering: the runtime is shutting down.
        Ok(Err(_)) => return Err(super::closed()),
        Err(_) => return Err(deadline_passed(1)),
    };
    find(&rows, id)
}

/// The row of token `id` among `rows`.
fn find(rows: &[Row], id: &str) -> StoreResult<Option<(TokenId, TokenRow)>> {
    rows.iter()
        .find(|row| {
            row.try_get::<_, &str>(ID_COLUMN)
                .is_ok_and(|found| found == id)
        })
        .map(token_row)
        .transpose()
}

/// Sends the queue as one statement if it is nobody else's turn.
fn dispatch(db: &Arc<Database>, lookups: &Arc<Lookups>) {
    loop {
        let Ok(turn) = Arc::clone(&lookups.turn).try_acquire_owned() else {
            // A statement is in flight: when it answers or stalls, it dispatches again.
            return;
        };
        let batch: Vec<Waiting> = {
            let mut queue = lookups.lock();
            let n = queue.len().min(lookups.max_ids);
            queue.drain(..n).collect()
        };
        if batch.is_empty() {
            drop(turn);
            // A lookup queued after the drain found the turn taken, and is left to this call.
            if lookups.lock().is_empty() {
                return;
            }
            continue;
        }
        let (db, lookups) = (Arc::clone(db), Arc::clone(lookups));
        tokio::spawn(async move {
            let statement = send(&db, &lookups, batch);
            tokio::pin!(statement);
            if tokio::time::timeout(STALL, &mut statement).await.is_err() {
                drop(turn);
                dispatch(&db, &lookups);
                statement.await;
            } else {
                drop(turn);
            }
            dispatch(&db, &lookups);
        });
        return;
    }
}

/// Runs one statement for `batch` and answers each of its callers.
async fn send(db: &Database, lookups: &Lookups, batch: Vec<Waiting>) {
    // Callers that stopped waiting need no row.
    let batch: Vec<Waiting> = batch
        .into_iter()
        .filter(|waiting| !waiting.answer.is_closed())
        .collect();
    let Some(deadline) = batch.iter().map(|waiting| waiting.deadline).max() else {
        return;
    };
    let mut ids: Vec<&str> = batch.iter().map(|waiting| waiting.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    lookups.statements.fetch_add(1, Ordering::Relaxed);
    lookups.ids.fetch_add(ids.len() as u64, Ordering::Relaxed);
    let answer: Answer = deadline::scope(deadline, db.query(sql::LOAD_TOKENS, &[&ids]))
        .await
        .map(Arc::new)
        .map_err(Arc::new);
    for waiting in batch {
        // A caller gone since needs no answer.
        let _ = waiting.answer.send(answer.clone());
    }
}

/// The error of a shared statement, for one of its callers: the same kind, and the message
/// followed by its causes (which belong to the statement's error).
fn shared_error(err: &StoreError) -> StoreError {
    let mut message = err.message.clone();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    StoreError::new(err.kind(), message, None)
}
