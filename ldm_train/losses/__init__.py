"""Loss terms of the stages: each returns a dict of named terms whose sum is the loss."""
