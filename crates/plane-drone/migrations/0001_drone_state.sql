-- The drone's local state store, version 1.
-- `meta`: drone-wide values (the persistent drone name).
-- `backends`: every backend this drone owns or has reported on, with what is needed to
--   re-adopt it after a restart (its runtime handle) and to keep renewing its key.
-- `outbox`: state events not yet acknowledged by the controller, in event_id order.
--   AUTOINCREMENT keeps event ids strictly increasing even after rows are deleted.

CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE backends (
    backend_id TEXT PRIMARY KEY NOT NULL,
    -- The SpawnAction as received (JSON); NULL for a backend only known from a Terminate.
    spawn TEXT,
    -- The current LeaseDeadlines (JSON), replaced on each renewal.
    deadlines TEXT,
    -- The last status reported (and recorded in the outbox).
    status TEXT NOT NULL,
    -- Where the backend listens (`ip:port`), once started.
    address TEXT,
    -- The runtime handle (JSON), once started.
    handle TEXT,
    termination_reason TEXT,
    termination_kind TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE INDEX backends_by_status ON backends (status);

CREATE TABLE outbox (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend_id TEXT NOT NULL,
    status TEXT NOT NULL,
    address TEXT,
    exit_code INTEGER,
    termination_reason TEXT,
    termination_kind TEXT,
    message TEXT,
    created_at INTEGER NOT NULL
);
