"""Decide: which images go where, and when (rules, platforms, the planner)."""
