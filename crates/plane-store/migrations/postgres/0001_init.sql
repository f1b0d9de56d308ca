-- Plane controller store, version 1 (PostgreSQL). The same tables as the SQLite schema
-- (migrations/sqlite/0001_init.sql), with PostgreSQL types. Times are milliseconds since
-- the epoch (BIGINT) in the database server's clock: plane_now_ms() is the one place
-- that reads it, so every controller sharing this database agrees on "now".
-- Identifiers use the "C" collation, so ordering is by bytes as in SQLite, whatever
-- the database's default locale. JSON documents are JSON (not JSONB): stored as given,
-- like the SQLite TEXT columns, so that any JSON SQLite accepts is accepted here too
-- (JSONB refuses the escape \u0000).

CREATE FUNCTION plane_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE
    AS $$ SELECT floor(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT $$;

CREATE TABLE controller (
    name TEXT COLLATE "C" PRIMARY KEY,
    last_heartbeat BIGINT NOT NULL
);

CREATE TABLE drone (
    name TEXT COLLATE "C" PRIMARY KEY,
    cluster TEXT COLLATE "C" NOT NULL,
    pool TEXT COLLATE "C" NOT NULL,
    runtimes JSON NOT NULL,
    plane_version TEXT NOT NULL,
    plane_hash TEXT NOT NULL,
    controller TEXT COLLATE "C",
    ready BOOLEAN NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT FALSE,
    last_heartbeat BIGINT NOT NULL
);
CREATE INDEX drone_cluster ON drone (cluster, pool);

CREATE TABLE proxy (
    name TEXT COLLATE "C" PRIMARY KEY,
    cluster TEXT COLLATE "C" NOT NULL,
    plane_version TEXT NOT NULL,
    plane_hash TEXT NOT NULL,
    controller TEXT COLLATE "C",
    connected BOOLEAN NOT NULL,
    last_seen BIGINT NOT NULL
);

-- The fencing token counter (the SQLite schema's `counter` row). CACHE 1: every
-- session draws from the shared counter, so values are issued in increasing order.
CREATE SEQUENCE fencing_token AS BIGINT START WITH 1 NO CYCLE CACHE 1;

CREATE TABLE backend (
    id TEXT COLLATE "C" PRIMARY KEY,
    cluster TEXT COLLATE "C" NOT NULL,
    pool TEXT COLLATE "C" NOT NULL,
    drone TEXT COLLATE "C" NOT NULL,
    executable JSON NOT NULL,
    key_namespace TEXT COLLATE "C" NOT NULL,
    key_name TEXT COLLATE "C" NOT NULL,
    key_tag TEXT NOT NULL,
    fencing_token BIGINT NOT NULL,
    status TEXT NOT NULL,
    status_order INTEGER NOT NULL,
    address TEXT,
    exit_code INTEGER,
    termination_reason TEXT,
    termination_kind TEXT,
    pending_kind TEXT,
    pending_reason TEXT,
    message TEXT,
    static_token TEXT,
    subdomain TEXT,
    lifetime_limit_seconds BIGINT,
    max_idle_seconds BIGINT,
    created_at BIGINT NOT NULL,
    last_active BIGINT NOT NULL
);
CREATE INDEX backend_drone ON backend (drone, status_order);
CREATE INDEX backend_live ON backend (status_order);

CREATE TABLE backend_status (
    backend_id TEXT COLLATE "C" NOT NULL REFERENCES backend (id),
    status TEXT NOT NULL,
    status_order INTEGER NOT NULL,
    time BIGINT NOT NULL,
    termination_reason TEXT,
    termination_kind TEXT,
    exit_error BOOLEAN,
    PRIMARY KEY (backend_id, status_order)
);

-- At most one row per key: the uniqueness that backs "one backend per key".
CREATE TABLE backend_key (
    namespace TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    backend_id TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES backend (id),
    tag TEXT NOT NULL,
    fencing_token BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);

CREATE TABLE token (
    token TEXT COLLATE "C" PRIMARY KEY,
    backend_id TEXT COLLATE "C" NOT NULL REFERENCES backend (id),
    username TEXT COLLATE "C",
    auth JSON,
    secret_token TEXT,
    revoked BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL
);
CREATE INDEX token_backend ON token (backend_id, username);
