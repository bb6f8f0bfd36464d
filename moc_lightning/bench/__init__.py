"""GPU benchmark commands: each prints JSON lines, one figure per line (see `common.emit`)."""
