//! Continuous batching on llama.cpp: one model and one context serve several conversations at
//! once. Each running answer owns a sequence of the context (a slot); one scheduler thread
//! builds every decode step from the next token of each answer plus a chunk of the prompts of
//! new turns, so a second user's prompt is read while the first user's answer goes on, instead
//! of after it ([`LlamaChat`](crate::LlamaChat) answers one request at a time).
//!
//! - **KV reuse per conversation.** A slot keeps the KV cache of its last prompt and answer
//!   when the answer ends, tagged with the conversation (the session id); that
//!   conversation's next turn goes back to the same slot and decodes only the new tail. An
//!   idle slot is taken over by another conversation only when no slot is empty (least
//!   recently used first). A turn whose prompt starts like another sequence's cache (a new
//!   conversation's system prompt) shares those cells instead of decoding them again.
//! - **Cancellation.** Dropping a [`Generation`] (barge-in, disconnect) ends its answer at the
//!   next step: the answer's KV cells are removed from its sequence at once and the slot takes
//!   the next queued turn; the other sequences are not touched.
//! - **Bounds.** At most [`BatchConfig::max_sequences`] answers run; further turns wait in a
//!   FIFO queue ([`BatchStats::queued`]) and are never refused. Each sequence holds at most
//!   [`BatchConfig::context_per_sequence`] tokens (the oldest prompt tokens are cut, as
//!   `LlamaChat` does).
//! - **Latency first** (see [`Scheduler::step`]): every step carries one token of each running
//!   answer, except that answers far ahead of their speech sit out a few steps while another
//!   answer writes its first sentence ([`BatchConfig::hold_steps`]); prompt tokens fill the
//!   rest, shortest remaining prompt first, at most [`BatchConfig::prefill_chunk`] per step,
//!   and only [`BatchConfig::opening_prefill_chunk`] while some answer has not yet finished
//!   its first sentence (its user waits for the first audio).
//! - A reader that lags (its channel full) pauses its own answer only.
//!
//! The KV cache is llama.cpp's unified one: a step's tokens of all sequences go through the
//! model as one micro-batch (one pass over the weights), and per-sequence bounds are kept
//! here rather than by splitting the cache into fixed streams.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use crate::Error;
use crate::bytelevel::Utf8Stream;
use crate::gate::{ComputeGate, Urgency};
use crate::llama::{ChatVocab, backend, load_model, sampler};
use crate::llm::{ChatModel, GenParams, GenStats, Speaker};
use crate::observe::{Engine, Observer};

/// Events queued from the scheduler to one reader. The scheduler never blocks on a reader: an
/// answer whose queue has fewer than [`ROOM_PER_STEP`] free places sits out the step.
const GENERATION_CAPACITY: usize = 32;
/// Events one step may send to one answer: a piece of text and the end.
const ROOM_PER_STEP: usize = 2;
/// How often the scheduler looks again when every running answer waits for its reader (a
/// tokio channel cannot wake a blocking thread when it gets room).
const PAUSED_POLL: Duration = Duration::from_millis(5);
/// An answer is "opening" (its user waits for the first audio) until its text has a sentence
/// end, or for at most this many tokens (a first sentence without punctuation).
const OPENING_MAX_TOKENS: usize = 48;
/// Characters of text an answer past its first sentence must have written before it may sit
/// out steps for others' first sentences: ~5 s of speech at ~14 chars/s, while the model
/// writes several times faster than that is spoken, so its voice is seconds behind its text.
const HOLD_AHEAD_CHARS: usize = 80;

/// Sizes of the batched engine. Every field is a bound the lead may expose as a variable.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Answers decoded at once (llama.cpp sequences). Further turns wait in the queue.
    pub max_sequences: usize,
    /// KV cache tokens per sequence: prompt and answer together.
    pub context_per_sequence: usize,
    /// Prompt tokens per decode step while no answer is opening: ~0.5 s of prefill on 2
    /// cores (~130 tokens/s), so running answers get at least ~2 tokens/s meanwhile, about
    /// the rate of speech.
    pub prefill_chunk: usize,
    /// Prompt tokens per decode step while some answer is before its first sentence end:
    /// small, so that its first sentence keeps coming at several tokens per second.
    pub opening_prefill_chunk: usize,
    /// Consecutive steps an answer already speaking (past its first sentence, with
    /// [`HOLD_AHEAD_CHARS`] written) may sit out while another answer writes its first
    /// sentence: a step of fewer tokens is shorter (on 2 cores three tokens took ~70 ms, one
    /// ~25-35 ms), so first sentences come sooner; it still takes part in one step of
    /// `hold_steps + 1`. 0: every answer takes part in every step.
    pub hold_steps: usize,
    /// Threads of each decode.
    pub threads: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            // Four answers at once keep a 2-core machine busy. A step of several tokens reads
            // the weights once but still computes each token: on 2 cores three took ~70 ms
            // against ~25-35 ms for one (see `hold_steps`).
            max_sequences: 4,
            // A spoken conversation's prompt and answer fit in a few hundred tokens; 2048
            // per sequence keep the whole cache at ~100 MB for Qwen2.5-0.5B (12 KiB per
            // token).
            context_per_sequence: 2048,
            prefill_chunk: 64,
            opening_prefill_chunk: 16,
            hold_steps: 4,
            threads: crate::models::compute_threads(),
        }
    }
}

/// What an answer yields.
#[derive(Debug)]
pub enum GenEvent {
    /// More text (possibly empty: a token that completes no character yet).
    Text(String),
    /// The answer ended (stop token or token limit).
    Done(GenStats),
    /// llama.cpp failed on this answer's step; the sequence's cache was dropped.
    Failed(Error),
}

/// One answer being generated. Dropping it cancels the answer.
pub struct Generation {
    rx: mpsc::Receiver<GenEvent>,
}

impl Generation {
    pub async fn recv(&mut self) -> Option<GenEvent> {
        self.rx.recv().await
    }

    /// Waits for the next event, blocking the thread (not for async code).
    pub fn blocking_recv(&mut self) -> Option<GenEvent> {
        self.rx.blocking_recv()
    }

    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<GenEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// Counters of the scheduler, for gauges and tests.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Turns waiting for a free sequence now.
    pub queued: AtomicUsize,
    /// Turns that had to wait for a free sequence, since the start.
    pub queued_total: AtomicU64,
    /// Answers running now (prefilling or decoding).
    pub active: AtomicUsize,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Turns that got a sequence (started reading their prompt), since the start.
    pub started: AtomicU64,
    /// Prompt tokens that came from a sequence's cache instead of being decoded.
    pub reused_tokens: AtomicU64,
}

/// A GGUF chat model on llama.cpp serving several conversations at once. Cloning shares the
/// engine; the scheduler thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct BatchedLlama {
    inner: Arc<Handle>,
    pub name: String,
}

struct Handle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    stats: BatchStats,
    observer: Observer,
    /// Test hook: the next turn to start panics inside the scheduler.
    panic_next: AtomicBool,
}

#[derive(Default)]
struct Inbox {
    requests: Vec<Request>,
    shutdown: bool,
}

struct Request {
    /// When the turn was asked for (its queue wait ends when its prompt starts).
    sent: Instant,
    conversation: String,
    messages: Vec<(Speaker, String)>,
    params: GenParams,
    tx: mpsc::Sender<GenEvent>,
}

impl BatchedLlama {
    /// Loads a GGUF model and starts the scheduler thread.
    pub fn load(
        path: &Path,
        config: BatchConfig,
        gate: ComputeGate,
    ) -> Result<BatchedLlama, Error> {
        let vocab = load_model(path)?;
        let max_sequences = config.max_sequences.max(1);
        let per_seq = config.context_per_sequence.max(64);
        let chunk = config
            .prefill_chunk
            .max(config.opening_prefill_chunk)
            .max(1);
        // One step: a token per running answer plus a prompt chunk, in one micro-batch.
        let batch_tokens = chunk + max_sequences;
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(i32::MAX);
        let n_ctx = u32::try_from(per_seq * max_sequences).unwrap_or(u32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_seq_max(max_sequences as u32)
            // One cache shared by all sequences: the bounds per sequence are kept here, and
            // a step's tokens of every sequence go through the model in one micro-batch (a
            // split cache would split them by sequence).
            .with_kv_unified(true)
            .with_n_batch(batch_tokens as u32)
            .with_n_ubatch(batch_tokens as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = vocab.model.new_context(backend(), params).map_err(|e| {
            Error::Model(format!(
                "{}: llama.cpp could not make a context ({e})",
                path.display()
            ))
        })?;
        let name = vocab.name.clone();
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            stats: BatchStats::default(),
            observer: Observer::none(),
            panic_next: AtomicBool::new(false),
        });
        let mut scheduler = Scheduler {
            vocab,
            ctx,
            batch: LlamaBatch::new(batch_tokens, 1),
            slots: (0..max_sequences)
                .map(|i| Slot {
                    seq: i as i32,
                    cached: Vec::new(),
                    owner: None,
                    last_used: 0,
                    job: None,
                })
                .collect(),
            queue: VecDeque::new(),
            config: BatchConfig {
                max_sequences,
                context_per_sequence: per_seq,
                prefill_chunk: config.prefill_chunk.max(1),
                opening_prefill_chunk: config.opening_prefill_chunk.max(1),
                hold_steps: config.hold_steps,
                threads: config.threads,
            },
            gate,
            shared: shared.clone(),
            clock: 0,
        };
        let thread = std::thread::Builder::new()
            .name("llama-batch".into())
            .spawn(move || {
                let _closed = Closed(scheduler.shared.clone());
                scheduler.run()
            })
            .map_err(|e| Error::Model(format!("could not start the LLM scheduler: {e}")))?;
        Ok(BatchedLlama {
            inner: Arc::new(Handle {
                shared,
                thread: Some(thread),
            }),
            name,
        })
    }

    /// Starts an answer to `messages` in `conversation` (the session id: its next turn reuses
    /// this one's KV cache). Never fails: beyond `max_sequences` the turn waits its turn.
    pub fn generate(
        &self,
        conversation: &str,
        messages: Vec<(Speaker, String)>,
        params: GenParams,
    ) -> Generation {
        let (tx, rx) = mpsc::channel(GENERATION_CAPACITY);
        let shared = &self.inner.shared;
        let mut inbox = shared
            .inbox
            .lock()
            .expect("inbox lock: nothing panics under it");
        if inbox.shutdown {
            // The scheduler is gone (it panicked): say so rather than wait forever.
            let _ = tx.try_send(GenEvent::Failed(Error::Inference(
                "the LLM scheduler has stopped".into(),
            )));
            return Generation { rx };
        }
        inbox.requests.push(Request {
            sent: Instant::now(),
            conversation: conversation.to_owned(),
            messages,
            params,
            tx,
        });
        shared.wake.notify_one();
        Generation { rx }
    }

    pub fn stats(&self) -> &BatchStats {
        &self.inner.shared.stats
    }

    /// Where the scheduler reports queue waits, steps, tokens and running answers.
    pub fn observer(&self) -> &Observer {
        &self.inner.shared.observer
    }

    /// Test hook: the next turn to start panics inside the scheduler.
    #[doc(hidden)]
    pub fn panic_on_next_job(&self) {
        self.inner.shared.panic_next.store(true, Ordering::SeqCst);
    }

    /// No answer is running or waiting.
    pub fn is_idle(&self) -> bool {
        let s = self.stats();
        let inbox = self.inner.shared.inbox.lock().expect("inbox lock");
        inbox.requests.is_empty()
            && s.active.load(Ordering::SeqCst) == 0
            && s.queued.load(Ordering::SeqCst) == 0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared
            .inbox
            .lock()
            .expect("inbox lock: nothing panics under it")
            .shutdown = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread ends after at most one decode step.
            let _ = thread.join();
        }
    }
}

/// What [`plan`] needs to know of a running answer.
#[derive(Debug, Clone, Copy)]
struct SlotState {
    /// The prompt is in the cache: the answer decodes a token per step.
    decoding: bool,
    /// Before its first sentence end.
    opening: bool,
    /// Its reader has room for this step's events.
    room: bool,
    /// Past its first sentence with [`HOLD_AHEAD_CHARS`] written: may sit out.
    ahead: bool,
    /// Consecutive steps it sat out.
    held: usize,
    remaining_prompt: usize,
    arrived: u64,
}

/// One step's plan, latency first: `(slot, tokens)` for every slot that takes part.
///
/// 1. Every decoding answer whose reader has room gets its next token, except that while some
///    answer is before its first sentence end, answers far ahead of their speech (`ahead`)
///    sit out up to `hold_steps` steps in a row (a step's time grows with its tokens on a
///    small CPU: first sentences come sooner in smaller steps).
/// 2. Prompt tokens of new turns fill the rest, shortest remaining prompt first (a follow-up
///    turn whose history is cached is read before a long cold prompt; ties by arrival), up
///    to `prefill_chunk` per step, or `opening_chunk` while some decoding answer has not
///    finished its first sentence, so that its first audio is not held up by another user's
///    prompt.
fn plan(
    slots: &[Option<SlotState>],
    prefill_chunk: usize,
    opening_chunk: usize,
    hold_steps: usize,
) -> Vec<(usize, usize)> {
    let running = || {
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.filter(|s| s.room).map(|s| (i, s)))
    };
    let opening = running().any(|(_, s)| s.decoding && s.opening);
    let mut out: Vec<(usize, usize)> = running()
        .filter(|(_, s)| s.decoding && !(opening && s.ahead && s.held < hold_steps))
        .map(|(i, _)| (i, 1))
        .collect();
    let mut budget = if opening {
        opening_chunk
    } else {
        prefill_chunk
    };
    let mut prefilling: Vec<(usize, SlotState)> = running()
        .filter(|(_, s)| !s.decoding && s.remaining_prompt > 0)
        .collect();
    prefilling.sort_by_key(|(_, s)| (s.remaining_prompt, s.arrived));
    for (i, s) in prefilling {
        if budget == 0 {
            break;
        }
        let take = s.remaining_prompt.min(budget);
        budget -= take;
        out.push((i, take));
    }
    out
}

/// Closes the inbox when the scheduler thread ends, even by a panic: requests already in it
/// and any later one end at once instead of waiting for a thread that is gone.
struct Closed(Arc<Shared>);

impl Drop for Closed {
    fn drop(&mut self) {
        let mut inbox = self.0.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.shutdown = true;
        for r in inbox.requests.drain(..) {
            let _ = r.tx.try_send(GenEvent::Failed(Error::Inference(
                "the LLM scheduler has stopped".into(),
            )));
        }
    }
}

/// One sequence of the context.
struct Slot {
    seq: i32,
    /// The tokens whose keys and values this sequence holds, at positions 0, 1, ...
    cached: Vec<LlamaToken>,
    /// The conversation whose prompt `cached` is.
    owner: Option<String>,
    /// When the slot last finished an answer (scheduler clock), for least-recently-used
    /// eviction.
    last_used: u64,
    job: Option<Job>,
}

/// An answer in a slot.
struct Job {
    prompt: Vec<LlamaToken>,
    params: GenParams,
    sampler: LlamaSampler,
    tx: mpsc::Sender<GenEvent>,
    stats: GenStats,
    text: Utf8Stream,
    /// The last sampled token, to be decoded in the next step (the answer is decoding once
    /// the whole prompt is in the cache).
    next: Option<LlamaToken>,
    /// Before the first sentence end (see [`OPENING_MAX_TOKENS`]).
    opening: bool,
    /// Characters of text written so far.
    chars: usize,
    /// Consecutive steps it sat out (see [`BatchConfig::hold_steps`]).
    held: usize,
    /// Arrival order, to break ties.
    arrived: u64,
}

/// What the step put in the batch for one slot.
struct Entry {
    slot: usize,
    tokens: Vec<LlamaToken>,
    /// Batch index of the logits to sample from, if the step ends the slot's prompt or is a
    /// decode token.
    logits: Option<i32>,
}

/// A turn waiting for a slot.
struct Queued {
    request: Request,
    arrived: u64,
    /// Already counted in [`BatchStats::queued_total`].
    counted: bool,
}

struct Scheduler {
    vocab: ChatVocab,
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    slots: Vec<Slot>,
    queue: VecDeque<Queued>,
    config: BatchConfig,
    gate: ComputeGate,
    shared: Arc<Shared>,
    /// Counts arrivals and finished answers.
    clock: u64,
}

impl Scheduler {
    fn run(&mut self) {
        loop {
            // Take new requests; sleep while there is nothing to do.
            {
                let mut inbox = self.shared.inbox.lock().expect("inbox lock");
                loop {
                    if inbox.shutdown {
                        return;
                    }
                    let idle = self.queue.is_empty() && self.slots.iter().all(|s| s.job.is_none());
                    if !idle || !inbox.requests.is_empty() {
                        break;
                    }
                    inbox = self.shared.wake.wait(inbox).expect("inbox lock");
                }
                for request in inbox.requests.drain(..) {
                    self.clock += 1;
                    self.queue.push_back(Queued {
                        request,
                        arrived: self.clock,
                        counted: false,
                    });
                }
                // Under the inbox lock, so that `is_idle` never misses a turn in transit.
                self.publish();
            }
            self.drop_cancelled();
            self.admit();
            self.publish();
            let stepped = match std::panic::catch_unwind(AssertUnwindSafe(|| self.step())) {
                Ok(stepped) => stepped,
                Err(_) => {
                    self.recover("a decode step");
                    true
                }
            };
            self.publish();
            if !stepped {
                // Every running answer waits for its reader.
                let inbox = self.shared.inbox.lock().expect("inbox lock");
                if inbox.requests.is_empty() && !inbox.shutdown {
                    let _ = self.shared.wake.wait_timeout(inbox, PAUSED_POLL);
                }
            }
        }
    }

    fn publish(&self) {
        let s = &self.shared.stats;
        s.queued.store(self.queue.len(), Ordering::SeqCst);
        let active = self.slots.iter().filter(|s| s.job.is_some()).count();
        if s.active.swap(active, Ordering::SeqCst) != active {
            self.shared.observer.llm_active(active);
        }
    }

    /// After a panic in `what`: the running answers fail (their caches may be half
    /// written, so they are emptied); queued turns and the scheduler go on.
    fn recover(&mut self, what: &str) {
        tracing::error!(
            what,
            "the LLM scheduler panicked; its running answers fail, it goes on"
        );
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(job) = slot.job.take() {
                let _ = job.tx.try_send(GenEvent::Failed(Error::Panicked(format!(
                    "the LLM scheduler panicked in {what}"
                ))));
                Self::forget(&mut self.ctx, slot);
            }
        }
    }

    /// Ends the answers whose reader is gone, and forgets queued turns nobody waits for.
    fn drop_cancelled(&mut self) {
        self.queue.retain(|q| !q.request.tx.is_closed());
        for i in 0..self.slots.len() {
            if self.slots[i]
                .job
                .as_ref()
                .is_some_and(|job| job.tx.is_closed())
            {
                self.finish(i, true);
            }
        }
    }

    /// Ends slot `i`'s answer and frees the slot. The cache keeps the prompt and the answer
    /// for the conversation's next turn, whose prompt starts with both; a cancelled answer's
    /// tokens leave the cache at once (the next prompt holds only what the user heard of it).
    fn finish(&mut self, i: usize, cancelled: bool) {
        self.clock += 1;
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.take() else { return };
        slot.last_used = self.clock;
        if !cancelled {
            return;
        }
        let keep = slot.cached.len().min(job.prompt.len());
        if keep < slot.cached.len() {
            let removed = self
                .ctx
                .clear_kv_cache_seq(Some(slot.seq as u32), Some(keep as u32), None)
                .unwrap_or(false);
            if removed {
                slot.cached.truncate(keep);
            } else {
                Self::forget(&mut self.ctx, slot);
            }
        }
    }

    /// Empties a slot's sequence.
    fn forget(ctx: &mut LlamaContext<'static>, slot: &mut Slot) {
        let _ = ctx.clear_kv_cache_seq(Some(slot.seq as u32), None, None);
        slot.cached.clear();
        slot.owner = None;
    }

    /// Moves queued turns into free slots, oldest first: the conversation's own slot if it is
    /// free, else an empty one, else the one used least recently.
    fn admit(&mut self) {
        while let Some(front) = self.queue.front() {
            let conversation = &front.request.conversation;
            let free = |s: &&Slot| s.job.is_none();
            let pick = self
                .slots
                .iter()
                .filter(free)
                .find(|s| s.owner.as_deref() == Some(conversation.as_str()))
                .or_else(|| self.slots.iter().filter(free).find(|s| s.cached.is_empty()))
                .or_else(|| self.slots.iter().filter(free).min_by_key(|s| s.last_used))
                .map(|s| s.seq as usize);
            let Some(i) = pick else {
                break;
            };
            let queued = self.queue.pop_front().expect("front exists");
            let tx = queued.request.tx.clone();
            let started = std::panic::catch_unwind(AssertUnwindSafe(|| self.start(i, queued)));
            if started.is_err() {
                // Only this turn fails; its slot's cache may be half made: emptied.
                let _ = tx.try_send(GenEvent::Failed(Error::Panicked(
                    "the LLM scheduler panicked on this turn".into(),
                )));
                let slot = &mut self.slots[i];
                slot.job = None;
                Self::forget(&mut self.ctx, slot);
                tracing::error!("the LLM scheduler panicked starting a turn; it goes on");
            }
        }
        // What is still queued waits for a slot: counted once per turn.
        for q in self.queue.iter_mut().filter(|q| !q.counted) {
            q.counted = true;
            self.shared
                .stats
                .queued_total
                .fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Starts `queued` in slot `i`, reusing the slot's cache for the common prefix.
    fn start(&mut self, i: usize, queued: Queued) {
        let Queued {
            request, arrived, ..
        } = queued;
        self.shared
            .observer
            .queue_wait(Engine::Llm, request.sent.elapsed());
        self.shared.stats.started.fetch_add(1, Ordering::SeqCst);
        if self.shared.panic_next.swap(false, Ordering::SeqCst) {
            panic!("injected panic (test hook)");
        }
        let model: &LlamaModel = self.vocab.model;
        let messages: Vec<(Speaker, &str)> = request
            .messages
            .iter()
            .map(|(who, text)| (*who, text.as_str()))
            .collect();
        let mut prompt =
            model
                .vocab()
                .tokenize(ChatModel::prompt(&messages).as_bytes(), false, true);
        // Keep room for the answer, cutting the oldest tokens as LlamaChat does.
        let per_seq = self.config.context_per_sequence;
        let mut params = request.params;
        params.max_tokens = params.max_tokens.clamp(1, per_seq / 2);
        let room = per_seq.saturating_sub(params.max_tokens + 8).max(1);
        if prompt.len() > room {
            prompt.drain(..prompt.len() - room);
        }
        // The last prompt token is always decoded again: its logits pick the first token of
        // the answer.
        let limit = prompt.len().saturating_sub(1);
        let common = |cached: &[LlamaToken]| {
            let n = cached
                .iter()
                .zip(&prompt)
                .take_while(|(a, b)| a == b)
                .count();
            n.min(limit)
        };
        let own = common(&self.slots[i].cached);
        // Another sequence may hold a longer prefix (the system prompt, for a conversation's
        // first turn): its cells are shared, not copied (the cache is unified).
        let donor = (0..self.slots.len())
            .filter(|&j| j != i)
            .map(|j| (j, common(&self.slots[j].cached)))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > own);
        if let Some((j, n)) = donor {
            let from = self.slots[j].seq;
            let slot = &mut self.slots[i];
            Self::forget(&mut self.ctx, slot);
            self.ctx
                .copy_kv_cache_seq(from, slot.seq, Some(0), Some(n as u32))
                .expect("positions of a context fit in i32");
            slot.cached = prompt[..n].to_vec();
        }
        let slot = &mut self.slots[i];
        slot.owner = Some(request.conversation.clone());
        let keep = common(&slot.cached);
        if keep < slot.cached.len() {
            let removed = self
                .ctx
                .clear_kv_cache_seq(Some(slot.seq as u32), Some(keep as u32), None)
                .unwrap_or(false);
            if removed {
                slot.cached.truncate(keep);
            } else {
                // llama.cpp cannot cut this cache (a recurrent model's): start afresh.
                Self::forget(&mut self.ctx, slot);
                slot.owner = Some(request.conversation.clone());
            }
        }
        let reused = slot.cached.len();
        self.shared
            .stats
            .reused_tokens
            .fetch_add(reused as u64, Ordering::SeqCst);
        slot.job = Some(Job {
            stats: GenStats {
                prompt_tokens: prompt.len(),
                prompt_decoded: prompt.len() - reused,
                completion_tokens: 0,
                stopped: false,
            },
            sampler: sampler(model, &params),
            prompt,
            params,
            tx: request.tx,
            text: Utf8Stream::default(),
            next: None,
            opening: true,
            chars: 0,
            held: 0,
            arrived,
        });
    }

    /// Builds and runs one decode step (planned by [`plan`]); returns false when no answer
    /// could take part (all wait for their readers).
    fn step(&mut self) -> bool {
        self.batch.clear();
        let states: Vec<Option<SlotState>> = self
            .slots
            .iter()
            .map(|slot| {
                let job = slot.job.as_ref()?;
                Some(SlotState {
                    decoding: job.next.is_some(),
                    opening: job.opening,
                    room: job.tx.capacity() >= ROOM_PER_STEP,
                    ahead: !job.opening && job.chars >= HOLD_AHEAD_CHARS,
                    held: job.held,
                    remaining_prompt: job.prompt.len().saturating_sub(slot.cached.len()),
                    arrived: job.arrived,
                })
            })
            .collect();
        let planned = plan(
            &states,
            self.config.prefill_chunk,
            self.config.opening_prefill_chunk,
            self.config.hold_steps,
        );
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(job) = slot.job.as_mut().filter(|job| job.next.is_some()) {
                let takes_part = planned.iter().any(|&(p, _)| p == i);
                job.held = if takes_part { 0 } else { job.held + 1 };
            }
        }
        let mut entries: Vec<Entry> = planned
            .into_iter()
            .map(|(i, take)| {
                let slot = &self.slots[i];
                let job = slot.job.as_ref().expect("planned slots have a job");
                let tokens = match job.next {
                    Some(next) => vec![next],
                    None => {
                        let start = slot.cached.len();
                        job.prompt[start..start + take].to_vec()
                    }
                };
                Entry {
                    slot: i,
                    tokens,
                    logits: None,
                }
            })
            .collect();
        if entries.is_empty() {
            return false;
        }
        for entry in &mut entries {
            let slot = &self.slots[entry.slot];
            let job = slot.job.as_ref().expect("entries are of running answers");
            let start = slot.cached.len();
            // Logits of a decode token, or of a prompt's last token.
            let wants_logits = job.next.is_some() || start + entry.tokens.len() == job.prompt.len();
            for (k, &t) in entry.tokens.iter().enumerate() {
                let last = k + 1 == entry.tokens.len();
                self.batch
                    .add(t, (start + k) as i32, &[slot.seq], last && wants_logits)
                    .expect("a step fits the batch it was sized for");
            }
            if wants_logits {
                entry.logits = Some(self.batch.n_tokens() - 1);
            }
        }
        // Urgent while some answer of the step is before its first sentence end or still
        // reading its prompt: its user waits for the first audio.
        let urgency = if entries.iter().any(|e| {
            let job = self.slots[e.slot].job.as_ref();
            job.is_some_and(|job| job.opening || job.next.is_none())
        }) {
            Urgency::Urgent
        } else {
            Urgency::Normal
        };
        let result = {
            let all = self.gate.cores();
            let _turn = self.gate.enter_as(urgency, all, all);
            self.ctx.decode(&mut self.batch)
        };
        self.shared.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.shared.observer.llm_step(entries.len());
        if let Err(e) = result {
            // The caches of this step's sequences may hold part of it: trust none of them.
            tracing::warn!(error = %e, "llama.cpp decode failed: the step's answers end");
            for entry in entries {
                let slot = &mut self.slots[entry.slot];
                if let Some(job) = slot.job.take() {
                    let _ = job.tx.try_send(GenEvent::Failed(Error::Inference(format!(
                        "llama.cpp decode: {e}"
                    ))));
                }
                Self::forget(&mut self.ctx, slot);
            }
            return true;
        }
        for entry in entries {
            let slot = &mut self.slots[entry.slot];
            slot.cached.extend_from_slice(&entry.tokens);
            let job = slot.job.as_mut().expect("entries are of running answers");
            job.next = None;
            let Some(idx) = entry.logits else { continue };
            let token = job.sampler.sample(&self.ctx, idx);
            if self.sample(entry.slot, token) {
                self.finish(entry.slot, false);
            }
        }
        true
    }

    /// Hands `token`, just sampled for slot `i`, to its reader; returns true when the answer
    /// is over.
    fn sample(&mut self, i: usize, token: LlamaToken) -> bool {
        let vocab = self.vocab.model.vocab();
        let stop = vocab.is_eog(token) || self.vocab.stops.contains(&token);
        let job = self.slots[i]
            .job
            .as_mut()
            .expect("sampled slots have a job");
        if stop {
            job.stats.stopped = true;
            let _ = job.tx.try_send(GenEvent::Done(job.stats));
            return true;
        }
        job.stats.completion_tokens += 1;
        self.shared.observer.llm_tokens(1);
        let mut bytes = Vec::new();
        vocab.token_to_piece_into(token, &mut bytes, false, None);
        let text = job.text.push(&bytes);
        job.chars += text.chars().count();
        if job.opening
            && (text.contains(['.', '!', '?', '\n', ':', ';'])
                || job.stats.completion_tokens >= OPENING_MAX_TOKENS)
        {
            job.opening = false;
        }
        // Room was checked before the step; a closed channel is found by the next
        // `drop_cancelled`.
        let _ = job.tx.try_send(GenEvent::Text(text));
        if job.stats.completion_tokens >= job.params.max_tokens {
            let _ = job.tx.try_send(GenEvent::Done(job.stats));
            return true;
        }
        job.next = Some(token);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding(opening: bool) -> Option<SlotState> {
        Some(SlotState {
            decoding: true,
            opening,
            room: true,
            ahead: false,
            held: 0,
            remaining_prompt: 0,
            arrived: 0,
        })
    }

    fn prefilling(remaining_prompt: usize, arrived: u64) -> Option<SlotState> {
        Some(SlotState {
            decoding: false,
            opening: true,
            room: true,
            ahead: false,
            held: 0,
            remaining_prompt,
            arrived,
        })
    }

    #[test]
    fn every_answer_gets_a_token_and_prompts_share_the_chunk_shortest_first() {
        let slots = [decoding(false), prefilling(200, 1), None, prefilling(20, 2)];
        // The short follow-up's whole tail, then the long prompt gets the rest of the chunk.
        assert_eq!(plan(&slots, 64, 16, 4), vec![(0, 1), (3, 20), (1, 44)]);
    }

    #[test]
    fn an_opening_answer_caps_the_prompt_chunk() {
        let slots = [decoding(true), prefilling(200, 1), decoding(false)];
        assert_eq!(plan(&slots, 64, 16, 4), vec![(0, 1), (2, 1), (1, 16)]);
        // A prefilling turn is not "opening" for the cap: nothing decodes yet.
        let slots = [prefilling(200, 1), prefilling(30, 2)];
        assert_eq!(plan(&slots, 64, 16, 4), vec![(1, 30), (0, 34)]);
    }

    #[test]
    fn answers_far_ahead_of_their_speech_sit_out_a_few_steps_for_first_sentences() {
        let ahead = |held| {
            let mut s = decoding(false);
            let st = s.as_mut().unwrap();
            (st.ahead, st.held) = (true, held);
            s
        };
        // Another answer writes its first sentence: the one ahead sits out...
        let slots = [ahead(0), decoding(true), decoding(false)];
        assert_eq!(plan(&slots, 64, 16, 4), vec![(1, 1), (2, 1)]);
        // ... up to `hold_steps` steps in a row, then takes part once.
        let slots = [ahead(4), decoding(true)];
        assert_eq!(plan(&slots, 64, 16, 4), vec![(0, 1), (1, 1)]);
        // Nobody opening (a prompt being read is not): everyone takes part.
        let slots = [ahead(0), prefilling(30, 1)];
        assert_eq!(plan(&slots, 64, 16, 4), vec![(0, 1), (1, 30)]);
        // 0 turns it off.
        let slots = [ahead(0), decoding(true)];
        assert_eq!(plan(&slots, 64, 16, 0), vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn a_reader_without_room_sits_out_and_does_not_cap_others() {
        let mut lagging = decoding(true);
        lagging.as_mut().unwrap().room = false;
        let slots = [lagging, prefilling(100, 1)];
        assert_eq!(plan(&slots, 64, 16, 4), vec![(1, 64)]);
        assert_eq!(plan(&[lagging, None], 64, 16, 4), vec![]);
    }
}
