-- duplex schema, SQLite flavour (see migrations/README.md for the portable types).

-- A person, known by the subject (`sub`) of their auth token.
CREATE TABLE users (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id        TEXT    NOT NULL UNIQUE,
    plan               TEXT    NOT NULL DEFAULT 'free',
    -- Set when a Stripe checkout names this user; one customer belongs to one user.
    stripe_customer_id TEXT    UNIQUE,
    -- Lifetime allowance of the free trial used so far, in milliseconds of conversation.
    trial_ms_used      BIGINT  NOT NULL DEFAULT 0,
    created_at         BIGINT  NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

-- Stripe's view of a subscription, as of the newest event applied (`last_event_created`).
CREATE TABLE subscriptions (
    stripe_subscription_id TEXT   PRIMARY KEY,
    stripe_customer_id     TEXT   NOT NULL,
    -- NULL until a checkout or the subscription's metadata names the user.
    user_id                BIGINT REFERENCES users (id),
    status                 TEXT   NOT NULL,
    price_id               TEXT,
    -- The plan `price_id` maps to (STRIPE_PRICE_PLANS); NULL for a price the config does not name.
    plan                   TEXT,
    current_period_end     BIGINT,
    -- `created` (Unix seconds) of the newest Stripe event applied to this row: older events
    -- arriving late are ignored. -1 for a row only a checkout has mentioned so far.
    last_event_created     BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL
);
CREATE INDEX subscriptions_customer ON subscriptions (stripe_customer_id);
CREATE INDEX subscriptions_user ON subscriptions (user_id);

-- Usage per user per UTC day, incremented while sessions run.
CREATE TABLE usage_daily (
    user_id               BIGINT NOT NULL REFERENCES users (id),
    day                   TEXT   NOT NULL,
    conversation_ms       BIGINT NOT NULL DEFAULT 0,
    stt_ms                BIGINT NOT NULL DEFAULT 0,
    llm_prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    llm_completion_tokens BIGINT NOT NULL DEFAULT 0,
    tts_chars             BIGINT NOT NULL DEFAULT 0,
    cost_micro_usd        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
-- MAX_DAILY_SPEND_USD sums one day over all users.
CREATE INDEX usage_daily_day ON usage_daily (day);

-- One WebSocket conversation.
CREATE TABLE sessions (
    id           TEXT   PRIMARY KEY,
    user_id      BIGINT NOT NULL REFERENCES users (id),
    started_at   BIGINT NOT NULL,
    ended_at     BIGINT,
    close_reason TEXT
);
CREATE INDEX sessions_user ON sessions (user_id, started_at);

-- Stripe events already applied: a redelivery changes nothing.
CREATE TABLE webhook_events (
    event_id     TEXT   PRIMARY KEY,
    event_type   TEXT   NOT NULL,
    processed_at BIGINT NOT NULL
);

-- Every change of a user's plan, and what caused it (e.g. a Stripe event id).
CREATE TABLE plan_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    BIGINT  NOT NULL REFERENCES users (id),
    old_plan   TEXT    NOT NULL,
    new_plan   TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    changed_at BIGINT  NOT NULL
);
CREATE INDEX plan_changes_user ON plan_changes (user_id, changed_at);
