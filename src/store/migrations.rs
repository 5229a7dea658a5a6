//! Numbered schema migrations. Applied in order at start; never edited once landed.
//! `PRAGMA user_version` holds the number of the last one applied.

pub const MIGRATIONS: &[&str] = &[
    // 1: the core tables.
    r#"
    CREATE TABLE cursors (
        stream      TEXT PRIMARY KEY,
        cursor      TEXT,
        updated_at  TEXT NOT NULL
    );
    CREATE TABLE links (
        stream      TEXT NOT NULL,
        source_id   TEXT NOT NULL,
        target_id   TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (stream, source_id)
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        stream          TEXT NOT NULL,
        body            BLOB NOT NULL,
        records         INTEGER NOT NULL,
        created_at      TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        first_refused_at TEXT,
        last_attempt_at TEXT,
        last_status     INTEGER,
        last_error      TEXT
    );
    CREATE INDEX outbox_stream ON outbox (stream, id);
    CREATE TABLE ledger (
        stream       TEXT NOT NULL,
        key          TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        target_ids   TEXT,
        status       TEXT,
        updated_at   TEXT NOT NULL,
        PRIMARY KEY (stream, key)
    ) WITHOUT ROWID;
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        stream      TEXT NOT NULL,
        trigger     TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        ended_at    TEXT,
        outcome     TEXT NOT NULL DEFAULT 'running',
        pulled      INTEGER NOT NULL DEFAULT 0,
        created     INTEGER NOT NULL DEFAULT 0,
        updated     INTEGER NOT NULL DEFAULT 0,
        skipped     INTEGER NOT NULL DEFAULT 0,
        failed      INTEGER NOT NULL DEFAULT 0,
        queued      INTEGER NOT NULL DEFAULT 0,
        error       TEXT
    );
    CREATE INDEX runs_stream ON runs (stream, id);
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        stream      TEXT NOT NULL,
        source_id   TEXT,
        record      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX dead_letters_stream ON dead_letters (stream, id);
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      TEXT NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        stream  TEXT,
        detail  TEXT
    );
    CREATE TABLE schedule (
        stream      TEXT PRIMARY KEY,
        next_run_at TEXT
    );
    "#,
    // 2: operators can ask for dead letters to be tried again.
    r#"
    ALTER TABLE dead_letters ADD COLUMN retry_requested INTEGER NOT NULL DEFAULT 0;
    "#,
    // 3 (S-360): the inbox of S-360's webhooks. A row is one record as received, in order of
    // receipt; `content_hash` (SHA-256 of the record's JSON) lets a resent payload be stored
    // once. The relay's cursor is the last inbox `id` it has put into the outbox.
    r#"
    CREATE TABLE s360_inbox (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        stream       TEXT NOT NULL,
        record_id    TEXT NOT NULL,
        content_hash BLOB NOT NULL,
        body         TEXT NOT NULL,
        received_at  TEXT NOT NULL
    );
    CREATE INDEX s360_inbox_stream ON s360_inbox (stream, id);
    CREATE INDEX s360_inbox_record ON s360_inbox (stream, record_id, id);
    "#,
    // 4 (integration settings): the last online check of each connection (seats.io,
    // CDP), and streams paused by a configuration error of their target (CDP 400/401/403).
    r#"
    CREATE TABLE settings_online_checks (
        connection  TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        checked_at  TEXT NOT NULL,
        valid       INTEGER NOT NULL,
        message     TEXT NOT NULL
    );
    CREATE TABLE cdp_stream_pauses (
        stream      TEXT PRIMARY KEY,
        paused_at   TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    "#,
    // 5 (Ticket Co x Airship): a digest of each source page group (a Ticket Co event's
    // booking pages, with everything else that shapes what is sent) whose every record is
    // in the ledger: the same digest next run means nothing in it changed.
    r#"
    CREATE TABLE page_digests (
        stream      TEXT NOT NULL,
        scope       TEXT NOT NULL,
        digest      TEXT NOT NULL,
        records     INTEGER NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (stream, scope)
    ) WITHOUT ROWID;
    "#,
    // 6 (S-360): a received record is a resend when it equals ANY stored version of its
    // record (not only the latest): looked up by content, so the index holds it.
    r#"
    DROP INDEX s360_inbox_record;
    CREATE INDEX s360_inbox_version ON s360_inbox (stream, record_id, content_hash);
    "#,
    // 7: writes in doubt. Per stream, until when a write usher sent may still take effect
    // at the target although its answer was not seen (a crash, a timeout); a run waits for
    // that time (plus the settle margin) before it looks its records up or sends them again.
    r#"
    CREATE TABLE in_doubt (
        stream      TEXT PRIMARY KEY,
        until       TEXT NOT NULL,
        state       TEXT NOT NULL,
        detail      TEXT,
        updated_at  TEXT NOT NULL
    );
    "#,
    // 8: rate budgets kept between processes: the instants of the calls that count in a
    // vendor's window (JSON array of times) and a running Retry-After, per budget key.
    r#"
    CREATE TABLE rate_budgets (
        key         TEXT PRIMARY KEY,
        calls       TEXT NOT NULL,
        not_before  TEXT,
        updated_at  TEXT NOT NULL
    );
    "#,
    // 9: records a stream owes its target. A record the target refused (or that could not
    // be read, e.g. a Ticket Co event whose page was malformed) stays here, with enough of
    // it to fetch it again (`scope`, `record`), until the target accepts it or it is set
    // aside in dead letters with its reason; every run tries it again, whatever its window.
    // Written only by `commit_page`, in the transaction of the batch that learnt it.
    r#"
    CREATE TABLE owed (
        stream      TEXT NOT NULL,
        key         TEXT NOT NULL,
        scope       TEXT,
        record      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        since       TEXT NOT NULL,
        attempts    INTEGER NOT NULL DEFAULT 1,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (stream, key)
    ) WITHOUT ROWID;
    "#,
    // 10: each outbox payload's own random part of its Idempotency-Key. The key was
    // `usher-<stream>-<outbox id>`, and ids start again at 1 in a state started afresh and
    // go on from the backup's in a restored one: a receiver that keeps the keys it saw
    // dropped new payloads as resends. Rows from before keep the old key (NULL here), so a
    // payload in flight across the upgrade keeps its key.
    r#"
    ALTER TABLE outbox ADD COLUMN nonce TEXT;
    "#,
    // 11 (several instances, issue 20): the lease of each group of streams (the streams
    // that share a rate budget run on one instance at a time), the instances that hold
    // them, operator requests carried out by the holder, and who ran each run. Times here
    // are milliseconds of the database's clock, so that instances never compare their own.
    r#"
    CREATE TABLE instances (
        id          TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        boot        TEXT NOT NULL DEFAULT '',
        role        TEXT NOT NULL DEFAULT 'daemon',
        started_ms  INTEGER NOT NULL,
        seen_ms     INTEGER NOT NULL
    );
    CREATE TABLE leases (
        key              TEXT PRIMARY KEY,
        holder           TEXT,
        epoch            INTEGER NOT NULL DEFAULT 0,
        expires_ms       INTEGER NOT NULL DEFAULT 0,
        previous_holder  TEXT,
        previous_expiry  INTEGER
    );
    CREATE TABLE requests (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        stream       TEXT NOT NULL,
        action       TEXT NOT NULL,
        arg          TEXT,
        actor        TEXT NOT NULL,
        host         TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        done_at      TEXT,
        done_by      TEXT,
        result       TEXT
    );
    CREATE INDEX requests_open ON requests (done_at, stream, id);
    ALTER TABLE runs ADD COLUMN holder TEXT;
    "#,
];

/// The same migrations for PostgreSQL, number for number (a state at version N has the same
/// tables on both backends, so `usher state migrate --to postgres://…` copies table by
/// table). Integers are BIGINT (rows are read as `i64` on both sides), blobs BYTEA, times
/// stay RFC 3339 text (ordered alike on both). The version is the `version` row of
/// `usher_schema`; migrations run under an advisory lock, so several instances starting at
/// once migrate once.
pub const MIGRATIONS_PG: &[&str] = &[
    // 1
    r#"
    CREATE TABLE cursors (
        stream      TEXT PRIMARY KEY,
        cursor      TEXT,
        updated_at  TEXT NOT NULL
    );
    CREATE TABLE links (
        stream      TEXT NOT NULL,
        source_id   TEXT NOT NULL,
        target_id   TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (stream, source_id)
    );
    CREATE TABLE outbox (
        id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        stream          TEXT NOT NULL,
        body            BYTEA NOT NULL,
        records         BIGINT NOT NULL,
        created_at      TEXT NOT NULL,
        attempts        BIGINT NOT NULL DEFAULT 0,
        first_refused_at TEXT,
        last_attempt_at TEXT,
        last_status     BIGINT,
        last_error      TEXT
    );
    CREATE INDEX outbox_stream ON outbox (stream, id);
    CREATE TABLE ledger (
        stream       TEXT NOT NULL,
        key          TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        target_ids   TEXT,
        status       TEXT,
        updated_at   TEXT NOT NULL,
        PRIMARY KEY (stream, key)
    );
    CREATE TABLE runs (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        stream      TEXT NOT NULL,
        trigger     TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        ended_at    TEXT,
        outcome     TEXT NOT NULL DEFAULT 'running',
        pulled      BIGINT NOT NULL DEFAULT 0,
        created     BIGINT NOT NULL DEFAULT 0,
        updated     BIGINT NOT NULL DEFAULT 0,
        skipped     BIGINT NOT NULL DEFAULT 0,
        failed      BIGINT NOT NULL DEFAULT 0,
        queued      BIGINT NOT NULL DEFAULT 0,
        error       TEXT
    );
    CREATE INDEX runs_stream ON runs (stream, id);
    CREATE TABLE dead_letters (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        stream      TEXT NOT NULL,
        source_id   TEXT,
        record      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX dead_letters_stream ON dead_letters (stream, id);
    CREATE TABLE audit (
        id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at      TEXT NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        stream  TEXT,
        detail  TEXT
    );
    CREATE TABLE schedule (
        stream      TEXT PRIMARY KEY,
        next_run_at TEXT
    );
    "#,
    // 2
    r#"
    ALTER TABLE dead_letters ADD COLUMN retry_requested BIGINT NOT NULL DEFAULT 0;
    "#,
    // 3
    r#"
    CREATE TABLE s360_inbox (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        stream       TEXT NOT NULL,
        record_id    TEXT NOT NULL,
        content_hash BYTEA NOT NULL,
        body         TEXT NOT NULL,
        received_at  TEXT NOT NULL
    );
    CREATE INDEX s360_inbox_stream ON s360_inbox (stream, id);
    CREATE INDEX s360_inbox_record ON s360_inbox (stream, record_id, id);
    "#,
    // 4
    r#"
    CREATE TABLE settings_online_checks (
        connection  TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        checked_at  TEXT NOT NULL,
        valid       BIGINT NOT NULL,
        message     TEXT NOT NULL
    );
    CREATE TABLE cdp_stream_pauses (
        stream      TEXT PRIMARY KEY,
        paused_at   TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    "#,
    // 5
    r#"
    CREATE TABLE page_digests (
        stream      TEXT NOT NULL,
        scope       TEXT NOT NULL,
        digest      TEXT NOT NULL,
        records     BIGINT NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (stream, scope)
    );
    "#,
    // 6
    r#"
    DROP INDEX s360_inbox_record;
    CREATE INDEX s360_inbox_version ON s360_inbox (stream, record_id, content_hash);
    "#,
    // 7
    r#"
    CREATE TABLE in_doubt (
        stream      TEXT PRIMARY KEY,
        until       TEXT NOT NULL,
        state       TEXT NOT NULL,
        detail      TEXT,
        updated_at  TEXT NOT NULL
    );
    "#,
    // 8
    r#"
    CREATE TABLE rate_budgets (
        key         TEXT PRIMARY KEY,
        calls       TEXT NOT NULL,
        not_before  TEXT,
        updated_at  TEXT NOT NULL
    );
    "#,
    // 9
    r#"
    CREATE TABLE owed (
        stream      TEXT NOT NULL,
        key         TEXT NOT NULL,
        scope       TEXT,
        record      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        since       TEXT NOT NULL,
        attempts    BIGINT NOT NULL DEFAULT 1,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (stream, key)
    );
    "#,
    // 10
    r#"
    ALTER TABLE outbox ADD COLUMN nonce TEXT;
    "#,
    // 11
    r#"
    CREATE TABLE instances (
        id          TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        pid         BIGINT NOT NULL,
        boot        TEXT NOT NULL DEFAULT '',
        role        TEXT NOT NULL DEFAULT 'daemon',
        started_ms  BIGINT NOT NULL,
        seen_ms     BIGINT NOT NULL
    );
    CREATE TABLE leases (
        key              TEXT PRIMARY KEY,
        holder           TEXT,
        epoch            BIGINT NOT NULL DEFAULT 0,
        expires_ms       BIGINT NOT NULL DEFAULT 0,
        previous_holder  TEXT,
        previous_expiry  BIGINT
    );
    CREATE TABLE requests (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        stream       TEXT NOT NULL,
        action       TEXT NOT NULL,
        arg          TEXT,
        actor        TEXT NOT NULL,
        host         TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        done_at      TEXT,
        done_by      TEXT,
        result       TEXT
    );
    CREATE INDEX requests_open ON requests (done_at, stream, id);
    ALTER TABLE runs ADD COLUMN holder TEXT;
    "#,
];
