-- Withdrawal limits (per withdrawal, rolling 24-hour amount and count), enforced by the
-- batch that applies the withdrawal. Additive.

-- Per-user overrides set by an operator (`walletq limits set`); a NULL falls back to the
-- worker's default for that limit.
CREATE TABLE wallet_limits (
    user_id         TEXT PRIMARY KEY,
    per_withdrawal  NUMERIC(20, 2) CHECK (per_withdrawal > 0),
    daily_amount    NUMERIC(20, 2) CHECK (daily_amount > 0),
    daily_count     INTEGER CHECK (daily_count > 0),
    note            TEXT,
    changed_at      TIMESTAMPTZ NOT NULL
);

-- Every change of an override, with its time and the operator's note: the audit's record
-- of which limits were in force when.
CREATE TABLE wallet_limit_changes (
    change_id       BIGSERIAL PRIMARY KEY,
    user_id         TEXT NOT NULL,
    per_withdrawal  NUMERIC(20, 2),
    daily_amount    NUMERIC(20, 2),
    daily_count     INTEGER,
    cleared         BOOLEAN NOT NULL,
    note            TEXT,
    changed_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX wallet_limit_changes_user_idx ON wallet_limit_changes (user_id, changed_at);

-- What left each wallet, by minute (span_s 60) and by hour (span_s 3600): approved
-- withdrawals and holds add, released and expired holds (and the uncaptured rest of a
-- partial capture) give back. A batch reads at most 23 hour and 60 minute buckets per user.
CREATE TABLE limit_usage (
    user_id       TEXT NOT NULL,
    span_s        INTEGER NOT NULL CHECK (span_s IN (60, 3600)),
    bucket_start  TIMESTAMPTZ NOT NULL,
    amount        NUMERIC(20, 2) NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (user_id, span_s, bucket_start)
);

-- The limits in force when an approved withdrawal or hold was applied (NULL: none).
ALTER TABLE requests ADD COLUMN limits JSONB;
