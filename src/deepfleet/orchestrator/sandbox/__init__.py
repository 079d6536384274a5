"""The sandbox fleet (work in progress)."""
