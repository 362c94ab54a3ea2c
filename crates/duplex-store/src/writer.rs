//! Group commit of the frequent small writes on SQLite: sessions' usage writes (every session's
//! heartbeat) and the records of session starts and ends.
//!
//! SQLite has one writer at a time, and a transaction costs far more than the few statements
//! of one usage write (taking the process's writer turn, a pool connection, `BEGIN IMMEDIATE`,
//! the commit). With 1,000 sessions that was the bottleneck: heartbeat writes queued for the
//! writer turn past their 10 s timeout. Here callers queue their write ([`Job`]) on a bounded
//! channel, and one task applies whatever is queued (up to [`MAX_BATCH`]) in one transaction,
//! then answers each caller on its own. A batch forms by itself under load (writes arrive
//! while the previous batch commits); an idle server writes batches of one.
//!
//! Failure isolation: an answer is sent only after the batch committed. If any write of the
//! batch fails (an unknown user, a duplicate session id, or the transaction itself: a full
//! disk), the batch is rolled back, nothing of it committed, and its writes are applied again
//! one by one, each in its own transaction, so one bad write fails only itself. Not a
//! savepoint per write: the writer is the one serialized path of the store, and each of its
//! statements is a round trip to SQLite's connection thread, which on a busy machine waits to
//! be scheduled; two more round trips per write (`SAVEPOINT`, `RELEASE`) for the rare failure
//! cost more than replaying a failed batch. Usage writes are exactly-once by their
//! `(session, seq)`, so applying one again after an unknown outcome never counts twice.
//!
//! PostgreSQL does not use this: many server processes share it, writers of different users do
//! not wait for each other there (row locks), and a batch would hold every row lock of its
//! users until its commit. Each write is its own transaction there (see `Store::write`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot};

use crate::{Result, StoreError, WriteOp, Written};

/// Writes applied in one transaction at most. A usage write is four statements, so a full
/// batch holds SQLite's write lock for about 500 statements: bounded, so that the writers of
/// other processes and the transactions of [`crate::Store::begin`] (which wait for the same
/// turn between batches) are not held off for long, while 1,000 sessions' heartbeats (200
/// writes a second) need only a few transactions a second. Not measured against other
/// bounds.
pub const MAX_BATCH: usize = 128;

/// Writes queued at most; a caller beyond that waits for room (within its own timeout, e.g.
/// the session's `STORE_TIMEOUT`). Every session has at most one usage write in flight plus
/// its final one, and one start or end record, so at the server's default connection limit
/// (1,000) the queue never fills unless the disk stops.
pub const QUEUE_CAPACITY: usize = 4096;

/// One queued write and where its answer goes.
pub(crate) struct Job {
    pub op: WriteOp,
    pub reply: oneshot::Sender<Result<Written>>,
}

/// How many batches and writes the writer committed (for tests and operators).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    batches: AtomicU64,
    writes: AtomicU64,
    largest: AtomicU64,
}

/// Figures of the group-commit writer since the store was opened: `batches` transactions held
/// `writes` writes, the largest `largest`. All zero on PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub batches: u64,
    pub writes: u64,
    pub largest: u64,
}

impl Counters {
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            largest: self.largest.load(Ordering::Relaxed),
        }
    }

    fn batch(&self, writes: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        self.largest.fetch_max(writes as u64, Ordering::Relaxed);
    }
}

/// The handle every clone of a SQLite store shares: the queue's sending side, started on
/// first use in the runtime of the caller, and started again if that runtime has gone (a
/// store used from one test runtime and then another).
#[derive(Default)]
pub(crate) struct Writer {
    queue: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    pub counters: Arc<Counters>,
}

impl Writer {
    /// Queues `op` and waits for its answer.
    pub async fn write(
        &self,
        pool: &AnyPool,
        turn: &Arc<tokio::sync::Mutex<()>>,
        op: WriteOp,
    ) -> Result<Written> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue(pool, turn);
        queue
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Writer("the writer task has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Writer("the writer task dropped the write".into()))?
    }

    fn queue(&self, pool: &AnyPool, turn: &Arc<tokio::sync::Mutex<()>>) -> mpsc::Sender<Job> {
        let mut queue = self
            .queue
            .lock()
            .expect("writer queue lock is never poisoned");
        if let Some(q) = queue.as_ref().filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(pool.clone(), turn.clone(), self.counters.clone(), rx));
        *queue = Some(tx.clone());
        tx
    }
}

/// The writer task: takes what is queued, applies it as one batch, answers, repeats. Ends when
/// every store handle is gone (the queue closes).
async fn run(
    pool: AnyPool,
    turn: Arc<tokio::sync::Mutex<()>>,
    counters: Arc<Counters>,
    mut queue: mpsc::Receiver<Job>,
) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        // A usage write whose caller stopped waiting (its timeout) is not applied: the meter
        // sends it again, unchanged, with its next write (or the server's usage backlog
        // does), so skipping it loses nothing and spares an overloaded store the work. Start
        // and end records are applied even so: no one sends those again.
        jobs.retain(|j| !(j.reply.is_closed() && matches!(j.op, WriteOp::Usage(_))));
        if jobs.is_empty() {
            continue;
        }
        let _turn = turn.lock().await;
        let answers = match apply_batch(&pool, &jobs).await {
            Ok(answers) => {
                counters.batch(jobs.len());
                answers
            }
            Err(e) => {
                tracing::warn!(error = %e, writes = jobs.len(), "a batch of writes failed; applying them one by one");
                let mut answers = Vec::with_capacity(jobs.len());
                for job in &jobs {
                    let answer = apply_alone(&pool, &job.op).await;
                    if answer.is_ok() {
                        counters.batch(1);
                    }
                    answers.push(answer);
                }
                answers
            }
        };
        for (job, answer) in jobs.drain(..).zip(answers) {
            let _ = job.reply.send(answer);
        }
    }
}

/// Applies `jobs` in one transaction: one answer per job once the transaction committed;
/// `Err` when any write or the transaction failed, and then nothing of it was committed.
async fn apply_batch(pool: &AnyPool, jobs: &[Job]) -> Result<Vec<Result<Written>>> {
    let ops: Vec<&WriteOp> = jobs.iter().map(|j| &j.op).collect();
    Ok(transaction(pool, &ops).await?.into_iter().map(Ok).collect())
}

/// Applies one write in its own transaction (after its batch failed as a whole).
async fn apply_alone(pool: &AnyPool, op: &WriteOp) -> Result<Written> {
    let mut written = transaction(pool, &[op]).await?;
    Ok(written.pop().expect("one write, one answer"))
}

/// Applies `ops` in one transaction on a connection of its own; on any error nothing of it is
/// committed and the connection is discarded.
async fn transaction(pool: &AnyPool, ops: &[&WriteOp]) -> Result<Vec<Written>> {
    let mut conn = pool.acquire().await?;
    let applied = async {
        begin(&mut conn).await?;
        let mut written = Vec::with_capacity(ops.len());
        for op in ops {
            written.push(crate::apply(&mut conn, op).await?);
        }
        sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
        Ok(written)
    }
    .await;
    if applied.is_err() {
        discard(conn).await;
    }
    applied
}

/// The writer's transactions are plain statements rather than sqlx's `Transaction`: after an
/// error that makes SQLite roll the whole transaction back by itself (a full disk, an I/O
/// error, a trigger's `RAISE(ROLLBACK)`), sqlx would still count the connection as inside a
/// transaction and refuse the next `BEGIN` on it (measured: `InvalidSavePointStatement` for an
/// innocent write of the retry).
async fn begin(conn: &mut AnyConnection) -> Result<()> {
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    Ok(())
}

/// After a failed transaction: rolls back what may still be open (an error if SQLite already
/// did, ignored), and closes the connection instead of returning it to the pool, since after
/// an error of the database itself its state is not to be trusted.
async fn discard(mut conn: PoolConnection<Any>) {
    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    let _ = conn.close().await;
}
