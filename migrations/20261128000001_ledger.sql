-- Wallets: one per user, created by the first deposit. Never negative.
CREATE TABLE wallets (
    user_id     TEXT PRIMARY KEY,
    balance     NUMERIC(20, 2) NOT NULL CHECK (balance >= 0),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Highest Redis fencing token that has written for a user. A batch carrying a lower
-- token (its lock expired and a newer holder wrote) is refused.
CREATE TABLE user_fences (
    user_id  TEXT PRIMARY KEY,
    fence    BIGINT NOT NULL
);

-- Every valid request ever processed, with the result that was sent: idempotency forever.
CREATE TABLE requests (
    request_id    TEXT PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 64),
    user_id       TEXT NOT NULL,
    op            TEXT NOT NULL CHECK (op IN ('withdraw', 'deposit')),
    amount        NUMERIC(20, 2) NOT NULL CHECK (amount > 0),
    status        TEXT NOT NULL CHECK (status IN ('approved', 'rejected')),
    reason        TEXT,
    result        JSONB NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX requests_user_idx ON requests (user_id, processed_at);

-- Append-only ledger: one entry per balance change.
CREATE TABLE ledger_entries (
    entry_id       BIGSERIAL PRIMARY KEY,
    request_id     TEXT NOT NULL UNIQUE REFERENCES requests (request_id),
    user_id        TEXT NOT NULL REFERENCES wallets (user_id),
    delta          NUMERIC(20, 2) NOT NULL CHECK (delta <> 0),
    balance_after  NUMERIC(20, 2) NOT NULL CHECK (balance_after >= 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_user_idx ON ledger_entries (user_id, entry_id);

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only';
END;
$$;
CREATE TRIGGER ledger_entries_no_update_or_delete
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

-- Coupons granted by deposits (one per qualifying deposit).
CREATE TABLE coupons (
    code        TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES wallets (user_id),
    kind        TEXT NOT NULL CHECK (kind IN ('red_packet_10', 'spend_300_save_50', 'lifetime_20_off')),
    request_id  TEXT NOT NULL UNIQUE REFERENCES requests (request_id),
    granted_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX coupons_user_idx ON coupons (user_id);
