"""The imitation network (the paper's drafter) and, in a later step, its trainer."""
from .network import ImitationConfig, ImitationNetwork

__all__ = ["ImitationConfig", "ImitationNetwork"]
