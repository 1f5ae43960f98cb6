"""get_agent_by_token per spec §2.2 (latest build, stop-build exception, deletions) and get_agent_by_id."""

from __future__ import annotations

import uuid

import pytest

from agentd.store import Database
from agentd.store.agents import PREBUILDS_SYSTEM_USER_ID, get_agent_by_id, get_agent_by_token, token_digest
from agentd.store.errors import CheckViolation, UniqueViolation
from agentd.store.testing import add_build, insert_row, seed_workspace, set_job_status


async def test_token_resolves_agent_build_and_workspace(db: Database) -> None:
    ws = await seed_workspace(db, agents=("main", "side"))
    main = ws.agent("main")
    auth = await get_agent_by_token(db, main.auth_token)
    assert auth is not None
    assert auth.agent.id == main.id and auth.agent.name == "main"
    assert auth.agent.lifecycle_state == "created"
    assert auth.agent.display_apps == (
        "vscode",
        "vscode_insiders",
        "web_terminal",
        "ssh_helper",
        "port_forwarding_helper",
    )
    assert auth.agent.subsystems == ()
    assert auth.build.id == ws.latest.id and auth.build.build_number == 1 and auth.build.transition == "start"
    assert auth.build.initiator_by_username == "alice"
    assert auth.workspace.id == ws.workspace_id and auth.workspace.owner_id == ws.owner_id
    assert not auth.workspace.is_prebuild
    assert auth.task_id is None
    side = await get_agent_by_token(db, ws.agent("side").auth_token)
    assert side is not None and side.agent.name == "side"


async def test_unknown_token(db: Database) -> None:
    await seed_workspace(db)
    assert await get_agent_by_token(db, uuid.uuid4()) is None


async def test_agent_of_older_build_is_refused(db: Database) -> None:
    ws = await seed_workspace(db)
    old = ws.agent()
    await add_build(db, ws, transition="start")
    assert await get_agent_by_token(db, old.auth_token) is None
    assert await get_agent_by_token(db, ws.agent().auth_token) is not None


async def test_start_agent_keeps_authenticating_during_stop(db: Database) -> None:
    for stop_status in ("pending", "running"):
        ws = await seed_workspace(db, workspace_name=f"ws-{stop_status}", owner_username=f"u-{stop_status}")
        agent = ws.agent()
        stop = await add_build(db, ws, transition="stop", job_status=stop_status, agents=())
        auth = await get_agent_by_token(db, agent.auth_token)
        assert auth is not None and auth.build.build_number == 1, stop_status
        # Once the stop job finishes the exception no longer applies.
        await set_job_status(db, stop.job_id, "succeeded")
        assert await get_agent_by_token(db, agent.auth_token) is None, stop_status


async def test_finished_stop_ends_the_exception(db: Database) -> None:
    for stop_status in ("succeeded", "failed", "canceling", "canceled"):
        ws = await seed_workspace(db, workspace_name=f"ws-{stop_status}", owner_username=f"u-{stop_status}")
        agent = ws.agent()
        await add_build(db, ws, transition="stop", job_status=stop_status, agents=())
        assert await get_agent_by_token(db, agent.auth_token) is None, stop_status


async def test_exception_needs_a_succeeded_start(db: Database) -> None:
    for start_status in ("pending", "running", "failed", "canceled"):
        ws = await seed_workspace(
            db,
            workspace_name=f"ws-{start_status}",
            owner_username=f"u-{start_status}",
            job_status=start_status,
        )
        agent = ws.agent()
        # Latest build itself: allowed whatever its job status (agents connect while provisioning).
        assert await get_agent_by_token(db, agent.auth_token) is not None, start_status
        await add_build(db, ws, transition="stop", job_status="running", agents=())
        assert await get_agent_by_token(db, agent.auth_token) is None, start_status


async def test_exception_only_for_the_directly_following_stop(db: Database) -> None:
    ws = await seed_workspace(db)
    agent = ws.agent()
    await add_build(db, ws, transition="stop", job_status="succeeded", agents=())
    await add_build(db, ws, transition="stop", job_status="running", agents=())
    assert await get_agent_by_token(db, agent.auth_token) is None


async def test_exception_not_for_a_following_start_or_delete(db: Database) -> None:
    ws = await seed_workspace(db)
    agent = ws.agent()
    await add_build(db, ws, transition="delete", job_status="running", agents=())
    assert await get_agent_by_token(db, agent.auth_token) is None


async def test_deleted_workspace_is_refused(db: Database) -> None:
    ws = await seed_workspace(db)
    await db.execute("UPDATE workspaces SET deleted = true WHERE id = %s", [ws.workspace_id])
    assert await get_agent_by_token(db, ws.agent().auth_token) is None


async def test_deleted_sub_agent_is_refused(db: Database) -> None:
    ws = await seed_workspace(db)
    parent = ws.agent()
    child_id, child_token = uuid.uuid4(), uuid.uuid4()
    await insert_row(
        db,
        "workspace_agents",
        {
            "id": child_id,
            "created_at": "now",
            "updated_at": "now",
            "name": "dev",
            "resource_id": parent.resource_id,
        }
        | {
            "auth_token_hash": token_digest(child_token),
            "architecture": "amd64",
            "operating_system": "linux",
            "parent_id": parent.id,
        },
    )
    child = await get_agent_by_token(db, child_token)
    assert child is not None and child.agent.parent_id == parent.id
    await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", [child_id])
    assert await get_agent_by_token(db, child_token) is None
    # A deleted agent's name is free again within the build (trigger ignores deleted agents) …
    await insert_row(
        db,
        "workspace_agents",
        {"id": uuid.uuid4(), "created_at": "now", "updated_at": "now", "name": "dev"}
        | {
            "resource_id": parent.resource_id,
            "auth_token_hash": token_digest(uuid.uuid4()),
            "architecture": "amd64",
        }
        | {"operating_system": "linux", "parent_id": parent.id},
    )
    # … but a live one's is not.
    with pytest.raises(UniqueViolation):
        await insert_row(
            db,
            "workspace_agents",
            {"id": uuid.uuid4(), "created_at": "now", "updated_at": "now", "name": "main"}
            | {
                "resource_id": parent.resource_id,
                "auth_token_hash": token_digest(uuid.uuid4()),
                "architecture": "amd64",
            }
            | {"operating_system": "linux"},
        )


async def test_task_and_prebuild(db: Database) -> None:
    ws = await seed_workspace(db)
    task_id = uuid.uuid4()
    await insert_row(
        db,
        "tasks",
        {"id": task_id, "organization_id": ws.organization_id, "owner_id": ws.owner_id, "name": "t"}
        | {"workspace_id": ws.workspace_id, "template_version_id": ws.template_version_id},
    )
    await db.execute(
        "UPDATE workspaces SET owner_id = %s WHERE id = %s", [PREBUILDS_SYSTEM_USER_ID, ws.workspace_id]
    )
    auth = await get_agent_by_token(db, ws.agent().auth_token)
    assert auth is not None
    assert auth.task_id == task_id
    assert auth.workspace.is_prebuild


async def test_get_agent_by_id(db: Database) -> None:
    ws = await seed_workspace(db)
    agent = await get_agent_by_id(db, ws.agent().id)
    assert agent is not None and agent.name == "main" and agent.directory == "/home/coder"
    await db.execute(
        "UPDATE workspace_agents SET logs_length = 10, subsystems = '{envbox}' WHERE id = %s", [agent.id]
    )
    fresh = await get_agent_by_id(db, agent.id)
    assert fresh is not None and fresh.logs_length == 10 and fresh.subsystems == ("envbox",)
    assert await get_agent_by_id(db, uuid.uuid4()) is None


async def test_max_logs_length_check_is_named(db: Database) -> None:
    ws = await seed_workspace(db)
    with pytest.raises(CheckViolation) as info:
        await db.execute("UPDATE workspace_agents SET logs_length = 1048577 WHERE id = %s", [ws.agent().id])
    assert info.value.constraint == "max_logs_length"
