-- Schema version 1 -> 2: sub-agents, soft-deleted agents, app statuses and open_in, tasks,
-- devcontainers, resource monitors, connection and boundary logs, context, user secrets,
-- notifications. Runs inside the migration transaction; the resulting catalog must equal
-- schema.sql's (tests/store/test_migrate.py checks it), so new columns go last, as in schema.sql.

-- Enum values may be added inside a transaction as long as they are not used before COMMIT.
ALTER TYPE app_sharing_level ADD VALUE 'organization' AFTER 'authenticated';

CREATE TYPE workspace_app_status_state AS ENUM ('working', 'complete', 'failure', 'idle');

CREATE TYPE workspace_app_open_in AS ENUM ('tab', 'window', 'slim-window');

CREATE TYPE agent_key_scope_enum AS ENUM ('all', 'no_user_data');

CREATE TYPE connection_type AS ENUM (
    'ssh', 'vscode', 'jetbrains', 'reconnecting_pty', 'workspace_app', 'port_forwarding'
);

CREATE TYPE connection_status AS ENUM ('connected', 'disconnected');

CREATE TYPE workspace_agent_monitor_state AS ENUM ('OK', 'NOK');

CREATE TYPE workspace_agent_context_body_kind AS ENUM (
    'instruction_file', 'skill', 'mcp_config', 'mcp_server', 'plugin', 'hook', 'subagent', 'command'
);

CREATE TYPE workspace_agent_context_resource_status AS ENUM ('ok', 'oversize', 'unreadable', 'invalid', 'excluded');

CREATE TYPE notification_method AS ENUM ('smtp', 'webhook', 'inbox');

CREATE TYPE notification_message_status AS ENUM (
    'pending', 'leased', 'sent', 'permanent_failure', 'temporary_failure', 'unknown', 'inhibited'
);

ALTER TABLE templates
    ADD COLUMN max_port_sharing_level app_sharing_level NOT NULL DEFAULT 'owner';

ALTER TABLE workspace_builds
    ADD COLUMN template_version_preset_id uuid,
    ADD COLUMN has_ai_task boolean,
    ADD COLUMN has_external_agent boolean;

ALTER TABLE workspace_agents
    ADD COLUMN display_order integer NOT NULL DEFAULT 0,
    ADD COLUMN parent_id uuid REFERENCES workspace_agents (id) ON DELETE CASCADE,
    ADD COLUMN api_key_scope agent_key_scope_enum NOT NULL DEFAULT 'all',
    ADD COLUMN deleted boolean NOT NULL DEFAULT false;

CREATE INDEX workspace_agents_auth_instance_id_deleted_idx ON workspace_agents (auth_instance_id, deleted);

CREATE INDEX workspace_agents_parent_id_idx ON workspace_agents (parent_id) WHERE parent_id IS NOT NULL;

-- Deleted (sub-)agents no longer reserve their name.
CREATE OR REPLACE FUNCTION check_workspace_agent_name_unique() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    build_id uuid;
    same_name integer;
BEGIN
    SELECT b.id INTO build_id
    FROM workspace_resources r
    JOIN workspace_builds b ON b.job_id = r.job_id
    WHERE r.id = NEW.resource_id;

    IF build_id IS NULL THEN
        RETURN NEW;
    END IF;

    SELECT count(*) INTO same_name
    FROM workspace_agents a
    JOIN workspace_resources r ON r.id = a.resource_id
    JOIN workspace_builds b ON b.job_id = r.job_id
    WHERE b.id = build_id
      AND a.name = NEW.name
      AND a.id <> NEW.id
      AND a.deleted = false;

    IF same_name > 0 THEN
        RAISE EXCEPTION 'workspace agent name "%" already exists in this workspace build', NEW.name
            USING ERRCODE = 'unique_violation';
    END IF;

    RETURN NEW;
END;
$$;

ALTER TABLE workspace_agent_metadata
    ADD COLUMN display_order integer NOT NULL DEFAULT 0;

ALTER TABLE workspace_apps
    ADD COLUMN open_in workspace_app_open_in NOT NULL DEFAULT 'slim-window',
    ADD COLUMN display_group text,
    ADD COLUMN tooltip character varying(2048) NOT NULL DEFAULT '';

ALTER TABLE workspace_agent_stats
    ADD COLUMN usage boolean NOT NULL DEFAULT false;

CREATE TABLE tasks (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name text NOT NULL,
    workspace_id uuid REFERENCES workspaces (id) ON DELETE CASCADE,
    template_version_id uuid NOT NULL REFERENCES template_versions (id) ON DELETE CASCADE,
    template_parameters jsonb NOT NULL DEFAULT '{}'::jsonb,
    prompt text NOT NULL DEFAULT '',
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    deleted_at timestamp with time zone
);

CREATE UNIQUE INDEX tasks_workspace_id_idx ON tasks (workspace_id) WHERE workspace_id IS NOT NULL;

-- Which app of which agent is the task's app, per build (spec §7.18 notifications).
CREATE TABLE task_workspace_apps (
    task_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    workspace_build_number integer NOT NULL,
    workspace_agent_id uuid REFERENCES workspace_agents (id) ON DELETE CASCADE,
    workspace_app_id uuid REFERENCES workspace_apps (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, workspace_build_number)
);

CREATE TABLE workspace_app_statuses (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    agent_id uuid NOT NULL REFERENCES workspace_agents (id),
    app_id uuid NOT NULL REFERENCES workspace_apps (id),
    workspace_id uuid NOT NULL REFERENCES workspaces (id),
    state workspace_app_status_state NOT NULL,
    message text NOT NULL,
    uri text
);

CREATE INDEX workspace_app_statuses_workspace_id_created_at_idx
    ON workspace_app_statuses (workspace_id, created_at DESC);

CREATE INDEX workspace_app_statuses_app_id_idx ON workspace_app_statuses (app_id, created_at DESC);

CREATE TABLE workspace_agent_devcontainers (
    id uuid PRIMARY KEY,
    workspace_agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    workspace_folder text NOT NULL,
    config_path text NOT NULL,
    name text NOT NULL,
    subagent_id uuid REFERENCES workspace_agents (id) ON DELETE CASCADE
);

CREATE INDEX workspace_agent_devcontainers_workspace_agent_id ON workspace_agent_devcontainers (workspace_agent_id);

CREATE TABLE workspace_agent_memory_resource_monitors (
    agent_id uuid PRIMARY KEY REFERENCES workspace_agents (id) ON DELETE CASCADE,
    enabled boolean NOT NULL,
    -- Percent of memory used at or above which a datapoint is NOK.
    threshold integer NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    state workspace_agent_monitor_state NOT NULL DEFAULT 'OK',
    debounced_until timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00'
);

CREATE TABLE workspace_agent_volume_resource_monitors (
    agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    enabled boolean NOT NULL,
    threshold integer NOT NULL,
    path text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    state workspace_agent_monitor_state NOT NULL DEFAULT 'OK',
    debounced_until timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    PRIMARY KEY (agent_id, path)
);

CREATE TABLE connection_logs (
    id uuid PRIMARY KEY,
    connect_time timestamp with time zone NOT NULL,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    workspace_owner_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    workspace_name text NOT NULL,
    agent_name text NOT NULL,
    type connection_type NOT NULL,
    ip inet,
    code integer,
    user_agent text,
    user_id uuid,
    slug_or_port text,
    connection_id uuid,
    disconnect_time timestamp with time zone,
    disconnect_reason text
);

CREATE UNIQUE INDEX idx_connection_logs_connection_id_workspace_id_agent_name
    ON connection_logs (connection_id, workspace_id, agent_name);

CREATE INDEX idx_connection_logs_connect_time_desc ON connection_logs (connect_time DESC);

CREATE INDEX idx_connection_logs_organization_id ON connection_logs (organization_id);

CREATE INDEX idx_connection_logs_workspace_id ON connection_logs (workspace_id);

CREATE INDEX idx_connection_logs_workspace_owner_id ON connection_logs (workspace_owner_id);

CREATE TABLE boundary_sessions (
    -- Generated by boundary, not by agentd.
    id uuid PRIMARY KEY,
    workspace_agent_id uuid NOT NULL REFERENCES workspace_agents (id),
    confined_process_name text NOT NULL,
    -- When agentd first saw a log of the session.
    started_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    owner_id uuid REFERENCES users (id) ON DELETE SET NULL
);

CREATE TABLE boundary_logs (
    id uuid PRIMARY KEY,
    -- No foreign key: logs may arrive before their session row (spec §7.17).
    session_id uuid NOT NULL,
    sequence_number integer NOT NULL CONSTRAINT boundary_logs_sequence_number_check CHECK (sequence_number >= 0),
    -- Arrival at agentd.
    captured_at timestamp with time zone NOT NULL,
    -- Event time inside the workspace.
    created_at timestamp with time zone NOT NULL,
    proto text NOT NULL DEFAULT '',
    method text NOT NULL DEFAULT '',
    detail text NOT NULL DEFAULT '',
    -- NULL means the request was denied.
    matched_rule text,
    owner_id uuid REFERENCES users (id) ON DELETE SET NULL
);

CREATE INDEX idx_boundary_logs_session_id_sequence_number
    ON boundary_logs (session_id, sequence_number) INCLUDE (matched_rule);

CREATE INDEX idx_boundary_logs_captured_at ON boundary_logs (captured_at);

CREATE TABLE boundary_usage_stats (
    replica_id uuid PRIMARY KEY,
    unique_workspaces_count bigint NOT NULL DEFAULT 0,
    unique_users_count bigint NOT NULL DEFAULT 0,
    allowed_requests bigint NOT NULL DEFAULT 0,
    denied_requests bigint NOT NULL DEFAULT 0,
    window_start timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);

CREATE TABLE workspace_agent_context_snapshots (
    workspace_agent_id uuid PRIMARY KEY REFERENCES workspace_agents (id) ON DELETE CASCADE,
    version bigint NOT NULL,
    aggregate_hash bytea NOT NULL,
    snapshot_error text NOT NULL DEFAULT '',
    received_at timestamp with time zone NOT NULL DEFAULT now()
);

CREATE TABLE workspace_agent_context_resources (
    workspace_agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    source text NOT NULL,
    body_kind workspace_agent_context_body_kind NOT NULL,
    -- protojson of the body variant (proto field names, unpopulated omitted).
    body jsonb NOT NULL,
    content_hash bytea NOT NULL,
    size_bytes bigint NOT NULL,
    status workspace_agent_context_resource_status NOT NULL,
    error text NOT NULL DEFAULT '',
    source_path text NOT NULL DEFAULT '',
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_agent_id, source)
);

CREATE TABLE user_secrets (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name text NOT NULL,
    description text NOT NULL DEFAULT '',
    value text NOT NULL,
    env_name text NOT NULL DEFAULT '',
    file_path text NOT NULL DEFAULT '',
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    -- Set when value is encrypted at rest (Coder's dbcrypt); agentd stores plaintext (NULL).
    value_key_id text
);

CREATE UNIQUE INDEX user_secrets_user_name_idx ON user_secrets (user_id, name);

CREATE UNIQUE INDEX user_secrets_user_env_name_idx ON user_secrets (user_id, env_name) WHERE env_name <> '';

CREATE UNIQUE INDEX user_secrets_user_file_path_idx ON user_secrets (user_id, file_path) WHERE file_path <> '';

-- Enqueued user notifications (resource alerts §7.12, task status §7.18). payload holds
-- {"notification_template_id", "user_id", "labels": {...}, "data": {...}}; dedupe_hash makes the
-- per-day de-duplication of identical content a unique-index conflict.
CREATE TABLE notification_messages (
    id uuid PRIMARY KEY,
    notification_template_id uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    method notification_method NOT NULL DEFAULT 'smtp',
    status notification_message_status NOT NULL DEFAULT 'pending',
    status_reason text,
    created_by text NOT NULL,
    payload jsonb NOT NULL,
    attempt_count integer DEFAULT 0,
    targets uuid[],
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone,
    leased_until timestamp with time zone,
    next_retry_after timestamp with time zone,
    queued_seconds double precision,
    dedupe_hash text
);

CREATE UNIQUE INDEX notification_messages_dedupe_hash_idx ON notification_messages (dedupe_hash);

CREATE INDEX idx_notification_messages_status ON notification_messages (status);

-- SELECT * views froze their column lists at creation; rebuild them over the new columns.
DROP VIEW workspace_build_with_user;

DROP VIEW workspaces_expanded;

CREATE VIEW workspace_build_with_user AS
SELECT
    workspace_builds.*,
    coalesce(users.avatar_url, '') AS initiator_by_avatar_url,
    coalesce(users.username, '') AS initiator_by_username,
    coalesce(users.name, '') AS initiator_by_name
FROM workspace_builds
LEFT JOIN users ON workspace_builds.initiator_id = users.id;

CREATE VIEW workspaces_expanded AS
SELECT
    workspaces.*,
    users.avatar_url AS owner_avatar_url,
    users.username AS owner_username,
    users.name AS owner_name,
    organizations.name AS organization_name,
    organizations.display_name AS organization_display_name,
    organizations.icon AS organization_icon,
    organizations.description AS organization_description,
    templates.name AS template_name,
    templates.display_name AS template_display_name,
    templates.icon AS template_icon,
    templates.description AS template_description,
    tasks.id AS task_id
FROM workspaces
JOIN users ON workspaces.owner_id = users.id
JOIN organizations ON workspaces.organization_id = organizations.id
JOIN templates ON workspaces.template_id = templates.id
LEFT JOIN tasks ON tasks.workspace_id = workspaces.id AND tasks.deleted_at IS NULL;

INSERT INTO users (id, email, username, name, created_at, updated_at, status, login_type, is_system)
VALUES (
    'c42fdf75-3097-471c-8c33-fb52454d81c0', 'prebuilds@system', 'prebuilds', 'Prebuilds',
    now(), now(), 'active', 'none', true
)
ON CONFLICT (id) DO NOTHING;
