"""Engines: what embeds the shards of the embed stage, shard by shard, on some devices.

Each takes the same call, `engine.run(tasks, commit, bar, timings, stop=None) -> tokens
embedded`:

- `tasks`, a queue of (shard record, its token table or None to read it from INDEX/tokens/),
  ended by END; a producer may still be adding to it (`tokenize --embed`);
- `commit(name, record)`, called in the calling thread for each shard once its file is
  written; only that thread records finished shards;
- `bar`, a tqdm-like progress bar (rows); `timings`, `stage.new_timings()`'s dict, which the
  engine adds its seconds to; `stop`, an event that ends the work early when set (the engine
  sets it when it ends).

`local.LocalEngine` runs threads in this process, one per device.
"""

END = None  # the task that ends a task queue


def show_rates(bar, **rates: str) -> None:
    """Set some of the progress bar's rates (e.g. written=..., tokens=...), keeping the
    others: the stage shows what is written, an engine what it computes."""
    shown = getattr(bar, "pipeline_rates", {})
    shown.update(rates)
    bar.pipeline_rates = shown
    # refresh=False: a bar drawn before tqdm counts it as shown would skip its closing
    # newline, and an error would print on the bar's line
    bar.set_postfix(shown, refresh=False)
