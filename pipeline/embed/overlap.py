"""`pipeline tokenize --embed`: both stages at once, each token shard embedded as soon as it is
written, so the GPU starts after the first shard instead of after the whole corpus.

Tokenizing runs in a child process (text/child.py says why); a thread here hands its shards
to the embed engine through a bounded queue, so when the GPU falls behind the tokenizer waits
instead of filling the memory.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

from pipeline.embed.engines import END
from pipeline.embed.engines.local import LocalEngine
from pipeline.embed.shards import check_dtype
from pipeline.embed.stage import (
    check_max_tokens,
    embed_section,
    embed_stats,
    load_encoders,
    new_timings,
    resumed_model,
    run_embed,
)
from pipeline.folder import EMBEDDINGS_DIR, IndexFolder
from pipeline.text.child import TokenizeChild


class ShardHandover:
    """The tokenizing child's shards put on `tasks` (a bounded engine task queue, ended by
    END) by a thread of its own. `outcome` ends as {"tokenize": section} or {"error":
    exception}; an error sets `stop`, which ends the embedding."""

    def __init__(self, child: TokenizeChild, n_devices: int, timings: dict):
        self.child, self._timings = child, timings
        self.tasks: queue.Queue = queue.Queue(maxsize=2 * n_devices + 2)
        self.stop = threading.Event()
        self.outcome: dict = {}
        self._thread = threading.Thread(target=self._hand_over, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Put `item` on the queue unless (or until) the run stops."""
        while not self.stop.is_set():
            try:
                self.tasks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _hand_over(self) -> None:
        handing = True  # after a stop, messages are read and dropped: a child blocked on a
        try:            # full pipe could not see its SIGTERM through
            for kind, *payload in self.child.messages():
                if kind == "shard":
                    if self._timings["first_tokens_at_s"] is None:
                        self._timings["first_tokens_at_s"] = (time.perf_counter()
                                                              - self._timings["origin"])
                    handing = handing and self._put(tuple(payload))
                else:
                    self.outcome["tokenize" if kind == "done" else "error"] = payload[0]
                    break
        finally:
            if not self.outcome and not self.stop.is_set():
                self.outcome["error"] = self.child.died()
            if "error" in self.outcome:
                self.stop.set()
            self._put(END)

    def finish(self, failed: bool) -> None:
        """Stop the child (at once if the run `failed` or the child has not reported) and
        wait for it and for this thread."""
        self.stop.set()
        self.child.stop(asked_to_stop=failed or not self.outcome)
        self._thread.join()
        self.child.close()


def run_tokenize_and_embed(corpus: str | Path, index_dir: str | Path, settings,
                           model: str | None = None, device: str | None = None,
                           pooling: str | None = None, dtype: str = "float32",
                           batch_tokens: int | None = None, precision: str = "auto",
                           devices: list[str] | None = None,
                           force: bool = False) -> tuple[dict, dict]:
    """Tokenize and embed at once; returns the manifest's tokenize and embed sections.

    The vectors go to INDEX/embeddings.tmp/ and move to INDEX/embeddings/ once the token
    shards are in place, so the folder ends exactly as after `tokenize` then `embed`. An
    interrupted run leaves nothing half-written that a rerun would trust; the rerun starts
    over (the separate stages resume shard by shard instead). Tokens that are already current
    are not redone: then this is `run_embed`, which resumes.
    """
    check_dtype(dtype)
    folder = IndexFolder(index_dir)
    existed = folder.path.exists()
    with folder.writing("tokenize --embed"):  # the child tokenizes under this lock
        return tokenize_and_embed(corpus, folder, existed, settings, model, device, pooling,
                                  dtype, batch_tokens, precision, devices, force)


def tokenize_and_embed(corpus, folder: IndexFolder, existed: bool, settings, model, device,
                       pooling, dtype, batch_tokens, precision, devices, force
                       ) -> tuple[dict, dict]:
    """`run_tokenize_and_embed` once the folder is held."""
    if folder.exists():
        model = resumed_model(folder.manifest, model)
    staging = folder.path / (EMBEDDINGS_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    started, timings, records = time.perf_counter(), new_timings(), {}
    # The child starts first, so its first shard is on the way while the model loads. (It
    # dies with the thread that starts it: call this from a thread that outlives the run.)
    handover = ShardHandover(TokenizeChild(corpus, folder.path, settings, force),
                             len(devices or [device]), timings)
    failure: BaseException | None = None
    try:
        encoders = load_encoders(model, device, pooling, precision, devices)
        timings["models_ready_at_s"] = time.perf_counter() - timings["origin"]
        check_max_tokens(settings.max_tokens, encoders[0])
        batch_tokens = batch_tokens or encoders[0].default_batch_tokens
        engine = LocalEngine(folder.path, encoders, dtype, batch_tokens, out_dir=staging)
        n_tokens = embed_handed_over(engine, handover, records, folder.path.name, timings)
    except BaseException as err:
        failure = err
    try:
        handover.finish(failed=failure is not None)
    finally:  # even on a second Ctrl-C while waiting for the child
        if failure is not None or "error" in handover.outcome:
            shutil.rmtree(staging, ignore_errors=True)
            if not existed and "tokenize" not in handover.outcome:
                shutil.rmtree(folder.path, ignore_errors=True)
    raise_failure(failure, handover.outcome)
    tok = handover.outcome["tokenize"]
    if tok.get("skipped"):  # tokens were current: nothing was handed over
        shutil.rmtree(staging, ignore_errors=True)
        return tok, run_embed(folder.path, model, device, pooling, dtype, batch_tokens,
                              precision=precision, devices=devices, encoders=encoders)
    section = embed_section(encoders, dtype, batch_tokens)
    section["stats"] = {**embed_stats(tok["stats"]["rows"], n_tokens,
                                      time.perf_counter() - started, timings),
                        "overlapped_with_tokenize": True}
    return tok, move_in(IndexFolder(folder.path), staging, section, records)


def embed_handed_over(engine: LocalEngine, handover: ShardHandover, records: dict,
                      name: str, timings: dict) -> int:
    """Embed the shards as they are handed over, each written shard's record put in
    `records`; returns the tokens embedded."""
    from tqdm import tqdm

    with tqdm(unit="doc", desc=f"embed {name}", smoothing=0.1, delay=1, position=1) as bar:
        # `handover.stop` (set by a failed tokenize) ends the embedding; the engine sets it
        # when it ends.
        return engine.run(handover.tasks, lambda shard, record: records.update({shard: record}),
                          bar, timings, stop=handover.stop)


def raise_failure(failure: BaseException | None, outcome: dict) -> None:
    """Raise what ended the run, if anything did: the child's error explains the embedding's
    (which may only have lost its folder), except after Ctrl-C."""
    if failure is None and "error" not in outcome:
        return
    if isinstance(failure, KeyboardInterrupt) or "error" not in outcome:
        raise failure
    raise outcome["error"] from None


def move_in(folder: IndexFolder, staging: Path, section: dict, records: dict) -> dict:
    """Put the staged vectors in place beside the new tokens and record them; returns the
    embed section."""
    shutil.rmtree(folder.embeddings_dir, ignore_errors=True)
    staging.rename(folder.embeddings_dir)
    section["shards"] = {s["name"]: records[s["name"]] for s in folder.token_shards}
    folder.manifest["embed"] = section
    folder.write_manifest()
    return section
