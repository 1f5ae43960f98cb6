"""storj DRPC as Coder speaks it: wire codec, per-transport state machine, registry and trio server."""
