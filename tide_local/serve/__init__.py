"""`tide serve`: an OpenAI-compatible HTTP server over one engine.

    cli.py         the command line: options, loading the model, running the server
    server.py      uvicorn in-process: a socket bound before loading, a clean stop
    app.py         the FastAPI app: routes, authentication, the disconnect watch
    schemas.py     the request bodies (typed pydantic models) and their decoding options
    jobs.py        a request body -> a validated Job (prompt ids, stop ids, decoding options)
    scheduler.py   the bounded queue and the one worker thread that owns the engine
    text.py        an answer's text as its blocks finish, cut at stop strings
    responses.py   OpenAI's response and stream-chunk JSON for chat and completions
    errors.py      OpenAI's error shape, and the handlers that give every error that shape
    middleware.py  the request body limit and the request counter (plain ASGI)
    metrics.py     the counters behind /metrics, in Prometheus' text format

Nothing here is imported by `import tide_local`: FastAPI loads only for `tide serve`.
"""
