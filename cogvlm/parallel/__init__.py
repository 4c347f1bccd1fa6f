"""Running one model over several devices: `device_map` (which device holds which block, and the hooks that move
activations there), `plan` (the memory planner behind "auto"/"balanced" maps), `segments` (a decode step cut into
one piece per device, each replayable as its own CUDA graph)."""
