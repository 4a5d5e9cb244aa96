"""`piggyback dry-run`: DVC's `dvc repro --dry`, made to work before the pipeline's outputs exist.

DVC (3.67.1, the newest release) crashes in a dry run at the first stage whose input is an output not
made yet: a new dataset's `data/raw/<key>`, a new task's `models/<task>`, every stage of a fresh clone.
Before it prints a stage's command it asks its run-cache whether the stage ran before, and that lookup
hashes every dependency (`dvc.stage.cache._can_hash`), so a missing one raises FileNotFoundError
instead of meaning "not cached" (DVC issue 9818). A stage with a missing input cannot be in the
run-cache anyway, so this command answers "not cached" for it and leaves everything else to DVC: the
same stage order, the same "Running stage" lines, the same options (`piggyback dry-run -s train@t2`).
Nothing is written: it is DVC's own dry run.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Sequence


@contextmanager
def missing_inputs_are_not_cached() -> Iterator[bool]:
    """While active, DVC's run-cache treats a stage with a missing local input as not cached.

    Yields False (and changes nothing) when this DVC has no `_can_hash` to wrap, i.e. its internals
    moved: the dry run then behaves exactly as `dvc repro --dry`.
    """
    try:
        from dvc.stage import cache as run_cache
    except ImportError:   # pragma: no cover - DVC is a dependency
        yield False
        return
    original = getattr(run_cache, "_can_hash", None)
    if original is None:
        yield False
        return

    def can_hash(stage) -> bool:
        if any(dep.protocol == "local" and not dep.exists for dep in stage.deps):
            return False
        return original(stage)

    run_cache._can_hash = can_hash
    try:
        yield True
    finally:
        run_cache._can_hash = original


def dry_run(dvc_args: Sequence[str]) -> int:
    """`dvc repro --dry <dvc_args>` in this process with the fix above; DVC's exit status."""
    from dvc.cli import main as dvc_main

    args = [a for a in dvc_args if a != "--dry"]
    with missing_inputs_are_not_cached() as fixed:
        if not fixed:
            print("piggyback dry-run: this DVC's run-cache internals changed; running plain `dvc repro --dry`",
                  file=sys.stderr)
        return dvc_main(["repro", "--dry", *args])
