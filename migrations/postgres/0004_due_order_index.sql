-- The due index in the claim's own order: (next_attempt_at, id) for queued recipients.
--
-- claim_due reads "ORDER BY next_attempt_at, id LIMIT n". With an index on next_attempt_at alone, every
-- recipient sharing the earliest due time had to be read and sorted by id before the first n came out —
-- and a backlog shares one due time whenever it was queued in bursts, released from hold or flushed
-- (`relay queue release|flush` set it to "now" for every row). Measured with bench/claims.py (1,000,000
-- recipients due at one instant): 309 ms per claim of 100 against 8 ms at 10,000. With id in the index
-- a claim reads its n entries and stops.
--
-- Plain CREATE INDEX (migrations run in a transaction): on a large queue it holds writes to recipients
-- for the few seconds the build takes; run `relay db migrate` in a quiet moment on big installations.
CREATE INDEX recipients_due_order ON recipients (next_attempt_at, id) WHERE state = 'queued';
DROP INDEX recipients_due;
