"""`cogvlm serve`: the model behind OpenAI's chat-completions API, with continuous batching and a chat page.

    config.py    settings and their command-line options (no torch)
    protocol.py  the request's fields, checked; answer, chunk and error shapes
    images.py    image URLs -> decoded images, within the limits
    engine.py    the continuous-batching engine: one decode batch shared by all requests
    app.py       the FastAPI app: routes, streaming, disconnects
    server.py    uvicorn: bind, report the URL, serve
    static/      the chat page (plain HTML, CSS and JavaScript; no build step, nothing from a CDN)

`cogvlm/cli/serve.py` is the command; `python -m cogvlm.serve ARGS` runs the same. docs/serve.md has the rest.
"""
