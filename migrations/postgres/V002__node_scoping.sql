-- Several nodes share one store (#13): a repository lives on the node that created it, and each
-- node relays and reconciles only the hook events of its own pushes. '' means "this store has
-- one node" (the embedded default).
ALTER TABLE repos ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE hook_outbox ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE hook_pending ADD COLUMN node TEXT NOT NULL DEFAULT '';
CREATE INDEX hook_outbox_by_node ON hook_outbox (node, id);
CREATE INDEX hook_pending_by_node ON hook_pending (node, owner);
