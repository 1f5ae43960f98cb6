-- agentd database schema: the one source of DDL.
--
-- Table, column, enum and constraint names follow Coder's coderd/database/dump.sql so that
-- spec/agent-api.md §10 reads straight onto this file. Only the tables the workspace-agent API
-- touches are here, plus the minimal rows they reference (organizations, users, templates,
-- template versions, provisioner jobs, workspaces, builds, resources, tasks).
--
-- `agentd migrate` applies this file to an empty database; an older database is brought here by
-- the upgrade scripts in agentd/migrations/ (a test checks both paths give the same catalog).
-- Columns added by an upgrade are therefore listed last in their table, in upgrade order.
-- Times are timestamptz; "zero time" is Go's 0001-01-01 00:00:00+00, which Coder uses as "unset".

-- ---------------------------------------------------------------------------------------------
-- Enums
-- ---------------------------------------------------------------------------------------------

CREATE TYPE user_status AS ENUM ('active', 'suspended', 'dormant');

CREATE TYPE login_type AS ENUM ('password', 'github', 'oidc', 'token', 'none');

CREATE TYPE provisioner_type AS ENUM ('echo', 'terraform');

CREATE TYPE provisioner_storage_method AS ENUM ('file');

CREATE TYPE provisioner_job_type AS ENUM ('template_version_import', 'workspace_build', 'template_version_dry_run');

CREATE TYPE provisioner_job_status AS ENUM (
    'pending', 'running', 'succeeded', 'canceling', 'canceled', 'failed', 'unknown'
);

CREATE TYPE workspace_transition AS ENUM ('start', 'stop', 'delete');

CREATE TYPE build_reason AS ENUM (
    'initiator', 'autostart', 'autostop', 'dormancy', 'failedstop', 'autodelete'
);

CREATE TYPE automatic_updates AS ENUM ('always', 'never');

CREATE TYPE workspace_agent_lifecycle_state AS ENUM (
    'created', 'starting', 'start_timeout', 'start_error', 'ready',
    'shutting_down', 'shutdown_timeout', 'shutdown_error', 'off'
);

CREATE TYPE workspace_agent_subsystem AS ENUM ('envbuilder', 'envbox', 'none', 'exectrace');

CREATE TYPE log_level AS ENUM ('trace', 'debug', 'info', 'warn', 'error');

CREATE TYPE workspace_app_health AS ENUM ('disabled', 'initializing', 'healthy', 'unhealthy');

-- 'organization' was added in schema version 2 (ADD VALUE … AFTER 'authenticated').
CREATE TYPE app_sharing_level AS ENUM ('owner', 'authenticated', 'organization', 'public');

CREATE TYPE display_app AS ENUM (
    'vscode', 'vscode_insiders', 'web_terminal', 'ssh_helper', 'port_forwarding_helper'
);

CREATE TYPE workspace_agent_script_timing_stage AS ENUM ('start', 'stop', 'cron');

CREATE TYPE workspace_agent_script_timing_status AS ENUM ('ok', 'exit_failure', 'timed_out', 'pipes_left_open');

-- Added in schema version 2.
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

-- ---------------------------------------------------------------------------------------------
-- Schema bookkeeping
-- ---------------------------------------------------------------------------------------------

-- One row per applied schema version; the current version is max(version).
CREATE TABLE schema_version (
    version integer PRIMARY KEY,
    applied_at timestamp with time zone NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------
-- Referenced rows: organizations, users, templates, provisioner jobs, workspaces, builds
-- ---------------------------------------------------------------------------------------------

CREATE TABLE organizations (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    display_name text NOT NULL DEFAULT '',
    icon text NOT NULL DEFAULT '',
    deleted boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX idx_organization_name_lower ON organizations (lower(name)) WHERE deleted = false;

CREATE TABLE users (
    id uuid PRIMARY KEY,
    email text NOT NULL,
    username text NOT NULL DEFAULT '',
    hashed_password bytea NOT NULL DEFAULT '\x'::bytea,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    status user_status NOT NULL DEFAULT 'active',
    rbac_roles text[] NOT NULL DEFAULT '{}',
    login_type login_type NOT NULL DEFAULT 'password',
    avatar_url text NOT NULL DEFAULT '',
    deleted boolean NOT NULL DEFAULT false,
    last_seen_at timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    name text NOT NULL DEFAULT '',
    is_system boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX users_email_lower_idx ON users (lower(email)) WHERE deleted = false;

CREATE UNIQUE INDEX users_username_lower_idx ON users (lower(username)) WHERE deleted = false;

CREATE TABLE templates (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    deleted boolean NOT NULL DEFAULT false,
    name character varying(64) NOT NULL,
    provisioner provisioner_type NOT NULL DEFAULT 'terraform',
    active_version_id uuid NOT NULL,
    description character varying(128) NOT NULL DEFAULT '',
    -- Nanoseconds, like Go's time.Duration.
    default_ttl bigint NOT NULL DEFAULT 604800000000000,
    created_by uuid NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    icon character varying(256) NOT NULL DEFAULT '',
    user_acl jsonb NOT NULL DEFAULT '{}'::jsonb,
    group_acl jsonb NOT NULL DEFAULT '{}'::jsonb,
    display_name character varying(64) NOT NULL DEFAULT '',
    allow_user_cancel_workspace_jobs boolean NOT NULL DEFAULT true,
    allow_user_autostart boolean NOT NULL DEFAULT true,
    allow_user_autostop boolean NOT NULL DEFAULT true,
    -- Nanoseconds; 0 disables the activity bump (spec §9.3).
    activity_bump bigint NOT NULL DEFAULT 3600000000000,
    -- Added in schema version 2.
    max_port_sharing_level app_sharing_level NOT NULL DEFAULT 'owner'
);

CREATE UNIQUE INDEX templates_organization_id_name_idx ON templates (organization_id, lower(name::text))
    WHERE deleted = false;

CREATE TABLE template_versions (
    id uuid PRIMARY KEY,
    template_id uuid REFERENCES templates (id) ON DELETE CASCADE,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    name character varying(64) NOT NULL,
    readme character varying(1048576) NOT NULL DEFAULT '',
    job_id uuid NOT NULL,
    created_by uuid NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    message character varying(1048576) NOT NULL DEFAULT '',
    archived boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX template_versions_template_id_name_key ON template_versions (template_id, name);

CREATE TABLE provisioner_jobs (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    started_at timestamp with time zone,
    canceled_at timestamp with time zone,
    completed_at timestamp with time zone,
    error text,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    initiator_id uuid NOT NULL,
    provisioner provisioner_type NOT NULL DEFAULT 'terraform',
    storage_method provisioner_storage_method NOT NULL DEFAULT 'file',
    type provisioner_job_type NOT NULL,
    input jsonb NOT NULL DEFAULT '{}'::jsonb,
    worker_id uuid,
    tags jsonb NOT NULL DEFAULT '{"scope": "organization"}'::jsonb,
    error_code text,
    -- Derived exactly as Coder derives it, so the token query of spec §2.2 reads the same.
    job_status provisioner_job_status NOT NULL GENERATED ALWAYS AS (
        CASE
            WHEN completed_at IS NOT NULL THEN
                CASE
                    WHEN error IS NOT NULL AND error <> '' THEN 'failed'::provisioner_job_status
                    WHEN canceled_at IS NOT NULL THEN 'canceled'::provisioner_job_status
                    ELSE 'succeeded'::provisioner_job_status
                END
            ELSE
                CASE
                    WHEN canceled_at IS NOT NULL THEN 'canceling'::provisioner_job_status
                    WHEN started_at IS NULL THEN 'pending'::provisioner_job_status
                    ELSE 'running'::provisioner_job_status
                END
        END
    ) STORED
);

CREATE INDEX provisioner_jobs_started_at_idx ON provisioner_jobs (started_at) WHERE started_at IS NULL;

CREATE TABLE workspaces (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    owner_id uuid NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE RESTRICT,
    template_id uuid NOT NULL REFERENCES templates (id) ON DELETE RESTRICT,
    deleted boolean NOT NULL DEFAULT false,
    name character varying(64) NOT NULL,
    autostart_schedule text,
    -- Nanoseconds.
    ttl bigint,
    last_used_at timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    dormant_at timestamp with time zone,
    deleting_at timestamp with time zone,
    automatic_updates automatic_updates NOT NULL DEFAULT 'never',
    favorite boolean NOT NULL DEFAULT false,
    next_start_at timestamp with time zone,
    group_acl jsonb NOT NULL DEFAULT '{}'::jsonb,
    user_acl jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT group_acl_is_object CHECK (jsonb_typeof(group_acl) = 'object'),
    CONSTRAINT user_acl_is_object CHECK (jsonb_typeof(user_acl) = 'object')
);

CREATE UNIQUE INDEX workspaces_owner_id_lower_idx ON workspaces (owner_id, lower(name::text)) WHERE deleted = false;

CREATE INDEX workspaces_template_id_idx ON workspaces (template_id) WHERE deleted = false;

CREATE TABLE workspace_builds (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    template_version_id uuid NOT NULL REFERENCES template_versions (id) ON DELETE CASCADE,
    build_number integer NOT NULL,
    transition workspace_transition NOT NULL,
    initiator_id uuid NOT NULL,
    provisioner_state bytea,
    job_id uuid NOT NULL UNIQUE REFERENCES provisioner_jobs (id) ON DELETE CASCADE,
    deadline timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    reason build_reason NOT NULL DEFAULT 'initiator',
    daily_cost integer NOT NULL DEFAULT 0,
    max_deadline timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    notified_autostop_deadline timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    CONSTRAINT workspace_builds_workspace_id_build_number_key UNIQUE (workspace_id, build_number),
    CONSTRAINT workspace_builds_deadline_below_max_deadline CHECK (
        (deadline <> '0001-01-01 00:00:00+00'::timestamp with time zone AND deadline <= max_deadline)
        OR max_deadline = '0001-01-01 00:00:00+00'::timestamp with time zone
    ),
    -- Added in schema version 2.
    template_version_preset_id uuid,
    has_ai_task boolean,
    has_external_agent boolean
);

CREATE TABLE workspace_resources (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    job_id uuid NOT NULL REFERENCES provisioner_jobs (id) ON DELETE CASCADE,
    transition workspace_transition NOT NULL,
    type character varying(192) NOT NULL,
    name character varying(64) NOT NULL,
    hide boolean NOT NULL DEFAULT false,
    icon character varying(256) NOT NULL DEFAULT '',
    instance_type character varying(256),
    daily_cost integer NOT NULL DEFAULT 0,
    module_path text
);

CREATE INDEX workspace_resources_job_id_idx ON workspace_resources (job_id);

-- ---------------------------------------------------------------------------------------------
-- Agents and what they report
-- ---------------------------------------------------------------------------------------------

CREATE TABLE workspace_agents (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    name character varying(64) NOT NULL,
    first_connected_at timestamp with time zone,
    last_connected_at timestamp with time zone,
    disconnected_at timestamp with time zone,
    resource_id uuid NOT NULL REFERENCES workspace_resources (id) ON DELETE CASCADE,
    auth_instance_id character varying,
    architecture character varying(64) NOT NULL,
    environment_variables jsonb,
    operating_system character varying(64) NOT NULL,
    instance_metadata jsonb,
    resource_metadata jsonb,
    directory character varying(4096) NOT NULL DEFAULT '',
    version text NOT NULL DEFAULT '',
    last_connected_replica_id uuid,
    connection_timeout_seconds integer NOT NULL DEFAULT 0,
    troubleshooting_url text NOT NULL DEFAULT '',
    motd_file text NOT NULL DEFAULT '',
    lifecycle_state workspace_agent_lifecycle_state NOT NULL DEFAULT 'created',
    expanded_directory character varying(4096) NOT NULL DEFAULT '',
    logs_length integer NOT NULL DEFAULT 0,
    logs_overflowed boolean NOT NULL DEFAULT false,
    started_at timestamp with time zone,
    ready_at timestamp with time zone,
    subsystems workspace_agent_subsystem[] DEFAULT '{}'::workspace_agent_subsystem[],
    display_apps display_app[]
        DEFAULT '{vscode,vscode_insiders,web_terminal,ssh_helper,port_forwarding_helper}'::display_app[],
    api_version text NOT NULL DEFAULT '',
    -- BatchCreateLogs relies on this constraint's name to detect the 1 MiB log budget (spec §7.9).
    CONSTRAINT max_logs_length CHECK (logs_length <= 1048576),
    CONSTRAINT subsystems_not_none CHECK (NOT ('none'::workspace_agent_subsystem = ANY (subsystems))),
    -- Added in schema version 2.
    display_order integer NOT NULL DEFAULT 0,
    parent_id uuid REFERENCES workspace_agents (id) ON DELETE CASCADE,
    api_key_scope agent_key_scope_enum NOT NULL DEFAULT 'all',
    deleted boolean NOT NULL DEFAULT false,
    -- Added in schema version 3: SHA-256 of the token's 16 bytes; the token itself is not stored.
    auth_token_hash bytea NOT NULL,
    CONSTRAINT auth_token_hash_is_sha256 CHECK (octet_length(auth_token_hash) = 32)
);

CREATE INDEX workspace_agents_auth_token_hash_idx ON workspace_agents (auth_token_hash);

CREATE INDEX workspace_agents_auth_instance_id_deleted_idx ON workspace_agents (auth_instance_id, deleted);

CREATE INDEX workspace_agents_resource_id_idx ON workspace_agents (resource_id);

CREATE INDEX workspace_agents_parent_id_idx ON workspace_agents (parent_id) WHERE parent_id IS NOT NULL;

-- Agent names are unique among the non-deleted agents of one workspace build. A trigger, because
-- the build is two joins away from the agent row. Raises unique_violation like a unique index.
CREATE FUNCTION check_workspace_agent_name_unique() RETURNS trigger
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

CREATE TRIGGER workspace_agent_name_unique_trigger
    BEFORE INSERT OR UPDATE OF name, resource_id ON workspace_agents
    FOR EACH ROW EXECUTE FUNCTION check_workspace_agent_name_unique();

-- Logs are UNLOGGED like Coder's: high volume, and losing them on a crash is acceptable.
CREATE UNLOGGED TABLE workspace_agent_logs (
    agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    created_at timestamp with time zone NOT NULL,
    output character varying(1024) NOT NULL,
    id bigserial PRIMARY KEY,
    level log_level NOT NULL DEFAULT 'info',
    -- No foreign key: unknown source ids are accepted (spec §7.9).
    log_source_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000'::uuid
);

CREATE INDEX workspace_agent_logs_agent_id_id_idx ON workspace_agent_logs (agent_id, id);

CREATE TABLE workspace_agent_log_sources (
    workspace_agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    id uuid NOT NULL,
    created_at timestamp with time zone NOT NULL,
    display_name character varying(127) NOT NULL,
    icon text NOT NULL,
    PRIMARY KEY (workspace_agent_id, id)
);

CREATE UNLOGGED TABLE workspace_agent_metadata (
    workspace_agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    display_name character varying(127) NOT NULL,
    key character varying(127) NOT NULL,
    script character varying(65535) NOT NULL,
    value character varying(65535) NOT NULL DEFAULT '',
    error character varying(65535) NOT NULL DEFAULT '',
    -- Seconds (the manifest ships them as nanoseconds, spec §7.1).
    timeout bigint NOT NULL,
    interval bigint NOT NULL,
    collected_at timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    PRIMARY KEY (workspace_agent_id, key),
    -- Added in schema version 2.
    display_order integer NOT NULL DEFAULT 0
);

CREATE TABLE workspace_apps (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL,
    agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    display_name character varying(64) NOT NULL,
    icon character varying(256) NOT NULL,
    command character varying(65534),
    url character varying(65534),
    healthcheck_url text NOT NULL DEFAULT '',
    healthcheck_interval integer NOT NULL DEFAULT 0,
    healthcheck_threshold integer NOT NULL DEFAULT 0,
    health workspace_app_health NOT NULL DEFAULT 'disabled',
    subdomain boolean NOT NULL DEFAULT false,
    sharing_level app_sharing_level NOT NULL DEFAULT 'owner',
    slug text NOT NULL,
    external boolean NOT NULL DEFAULT false,
    display_order integer NOT NULL DEFAULT 0,
    hidden boolean NOT NULL DEFAULT false,
    CONSTRAINT workspace_apps_agent_id_slug_idx UNIQUE (agent_id, slug),
    -- Added in schema version 2.
    open_in workspace_app_open_in NOT NULL DEFAULT 'slim-window',
    display_group text,
    tooltip character varying(2048) NOT NULL DEFAULT ''
);

CREATE TABLE workspace_agent_scripts (
    workspace_agent_id uuid NOT NULL REFERENCES workspace_agents (id) ON DELETE CASCADE,
    log_source_id uuid NOT NULL,
    log_path text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    script text NOT NULL,
    cron text NOT NULL,
    start_blocks_login boolean NOT NULL,
    run_on_start boolean NOT NULL,
    run_on_stop boolean NOT NULL,
    timeout_seconds integer NOT NULL,
    display_name text NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    CONSTRAINT workspace_agent_scripts_id_key UNIQUE (id)
);

CREATE INDEX workspace_agent_scripts_workspace_agent_id_idx ON workspace_agent_scripts (workspace_agent_id);

CREATE TABLE workspace_agent_script_timings (
    script_id uuid NOT NULL REFERENCES workspace_agent_scripts (id) ON DELETE CASCADE,
    started_at timestamp with time zone NOT NULL,
    ended_at timestamp with time zone NOT NULL,
    exit_code integer NOT NULL,
    stage workspace_agent_script_timing_stage NOT NULL,
    status workspace_agent_script_timing_status NOT NULL,
    CONSTRAINT workspace_agent_script_timings_script_id_started_at_key UNIQUE (script_id, started_at)
);

CREATE TABLE workspace_agent_stats (
    id uuid PRIMARY KEY,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    user_id uuid NOT NULL,
    agent_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    template_id uuid NOT NULL,
    connections_by_proto jsonb NOT NULL DEFAULT '{}'::jsonb,
    connection_count bigint NOT NULL DEFAULT 0,
    rx_packets bigint NOT NULL DEFAULT 0,
    rx_bytes bigint NOT NULL DEFAULT 0,
    tx_packets bigint NOT NULL DEFAULT 0,
    tx_bytes bigint NOT NULL DEFAULT 0,
    connection_median_latency_ms double precision NOT NULL DEFAULT -1,
    session_count_vscode bigint NOT NULL DEFAULT 0,
    session_count_jetbrains bigint NOT NULL DEFAULT 0,
    session_count_reconnecting_pty bigint NOT NULL DEFAULT 0,
    session_count_ssh bigint NOT NULL DEFAULT 0,
    -- Added in schema version 2.
    usage boolean NOT NULL DEFAULT false
);

CREATE INDEX idx_agent_stats_created_at ON workspace_agent_stats (created_at);

CREATE INDEX idx_agent_stats_user_id ON workspace_agent_stats (user_id);

CREATE INDEX workspace_agent_stats_template_id_created_at_user_id_idx
    ON workspace_agent_stats (template_id, created_at, user_id);

-- ---------------------------------------------------------------------------------------------
-- Schema version 2: tasks, app statuses, devcontainers, monitors, connection and boundary logs,
-- context, user secrets, notifications.
-- ---------------------------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------------------------
-- Views the API reads through (Coder's names)
-- ---------------------------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------------------------
-- Tailnet coordinator shared by replicas (agentd/tailnet/pg_coordinator.py, coordinator = "postgres")
-- ---------------------------------------------------------------------------------------------

CREATE TYPE tailnet_status AS ENUM ('ok', 'lost');

-- One row per running coordinator (a fresh id per process start); heartbeat_at is advanced every
-- heartbeat period. Rows of coordinators dead for long are deleted, and their peers and tunnels with them.
CREATE TABLE tailnet_coordinators (
    id uuid PRIMARY KEY,
    heartbeat_at timestamp with time zone NOT NULL
);

-- The binding of a peer id to the coordinator its current connection is on. node is NULL until the
-- peer's first update_self (a connected peer without a node is still a row: others' nodes reach it).
CREATE TABLE tailnet_peers (
    id uuid PRIMARY KEY,
    coordinator_id uuid NOT NULL REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
    node bytea,
    status tailnet_status NOT NULL DEFAULT 'ok',
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);

CREATE INDEX tailnet_peers_coordinator_idx ON tailnet_peers (coordinator_id);

-- src may open a tunnel to dst before dst ever connects: no foreign keys on the peer ids.
CREATE TABLE tailnet_tunnels (
    src_id uuid NOT NULL,
    dst_id uuid NOT NULL,
    coordinator_id uuid NOT NULL REFERENCES tailnet_coordinators (id) ON DELETE CASCADE,
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (src_id, dst_id)
);

CREATE INDEX tailnet_tunnels_dst_idx ON tailnet_tunnels (dst_id);
CREATE INDEX tailnet_tunnels_coordinator_idx ON tailnet_tunnels (coordinator_id);

-- ---------------------------------------------------------------------------------------------
-- Seed rows every Coder database has
-- ---------------------------------------------------------------------------------------------

-- Owner of prebuilt workspaces (spec §4.4): the activity bump and the workspace cache skip it.
INSERT INTO users (id, email, username, name, created_at, updated_at, status, login_type, is_system)
VALUES (
    'c42fdf75-3097-471c-8c33-fb52454d81c0', 'prebuilds@system', 'prebuilds', 'Prebuilds',
    now(), now(), 'active', 'none', true
);
