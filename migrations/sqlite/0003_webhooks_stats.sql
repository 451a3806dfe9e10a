-- Webhook delivery per endpoint, hourly statistics and raised alerts.
-- Times are UNIX epoch seconds (REAL, UTC), as everywhere in the relay's interfaces.
-- One statement per ';' (the runner splits on complete statements and applies them in one transaction).
--
-- The outbox (events, 0002) is fanned out to the configured endpoints: the webhook loop takes undispatched
-- events in due order (the events_pending index), writes one webhook_deliveries row per endpoint whose
-- filter matches, and sets events.delivered_at — which from here on means "handed to the endpoints"
-- (events.attempts, dead_at and last_error stay unused: each endpoint's delivery keeps its own).

-- One row per (endpoint, event): retried with back-off under a lease (as recipient claims are), until
-- delivered or given up (dead-lettered) once the retry window that began at created_at has passed.
CREATE TABLE webhook_deliveries (
    endpoint        TEXT NOT NULL,
    event_id        TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    -- When the event was queued for this endpoint (or replayed): the retry window starts here.
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner     TEXT,
    lease_until     REAL,
    delivered_at    REAL,
    dead_at         REAL,
    last_error      TEXT,
    PRIMARY KEY (endpoint, event_id)
) WITHOUT ROWID;

-- A claim walks one endpoint's waiting rows in due order; the partial index holds only those.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
-- Dead letters are listed and replayed by time.
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (dead_at) WHERE dead_at IS NOT NULL;
-- Deleting an event (retention) finds its deliveries.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- Health of each endpoint, shared by every relay node: consecutive failures and the pause they caused.
CREATE TABLE webhook_endpoints (
    endpoint             TEXT PRIMARY KEY NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    paused_until         REAL,
    last_error           TEXT,
    updated_at           REAL NOT NULL
);

-- Hourly aggregates of the events, per sender domain and per destination domain (materialised by the
-- stats job; an hour is recomputed whole from the events, so recomputing is always safe).
CREATE TABLE stats_hourly (
    dimension    TEXT NOT NULL CHECK (dimension IN ('sender', 'destination')),
    hour         REAL NOT NULL,
    domain       TEXT NOT NULL,
    sent         INTEGER NOT NULL DEFAULT 0,
    delivered    INTEGER NOT NULL DEFAULT 0,
    bounced_hard INTEGER NOT NULL DEFAULT 0,
    bounced_soft INTEGER NOT NULL DEFAULT 0,
    deferred     INTEGER NOT NULL DEFAULT 0,
    complained   INTEGER NOT NULL DEFAULT 0,
    opened       INTEGER NOT NULL DEFAULT 0,
    clicked      INTEGER NOT NULL DEFAULT 0,
    computed_at  REAL NOT NULL,
    PRIMARY KEY (dimension, hour, domain)
) WITHOUT ROWID;

-- The last alert raised per (kind, scope): an alert is raised again only after its period, or when it
-- escalates from warning to critical. The conditional upsert makes that hold across relay nodes.
CREATE TABLE alerts_raised (
    kind      TEXT NOT NULL,
    scope     TEXT NOT NULL,
    level     TEXT NOT NULL CHECK (level IN ('warning', 'critical')),
    raised_at REAL NOT NULL,
    PRIMARY KEY (kind, scope)
) WITHOUT ROWID;
