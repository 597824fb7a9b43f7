"""Model adapters: they load models and turn them into forward functions and tasks; they never merge."""
