-- Why: discovery must neither re-fire payments handled before paywatch could see them nor trust
-- an order of Search Checkouts results that paymennt never promised.
--
-- discovery_epoch: when discovery first ran on this ledger (one row). A checkout discovery finds
-- that was created before the epoch and whose first verified status is not open is a baseline:
-- recorded with source 'discovery-import', no hook delivery queued. A ledger on which an earlier
-- paywatch already ran discovery takes its oldest cursor's time as the epoch.
CREATE TABLE discovery_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch TEXT NOT NULL
);
INSERT INTO discovery_epoch (id, epoch)
    SELECT 1, min(updated_at) FROM discovery_cursor HAVING count(*) > 0;

-- discovery_rounds: per checkout type, when the last complete round started. The next round
-- searches with afterTimestamp = that time minus an overlap, page by page, whatever order the
-- results come in. Rows of the old id cursor carry over with the time the cursor last moved.
CREATE TABLE discovery_rounds (
    kind        TEXT PRIMARY KEY,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
INSERT INTO discovery_rounds (kind, started_at, finished_at)
    SELECT kind, updated_at, updated_at FROM discovery_cursor;

-- A baseline's history entry has a source of its own.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql, 'CHECK (source IN (''firestore'', ''reconcile'', ''manual'', ''webhook''))',
                          'CHECK (source IN (''firestore'', ''reconcile'', ''manual'', ''webhook'', ''discovery-import''))')
 WHERE type = 'table' AND name = 'transitions';
PRAGMA writable_schema = OFF;
