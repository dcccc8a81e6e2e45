"""Workloads: what the simulated applications do and what is measured of it.

Each workload drives the real cores through the engine (data from the
scenario file) and records, from outside the cores, what a user would see;
none re-implements protocol logic.
"""
