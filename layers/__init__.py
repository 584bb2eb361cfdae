"""trainguard: layers."""
