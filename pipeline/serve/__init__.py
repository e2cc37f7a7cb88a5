"""`pipeline serve`: a JSON API (search, embeddings, similarity, metrics) and a search page
over index folders, loaded once and reloaded when rebuilt.

app.py: the FastAPI app (`create_app`) and its routes; schema.py: request bodies, checks and
answer shapes; batching.py: concurrent requests into shared forward passes; engine.py: what a
batch does; slots.py: the served indexes and their reloading; metrics.py: /metrics' text.
Only app.py needs fastapi (the `serve` extra).
"""
