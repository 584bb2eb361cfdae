"""trainguard: the core of the daemon that guards FAL trainings until their results are stored."""

__version__ = "0.1.0"
