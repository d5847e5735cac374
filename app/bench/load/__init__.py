"""`python -m app.bench load`: open-loop load on loopback; every request answered, none late, no 5xx.

The tool starts the server (`app.bench.launcher`, VAR_VARIANTS from `--variants`) or targets `--url` (127.0.0.1
only). It measures the capacity in images per second with a short closed-loop burst (or takes
`--capacity`), then sends requests at precomputed arrival times, whatever the answers: the offered load
follows a profile in multiples of that capacity. `ramp` (`make loadtest`): from idle to 1x, up to `--peak`
(4x), held, down to 1x and to idle. `steady` (`make soak`): `--level` (1x) throughout, with the RSS check.

Each arrival is one of four kinds, drawn with a seed:
- good: one image of a variant, timeout_s `--timeout-s`; answered 200, or 429 (queue full) or 504 (deadline);
- short: the same with timeout_s `--short-timeout-s`, so that deadlines pass under overload;
- invalid: a body with an invalid field; answered 422;
- cancel: a good request the client gives up on after a random delay, closing its connection.

Per request: its status, or that the tool cancelled it on purpose; otherwise it got no answer
(`unanswered`). An answer later than its timeout_s plus `--allowance-s` is `late`; a 5xx other than a 504
that came after timeout_s is an `unexpected_5xx`; an answer of a status not expected for its kind, a 429 or
503 without Retry-After or a 200 of the wrong variant or image count is a `wrong_answer`. The server's RSS is
sampled throughout (/proc/<pid>/status of the started server, else its process_resident_memory_bytes).
Exit status 1 when any of those counts is not 0 or the RSS grew more than `--max-rss-growth`.
"""
