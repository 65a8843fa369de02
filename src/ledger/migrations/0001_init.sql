-- The first schema: checkouts, their verified history, the hook outbox, listener resume state.
-- Money is stored as exact decimal text, times as RFC 3339 UTC text with milliseconds (so they
-- sort as text).

CREATE TABLE checkouts (
    id                  TEXT PRIMARY KEY,
    order_id            TEXT,
    request_id          TEXT,
    display_id          TEXT,
    amount              TEXT NOT NULL,
    currency            TEXT NOT NULL,
    -- NULL until a status has been verified with Get Checkout.
    status              TEXT,
    total_refunded      TEXT,
    redirect_url        TEXT,
    firebase_database   TEXT NOT NULL,
    firebase_collection TEXT NOT NULL,
    firebase_document   TEXT NOT NULL,
    -- 1 while the daemon should listen to the checkout's document.
    watched             INTEGER NOT NULL DEFAULT 1,
    -- For PAID checkouts: stop watching after this time (refund-watch period).
    watch_until         TEXT,
    -- 1 when a change was seen but not yet verified (survives a crash; the reconciler picks it up).
    needs_verify        INTEGER NOT NULL DEFAULT 1,
    -- How paywatch learned of it: link-create, track, track-fetch, daemon.
    tracked_via         TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    verified_at         TEXT
);
CREATE INDEX checkouts_order_id ON checkouts (order_id);
CREATE INDEX checkouts_status ON checkouts (status);
CREATE INDEX checkouts_watched ON checkouts (watched);

-- Append-only: every verified status change.
CREATE TABLE transitions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    checkout_id   TEXT NOT NULL REFERENCES checkouts (id),
    from_status   TEXT,
    to_status     TEXT NOT NULL,
    source        TEXT NOT NULL CHECK (source IN ('firestore', 'reconcile', 'manual')),
    -- When the change happened upstream (the Firestore document's update time), if known.
    changed_at    TEXT,
    verified_at   TEXT NOT NULL,
    -- Milliseconds from the change to its verification, if known.
    latency_ms    INTEGER,
    -- The Get Checkout result, verbatim.
    verified_json TEXT NOT NULL
);
CREATE INDEX transitions_checkout ON transitions (checkout_id, id);
CREATE INDEX transitions_verified_at ON transitions (verified_at);

CREATE TRIGGER transitions_are_append_only_update BEFORE UPDATE ON transitions
BEGIN
    SELECT RAISE(ABORT, 'transitions are append-only');
END;
CREATE TRIGGER transitions_are_append_only_delete BEFORE DELETE ON transitions
BEGIN
    SELECT RAISE(ABORT, 'transitions are append-only');
END;

-- The hook outbox: one row per (transition, hook), written in the transition's transaction.
CREATE TABLE hook_deliveries (
    event_id        TEXT PRIMARY KEY,
    transition_id   INTEGER NOT NULL REFERENCES transitions (id),
    checkout_id     TEXT NOT NULL REFERENCES checkouts (id),
    hook            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_exit_code  INTEGER,
    last_error      TEXT,
    -- 1 for deliveries made by `hooks replay`.
    replay          INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    delivered_at    TEXT
);
CREATE INDEX hook_deliveries_due ON hook_deliveries (state, next_attempt_at);
CREATE INDEX hook_deliveries_order ON hook_deliveries (checkout_id, hook, transition_id);

-- Firestore listener resume state, one row per watched checkout (one target per checkout).
CREATE TABLE listen_targets (
    checkout_id  TEXT PRIMARY KEY REFERENCES checkouts (id),
    resume_token BLOB NOT NULL,
    read_time    TEXT,
    updated_at   TEXT NOT NULL
);
