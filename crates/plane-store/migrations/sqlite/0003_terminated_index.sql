-- Finds terminated backends by the time they terminated (their `terminated` status
-- entry), longest terminated first, for the cleanup of old backends and their tokens.
CREATE INDEX backend_status_terminated ON backend_status (time, backend_id) WHERE status_order = 70;
