-- no-transaction
-- CONCURRENTLY keeps the host's intakes table writable while the index
-- builds. It cannot run in a transaction (hence the directive) nor share a
-- multi-statement query, so each index has a migration of its own.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_intakes_recording_id ON intakes (recording_id);
