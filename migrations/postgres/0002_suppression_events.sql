-- The suppression list and the event outbox.
-- Times are UNIX epoch seconds (double precision, UTC), as everywhere in the relay's interfaces.

-- One row per (value, kind, scope). Values are stored normalised (relay.policies.addresses): lower-case,
-- IDNA-encoded domains, canonical IP text. scope '' applies to every sender, else to one sender domain.
CREATE TABLE suppressions (
    value      text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('address', 'domain', 'ip')),
    scope      text NOT NULL DEFAULT '',
    reason     text NOT NULL,
    source     text NOT NULL DEFAULT '',
    created_at double precision NOT NULL,
    expires_at double precision,
    note       text NOT NULL DEFAULT '',
    -- Value first: a lookup knows the values (the address, its domain, the IP) but not which kinds and
    -- scopes hold them, so this one key is both the uniqueness rule and the lookup index.
    PRIMARY KEY (value, kind, scope)
);

-- Purging expired entries walks only the rows that can expire.
CREATE INDEX suppressions_expires_at ON suppressions (expires_at) WHERE expires_at IS NOT NULL;

-- The outbox: events appended by plugins (suppressed, unsubscribed, complained, opened, …) for webhook
-- delivery. The id is the idempotency key a receiver deduplicates on.
CREATE TABLE events (
    id              text PRIMARY KEY,
    type            text NOT NULL,
    created_at      double precision NOT NULL,
    message_id      text,
    recipient       text,
    data            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Delivery to webhooks: due at next_attempt_at until delivered or given up (dead).
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    delivered_at    double precision,
    dead_at         double precision,
    last_error      text
);

-- The webhook sender claims undelivered events in due order; the partial index holds only those.
CREATE INDEX events_pending ON events (next_attempt_at) WHERE delivered_at IS NULL AND dead_at IS NULL;
-- Listing by time (CLI, tests) and purging old events.
CREATE INDEX events_created_at ON events (created_at);
