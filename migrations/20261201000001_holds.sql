-- Holds (two-phase withdrawals): reserve money, then capture or release it, or let it expire.
-- Additive: every existing row stays valid; a wallet without holds has held = 0.

-- The sum of the wallet's active holds. available = balance - held, never below 0.
ALTER TABLE wallets ADD COLUMN held NUMERIC(20, 2) NOT NULL DEFAULT 0;
ALTER TABLE wallets ADD CONSTRAINT wallets_held_check CHECK (held >= 0 AND held <= balance);

-- Requests gain the new ops and their fields: a capture may name no amount (the whole
-- hold), a release never does.
ALTER TABLE requests DROP CONSTRAINT requests_op_check;
ALTER TABLE requests ADD CONSTRAINT requests_op_check
    CHECK (op IN ('withdraw', 'deposit', 'hold', 'capture', 'release'));
ALTER TABLE requests ALTER COLUMN amount DROP NOT NULL;
ALTER TABLE requests ADD COLUMN hold_id TEXT;
ALTER TABLE requests ADD COLUMN timeout_s INTEGER CHECK (timeout_s BETWEEN 1 AND 604800);
ALTER TABLE requests ADD CONSTRAINT requests_fields_check CHECK (
    CASE op
        WHEN 'hold' THEN amount IS NOT NULL AND timeout_s IS NOT NULL AND hold_id IS NULL
        WHEN 'capture' THEN hold_id IS NOT NULL AND timeout_s IS NULL
        WHEN 'release' THEN hold_id IS NOT NULL AND amount IS NULL AND timeout_s IS NULL
        ELSE amount IS NOT NULL AND hold_id IS NULL AND timeout_s IS NULL
    END
);

-- One row per approved hold, closed at most once (captured, released or expired).
CREATE TABLE holds (
    hold_id        TEXT PRIMARY KEY REFERENCES requests (request_id),
    user_id        TEXT NOT NULL REFERENCES wallets (user_id),
    -- The user's partition hash (walletq's user_hash, its u64 bits as a BIGINT), so that a
    -- partition's worker finds its own users' due holds.
    user_hash      BIGINT NOT NULL,
    amount         NUMERIC(20, 2) NOT NULL CHECK (amount > 0),
    state          TEXT NOT NULL CHECK (state IN ('active', 'captured', 'released', 'expired')),
    captured       NUMERIC(20, 2) CHECK (captured > 0 AND captured <= amount),
    expires_at     TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    closed_at      TIMESTAMPTZ,
    -- The capture or release that closed it; NULL for an expiry.
    closed_by      TEXT UNIQUE REFERENCES requests (request_id),
    -- Where the expiry result goes (the hold's reply_to); NULL: the results queue.
    reply_to       TEXT,
    -- The expiry result, kept until it is published (and after, for the record).
    expiry_result  JSONB,
    expiry_sent    BOOLEAN NOT NULL DEFAULT false,
    CHECK ((state = 'active') = (closed_at IS NULL)),
    CHECK ((state = 'captured') = (captured IS NOT NULL)),
    CHECK ((state IN ('captured', 'released')) = (closed_by IS NOT NULL)),
    CHECK ((state = 'expired') = (expiry_result IS NOT NULL))
);
-- The active holds of a user that are due: read by every batch of that user.
CREATE INDEX holds_active_user_idx ON holds (user_id, expires_at) WHERE state = 'active';
-- The sweeper's scan for due holds and for expiry results not yet published.
CREATE INDEX holds_active_due_idx ON holds (expires_at) WHERE state = 'active';
-- The audit's limit check: a user's holds placed in a 24-hour window.
CREATE INDEX holds_user_created_idx ON holds (user_id, created_at);
CREATE INDEX holds_unsent_idx ON holds (closed_at) WHERE state = 'expired' AND NOT expiry_sent;
