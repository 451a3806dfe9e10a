-- The due index in the claim's own order: (next_attempt_at, id) for queued recipients (see the Postgres
-- migration of the same number for why). SQLite already breaks ties by rowid (= id) in an index on
-- next_attempt_at alone; the index is rebuilt with id spelled out so that both stores have the same
-- schema and the same plan for the claim.
CREATE INDEX recipients_due_order ON recipients (next_attempt_at, id) WHERE state = 'queued';
DROP INDEX recipients_due;
