-- The suppression list and the event outbox.
-- Times are UNIX epoch seconds (REAL, UTC), as everywhere in the relay's interfaces.
-- One statement per ';' (the runner splits on complete statements and applies them in one transaction).

-- One row per (value, kind, scope). Values are stored normalised (relay.policies.addresses): lower-case,
-- IDNA-encoded domains, canonical IP text. scope '' applies to every sender, else to one sender domain.
CREATE TABLE suppressions (
    value      TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('address', 'domain', 'ip')),
    scope      TEXT NOT NULL DEFAULT '',
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL,
    note       TEXT NOT NULL DEFAULT '',
    -- Value first: a lookup knows the values (the address, its domain, the IP) but not which kinds and
    -- scopes hold them, so this one key is both the uniqueness rule and the lookup index.
    PRIMARY KEY (value, kind, scope)
) WITHOUT ROWID;

-- Purging expired entries walks only the rows that can expire.
CREATE INDEX suppressions_expires_at ON suppressions (expires_at) WHERE expires_at IS NOT NULL;

-- The outbox: events appended by plugins (suppressed, unsubscribed, complained, opened, …) for webhook
-- delivery. The id is the idempotency key a receiver deduplicates on.
CREATE TABLE events (
    id              TEXT PRIMARY KEY NOT NULL,
    type            TEXT NOT NULL,
    created_at      REAL NOT NULL,
    message_id      TEXT,
    recipient       TEXT,
    -- A JSON object.
    data            TEXT NOT NULL DEFAULT '{}',
    -- Delivery to webhooks: due at next_attempt_at until delivered or given up (dead).
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at    REAL,
    dead_at         REAL,
    last_error      TEXT
);

-- The webhook sender claims undelivered events in due order; the partial index holds only those.
CREATE INDEX events_pending ON events (next_attempt_at) WHERE delivered_at IS NULL AND dead_at IS NULL;
-- Listing by time (CLI, tests) and purging old events.
CREATE INDEX events_created_at ON events (created_at);
