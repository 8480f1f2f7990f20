"""Pipelines: specs, datums, job planning and records, provenance (no containers here).

Running containers is the daemon's job (``daemon.runtimes``, ``daemon.watcher``);
everything here is plain logic over the store, usable from the CLI and tests.
"""
