-- The queue: messages, one row per recipient, attempt history and SMTP AUTH users.
-- Times are UNIX epoch seconds (REAL, UTC), as everywhere in the relay's interfaces.
-- One statement per ';' (the runner splits on complete statements and applies them in one transaction).

CREATE TABLE messages (
    id          TEXT PRIMARY KEY NOT NULL,
    sender      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    received_at REAL NOT NULL,
    client_ip   TEXT NOT NULL DEFAULT '',
    client_helo TEXT NOT NULL DEFAULT '',
    auth_user   TEXT,
    listener    TEXT NOT NULL DEFAULT '',
    envid       TEXT,
    ret         TEXT,
    smtputf8    INTEGER NOT NULL DEFAULT 0,
    data        BLOB NOT NULL
);

-- Queue lifetime (claim_expired) and purge both walk messages by reception time.
CREATE INDEX messages_received_at ON messages (received_at);

CREATE TABLE recipients (
    -- AUTOINCREMENT: ids are never reused after a purge, because attempt history outlives recipients
    -- and must never be attributed to a newer recipient that happens to get the same id.
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address         TEXT NOT NULL,
    domain          TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'held', 'delivered', 'bounced', 'expired', 'deleted')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_reply      TEXT,
    notify          TEXT,
    orcpt           TEXT,
    lease_owner     TEXT,
    lease_until     REAL,
    updated_at      REAL NOT NULL
);

CREATE INDEX recipients_message ON recipients (message_id);
-- Claims scan queued rows in due order and stop at LIMIT; the partial index holds only queued rows.
CREATE INDEX recipients_due ON recipients (next_attempt_at) WHERE state = 'queued';
-- Leased rows are few (the ones in flight); next_due_at needs their lease ends.
CREATE INDEX recipients_leased ON recipients (lease_until) WHERE lease_until IS NOT NULL;

-- Attempt history outlives the message (purge removes it separately, by age), so no foreign keys here.
CREATE TABLE attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient_id INTEGER NOT NULL,
    message_id   TEXT NOT NULL,
    started_at   REAL NOT NULL,
    duration     REAL NOT NULL,
    mx_host      TEXT,
    tls_version  TEXT,
    reply        TEXT,
    category     TEXT,
    outcome      TEXT NOT NULL
);

CREATE INDEX attempts_recipient ON attempts (recipient_id);
CREATE INDEX attempts_started_at ON attempts (started_at);

CREATE TABLE users (
    username               TEXT PRIMARY KEY NOT NULL,
    password_hash          TEXT NOT NULL,
    -- A JSON array of domain names.
    allowed_sender_domains TEXT NOT NULL DEFAULT '[]',
    expires_at             REAL,
    disabled               INTEGER NOT NULL DEFAULT 0,
    quota_per_minute       INTEGER NOT NULL DEFAULT 0,
    quota_per_day          INTEGER NOT NULL DEFAULT 0,
    created_at             REAL NOT NULL
);
