"""trainguard: plugins."""
