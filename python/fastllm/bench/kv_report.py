"""KV-cache efficiency report for the benchmarks: lives in fastllm.engine.stats (the
engine's own statistics, also used by `generate --stats`); re-exported here."""
from fastllm.engine.stats import (KVPeakTracker, engine_kv_report, format_kv_report,  # noqa: F401
                                  kv_cache_report, track_kv_peak)

__all__ = ["KVPeakTracker", "engine_kv_report", "format_kv_report", "kv_cache_report",
           "track_kv_peak"]
