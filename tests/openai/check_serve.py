"""The official `openai` client against `xrayglm serve` (run by tests/demo.rs).

Usage: python check_serve.py CASE.json — the case file names the server, its key, the models, the
films and the answers `xrayglm chat` gave for them. Every check raises AssertionError with what
differed; the script prints one line per check that passed and exits 0 when all hold.
"""

import base64
import concurrent.futures
import json
import sys
import urllib.request

from typing import Literal

import openai
from openai import OpenAI
from pydantic import BaseModel
from prometheus_client.parser import text_string_to_metric_families


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(text, image=None):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": parts}


def main():
    case = json.load(open(sys.argv[1], encoding="utf-8"))
    client = OpenAI(base_url=case["base_url"], api_key=case["api_key"], max_retries=0, timeout=120)
    base, early = case["base_model"], case["early_model"]
    q, films = case["question"], case["films"]

    def ask(model, film, **kw):
        kw.setdefault("temperature", 0)
        return client.chat.completions.create(model=model, messages=[user(q, film)], **kw)

    def streamed(model, film, **kw):
        kw.setdefault("temperature", 0)
        chunks = list(client.chat.completions.create(
            model=model, messages=[user(q, film)], stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finish, chunks

    # /v1/models: the base, then each adapter.
    ids = [m.id for m in client.models.list().data]
    assert ids == case["models"], ids
    print("models:", ids)

    # One-shot report from a data-URL image = `chat --greedy`'s.
    r = ask(base, films[0])
    got = r.choices[0].message.content
    assert got == case["chat_greedy"], (got, case["chat_greedy"])
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    assert r.model == base and r.object == "chat.completion", r
    print("one-shot = chat --greedy:", got[:40], "| usage", u.prompt_tokens, u.completion_tokens)

    # The findings extension: off by default; asked for, the reply's labels as `xrayglm findings`
    # reads the same text, in the completion and in the stream's finishing chunk.
    assert "findings" not in (r.model_extra or {}), r.model_extra
    rf = ask(base, films[0], extra_body={"findings": True})
    assert rf.choices[0].message.content == got
    assert rf.model_extra["findings"] == case["chat_greedy_findings"], (
        rf.model_extra["findings"], case["chat_greedy_findings"])
    assert case["chat_greedy_findings"]["labels"], case["chat_greedy_findings"]
    chunks = list(client.chat.completions.create(
        model=base, messages=[user(q, films[0])], temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"findings": True}))
    carrying = [c for c in chunks if "findings" in (c.model_extra or {})]
    assert len(carrying) == 1 and carrying[0].choices[0].finish_reason == "stop", chunks[-3:]
    assert carrying[0].model_extra["findings"] == case["chat_greedy_findings"]
    print("findings extension:", json.dumps(rf.model_extra["findings"]["labels"], ensure_ascii=False))

    # Two films (one study's views) in one message = `chat --image A --image B`.
    two = {"role": "user", "content": [
        {"type": "text", "text": q},
        {"type": "image_url", "image_url": {"url": data_url(films[0])}},
        {"type": "image_url", "image_url": {"url": data_url(films[1])}}]}
    r2 = client.chat.completions.create(model=base, messages=[two], temperature=0)
    assert r2.choices[0].message.content == case["chat_greedy_two_films"], (
        r2.choices[0].message.content, case["chat_greedy_two_films"])
    assert r2.usage.prompt_tokens > u.prompt_tokens + 32, (r2.usage, u)
    print("two films = chat --image A --image B:", r2.choices[0].message.content[:40])

    # Streaming: the chunks concatenate to the same text; usage on request.
    text, finish, chunks = streamed(base, films[0], stream_options={"include_usage": True})
    assert text == got, (text, got)
    assert finish == ["stop"], finish
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == u.completion_tokens
    print("stream: %d chunks concatenate to the same report" % len(chunks))

    # max_tokens: finish_reason length, that many tokens.
    r = ask(base, films[0], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3, r
    assert got.startswith(r.choices[0].message.content), (r.choices[0].message.content, got)
    # stop: the text ends before the stop string.
    cut = got[4:6]
    r = ask(base, films[0], stop=[cut])
    assert r.choices[0].finish_reason == "stop", r
    assert r.choices[0].message.content == got[: got.index(cut)].rstrip(), r.choices[0].message.content
    print("max_tokens and stop: ok")

    # Two turns: the history maps onto 问：…答： as `chat` builds it.
    r = client.chat.completions.create(model=base, temperature=0, messages=[
        user(q, films[0]),
        {"role": "assistant", "content": case["chat_turns"][0]},
        {"role": "user", "content": case["second_question"]},
    ])
    assert r.choices[0].message.content == case["chat_turns"][1], (r.choices[0].message.content, case["chat_turns"])
    print("two turns = chat's second answer:", case["chat_turns"][1][:40])

    # Seeds: the same seed gives the same sampled reply, and the one `chat --seed` gives.
    kw = dict(temperature=2.0, top_p=1.0, extra_body={"top_k": 40, "repetition_penalty": 1.0})
    a = ask(base, films[1], seed=7, **kw).choices[0].message.content
    b = ask(base, films[1], seed=7, **kw).choices[0].message.content
    assert a == b == case["chat_seed7"], (a, b, case["chat_seed7"])
    print("seed 7 twice = chat --no_merge --seed 7:", a[:40])

    # Adapter selection by model name: the adapter answers as `chat` on its checkpoint does
    # (greedy, and sampled with a seed, where the two checkpoints differ).
    r = ask(early, films[0])
    assert r.choices[0].message.content == case["chat_greedy_early"], (r.choices[0].message.content, case["chat_greedy_early"])
    assert r.model == early
    e = ask(early, films[1], seed=7, **kw).choices[0].message.content
    assert e == case["chat_seed7_early"], (e, case["chat_seed7_early"])
    assert e != a, "the adapter answered as the base model"
    print("adapter", early, "= chat on its checkpoint (greedy and seed 7):", e[:40])

    # Errors, as the client's exception types.
    def raises(exc, f, status=None):
        try:
            f()
        except exc as e:
            if status is not None:
                assert e.status_code == status, (e.status_code, status)
            return e
        raise AssertionError("no %s" % exc.__name__)

    bad_key = OpenAI(base_url=case["base_url"], api_key="wrong", max_retries=0)
    raises(openai.AuthenticationError, lambda: bad_key.models.list())
    raises(openai.AuthenticationError, lambda: bad_key.chat.completions.create(
        model=base, messages=[user(q)]))
    e = raises(openai.NotFoundError, lambda: ask("no-such-model", films[0]))
    assert "no-such-model" in str(e), e
    not_png = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}
    for parts, what in [
        ([{"type": "text", "text": q}, not_png], "undecodable image"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "unsupported part"),
        ([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}], "remote URL"),
        ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "local path"),
    ]:
        e = raises(openai.BadRequestError, lambda: client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": parts}]))
        assert e.body and "message" in e.body, (what, e.body)
    raises(openai.BadRequestError, lambda: client.chat.completions.create(
        model=base, messages=[{"role": "assistant", "content": "hi"}]))
    raises(openai.BadRequestError, lambda: ask(base, films[0], temperature=-1))
    raises(openai.BadRequestError, lambda: client.chat.completions.create(
        model=base, messages=[{"role": "user", "content": None}]))
    for size in (case["max_body"] + 1, 30 << 20):
        # Both answered 413 (the larger one is read and dropped first, so the client, still
        # sending, reads the status instead of a reset connection).
        big = "x" * size
        raises(openai.APIStatusError, lambda: client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": big}]), status=413)
    print("errors: 401, 404, 400 (image, part, remote, local, order, temperature, null content), "
          "413 (just over the limit and 30 MiB)")

    # What the server does not implement is refused by name, never silently ignored.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kw, field in [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}),
         "response_format"),
        (dict(response_format={"type": "grammar"}), "response_format"),
        (dict(tools=[tool]), "tools"),
        (dict(tool_choice="required", tools=[tool]), "tools"),
        (dict(logprobs=True, top_logprobs=2), "logprobs"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(n=2), "n"),
    ]:
        e = raises(openai.BadRequestError, lambda: ask(base, films[0], **kw))
        assert e.body and e.body.get("param") == field, (kw, e.body)
    r = ask(base, films[0], response_format={"type": "text"}, frequency_penalty=0, user="u1")
    assert r.choices[0].message.content == case["chat_greedy"], r
    print("unimplemented fields refused by name (a schema that does not compile, an unknown "
          "response_format, tools, logprobs, frequency_penalty, n); neutral values accepted")

    # Structured output: `parse` with a pydantic model (a findings schema) gets a reply held to it,
    # greedy and sampled, on the base and an adapter; `json_object` a reply that opens an object
    # (a model trained on free-text reports need not close it within a few tokens).
    class Findings(BaseModel):
        cardiomegaly: Literal["present", "absent", "uncertain"]
        pleural_effusion: Literal["none", "left", "right", "both"]
        support_devices: bool

    for model, kw in [(base, {}), (early, {}), (base, {"temperature": 1.0, "seed": 5})]:
        kw.setdefault("temperature", 0)
        p = client.chat.completions.parse(
            model=model, messages=[user(q, films[0])], response_format=Findings, max_tokens=64, **kw)
        choice = p.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Findings), choice.message
        assert Findings.model_validate_json(choice.message.content) == choice.message.parsed
    o = ask(base, films[0], response_format={"type": "json_object"}, max_tokens=8)
    assert o.choices[0].message.content.startswith("{"), o
    print("structured output: parse() with a pydantic findings model ->", choice.message.parsed,
          "| json_object opens", repr(o.choices[0].message.content[:20]))

    # Operations: liveness, readiness, and /metrics read by Prometheus' own text parser.
    root = case["base_url"].rsplit("/v1", 1)[0]

    def get(path):
        with urllib.request.urlopen(root + path, timeout=30) as resp:
            return resp.status, resp.read().decode()

    for path, status in [("/health", "ok"), ("/ready", "ready")]:
        code, body = get(path)
        assert code == 200 and json.loads(body)["status"] == status, (path, code, body)

    def scrape():
        fams = {f.name: f for f in text_string_to_metric_families(get("/metrics")[1])}
        for name, kind in [("xrayglm_requests", "counter"), ("xrayglm_prompt_tokens", "counter"),
                           ("xrayglm_generation_tokens", "counter"),
                           ("xrayglm_time_to_first_token_seconds", "histogram"),
                           ("xrayglm_inter_token_latency_seconds", "histogram"),
                           ("xrayglm_e2e_request_latency_seconds", "histogram"),
                           ("xrayglm_batch_rows", "histogram"), ("xrayglm_queue_depth", "gauge"),
                           ("xrayglm_running_rows", "gauge"), ("xrayglm_kv_cache_bytes", "gauge")]:
            assert name in fams and fams[name].type == kind, (name, kind, fams.get(name))
        values = {}
        for f in fams.values():
            for s in f.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return values

    def at(values, name, **labels):
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    before = scrape()
    r = ask(early, films[1], max_tokens=24)
    raises(openai.NotFoundError, lambda: ask("no-such-model", films[0]))
    after = scrape()

    def delta(name, **labels):
        return at(after, name, **labels) - at(before, name, **labels)

    u = r.usage
    assert u.completion_tokens >= 2, u
    expect = [
        (("xrayglm_requests_total",), dict(model=early, status="200"), 1),
        (("xrayglm_requests_total",), dict(model="", status="404"), 1),
        (("xrayglm_requests_total",), dict(model=base, status="200"), 0),
        (("xrayglm_prompt_tokens_total",), dict(model=early), u.prompt_tokens),
        (("xrayglm_generation_tokens_total",), dict(model=early), u.completion_tokens),
        (("xrayglm_generation_tokens_total",), dict(model=base), 0),
        (("xrayglm_time_to_first_token_seconds_count",), dict(model=early), 1),
        (("xrayglm_inter_token_latency_seconds_count",), dict(model=early), u.completion_tokens - 1),
        (("xrayglm_e2e_request_latency_seconds_count",), dict(model=early), 1),
        (("xrayglm_e2e_request_latency_seconds_bucket",), dict(model=early, le="+Inf"), 1),
    ]
    for (name,), labels, want in expect:
        assert delta(name, **labels) == want, (name, labels, delta(name, **labels), want)
    assert delta("xrayglm_batch_rows_count") >= u.completion_tokens - 1, after
    ttft = delta("xrayglm_time_to_first_token_seconds_sum", model=early)
    e2e = delta("xrayglm_e2e_request_latency_seconds_sum", model=early)
    assert 0 < ttft <= e2e, (ttft, e2e)
    assert at(after, "xrayglm_queue_depth") == 0 and at(after, "xrayglm_running_rows") == 0, after
    print("health, ready; /metrics parsed by prometheus_client: one %d-token reply of %r counted "
          "exactly (requests, tokens, TTFT, %d inter-token gaps, end-to-end), a 404 under model \"\""
          % (u.completion_tokens, early, u.completion_tokens - 1))

    # The caches: the same request again is answered from the prompt cache, word for word; the
    # same film under the other adapter is a new prompt (no hit) whose film is not encoded again.
    before = scrape()
    again = ask(early, films[1], max_tokens=24)
    other = client.chat.completions.create(
        model=base, messages=[user("请只描述心脏。", films[1])], temperature=0, max_tokens=8)
    after = scrape()
    assert again.choices[0].message.content == r.choices[0].message.content, (again, r)
    for name, want in [("xrayglm_prompt_cache_hits_total", 1), ("xrayglm_prompt_cache_misses_total", 1),
                       ("xrayglm_image_cache_hits_total", 1), ("xrayglm_image_cache_misses_total", 0)]:
        assert delta(name) == want, (name, delta(name), want)
    assert at(after, "xrayglm_prompt_cache_bytes") > 0 and at(after, "xrayglm_image_cache_bytes") > 0
    assert other.choices[0].message.content, other
    print("caches: the request again came from the prompt cache with the same reply; the other "
          "adapter's prompt missed it and found its film in the image cache")

    # A full queue: a server that decodes one request and queues one answers the rest 503.
    busy = OpenAI(base_url=case["busy_base_url"], api_key="none", max_retries=0, timeout=120)
    hot = dict(temperature=5.0, top_p=1.0, max_tokens=120, extra_body={"top_k": 0})

    def try_busy(_):
        try:
            busy.chat.completions.create(model=base, messages=[user(q, films[0])], **hot)
            return "ok"
        except openai.InternalServerError as e:
            assert e.status_code == 503, e.status_code
            assert e.body and e.body.get("code") == "queue_full", e.body
            return "busy"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(try_busy, range(8)))
    assert "busy" in outcomes and "ok" in outcomes, outcomes
    print("queue full: %d of 8 answered 503 (InternalServerError), the others served" % outcomes.count("busy"))

    # 32 concurrent requests, mixed models and stream on / off: each answer = its answer alone.
    models = case["models"]
    alone = {}
    for m in models:
        for f in films:
            alone[(m, f)] = ask(m, f).choices[0].message.content
    jobs = [(models[i % len(models)], films[i % len(films)], i % 2 == 0) for i in range(32)]

    def run(job):
        m, f, stream = job
        if stream:
            return streamed(m, f)[0]
        return ask(m, f).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(run, jobs))
    for job, a in zip(jobs, answers):
        assert a == alone[job[:2]], (job, a, alone[job[:2]])
    distinct = len(set(alone.values()))
    print("32 concurrent (models %s, %d films, stream on/off): every answer = its answer alone "
          "(%d distinct answers)" % (models, len(films), distinct))


if __name__ == "__main__":
    main()
