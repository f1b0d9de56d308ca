-- Finds terminated backends by the time they terminated (their `terminated` status
-- entry), longest terminated first, for the cleanup of old backends and their tokens.
-- The same index as migrations/sqlite/0003_terminated_index.sql.
CREATE INDEX backend_status_terminated ON backend_status (time, backend_id) WHERE status_order = 70;
