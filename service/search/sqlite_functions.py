"""Aggregates that PostgreSQL has and SQLite lacks, registered on each SQLite connection.

They run inside SQLite's own aggregation (called per row by the engine), so that a
query's statistics are computed where its rows are, as on PostgreSQL.
"""

import math
import sqlite3


class SampleStandardDeviation:
    """``stddev_samp``: Welford's running mean and sum of squared deviations (no cancellation)."""

    def __init__(self):
        self.count, self.mean, self.squares = 0, 0.0, 0.0

    def step(self, value):
        if value is None:
            return
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.squares += delta * (value - self.mean)

    def finalize(self):
        return math.sqrt(self.squares / (self.count - 1)) if self.count > 1 else None


class Median:
    """``median``: the middle value, or the mean of the two middle values (as percentile_cont(0.5))."""

    def __init__(self):
        self.values = []

    def step(self, value):
        if value is not None:
            self.values.append(value)

    def finalize(self):
        if not self.values:
            return None
        ordered = sorted(self.values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def register(connection: sqlite3.Connection) -> None:
    connection.create_aggregate("stddev_samp", 1, SampleStandardDeviation)
    connection.create_aggregate("median", 1, Median)
