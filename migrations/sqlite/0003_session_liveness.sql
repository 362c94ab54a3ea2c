-- Liveness of open sessions: every usage write (a heartbeat every few seconds while a session
-- runs) stamps its session. A row still open whose last stamp is long past belongs to a server
-- that crashed or was killed; any server may close it then without knowing which server owned
-- it (multi-node safe: a live session on another server keeps stamping).
ALTER TABLE sessions ADD COLUMN last_seen_at BIGINT;
