"""Stage kinds: sources, download, decode, transforms and sinks. Each module registers its kinds."""
