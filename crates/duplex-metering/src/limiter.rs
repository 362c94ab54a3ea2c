//! [`UserTurnLimiter`]: the per-user turn rate limit shared by all sessions of one server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Users whose turn history is kept before stale entries are swept: bounds memory under a
/// flood of distinct users (one small deque each).
const MAX_TRACKED_USERS: usize = 100_000;
/// The window of `turns_per_minute`.
const TURN_WINDOW: Duration = Duration::from_secs(60);

/// The per-user turn rate limit across all of a user's sessions on this server. Each
/// session's meter also limits its own turns; this closes the gap of a user opening several
/// sessions. (Across server instances the per-session limit and the per-IP caps still hold;
/// a shared limiter would need the store.) Pure: time comes in as `now`; clones share state.
#[derive(Clone, Default)]
pub struct UserTurnLimiter {
    users: Arc<Mutex<HashMap<i64, VecDeque<Instant>>>>,
}

impl UserTurnLimiter {
    /// Records a turn of `user_id` at `now` if fewer than `limit` happened in the last minute;
    /// otherwise returns how many did and when the oldest of them leaves the window.
    pub fn try_acquire(
        &self,
        user_id: i64,
        limit: u32,
        now: Instant,
    ) -> Result<(), (u64, Instant)> {
        // A panic while the lock is held cannot leave the map inconsistent (every update is
        // one push or pop), so a poisoned lock is taken over rather than propagated.
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if users.len() >= MAX_TRACKED_USERS {
            users.retain(|_, turns| turns.back().is_some_and(|&t| t + TURN_WINDOW > now));
        }
        let turns = users.entry(user_id).or_default();
        while turns.front().is_some_and(|&t| t + TURN_WINDOW <= now) {
            turns.pop_front();
        }
        if turns.len() >= limit as usize {
            let Some(&oldest) = turns.front() else {
                // limit == 0: no turn is ever allowed.
                return Err((0, now + TURN_WINDOW));
            };
            return Err((turns.len() as u64, oldest + TURN_WINDOW));
        }
        turns.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_limiter_counts_per_user_in_a_rolling_minute() {
        let l = UserTurnLimiter::default();
        let t0 = Instant::now();
        assert!(l.try_acquire(1, 2, t0).is_ok());
        assert!(l.try_acquire(1, 2, t0 + Duration::from_secs(10)).is_ok());
        assert_eq!(
            l.try_acquire(1, 2, t0 + Duration::from_secs(20)),
            Err((2, t0 + Duration::from_secs(60)))
        );
        // Another user is not affected.
        assert!(l.try_acquire(2, 2, t0 + Duration::from_secs(20)).is_ok());
        // The oldest turn leaves the window after a minute.
        assert!(l.try_acquire(1, 2, t0 + Duration::from_secs(60)).is_ok());
        assert!(l.try_acquire(1, 2, t0 + Duration::from_secs(61)).is_err());
    }

    #[test]
    fn a_zero_limit_refuses_without_panicking() {
        let l = UserTurnLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.try_acquire(1, 0, t0), Err((0, t0 + TURN_WINDOW)));
    }
}
