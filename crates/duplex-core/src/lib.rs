//! The pure conversation core of duplex: everything about a conversation that can be decided
//! without sockets, tasks or a clock. Time comes in as an argument; deadlines go out as values.
//!
//! - [`chunker`]: turns an LLM token stream into speakable chunks as early as possible.
//! - [`pacer`]: keeps assistant audio a bounded lead ahead of the client's playhead.
//! - [`conversation`]: the turn state machine (turn ids, barge-in, history truncation).

pub mod chunker;
pub mod conversation;
pub mod pacer;
