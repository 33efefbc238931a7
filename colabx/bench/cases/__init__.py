"""Per-op benchmark cases: each module exposes cases(device, quick) -> list[Case]."""
