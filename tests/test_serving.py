"""`diyllm serve` end to end: the real server in a subprocess, called with the official openai client, raw
HTTP and a real browser (Playwright driving Debian's Chromium).

One tiny chat model is trained once for the module (a few seconds of `diyllm sft`), and one server
process answers every test, so the whole module costs one training and one server start.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diyllm.integrity import seal

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (serve-test extra) is not installed")

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
WIDE_CONTEXT = 16384  # a long generation must outlast the browser's stop click: ~1.5k tokens/s here
CHROMIUM = "/usr/bin/chromium"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "diyllm", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A chat model that learned "say WORD" -> "WORD WORD!" (fine-tuned with `diyllm sft` from a random base).

    It is trained with a 48-token context (fast), then its config is widened to 16384 tokens: RoPE has no
    weights, so the same weights load, and the tests get room for long generations.
    """
    from diyllm.cli import main
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("serve_model")
    torch.manual_seed(0)
    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok.save(tmp / "base_tok.json")
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=48, d_model=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2))
    save_checkpoint(model, None, 0, tmp / "base.pt", model_config=model.config.to_dict(),
                    tokenizer=(tmp / "base_tok.json").read_text())
    with open(tmp / "chat.jsonl", "w") as f:
        for _ in range(4):
            for w in WORDS:
                conv = [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}!"}]
                f.write(json.dumps({"conversations": conv}) + "\n")
    assert main(["sft", f"--init_from={tmp / 'base.pt'}", f"--data_dir={tmp / 'chat.jsonl'}",
                 f"--val_data={tmp / 'chat.jsonl'}", "--device=cpu", "--batch_size=8", "--max_iters=60",
                 "--eval_interval=60", "--eval_iters=1", "--warmup_iters=0", "--learning_rate=3e-3",
                 "--progress=false", f"--out_dir={tmp / 'sft'}"]) == 0
    state = torch.load(tmp / "sft" / "latest.pt", weights_only=True)
    state["model_config"]["context_length"] = WIDE_CONTEXT
    seal(state)  # an edited checkpoint gets a new checksum (diyllm.integrity), as save_checkpoint would give it
    torch.save(state, tmp / "chat.pt")
    return tmp / "chat.pt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _post(port: int, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(checkpoint):
    """`diyllm serve` on a free loopback port; yields the port and stops the process afterwards."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(checkpoint.parent / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "diyllm", "serve", "--ckpt", str(checkpoint), "--port",
                             str(port), "--model-name", "tiny-chat", "--max-concurrency", "8"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(port, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{(checkpoint.parent / 'server.log').read_text()}")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_idle(port: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, health = _get(port, "/health")
        if health["active_rows"] == 0 and health["waiting_requests"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


# ---- the API with the official client --------------------------------------------------------------

def test_models_and_non_streaming_chat_with_the_openai_client(client, checkpoint):
    from diyllm.data.chat_template import encode_chat
    from diyllm.training.checkpoint import load_model

    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "say tiger"}],
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-chat"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "tiger tiger!"
    assert r.choices[0].finish_reason == "stop"
    _, tok, _ = load_model(checkpoint)
    prompt = encode_chat(tok, [{"role": "user", "content": "say tiger"}], add_generation_prompt=True)[0]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(tok.encode("tiger tiger!"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_role_first_then_content_then_finish_reason_and_usage(client):
    stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "say piano"}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "piano piano!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"] and chunks[-1].usage.completion_tokens == len("piano piano!")
    # (how many content chunks depends on timing: deltas that queue up go out as one; tested below)
    middle = [c for c in chunks[1:] if c.choices and not c.choices[0].finish_reason]  # after the role chunk
    assert middle and all(c.choices[0].delta.content for c in middle)  # no empty content chunks


def test_the_stream_sends_each_delta_as_it_comes_and_merges_only_those_that_queued_up():
    """A delta that arrives while the stream waits goes out at once, on its own; deltas of one choice
    already queued behind it leave as one chunk (same text, fewer chunks for the HTTP thread to write),
    never merged across choices or past a finish."""
    import asyncio

    from diyllm.serving.app import _stream
    from diyllm.serving.scheduler import GenerationRequest

    async def run() -> tuple[list[str], list[str]]:
        events: asyncio.Queue = asyncio.Queue()
        gen = GenerationRequest(prompt_ids=[1], max_tokens=9, emit=lambda *e: None, n=2)
        body = _stream("completion", "cmpl-1", "m", 0, gen, events, 1, False)
        live = []
        for piece in ("a", "b"):  # the stream is waiting: each delta is its own chunk
            events.put_nowait(("delta", 0, piece))
            live.append(await body.__anext__())
        for e in [("delta", 0, "c"), ("delta", 0, "d"), ("delta", 1, "x"), ("delta", 1, "y"), ("finish", 1, "stop", 2),
                  ("delta", 0, "e"), ("finish", 0, "length", 3)]:
            events.put_nowait(e)
        return live, [chunk async for chunk in body]

    live, rest = asyncio.run(run())
    payloads = [json.loads(c.removeprefix("data: ")) for c in live + rest if c.startswith("data: {")]
    pieces = [(p["choices"][0]["index"], p["choices"][0]["text"], p["choices"][0]["finish_reason"]) for p in payloads]
    assert pieces == [(0, "a", None), (0, "b", None), (0, "cd", None), (1, "xy", None), (1, "", "stop"),
                      (0, "e", None), (0, "", "length")]
    assert rest[-1] == "data: [DONE]\n\n"


def test_completions_streaming_and_not_and_max_tokens_gives_length(client):
    r = client.completions.create(model="tiny-chat", prompt="<|im_start|>user\nsay cloud<|im_end|>\n", max_tokens=5,
                                  temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    pieces = list(client.completions.create(model="tiny-chat", prompt="<|im_start|>user\nsay cloud<|im_end|>\n",
                                            max_tokens=5, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == r.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    stopped = client.completions.create(model="tiny-chat", prompt="<|im_start|>user\nsay cloud<|im_end|>\n",
                                        max_tokens=40, temperature=0, stop=["!"])
    assert "!" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_seed_n_and_penalties(client):
    kw = dict(model="tiny-chat", prompt="say", max_tokens=16, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    two = client.completions.create(**{**kw, "n": 2})
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == a.choices[0].text
    assert two.usage.completion_tokens == 32
    penalised = client.completions.create(model="tiny-chat", prompt="say", max_tokens=16, temperature=0,
                                          frequency_penalty=2.0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny-chat", prompt="say", max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert penalised.choices[0].text != plain.choices[0].text


# ---- raw HTTP: SSE framing --------------------------------------------------------------------------

def test_raw_sse_framing_content_type_and_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = {"model": "x", "messages": [{"role": "user", "content": "say stone"}], "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read().decode()
    conn.close()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n") and raw.count("data: [DONE]") == 1
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == "stone stone!"
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


# ---- same answers as the command line -----------------------------------------------------------------

def test_greedy_over_the_api_equals_diyllm_sample_and_chat(client, checkpoint):
    prompt = "<|im_start|>user\nsay lemon<|im_end|>\n<|im_start|>assistant\nle"
    sample = _cli("sample", "--ckpt", str(checkpoint), "--prompt", prompt, "--temperature", "0",
                  "--max_new_tokens", "40", "--device", "cpu")
    assert sample.returncode == 0, sample.stderr
    api = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=40, temperature=0)
    assert sample.stdout == prompt + api.choices[0].text + "\n"
    chat = _cli("chat", "--ckpt", str(checkpoint), "--prompt", "say river", "--temperature", "0", "--device", "cpu")
    api_chat = client.chat.completions.create(model="tiny-chat", temperature=0, max_tokens=256,
                                              messages=[{"role": "user", "content": "say river"}])
    assert chat.returncode == 0 and chat.stdout == api_chat.choices[0].message.content + "\n" == "river river!\n"


# ---- concurrency -----------------------------------------------------------------------------------------

def test_eight_concurrent_streaming_clients_get_their_own_answers(client, server):
    jobs = [(f"say {w}", 64 + 8 * i) for i, w in enumerate(WORDS)]
    prompts = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p, _ in jobs]
    expected = [client.completions.create(model="m", prompt=p, max_tokens=n, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
                for p, (_, n) in zip(prompts, jobs)]  # one at a time: the reference answers
    assert expected[0].startswith("apple apple!")
    got: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        stream = client.completions.create(model="m", prompt=prompts[i], max_tokens=jobs[i][1], temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        got[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    assert _get(server, "/health")[1]["peak_batch"] >= 4  # they were decoded together, not one by one


def test_health_answers_during_a_long_generation_and_disconnect_frees_the_slot(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = {"prompt": "say", "max_tokens": 12000, "temperature": 0, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    for _ in range(5):  # a few events arrived: the generation is running
        assert r.readline().startswith(b"data: ")
        assert r.readline() == b"\n"
    worst = 0.0
    for _ in range(5):
        t = time.perf_counter()
        status, health = _get(server, "/health")
        worst = max(worst, time.perf_counter() - t)
        assert status == 200 and health["active_rows"] == 1
    assert worst < 1.0
    steps = health["decode_steps"]
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    health = _wait_idle(server, timeout=10)
    assert health["active_rows"] == 0
    assert health["decode_steps"] - steps < 6000  # dropped long before its 12000 tokens


# ---- bad input ----------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": WIDE_CONTEXT + 1}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * WIDE_CONTEXT}]}, "messages"),
    ("/v1/completions", {"prompt": "y" * WIDE_CONTEXT}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {"prompt": [999999]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, "logprobs"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_input_is_a_400_with_an_openai_error_object(server, path, body, param):
    status, reply = _post(server, path, body)
    assert status == 400, reply
    assert set(reply) == {"error"} and set(reply["error"]) >= {"message", "type", "param"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert "Traceback" not in reply["error"]["message"]


def test_a_second_server_on_a_taken_port_is_one_error_line(server, checkpoint):
    p = _cli("serve", "--ckpt", str(checkpoint), "--port", str(server), timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{server}")
    assert "Traceback" not in p.stderr


def test_server_survives_bad_input_and_unknown_routes(server, client):
    status, reply = _get(server, "/v1/nothing")
    assert status == 404 and reply["error"]["type"] == "not_found_error"
    assert _get(server, "/health")[1]["status"] == "ok"
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "say green"}], temperature=0)
    assert r.choices[0].message.content == "green green!"


# ---- the web page in a real browser -------------------------------------------------------------------------

def test_chat_page_in_a_real_browser(server, tmp_path_factory):
    """Playwright drives Debian's headless Chromium (never a downloaded browser): type, see the reply stream
    in, stop a long generation, start a new chat. The screenshot is kept under the pytest tmp dir."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (serve-test extra) is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    shots = tmp_path_factory.mktemp("browser")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(f"http://127.0.0.1:{server}/")
            sync_api.expect(page.locator("#model-name")).to_contain_text("tiny-chat")
            page.fill("#temperature", "0")
            # a long generation, stopped once it is streaming. The page's request gets ignore_eos added on
            # its way out, so the reply surely runs for all of its 15000 tokens unless stopped.
            def ignore_eos(route):
                route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))

            page.route("**/v1/chat/completions", ignore_eos)
            page.fill("#max-tokens", "15000")
            page.fill("#input", "say lemon")
            page.click("#send")
            long_reply = page.locator(".msg.assistant").last
            page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 30")
            assert not page.locator("#stop").is_disabled()
            page.click("#stop")
            sync_api.expect(page.locator(".msg.note")).to_contain_text("stopped")
            stopped_at = len(long_reply.text_content())
            assert _wait_idle(server, timeout=10)["active_rows"] == 0  # the server stopped generating too
            time.sleep(0.3)
            assert len(long_reply.text_content()) == stopped_at < 15000
            page.unroute("**/v1/chat/completions")
            # a new chat, then a short reply streamed in
            page.click("#new-chat")
            sync_api.expect(page.locator(".msg")).to_have_count(0)
            page.fill("#input", "say apple")
            page.click("#send")
            sync_api.expect(page.locator(".msg.assistant").last).to_have_text("apple apple!", timeout=30_000)
            sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s")
            assert not page.locator("#send").is_disabled()
            page.screenshot(path=str(shots / "chat.png"))
        finally:
            browser.close()
    assert (shots / "chat.png").stat().st_size > 1000


# ---- in-process (no server subprocess): API key and a full queue ------------------------------------------

def test_api_key_is_required_when_set_and_a_full_queue_answers_503():
    from starlette.testclient import TestClient

    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.serving.app import create_app
    from diyllm.serving.scheduler import BatchScheduler
    from diyllm.tokenizers import BPETokenizer

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=32, d_model=32, num_layers=1, num_heads=2))
    body = {"prompt": "hi", "max_tokens": 3}
    with TestClient(create_app(BatchScheduler(model, tok), "m", api_key="s3cret")) as http:
        r = http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").status_code == 200  # health and the page need no key
        assert "<title>diyllm chat</title>" in http.get("/").text
    with TestClient(create_app(BatchScheduler(model, tok, max_batch=2, max_queue=0), "m")) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        r = http.post("/v1/completions", json={**body, "n": 3})  # could never be admitted: refused, not queued
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_char_tokenizer_model_serves_completions_and_refuses_chat_clearly():
    from starlette.testclient import TestClient

    from diyllm.generation.generate import generate
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.serving.app import create_app
    from diyllm.serving.scheduler import BatchScheduler
    from diyllm.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefgh \n")
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, num_layers=1,
                                     num_heads=2))
    with TestClient(create_app(BatchScheduler(model, tok), "char")) as http:
        r = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == tok.decode(generate(model, tok.encode("abc"), 6, temperature=0)[0])
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "abc"}]})
        assert r.status_code == 400 and "BPE tokenizer" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "xyz"})  # characters the tokenizer does not know
        assert r.status_code == 400, r.json()
