-- The schema as gitplane created it before versioned migrations (IF NOT EXISTS: an
-- existing database takes this as a no-op).
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS grants (
    repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    access INTEGER NOT NULL,
    PRIMARY KEY (repo_id, user_id)
);
CREATE TABLE IF NOT EXISTS ssh_keys (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS ssh_keys_user ON ssh_keys (user_id);
CREATE TABLE IF NOT EXISTS hook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    repo TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS hook_pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    repo TEXT NOT NULL,
    refs TEXT NOT NULL,
    pusher TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    via TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'prepared',
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS hook_pending_by_owner ON hook_pending (owner);
CREATE TABLE IF NOT EXISTS hook_jobs (
    event_id TEXT NOT NULL,
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    finished_at INTEGER NOT NULL DEFAULT (unixepoch()),
    PRIMARY KEY (event_id, job)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS webhooks_by_repo ON webhooks (repo);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY,
    webhook_id INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status INTEGER,
    ok INTEGER NOT NULL,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    delivered_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_event ON webhook_deliveries (event_id, webhook_id);
CREATE TABLE IF NOT EXISTS commits (
    repo TEXT NOT NULL,
    sha TEXT NOT NULL,
    author TEXT NOT NULL,
    time INTEGER NOT NULL,
    subject TEXT NOT NULL,
    ref TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (repo, sha)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repo_sizes (
    repo TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    updated_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS lfs_objects (
    oid TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS lfs_repo_objects (
    repo TEXT NOT NULL,
    oid TEXT NOT NULL REFERENCES lfs_objects(oid),
    PRIMARY KEY (repo, oid)
);
CREATE TABLE IF NOT EXISTS lfs_locks (
    id INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    path TEXT NOT NULL,
    owner TEXT NOT NULL,
    locked_at INTEGER NOT NULL DEFAULT (unixepoch()),
    UNIQUE (repo, path)
);
