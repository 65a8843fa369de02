-- Why: Firestore may refuse to watch one checkout's document (a TargetChange REMOVE with a
-- cause, e.g. PERMISSION_DENIED from the project's security rules) while the stream and its
-- other checkouts carry on. The refusal is kept here so `paywatch status` can show it; the
-- listener retries the document with a long backoff and the reconciler keeps checking it.
-- A row is removed when Firestore accepts the document again (and at daemon start).
CREATE TABLE listen_refusals (
    checkout_id      TEXT PRIMARY KEY REFERENCES checkouts (id),
    -- The gRPC code name, e.g. PERMISSION_DENIED.
    refusal_code     TEXT NOT NULL,
    refusal_message  TEXT NOT NULL,
    -- The document's full resource name as it was sent.
    refused_document TEXT NOT NULL,
    first_refused_at TEXT NOT NULL,
    last_refused_at  TEXT NOT NULL,
    -- Refusals in a row.
    refusal_count    INTEGER NOT NULL,
    -- When the listener asks Firestore again.
    next_retry_at    TEXT
);
