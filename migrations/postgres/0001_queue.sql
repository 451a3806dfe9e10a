-- The queue: messages, one row per recipient, attempt history and SMTP AUTH users.
-- Times are UNIX epoch seconds (double precision, UTC), as everywhere in the relay's interfaces.

CREATE TABLE messages (
    id          text PRIMARY KEY,
    sender      text NOT NULL,
    size        bigint NOT NULL,
    received_at double precision NOT NULL,
    client_ip   text NOT NULL DEFAULT '',
    client_helo text NOT NULL DEFAULT '',
    auth_user   text,
    listener    text NOT NULL DEFAULT '',
    envid       text,
    ret         text,
    smtputf8    boolean NOT NULL DEFAULT false,
    data        bytea NOT NULL
);

-- Queue lifetime (claim_expired) and purge both walk messages by reception time.
CREATE INDEX messages_received_at ON messages (received_at);

CREATE TABLE recipients (
    id              bigserial PRIMARY KEY,
    -- Recipients live and die with their message; attempt history does not (see attempts).
    message_id      text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address         text NOT NULL,
    domain          text NOT NULL,
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'held', 'delivered', 'bounced', 'expired', 'deleted')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    last_reply      text,
    notify          text,
    orcpt           text,
    lease_owner     text,
    lease_until     double precision,
    updated_at      double precision NOT NULL
);

CREATE INDEX recipients_message ON recipients (message_id);
-- Claims scan queued rows in due order and stop at LIMIT: the partial index holds only queued rows, so a
-- claim costs the same with a million recipients waiting as with ten thousand.
CREATE INDEX recipients_due ON recipients (next_attempt_at) WHERE state = 'queued';
-- Leased rows are few (the ones in flight); next_due_at needs their lease ends.
CREATE INDEX recipients_leased ON recipients (lease_until) WHERE lease_until IS NOT NULL;

-- Attempt history outlives the message (purge removes it separately, by age), so no foreign keys here.
CREATE TABLE attempts (
    id           bigserial PRIMARY KEY,
    recipient_id bigint NOT NULL,
    message_id   text NOT NULL,
    started_at   double precision NOT NULL,
    duration     double precision NOT NULL,
    mx_host      text,
    tls_version  text,
    reply        text,
    category     text,
    outcome      text NOT NULL
);

CREATE INDEX attempts_recipient ON attempts (recipient_id);
CREATE INDEX attempts_started_at ON attempts (started_at);

CREATE TABLE users (
    username               text PRIMARY KEY,
    password_hash          text NOT NULL,
    allowed_sender_domains text[] NOT NULL DEFAULT '{}',
    expires_at             double precision,
    disabled               boolean NOT NULL DEFAULT false,
    quota_per_minute       integer NOT NULL DEFAULT 0,
    quota_per_day          integer NOT NULL DEFAULT 0,
    created_at             double precision NOT NULL
);
