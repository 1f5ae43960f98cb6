# agentd developer recipes. `just` comes from PyPI (rust-just): `pip install '.[dev]'`.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Install and start the daemon on its embedded PostgreSQL.
serve *ARGS:
    pip install -q . && agentd serve {{ARGS}}

# The whole test suite (same as the README's command).
test *ARGS:
    python -m pytest {{ARGS}}

lint:
    ruff check agentd tests bench scripts
    ruff format --check agentd tests bench scripts

typecheck:
    mypy --strict agentd

# Regenerate agentd/proto/*_pb2.py and .pyi from the .proto sources (grpcio-tools, pinned in setup.cfg),
# then the typed client stubs derived from them.
proto:
    python scripts/gen_proto.py
    python -m agentd.client.gen_stubs

bench: bench-mux bench-rpc

bench-mux *ARGS:
    python bench/mux.py {{ARGS}}

bench-rpc *ARGS:
    python bench/rpc.py {{ARGS}}

# Fuzz a live daemon (bench/fuzz.py) for --seconds (default 180) or --max-inputs; numbers at the end.
fuzz *ARGS:
    python bench/fuzz.py {{ARGS}}

# Connect rate and idle cost of one `agentd serve` (needs PostgreSQL: --postgres URL of the server).
bench-idle *ARGS:
    python bench/idle_connect.py {{ARGS}}

# Server CPU per RPC kind against PostgreSQL (agentd serve in a subprocess, fresh database).
bench-rpc-db *ARGS:
    python bench/rpc_db.py {{ARGS}}

# CPU per query: agentd's Database (trio-native) vs plain asyncio vs the trio-native prototype.
bench-pg-bridge *ARGS:
    python bench/pg_bridge.py {{ARGS}}

# Agents one `agentd serve` holds: connect rate, latency, CPU/RSS per agent (bench/scale.py --help).
bench-scale *ARGS:
    python bench/scale.py {{ARGS}}
