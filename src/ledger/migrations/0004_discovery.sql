-- Why: discovery tracks checkouts created anywhere (Search Checkouts with afterId), and a refund
-- that leaves the status unchanged (a second partial refund) is history of its own.
--
-- discovery_cursor: per checkout type, the highest checkout id discovery has handled, so a
-- restart resumes with afterId = after_id and neither misses nor repeats a checkout.
CREATE TABLE discovery_cursor (
    kind       TEXT PRIMARY KEY,
    after_id   TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- refunded_to:   totalRefunded as Get Checkout gave it with this entry (NULL if it did not).
-- refunded_from: the total recorded before, set only when this entry changed the total; an entry
--                whose status did not change (from_status = to_status) is a refund of its own.
ALTER TABLE transitions ADD COLUMN refunded_from TEXT;
ALTER TABLE transitions ADD COLUMN refunded_to TEXT;

-- A checkout discovered without Firebase coordinates is tracked with empty coordinates: the
-- reconciler checks it, the listener does not.
