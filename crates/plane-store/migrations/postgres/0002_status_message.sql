-- A human-readable detail per status entry (for example why an image pull failed), so
-- that it is visible in the status API and not only in the drone's log.
ALTER TABLE backend_status ADD COLUMN message TEXT;
