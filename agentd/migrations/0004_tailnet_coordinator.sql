-- Schema version 3 -> 4: the tailnet coordinator shared by replicas (coordinator = "postgres").
-- Same DDL as schema.sql's tailnet section (tests/store/test_migrate.py compares the catalogs).

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

