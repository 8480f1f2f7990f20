"""A separate process that changes, reads or commits a mounted branch, for the coherence test.

    python coherence_worker.py change BRANCH NAME LOG SECONDS SEED
    python coherence_worker.py read BRANCH NAMES LOG SECONDS SEED
    python coherence_worker.py commit BRANCH NAMES LOG SECONDS SEED

Each role appends one JSON line per operation to LOG, with the times (CLOCK_MONOTONIC,
the same in every process) it started and ended, so that the test can check every
read against what the file held then (``test_coherence.check_reads``).

* ``change``: the only process that changes NAME (so its versions are in order):
  appends, same-size overwrites, truncations, replacing it by rename, and ``vfsctl
  put`` of a new version from outside the mount. Each line holds the content after
  the change and the file's inode number (a rename makes a new file; a put does not).
* ``read``: keeps a descriptor of every file open across the changes and reads
  through it, opens and reads afresh, and stats; each line holds what it saw (or
  that an open or stat failed with ENOENT).
* ``commit``: ``vfsctl commit`` now and then, and reads every file of every commit
  it made once more at the end: a commit path never changes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

MAX_SIZE = 3000
_READ = 1 << 16


def vfsctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=120)


def pattern(name: str, step: int, size: int) -> bytes:
    """Bytes no other step of any file writes (a stale read cannot match them)."""
    unit = f"<{name}:{step}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


class Log:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a")  # noqa: SIM115 - closed at exit

    def write(self, **record: object) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def change(branch: str, name: str, log: Log, seconds: float, rng: random.Random) -> None:
    path = os.path.join(branch, name)
    with open(path, "rb") as f:
        content = f.read()
    source = f"{log.file.name}.source"
    step = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        step += 1
        kind = rng.choices(["append", "overwrite", "truncate", "rename", "put"],
                           [3, 3, 1, 2, 1])[0]
        if kind == "append" and len(content) > MAX_SIZE:
            kind = "truncate"
        started = time.monotonic()
        if kind == "append":
            line = pattern(name, step, rng.randrange(10, 200))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.write(fd, line)
            os.close(fd)
            content += line
        elif kind == "overwrite":  # the same size: only the bytes tell
            content = pattern(name, step, len(content))
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, content, 0)
            os.close(fd)
        elif kind == "truncate":
            content = content[: rng.randrange(0, len(content) + 1)]
            os.truncate(path, len(content))
        elif kind == "rename":
            content = pattern(name, step, rng.randrange(100, MAX_SIZE))
            temporary = f"{path}.new"
            with open(temporary, "wb") as f:
                f.write(content)
            os.rename(temporary, path)
        else:  # a new version from outside the mount, often with the same size and time
            st = os.stat(path)
            same = rng.random() < 0.5
            content = pattern(name, step, len(content) if same else rng.randrange(100, MAX_SIZE))
            with open(source, "wb") as f:
                f.write(content)
            if same:
                os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
            done = vfsctl("put", f"data@main:/{name}", source)
            if done.returncode != 0:
                raise RuntimeError(f"vfsctl put failed: {done.stderr}")
        ended = time.monotonic()
        log.write(op=kind, name=name, t0=started, t1=ended, ino=os.stat(path).st_ino,
                  data=content.hex())
        time.sleep(rng.uniform(0, 0.05))


def read(branch: str, names: list[str], log: Log, seconds: float,
         rng: random.Random) -> None:
    held: dict[str, int] = {}

    def open_file(name: str) -> int:
        # An open that fails is logged (the test counts it a problem) and retried.
        while True:
            started = time.monotonic()
            try:
                return os.open(os.path.join(branch, name), os.O_RDONLY)
            except FileNotFoundError:
                log.write(op="enoent", name=name, t0=started, t1=time.monotonic())

    def hold(name: str) -> None:
        if name in held:
            os.close(held.pop(name))
        held[name] = open_file(name)

    for name in names:
        hold(name)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        name = rng.choice(names)
        path = os.path.join(branch, name)
        kind = rng.choices(["held", "fresh", "stat", "reopen"], [5, 3, 1, 1])[0]
        started = time.monotonic()
        if kind == "held":
            fd = held[name]
            data = os.pread(fd, _READ, 0)
            log.write(op=kind, name=name, t0=started, t1=time.monotonic(),
                      ino=os.fstat(fd).st_ino, data=data.hex())
        elif kind == "fresh":
            fd = open_file(name)
            try:
                data = os.read(fd, _READ)
                ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            log.write(op=kind, name=name, t0=started, t1=time.monotonic(), ino=ino,
                      data=data.hex())
        elif kind == "stat":
            try:
                st = os.stat(path)
            except FileNotFoundError:
                log.write(op="enoent", name=name, t0=started, t1=time.monotonic())
                continue
            log.write(op=kind, name=name, t0=started, t1=time.monotonic(), ino=st.st_ino,
                      size=st.st_size)
        else:
            hold(name)
        time.sleep(rng.uniform(0, 0.005))
    for fd in held.values():
        os.close(fd)


def commit(branch: str, names: list[str], log: Log, seconds: float,
           rng: random.Random) -> None:
    root = os.path.dirname(branch)
    seen: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 2.0))
        started = time.monotonic()
        done = vfsctl("commit", "data@main", "-m", "exercise")
        if done.returncode != 0:
            if "nothing to commit" in done.stderr:
                continue
            raise RuntimeError(f"vfsctl commit failed: {done.stderr}")
        commit_id = done.stdout.strip()
        seen[commit_id] = _read_commit(root, commit_id, names)
        log.write(op="commit", commit=commit_id, t0=started, t1=time.monotonic(),
                  files=seen[commit_id])
    for commit_id, files in seen.items():
        again = _read_commit(root, commit_id, names)
        log.write(op="reread", commit=commit_id, files=again, first=files)


def _read_commit(root: str, commit_id: str, names: list[str]) -> dict[str, str | None]:
    """The bytes (hex) of each file in a commit; None for one it lacks."""
    files: dict[str, str | None] = {}
    for name in names:
        try:
            with open(os.path.join(root, f"data@{commit_id}", name), "rb") as f:
                files[name] = f.read().hex()
        except FileNotFoundError:
            files[name] = None
    return files


def main(argv: list[str]) -> None:
    role, branch, names, log_path, seconds, seed = argv
    log = Log(log_path)
    rng = random.Random(int(seed))
    if role == "change":
        change(branch, names, log, float(seconds), rng)
    elif role == "read":
        read(branch, names.split(","), log, float(seconds), rng)
    elif role == "commit":
        commit(branch, names.split(","), log, float(seconds), rng)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
