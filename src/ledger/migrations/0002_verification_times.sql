-- Why: the crash-safety of "a change was seen but not yet verified" must not depend on which of
-- two near-simultaneous events (the change arriving, a Get Checkout answering) wrote first.
-- Times are kept as integer microseconds so they order exactly.
--
-- needs_verify_since_us: when the earliest change not yet covered by a verification was seen.
-- verify_requested_us:   when the request behind the last applied verification was sent; a
--                        verification requested earlier than that is stale and ignored.
-- not_found_count:       consecutive Get Checkout answers saying the checkout does not exist.
ALTER TABLE checkouts ADD COLUMN needs_verify_since_us INTEGER;
ALTER TABLE checkouts ADD COLUMN verify_requested_us INTEGER;
ALTER TABLE checkouts ADD COLUMN not_found_count INTEGER NOT NULL DEFAULT 0;
