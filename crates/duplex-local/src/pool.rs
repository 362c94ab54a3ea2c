//! A pool of engine instances shared by every session: Whisper models (clones sharing the
//! weights) or Piper sessions. A job waits in a FIFO for an idle instance, then runs on tokio's
//! blocking pool with the instance to itself, so that two sessions' jobs run at once on two
//! instances and nothing is locked across a whole inference.
//!
//! - **Cancellation.** Dropping a job's future before it got an instance removes it from the
//!   queue: it never starts. Dropping it while it runs raises its [`Cancel`] flag, which the
//!   engine reads at each step (a Whisper decoder token); the instance comes back after that
//!   step.
//! - **Panics.** A panic inside a job is caught: that job fails with [`Error::Panicked`], the
//!   instance goes back to the pool (engines reset their state at the start of a job) and no
//!   lock is held across the job, so nothing is poisoned.
//! - **Bound.** At most `max_waiting` jobs wait. When the queue is full, the oldest waiting
//!   *speculative* job is dropped (its result would only have saved time); a final job is
//!   never refused, so the bound can be exceeded by finals only, and those are at most one
//!   per session.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::Error;
use crate::observe::{Engine, Observer};

/// How urgent a job is. A job waits behind the queued jobs of its own or a higher priority
/// and ahead of those of a lower one, so first audio comes first: a session's first sentence
/// is not held up by another session's third.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Someone waits and has heard nothing of the answer yet (its first sentence).
    First,
    /// Someone waits for this result (a final transcript, a later sentence).
    Needed,
    /// May be dropped when the queue is full (a speculative transcript).
    Speculative,
}

impl Priority {
    fn rank(self) -> u8 {
        match self {
            Priority::First => 0,
            Priority::Needed => 1,
            Priority::Speculative => 2,
        }
    }
}

/// Raised when the job's caller went away; engines read it between steps.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Raises the flag when the job's future is dropped (also after the job ended: harmless).
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.0.store(true, Ordering::Relaxed);
    }
}

/// Counters of one pool, for tests and gauges.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Jobs that ran (started on an instance), since the start.
    pub started: AtomicU64,
    /// Speculative jobs dropped from a full queue.
    pub dropped: AtomicU64,
    /// Jobs that panicked.
    pub panicked: AtomicU64,
}

struct Waiter<T> {
    priority: Priority,
    grant: oneshot::Sender<T>,
}

struct State<T> {
    idle: Vec<T>,
    waiting: VecDeque<Waiter<T>>,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    max_waiting: usize,
    engine: Engine,
    observer: Observer,
    stats: PoolStats,
}

/// A pool of engine instances. Cloning shares the pool.
pub struct Pool<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Send + 'static> Pool<T> {
    /// A pool of `instances` (at least one) whose queue holds `max_waiting` jobs.
    pub fn new(
        instances: Vec<T>,
        max_waiting: usize,
        engine: Engine,
        observer: Observer,
    ) -> Pool<T> {
        assert!(!instances.is_empty(), "a pool needs an instance");
        Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    idle: instances,
                    waiting: VecDeque::new(),
                }),
                max_waiting,
                engine,
                observer,
                stats: PoolStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Jobs waiting for an instance now.
    pub fn waiting(&self) -> usize {
        self.inner.lock().waiting.len()
    }

    /// Runs `job` on an idle instance (on the blocking pool), after the jobs queued before
    /// it. `Err(Error::Cancelled)` if it was dropped from a full queue.
    pub async fn run<R: Send + 'static>(
        &self,
        priority: Priority,
        job: impl FnOnce(&mut T, &Cancel) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let queued = Instant::now();
        let instance = match self.take(priority) {
            Ok(instance) => instance,
            Err(grant) => {
                Ticket {
                    grant: Some(grant),
                    inner: self.inner.clone(),
                }
                .wait()
                .await?
            }
        };
        self.inner
            .observer
            .queue_wait(self.inner.engine, queued.elapsed());
        self.inner.stats.started.fetch_add(1, Ordering::Relaxed);
        let cancel = Cancel::default();
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let inner = self.inner.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut instance = instance;
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut instance, &cancel)));
            inner.release(instance);
            result.unwrap_or_else(|panic| {
                inner.stats.panicked.fetch_add(1, Ordering::Relaxed);
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                tracing::error!(
                    engine = inner.engine.label(),
                    why,
                    "a local engine panicked on a job"
                );
                Err(Error::Panicked(why))
            })
        });
        handle
            .await
            .map_err(|e| Error::Panicked(format!("blocking task: {e}")))?
    }

    /// An idle instance at once, or a place in the queue.
    fn take(&self, priority: Priority) -> Result<T, oneshot::Receiver<T>> {
        let mut state = self.inner.lock();
        // Waiters whose job was dropped meanwhile hold no place.
        state.waiting.retain(|w| !w.grant.is_closed());
        if state.waiting.is_empty()
            && let Some(instance) = state.idle.pop()
        {
            return Ok(instance);
        }
        let (grant, rx) = oneshot::channel();
        if state.waiting.len() >= self.inner.max_waiting {
            let oldest_speculative = state
                .waiting
                .iter()
                .position(|w| w.priority == Priority::Speculative);
            match (oldest_speculative, priority) {
                (Some(i), _) => {
                    // Its receiver sees the sender dropped: that job ends as cancelled.
                    state.waiting.remove(i);
                }
                // Nothing to make room with, and this job is only a guess: drop it.
                (None, Priority::Speculative) => {
                    drop(grant);
                    self.dropped();
                    return Err(rx);
                }
                (None, Priority::Needed | Priority::First) => {}
            }
            if oldest_speculative.is_some() {
                self.dropped();
            }
        }
        // Behind every waiter of the same or a higher priority.
        let at = state
            .waiting
            .iter()
            .position(|w| w.priority.rank() > priority.rank())
            .unwrap_or(state.waiting.len());
        state.waiting.insert(at, Waiter { priority, grant });
        Err(rx)
    }

    fn dropped(&self) {
        self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.inner.observer.dropped(self.inner.engine);
    }
}

/// A place in the queue. Dropped after an instance was handed to it but before the job took
/// it (the job's future dropped in between), it gives the instance back: none is lost.
struct Ticket<T> {
    grant: Option<oneshot::Receiver<T>>,
    inner: Arc<Inner<T>>,
}

impl<T> Ticket<T> {
    async fn wait(mut self) -> Result<T, Error> {
        let grant = self.grant.as_mut().expect("a ticket is waited on once");
        let result = grant.await;
        self.grant = None;
        result.map_err(|_| Error::Cancelled)
    }
}

impl<T> Drop for Ticket<T> {
    fn drop(&mut self) {
        if let Some(mut grant) = self.grant.take() {
            grant.close();
            if let Ok(instance) = grant.try_recv() {
                self.inner.release(instance);
            }
        }
    }
}

impl<T> Inner<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // Nothing under this lock can panic (queue operations only); recover anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `instance` to the oldest waiting job still wanted, or back to the idle list.
    fn release(&self, mut instance: T) {
        let mut state = self.lock();
        while let Some(waiter) = state.waiting.pop_front() {
            match waiter.grant.send(instance) {
                Ok(()) => return,
                // That job was dropped while it waited: the next one.
                Err(back) => instance = back,
            }
        }
        state.idle.push(instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(instances: usize, max_waiting: usize) -> Pool<usize> {
        Pool::new(
            (0..instances).collect(),
            max_waiting,
            Engine::Stt,
            Observer::none(),
        )
    }

    /// A job that holds its instance until `release` fires, then returns `value`.
    fn blocked(
        value: u32,
        release: std::sync::mpsc::Receiver<()>,
    ) -> impl FnOnce(&mut usize, &Cancel) -> Result<u32, Error> + Send + 'static {
        move |_, _| {
            let _ = release.recv();
            Ok(value)
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_queued_job_never_runs_and_a_panic_fails_only_its_job() {
        let pool = pool(1, 4);
        let (go, release) = std::sync::mpsc::channel();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(Priority::Needed, blocked(1, release)).await }
        });
        settle().await;
        let ran = Arc::new(AtomicBool::new(false));
        let queued = tokio::spawn({
            let (pool, ran) = (pool.clone(), ran.clone());
            async move {
                pool.run(Priority::Needed, move |_, _| {
                    ran.store(true, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }
        });
        settle().await;
        assert_eq!(pool.waiting(), 1);
        queued.abort();
        let _ = queued.await;
        go.send(()).unwrap();
        assert_eq!(busy.await.unwrap().unwrap(), 1);
        // The instance went back to the pool, past the dropped job.
        let panicked = pool
            .run(Priority::Needed, |_, _| -> Result<(), Error> {
                panic!("injected")
            })
            .await;
        assert!(
            matches!(panicked, Err(Error::Panicked(ref why)) if why == "injected"),
            "{panicked:?}"
        );
        let next = pool.run(Priority::Needed, |i, _| Ok(*i)).await;
        assert_eq!(
            next.unwrap(),
            0,
            "the pool serves the next job after a panic"
        );
        assert!(!ran.load(Ordering::SeqCst), "the dropped job never ran");
        assert_eq!(pool.stats().started.load(Ordering::SeqCst), 3);
        assert_eq!(pool.stats().panicked.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_drops_the_oldest_speculation_never_a_needed_job() {
        let pool = pool(1, 2);
        let (go, release) = std::sync::mpsc::channel();
        let spawn = |priority, value: u32| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(priority, move |_, _| Ok(value)).await })
        };
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(Priority::Needed, blocked(0, release)).await }
        });
        settle().await;
        let s1 = spawn(Priority::Speculative, 1);
        settle().await;
        let n2 = spawn(Priority::Needed, 2);
        settle().await;
        // Full: the oldest speculation makes room for the next job.
        let s3 = spawn(Priority::Speculative, 3);
        settle().await;
        // Full again: s3 is now the oldest speculation.
        let n4 = spawn(Priority::Needed, 4);
        settle().await;
        // Full of needed jobs: a speculation is refused at once, a needed job still queues.
        let s5 = spawn(Priority::Speculative, 5);
        let n6 = spawn(Priority::Needed, 6);
        settle().await;
        go.send(()).unwrap();
        assert_eq!(busy.await.unwrap().unwrap(), 0);
        assert!(matches!(s1.await.unwrap(), Err(Error::Cancelled)));
        assert!(matches!(s3.await.unwrap(), Err(Error::Cancelled)));
        assert!(matches!(s5.await.unwrap(), Err(Error::Cancelled)));
        assert_eq!(n2.await.unwrap().unwrap(), 2);
        assert_eq!(n4.await.unwrap().unwrap(), 4);
        assert_eq!(n6.await.unwrap().unwrap(), 6);
        assert_eq!(pool.stats().dropped.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_sentences_go_first_then_needed_jobs_then_speculations() {
        let pool = pool(1, 8);
        let (go, release) = std::sync::mpsc::channel();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let spawn = |priority, value: u32| {
            let (pool, ran) = (pool.clone(), ran.clone());
            tokio::spawn(async move {
                pool.run(priority, move |_, _| {
                    ran.lock().unwrap().push(value);
                    Ok(())
                })
                .await
            })
        };
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(Priority::Needed, blocked(0, release)).await }
        });
        settle().await;
        let mut jobs = Vec::new();
        for (priority, value) in [
            (Priority::Speculative, 1),
            (Priority::Needed, 2),
            (Priority::First, 3),
            (Priority::Needed, 4),
            (Priority::First, 5),
            (Priority::Speculative, 6),
        ] {
            jobs.push(spawn(priority, value));
            settle().await;
        }
        go.send(()).unwrap();
        busy.await.unwrap().unwrap();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        // By priority, and in arrival order within one.
        assert_eq!(*ran.lock().unwrap(), [3, 5, 2, 4, 1, 6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_job_sees_its_cancel_flag_when_dropped() {
        let pool = pool(1, 1);
        let (saw_tx, saw) = std::sync::mpsc::channel();
        let job = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(Priority::Needed, move |_, cancel| {
                    // Bounded: 2 s of 1 ms steps.
                    for _ in 0..2000 {
                        if cancel.is_cancelled() {
                            let _ = saw_tx.send(true);
                            return Err(Error::Cancelled);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let _ = saw_tx.send(false);
                    Ok(())
                })
                .await
            }
        });
        settle().await;
        job.abort();
        let saw = tokio::task::spawn_blocking(move || saw.recv().unwrap())
            .await
            .unwrap();
        assert!(saw, "the running job stopped at its next step");
        // And the instance came back.
        assert_eq!(pool.run(Priority::Needed, |i, _| Ok(*i)).await.unwrap(), 0);
    }
}
