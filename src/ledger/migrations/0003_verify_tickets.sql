-- Why: verification requests were ordered by wall-clock microseconds, and a clock stepped
-- backwards (NTP, a VM restore) made every later answer look older than one already recorded,
-- PAID included. Requests are now ordered by tickets from a counter kept here, which only grows,
-- across restarts too.
--
-- verify_tickets.last:     the last ticket handed out (one row).
-- verify_requested_ticket: the ticket of the request behind the last applied verification; an
--                          answer to a request with an earlier ticket is stale.
-- needs_verify_after:      a change not yet verified was seen when the counter stood here; only a
--                          verification requested with a later ticket clears needs_verify.
CREATE TABLE verify_tickets (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT INTO verify_tickets (id, last) VALUES (1, 0);

ALTER TABLE checkouts ADD COLUMN verify_requested_ticket INTEGER;
ALTER TABLE checkouts ADD COLUMN needs_verify_after INTEGER;
-- A change noted before this migration is cleared by any verification after it.
UPDATE checkouts SET needs_verify_after = 0 WHERE needs_verify_since_us IS NOT NULL;
ALTER TABLE checkouts DROP COLUMN verify_requested_us;
ALTER TABLE checkouts DROP COLUMN needs_verify_since_us;
