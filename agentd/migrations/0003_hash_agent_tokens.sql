-- Schema version 2 -> 3: agent tokens hashed at rest. workspace_agents keeps SHA-256 of the token's
-- 16 bytes instead of the token, so a copy of the database (or a backup) cannot impersonate agents.
-- agentd.store.agents.token_digest computes the same digest; authentication compares digests.
-- Runs inside the migration transaction; the new column goes last, as in schema.sql.

ALTER TABLE workspace_agents ADD COLUMN auth_token_hash bytea;

UPDATE workspace_agents SET auth_token_hash = sha256(uuid_send(auth_token));

ALTER TABLE workspace_agents ALTER COLUMN auth_token_hash SET NOT NULL;

ALTER TABLE workspace_agents
    ADD CONSTRAINT auth_token_hash_is_sha256 CHECK (octet_length(auth_token_hash) = 32);

DROP INDEX workspace_agents_auth_token_idx;

ALTER TABLE workspace_agents DROP COLUMN auth_token;

CREATE INDEX workspace_agents_auth_token_hash_idx ON workspace_agents (auth_token_hash);
