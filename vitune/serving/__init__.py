"""Serving: an OpenAI-compatible HTTP API around the inference stack (`vitune serve`).

    cli_args.py    `vitune serve` options and run_serve           server.py   uvicorn, socket, SIGTERM drain
    api.py         the FastAPI app: routes, auth, error bodies     guard.py    body limit, read timeout, draining
    schema.py      request bodies -> typed, checked objects        errors.py   OpenAI-style error bodies
    images.py      image URLs -> RGB images, safely                jobs.py     chat request -> engine job
    engine.py      continuous batching in one model thread         slot_cache.py  per-request KV cache slots
    decoding.py    one request's tokens -> text, streamed          bridge.py   engine thread -> event loop
    responses.py   OpenAI response bodies and SSE chunks           metrics.py  Prometheus metrics
    embeddings.py  retrieval-head embeddings                       settings.py the server's limits
    page.py        the web page at / (page.html)

Needs the `serve` extra (fastapi, uvicorn, prometheus-client). The package imports only
inference, data, model, checkpoints and the base modules.
"""
