-- The cluster (#14): nodes and their heartbeats, and every repository's replicas with the
-- generation each has reached. A replica whose generation is below its repository's has missed
-- a write: it is not read from until repaired.
CREATE TABLE cluster_nodes (
    id TEXT PRIMARY KEY,
    cluster_addr TEXT NOT NULL,
    http_addr TEXT NOT NULL DEFAULT '',
    ssh_addr TEXT NOT NULL DEFAULT '',
    heartbeat_ms BIGINT NOT NULL,
    -- Silent this long, the node is down (its own setting, so every node and the CLI agree).
    down_after_ms BIGINT NOT NULL DEFAULT 10000,
    draining BOOLEAN NOT NULL DEFAULT false
);
ALTER TABLE repos ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
CREATE TABLE repo_replicas (
    repo_id BIGINT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    node TEXT NOT NULL,
    generation BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (repo_id, node)
);
CREATE INDEX repo_replicas_by_node ON repo_replicas (node);
