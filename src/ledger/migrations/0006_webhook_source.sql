-- Why: webhook notifications (POST /webhooks/paymennt) are a fourth source of nudges, and a
-- transition they led to is recorded with source 'webhook'.
--
-- The only change is a wider CHECK on transitions.source. SQLite cannot alter a CHECK in place;
-- rather than rebuild an append-only table that hook_deliveries references, the constraint text
-- is edited in the schema, the procedure SQLite's ALTER TABLE documentation gives for changes
-- that do not touch stored rows (every stored row already satisfies the wider check). The
-- schema version is bumped so every connection re-reads the schema.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql, 'CHECK (source IN (''firestore'', ''reconcile'', ''manual''))',
                          'CHECK (source IN (''firestore'', ''reconcile'', ''manual'', ''webhook''))')
 WHERE type = 'table' AND name = 'transitions';
PRAGMA writable_schema = OFF;
