-- Plane controller store, version 1. Times are milliseconds since the epoch in the
-- store's clock.

CREATE TABLE controller (
    name TEXT PRIMARY KEY,
    last_heartbeat INTEGER NOT NULL
);

CREATE TABLE drone (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    pool TEXT NOT NULL,
    runtimes TEXT NOT NULL,
    plane_version TEXT NOT NULL,
    plane_hash TEXT NOT NULL,
    controller TEXT,
    ready INTEGER NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    last_heartbeat INTEGER NOT NULL
);
CREATE INDEX drone_cluster ON drone (cluster, pool);

CREATE TABLE proxy (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    plane_version TEXT NOT NULL,
    plane_hash TEXT NOT NULL,
    controller TEXT,
    connected INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);

CREATE TABLE counter (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counter (name, value) VALUES ('fencing_token', 0);

CREATE TABLE backend (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    pool TEXT NOT NULL,
    drone TEXT NOT NULL,
    executable TEXT NOT NULL,
    key_namespace TEXT NOT NULL,
    key_name TEXT NOT NULL,
    key_tag TEXT NOT NULL,
    fencing_token INTEGER NOT NULL,
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
    lifetime_limit_seconds INTEGER,
    max_idle_seconds INTEGER,
    created_at INTEGER NOT NULL,
    last_active INTEGER NOT NULL
);
CREATE INDEX backend_drone ON backend (drone, status_order);
CREATE INDEX backend_live ON backend (status_order);

CREATE TABLE backend_status (
    backend_id TEXT NOT NULL REFERENCES backend (id),
    status TEXT NOT NULL,
    status_order INTEGER NOT NULL,
    time INTEGER NOT NULL,
    termination_reason TEXT,
    termination_kind TEXT,
    exit_error INTEGER,
    PRIMARY KEY (backend_id, status_order)
);

-- At most one row per key: the uniqueness that backs "one backend per key".
CREATE TABLE backend_key (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    backend_id TEXT NOT NULL UNIQUE REFERENCES backend (id),
    tag TEXT NOT NULL,
    fencing_token INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);

CREATE TABLE token (
    token TEXT PRIMARY KEY,
    backend_id TEXT NOT NULL REFERENCES backend (id),
    username TEXT,
    auth TEXT,
    secret_token TEXT,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE INDEX token_backend ON token (backend_id, username);
