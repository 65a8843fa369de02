-- Why: several daemons may share one PostgreSQL ledger, and exactly one may act. The one that
-- holds the lease (one row) is active; a lease not renewed by the database's own clock expires,
-- and a standby takes it over with the next epoch. Every write a daemon makes is fenced by its
-- epoch, in the write's own transaction, so a daemon paused past its lease cannot write when it
-- wakes up. (The election is riverqueue/river's: INSERT ... ON CONFLICT, renewed only by its
-- holder, expired by now() on the server, resigned with pg_notify; the epoch and the fence are
-- ours.)

CREATE TABLE lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    -- The holding daemon's instance name (host, process id and a random part).
    holder     TEXT NOT NULL,
    -- Grows by one at every election, whoever wins it; never reused.
    epoch      BIGINT NOT NULL CHECK (epoch > 0),
    elected_at TIMESTAMPTZ NOT NULL,
    -- By the database's clock; '-infinity' once resigned.
    expires_at TIMESTAMPTZ NOT NULL
);

-- The election lock (an advisory lock, key 0x706179776c656173, "paywleas" in ASCII): an election
-- takes it exclusively, every fenced write shares it until its transaction ends. So an election
-- waits for the writes under way to commit or roll back, and a write that starts after an
-- election sees its new epoch. A writer paused inside its transaction is ended by the server's
-- idle_in_transaction_session_timeout, which the daemon sets on its connections.

-- Wins the lease for `candidate` for `ttl_ms` if no one holds it (never held, expired or
-- resigned): returns the new epoch, or NULL when someone else holds it.
CREATE FUNCTION paywatch_elect(candidate TEXT, ttl_ms BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    won BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(8097887158815514995);
    INSERT INTO lease AS l (id, holder, epoch, elected_at, expires_at)
        VALUES (1, candidate, 1, clock_timestamp(),
                clock_timestamp() + ttl_ms * INTERVAL '1 millisecond')
    ON CONFLICT (id) DO UPDATE
        SET holder = excluded.holder, epoch = l.epoch + 1,
            elected_at = excluded.elected_at, expires_at = excluded.expires_at
        WHERE l.expires_at <= clock_timestamp()
    RETURNING epoch INTO won;
    IF won IS NOT NULL THEN
        PERFORM pg_notify('paywatch_lease', 'elected ' || won);
    END IF;
    RETURN won;
END
$$;

-- Renews the lease held by `holder` at `claimed` for `ttl_ms` more: true, or false when that
-- lease has expired or passed to someone else (renewal never revives an expired lease).
CREATE FUNCTION paywatch_renew(holder_name TEXT, claimed BIGINT, ttl_ms BIGINT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE lease
       SET expires_at = clock_timestamp() + ttl_ms * INTERVAL '1 millisecond'
     WHERE id = 1 AND holder = holder_name AND epoch = claimed
       AND expires_at > clock_timestamp();
    RETURN FOUND;
END
$$;

-- Gives up the lease held by `holder` at `claimed` and wakes the standbys (LISTEN
-- paywatch_lease) so they need not wait out the lease.
CREATE FUNCTION paywatch_resign(holder_name TEXT, claimed BIGINT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE lease SET expires_at = '-infinity'
     WHERE id = 1 AND holder = holder_name AND epoch = claimed
       AND expires_at > clock_timestamp();
    IF FOUND THEN
        PERFORM pg_notify('paywatch_lease', 'resigned ' || claimed);
    END IF;
    RETURN FOUND;
END
$$;

-- The fence: the first statement of every write transaction a daemon makes. It shares the
-- election lock until the transaction ends and refuses (SQLSTATE PW001, aborting the
-- transaction) unless `claimed` is the current, unexpired epoch. PL/pgSQL takes a new snapshot
-- for each statement, so the check reads the lease after the lock is granted.
CREATE FUNCTION paywatch_fence(claimed BIGINT) RETURNS VOID
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    current_epoch BIGINT;
    live BOOLEAN;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(8097887158815514995);
    SELECT epoch, expires_at > clock_timestamp() INTO current_epoch, live FROM lease WHERE id = 1;
    IF current_epoch IS DISTINCT FROM claimed OR NOT live THEN
        RAISE EXCEPTION USING
            ERRCODE = 'PW001',
            MESSAGE = format('lease epoch %s is not current (the lease is at epoch %s, %s)',
                             claimed, coalesce(current_epoch::TEXT, 'none'),
                             CASE WHEN live THEN 'held' ELSE 'expired' END);
    END IF;
    PERFORM set_config('paywatch.epoch', claimed::TEXT, TRUE);
END
$$;

-- A daemon's connections say so (the session setting paywatch.role = 'daemon'); on them a
-- write to any ledger table without the fence in its transaction is refused, so no write path
-- can forget it. Operators' commands (track, link create, hooks replay, ledger copy) do not
-- run as a daemon and need no lease.
CREATE FUNCTION paywatch_fenced_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('paywatch.role', TRUE) = 'daemon'
       AND coalesce(current_setting('paywatch.epoch', TRUE), '') = '' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'PW001',
            MESSAGE = format('a daemon wrote to %s without holding the lease', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER checkouts_fenced BEFORE INSERT OR UPDATE OR DELETE ON checkouts
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER transitions_fenced BEFORE INSERT ON transitions
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER hook_deliveries_fenced BEFORE INSERT OR UPDATE OR DELETE ON hook_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER listen_targets_fenced BEFORE INSERT OR UPDATE OR DELETE ON listen_targets
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER listen_refusals_fenced BEFORE INSERT OR UPDATE OR DELETE ON listen_refusals
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER verify_tickets_fenced BEFORE INSERT OR UPDATE OR DELETE ON verify_tickets
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER discovery_epoch_fenced BEFORE INSERT OR UPDATE OR DELETE ON discovery_epoch
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
CREATE TRIGGER discovery_rounds_fenced BEFORE INSERT OR UPDATE OR DELETE ON discovery_rounds
    FOR EACH STATEMENT EXECUTE FUNCTION paywatch_fenced_write();
