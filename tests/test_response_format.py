"""`response_format` over HTTP with the official `openai` client, on a tiny model with random weights:
left alone it writes newlines, so every parsed reply below is the constraint's doing. Replies are
checked with `jsonschema`, a validator independent of the grammar library that enforces them."""

import json
import random
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel, Field
from tiny_lm import running_server, wide_checkpoint

ASK = [{"role": "user", "content": "File this ticket: my parcel never came, order 12345."}]


class Item(BaseModel):
    name: str = Field(max_length=10)
    qty: int = Field(ge=0, le=99)


class Ticket(BaseModel):
    intent: Literal["refund", "cancel", "track"]
    urgent: bool
    items: list[Item] = Field(max_length=3)
    note: str | None = Field(max_length=12)


TICKET_SCHEMA = type_to_response_format_param(Ticket)["json_schema"]["schema"]  # what parse() sends


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = wide_checkpoint(tmp_path_factory.mktemp("rf") / "random", block_size=1024)
    with running_server(ckpt, "--max-batch", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_free_reply_is_not_json(client):
    """Without response_format this model writes no JSON, so the tests below can fail."""
    text = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=0).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (1.5, 3)])
def test_parse_gives_the_pydantic_object(client, temperature, seed):
    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Ticket, max_tokens=300,
                                      temperature=temperature, seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Ticket)
    jsonschema.validate(json.loads(choice.message.content), TICKET_SCHEMA)
    assert " " not in choice.message.content.split('"')[0]  # compact: no whitespace before the first string


def test_streamed_reply_is_valid_too(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA, "strict": True}}
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=300,
                                                 temperature=1.0, seed=7, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), TICKET_SCHEMA)


def test_json_object_and_schemaless_json_schema(client, server):
    stopped = 0
    for fmt, kind in [({"type": "json_object"}, dict), ({"type": "json_schema", "json_schema": {"name": "x"}}, object)]:
        for seed in (1, 2, 3):
            r = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=200,
                                               temperature=1.0, seed=seed)
            text = r.choices[0].message.content
            if r.choices[0].finish_reason == "stop":  # free-form JSON may legitimately run on to max_tokens
                assert isinstance(json.loads(text), kind)
                stopped += 1
            else:
                assert text[:1] in ("{" if kind is dict else '{["-0123456789tfn')
    assert stopped >= 2
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, response_format={"type": "text"},
                                       temperature=0)  # greedy: a sampled reply of this random model stops early ~3% of the time
    assert r.choices[0].finish_reason == "length"
    # /v1/completions takes it too (vLLM's extension)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=50, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "n", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


@pytest.mark.parametrize("schema,named", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not'"),
    ({"type": "string", "maxLenght": 3}, "'maxLenght'"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "frob"}, "frob"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
])
def test_unsupported_schema_is_a_400_naming_the_keyword(client, schema, named):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, response_format=fmt)
    err = e.value.body
    assert named in err["message"] and err["message"].startswith("response_format.json_schema.schema")
    assert err["param"] == "response_format" and err["code"] == "invalid_schema"


@pytest.mark.parametrize("fmt", ["json", {"type": "xml"}, {"type": "json_schema"},
                                 {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
                                 {"type": "json_schema", "json_schema": {"schema": {}}}])
def test_malformed_response_format_is_a_422(client, fmt):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, response_format=fmt)
    assert e.value.body["param"].startswith("response_format")


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},                                                                   # refused up front
    {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]},  # stops short
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},      # the library gives up
])
@pytest.mark.parametrize("stream", [False, True])
def test_schemas_with_no_finite_value_are_a_400_not_broken_json(client, schema, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

    def plain():  # greedy, so the reply before and after can be compared (a sampled one may stop early)
        c = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, temperature=0).choices[0]
        return c.message.content, c.finish_reason

    before = plain()
    with pytest.raises(openai.APIError) as e:
        r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=30, response_format=fmt, stream=stream)
        list(r) if stream else None
    assert "response_format" in str(e.value.message) or "response_format" in str(e.value.body)
    assert plain() == before  # the engine is fine: the next request gets the reply it got before


def test_oversized_and_overdeep_schemas_are_refused(server):
    deep = {"type": "integer"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    for schema, why in [(deep, "nested"), ({"enum": ["x" * 100] * 2000}, "bytes")]:
        r = httpx.post(server + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": ASK, "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert r.status_code == 400 and why in r.json()["error"]["message"]


# ---- fuzzing: random schemas (valid, bad keywords, wrong types, deep nesting, big enums) never give a 5xx
def random_schema(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([{"type": "string", "maxLength": rng.randint(0, 8)}, {"type": "integer", "minimum": -5,
                           "maximum": rng.randint(-5, 500)}, {"type": "boolean"}, {"type": "null"},
                           {"enum": [rng.choice(["a", 1, None, True, "é", [1]]) for _ in range(rng.randint(1, 4))]},
                           {"const": rng.choice(["x", 2, {"k": [1]}])}, {"type": "number", "maximum": 1e3, "minimum": 0},
                           {"type": "string", "pattern": rng.choice(["^[a-z]{1,4}$", "[0-9]+", "((", "a{2,3}"])},
                           {"type": "string", "format": rng.choice(["date", "email", "uuid", "nope"])}])
    if r < 0.55:
        props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(0, 3))}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    if r < 0.7:
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    if r < 0.8:
        return {rng.choice(["anyOf", "oneOf", "allOf"]): [random_schema(rng, depth + 1) for _ in range(rng.randint(0, 2))]}
    return rng.choice([{"not": {}}, {"if": {}}, {"type": ["string", 3]}, {"type": 7}, {"properties": [1]},
                       {"required": "a"}, {"$ref": "#/nope"}, {"items": "x"}, {"minimum": "0"}, {"enum": []},
                       {"enum": [f"v{i}" for i in range(rng.randint(100, 2000))]}, {"maxItems": -1},
                       {"minLength": 10**12, "type": "string"}, {"type": "object", "$defs": {"a": {"$ref": "#/$defs/a"}}},
                       {"$ref": "#"}, {"x-custom": 1}, {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
                       {"type": "array", "items": {"$ref": "#/items"}, "minItems": 1}, {"type": "string", "pattern": 5}, {"anyOf": {}}])


def test_fuzzed_schemas_never_give_a_5xx(server):
    rng = random.Random(20)
    seen = set()
    with httpx.Client(base_url=server, timeout=60) as http:
        for i in range(80):
            schema = random_schema(rng)
            if rng.random() < 0.1:  # wrong types where the schema or the format goes
                fmt = rng.choice([{"type": "json_schema", "json_schema": {"name": "f", "schema": rng.choice([1, "s", None, []])}},
                                  {"type": "json_object", "json_schema": 3}, {"type": None}, ["json_object"]])
            else:
                fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": schema, "strict": rng.random() < 0.5}}
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 40,
                                                        "temperature": 1.0, "seed": i, "response_format": fmt})
            assert r.status_code < 500, (fmt, r.text)
            seen.add(r.status_code)
            if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop" and isinstance(schema, dict) \
                    and fmt.get("json_schema", {}).get("schema") is schema:
                content = r.json()["choices"][0]["message"]["content"]
                assert content, (fmt, r.json())
                reply = json.loads(content)
                validator = jsonschema.validators.validator_for(schema)
                try:  # the grammar library takes a few schemas the meta-schema calls invalid (anyOf: [] in items)
                    validator.check_schema(schema)
                except jsonschema.SchemaError:
                    continue
                validator(schema).validate(reply)
                seen.add("validated")
    assert {200, 400, 422, "validated"} <= seen  # the fuzzer reached every outcome
