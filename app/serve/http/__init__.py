"""The HTTP layer: every HTTP rule of the service, over the engine. It never imports the composition root
above it (app/serve/app.py, service.py): the routes reach the service through `routes.Backend`.

routes.py       the routes (POST /generate, GET /models, /healthz, /readyz, /metrics, the playground page)
schemas.py      request and response bodies with their static limits
limits.py       the checks of a request against the loaded model and the settings (422 naming field and limit)
errors.py       one table from error to status, headers and Retry-After; one handler
encoding.py     PNG/JPEG/WebP, Accept negotiation
openapi.py      what each route answers besides its 200 JSON; the loaded model's limits in the request schema
auth.py         optional API keys
middleware.py   the body's size and time limits (413, the rest of the body discarded; 408), the 429 before parsing
                while the queue is full, per-request metrics
json_body.py    strict JSON parsing of request bodies
connections.py  uvicorn's httptools protocol with a deadline and a size bound for the request line and headers
static/         the playground page (GET /)
"""
