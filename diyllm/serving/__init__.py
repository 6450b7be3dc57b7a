"""Serving a trained model: an OpenAI-compatible HTTP API and a web chat page (`diyllm serve`).

* `slots`: a KV cache of independent rows, so requests can join and leave one decode batch.
* `scheduler`: the decode loop (a thread, off the event loop) doing continuous batching.
* `protocol`: OpenAI request validation and response/chunk objects.
* `app`: the Starlette application (routes, Server-Sent Events, errors).
* `cli`: the `diyllm serve` command. `static/chat.html`: the self-contained chat page.

The HTTP parts need the `serve` extra (starlette, uvicorn); `slots` and `scheduler` need only torch.
"""
