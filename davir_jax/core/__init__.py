"""The lowest floor: mesh and sharding rules, losses, scores, statistics, atomic I/O, errors."""
