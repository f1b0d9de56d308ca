-- Tokens may expire (store clock, ms since the epoch; NULL = valid for the backend's
-- life, as in Plane 0.5).
ALTER TABLE token ADD COLUMN expires_at INTEGER;

-- ACME DNS-01 issuance: one proxy per cluster holds the lease while it issues, and the
-- TXT values it publishes (a JSON array) are served by the DNS servers while the lease
-- lives. The same table as migrations/postgres/0004_token_expiry_cert_lease.sql.
CREATE TABLE cert_lease (
    cluster TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    txt_values TEXT NOT NULL DEFAULT '[]'
);
