-- Exactly-once usage writes: a session numbers its usage writes (`seq`, 1, 2, …) and sends a
-- write again, unchanged, when its outcome is unknown (it failed or timed out, and may have
-- committed anyway). The ledger applies a write only if its `seq` is above the session's last
-- applied one, in the same transaction as the increment, so a replay adds nothing. One row per
-- session rather than one per write: a session has one write in flight at a time and its
-- `seq`s only grow, so the highest applied `seq` identifies every write applied before it.
CREATE TABLE usage_writes (
    session_id TEXT   PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    last_seq   BIGINT NOT NULL
);
