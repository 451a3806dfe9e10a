-- Webhook delivery per endpoint, hourly statistics and raised alerts.
-- Times are UNIX epoch seconds (double precision, UTC), as everywhere in the relay's interfaces.
--
-- The outbox (events, 0002) is fanned out to the configured endpoints: the webhook loop takes undispatched
-- events in due order (the events_pending index), writes one webhook_deliveries row per endpoint whose
-- filter matches, and sets events.delivered_at — which from here on means "handed to the endpoints"
-- (events.attempts, dead_at and last_error stay unused: each endpoint's delivery keeps its own).

-- One row per (endpoint, event): retried with back-off under a lease (as recipient claims are), until
-- delivered or given up (dead-lettered) once the retry window that began at created_at has passed.
CREATE TABLE webhook_deliveries (
    endpoint        text NOT NULL,
    event_id        text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    -- When the event was queued for this endpoint (or replayed): the retry window starts here.
    created_at      double precision NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    lease_owner     text,
    lease_until     double precision,
    delivered_at    double precision,
    dead_at         double precision,
    last_error      text,
    PRIMARY KEY (endpoint, event_id)
);

-- A claim walks one endpoint's waiting rows in due order; the partial index holds only those.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
-- Dead letters are listed and replayed by time.
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (dead_at) WHERE dead_at IS NOT NULL;
-- Deleting an event (retention) finds its deliveries.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- Health of each endpoint, shared by every relay node: consecutive failures and the pause they caused.
CREATE TABLE webhook_endpoints (
    endpoint             text PRIMARY KEY,
    consecutive_failures integer NOT NULL DEFAULT 0,
    paused_until         double precision,
    last_error           text,
    updated_at           double precision NOT NULL
);

-- Hourly aggregates of the events, per sender domain and per destination domain (materialised by the
-- stats job; an hour is recomputed whole from the events, so recomputing is always safe).
CREATE TABLE stats_hourly (
    dimension    text NOT NULL CHECK (dimension IN ('sender', 'destination')),
    hour         double precision NOT NULL,
    domain       text NOT NULL,
    sent         integer NOT NULL DEFAULT 0,
    delivered    integer NOT NULL DEFAULT 0,
    bounced_hard integer NOT NULL DEFAULT 0,
    bounced_soft integer NOT NULL DEFAULT 0,
    deferred     integer NOT NULL DEFAULT 0,
    complained   integer NOT NULL DEFAULT 0,
    opened       integer NOT NULL DEFAULT 0,
    clicked      integer NOT NULL DEFAULT 0,
    computed_at  double precision NOT NULL,
    PRIMARY KEY (dimension, hour, domain)
);

-- The last alert raised per (kind, scope): an alert is raised again only after its period, or when it
-- escalates from warning to critical. The conditional upsert makes that hold across relay nodes.
CREATE TABLE alerts_raised (
    kind      text NOT NULL,
    scope     text NOT NULL,
    level     text NOT NULL CHECK (level IN ('warning', 'critical')),
    raised_at double precision NOT NULL,
    PRIMARY KEY (kind, scope)
);
