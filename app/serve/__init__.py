"""The REST service: request -> api -> engine (batching, worker thread) -> pipeline -> images -> api.

settings.py  ServeSettings (VAR_* environment variables)     app.py      create_app: the composition root
service.py   load, compress, warm up, drain                   api.py      routes; errors.py: engine errors -> HTTP
engine.py    queue, dynamic batching, the worker thread        batching.py requests, results, the batching policy
models.py    variants from one checkpoint, memory accounting  limits.py   request checks against the model
metrics.py   every Prometheus metric                          encoding.py PNG/JPEG/WebP, Accept negotiation
static/      the playground page (GET /)                      middleware.py body size limit, request metrics
"""
