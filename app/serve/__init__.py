"""The REST service: request -> http -> engine (batching, worker thread) -> pipeline -> images -> http.

engine/      batching and the worker thread; no web framework (app/serve/engine/__init__.py lists its modules)
http/        routes, schemas, limits, errors, encoding, auth, middleware; every HTTP rule
The composition root, which builds both from the settings:
app.py       create_app: the FastAPI app with its routes, error handlers and middleware
service.py   the service's life: load, compress, warm up, serve, drain (implements http's Backend)
settings.py  ServeSettings (VAR_* environment variables); read only here, in app.py and __main__.py
models.py    variants from one checkpoint, memory accounting
metrics.py   every Prometheus metric but the offline quality; imports nothing from engine/ or http/
quality_metrics.py  the offline quality: the checkpoint's evaluation.json as gauges, read at start
__main__.py  `python -m app.serve`: uvicorn with a draining shutdown
"""
