"""Constrained decoding: labels and JSON that are valid by construction on a model that writes garbage.

The model here is a tiny GPT with random weights: left alone it writes no label and no JSON, so every
valid output below is the constraint's doing. Outputs are checked with `jsonschema`, a validator
independent of the grammar library that enforces them."""

import json

import jsonschema
import pytest
import torch

from pocketlm.infer.constrain import Choice, ConstraintError, JsonSchema, SchemaError, load_schema, parse_fields
from pocketlm.model.gpt import GPT, ModelConfig
from tiny_lm import tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def random_lm():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size + 16, block_size=512, n_layer=2, n_head=4,
                      n_kv_head=2, n_embd=64)  # a vocabulary padded past the tokenizer's, as real models have
    return GPT(cfg).eval(), tok


def decode(model, ids, proc=None, n=80, use_forced=True, temperature=0.0, seed=0):
    """A greedy (or sampled) loop straight over GPT.forward; forced tokens are taken without a step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            if proc is not None and use_forced:
                for t in proc.forced():
                    proc.accept(t)
                    out.append(t)
                if proc.is_done():
                    break
            logits = model(torch.tensor([ids + out]))[0, -1]
            if proc is not None:
                logits = proc.process(logits)
            if temperature:
                t = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=g))
            else:
                t = int(logits.argmax())
            if proc is not None:
                proc.accept(t)
            out.append(t)
            if proc is not None and proc.is_done():
                break
    return out


def prompts(tok, n):
    texts = ["my parcel never came", "I want my money back!!", "where is order 12345?", "cancel it", "héllo wörld",
             "", "1 2 3", "ROMEO: what light"]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts[:n]]


LABELS = ["refund", "cancel order", "cancel", "track_order", "other", "Ünïcode label"]


@pytest.mark.parametrize("use_forced", [True, False])
def test_choice_always_gives_a_label_in_canonical_tokens(random_lm, use_forced):
    model, tok = random_lm
    for i, ids in enumerate(prompts(tok, 8)):
        c = Choice(tok, LABELS)
        out = decode(model, ids, c, use_forced=use_forced, temperature=1.0 if i % 2 else 0.0, seed=i)
        assert c.label in LABELS
        assert out == tok.encode(c.label) + [tok.eos_id]  # the canonical encoding, then end of turn
        assert 0.0 < c.confidence <= 1.0
    # the same model unconstrained writes no label at all (so the test above can fail)
    free = [tok.decode(decode(model, ids, n=12)) for ids in prompts(tok, 4)]
    assert not any(f.strip() in LABELS for f in free)


def test_choice_confidence_is_the_probability_of_the_path(random_lm):
    model, tok = random_lm
    labels = ["cancel", "cancel order", "refund"]
    ids = prompts(tok, 2)[1]
    c = Choice(tok, labels)
    decode(model, ids, c)
    # recompute by teacher forcing: at each step, the chosen token's share among the tokens some label allows
    seqs = [tok.encode(lab) + [tok.eos_id] for lab in labels]
    path = tok.encode(c.label) + [tok.eos_id]
    expected = 1.0
    with torch.no_grad():
        for j in range(len(path)):
            allowed = sorted({s[j] for s in seqs if s[:j] == path[:j]})
            logits = model(torch.tensor([ids + path[:j]]))[0, -1]
            expected *= float(logits[allowed].softmax(-1)[allowed.index(path[j])])
    assert c.confidence == pytest.approx(expected, rel=1e-4)
    assert c.confidence < 1.0


def test_choice_rejects_a_token_outside_the_trie(random_lm):
    _, tok = random_lm
    c = Choice(tok, ["yes", "no"])
    with pytest.raises(ConstraintError):
        c.accept(tok.encode("maybe")[0] if tok.encode("maybe")[0] not in c.root else tok.eos_id)


@pytest.mark.parametrize("bad", [[], "a,b", ["a", ""], ["a", "a"], ["a", 3]])
def test_bad_label_lists_are_errors(random_lm, bad):
    with pytest.raises(SchemaError, match="labels"):
        Choice(random_lm[1], bad)


SCHEMAS = [
    parse_fields("intent refund|cancel|other, order_id str?, urgency int"),
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "ok": {"type": "boolean"},
        "when": {"type": "string", "format": "date"},
        "nested": {"type": "object", "properties": {"x": {"anyOf": [{"type": "integer", "maximum": 99, "minimum": 0},
                                                                     {"type": "null"}]}},
                   "required": ["x"], "additionalProperties": False}},
     "required": ["name", "age", "score", "tags", "code", "ok", "when", "nested"], "additionalProperties": False},
    {"$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 6}},
                        "required": ["sku"], "additionalProperties": False}},
     "type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2},
]


def bounded(schema):
    """Random weights can write a string or an integer forever; bound those the test schemas leave open
    (the engine's max_tokens does that in real use, and the row is then reported as cut off)."""
    schema = json.loads(json.dumps(schema))
    for prop in schema.get("properties", {}).values():
        for sub in prop.get("anyOf", [prop]):
            if sub.get("type") == "string" and "format" not in sub and "pattern" not in sub:
                sub.setdefault("maxLength", 10)
            if sub.get("type") == "integer":
                sub.setdefault("minimum", 0)
                sub.setdefault("maximum", 9999)
    return schema


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_json_schema_outputs_always_validate(random_lm, k):
    model, tok = random_lm
    schema = bounded(SCHEMAS[k])
    for i, ids in enumerate(prompts(tok, 4)):
        proc = JsonSchema(tok, schema, vocab_size=model.cfg.vocab_size)
        out = decode(model, ids, proc, n=150, temperature=1.0 if i % 2 else 0.0, seed=i)
        assert proc.is_done(), tok.decode(out)
        text = tok.decode(out, skip_special_tokens=True)
        value = json.loads(text)
        jsonschema.validate(value, SCHEMAS[k] if k else schema)
        assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact: no whitespace runs
    free = tok.decode(decode(model, prompts(tok, 1)[0], n=20))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


def test_forced_tokens_are_what_the_schema_dictates(random_lm):
    model, tok = random_lm
    proc = JsonSchema(tok, parse_fields("intent, n int"), vocab_size=model.cfg.vocab_size)
    forced = proc.forced()
    assert tok.decode(forced) == '{"intent":"'
    for t in forced:
        proc.accept(t)
    with pytest.raises(ConstraintError):
        proc.accept(tok.eos_id)  # the string is still open: it cannot end here


@pytest.mark.parametrize("schema, names", [
    ({"type": "array", "uniqueItems": True}, ["uniqueItems"]),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, ["'not'", "/properties/a"]),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLenght": 3}}}, ["maxLenght", "/properties/a"]),
    ({"anyOf": [{"type": "string"}, {"if": {}, "then": {}}]}, ["/anyOf/1", "'if'"]),
    ({"type": "string", "format": "hostnam"}, ["hostnam"]),
    ({"type": "strin"}, ["strin"]),
    ({"type": "object", "properties": []}, ["/properties"]),
])
def test_unsupported_schemas_are_errors_naming_the_keyword(random_lm, schema, names):
    _, tok = random_lm
    with pytest.raises(SchemaError) as e:
        JsonSchema(tok, schema)
    for name in names:
        assert name in str(e.value)


def test_field_dsl():
    schema = parse_fields("intent, order_id str?, urgency int, tone calm|angry, ok bool?, when date, x float")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert list(schema["properties"]) == ["intent", "order_id", "urgency", "tone", "ok", "when", "x"]
    assert schema["required"] == list(schema["properties"])
    v = jsonschema.Draft202012Validator(schema)
    good = {"intent": "refund", "order_id": None, "urgency": 3, "tone": "calm", "ok": None, "when": "2024-01-02", "x": 1.5}
    assert v.is_valid(good)
    assert not v.is_valid({**good, "urgency": "3"}) and not v.is_valid({**good, "tone": "sad"})
    assert not v.is_valid({**good, "intent": None})
    for spec, word in [("a, b colour", "'b' has unknown type 'colour'"), ("a, a", "'a' is given twice"),
                       ("a,,b", "item 2"), ("", "fields"), ("9lives", "item 1")]:
        with pytest.raises(SchemaError, match=word):
            parse_fields(spec)


def test_load_schema_forms(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"type": "object",\n "properties": {"a": {"type": "string"}},\n oops}')
    with pytest.raises(SchemaError, match=r"s\.json: invalid JSON at line 3"):
        load_schema(str(f))
    with pytest.raises(SchemaError, match="not found"):
        load_schema(str(tmp_path / "missing.json"))
    f.write_text('{"type": "integer"}')
    assert load_schema(f) == {"type": "integer"} == load_schema('{"type": "integer"}')
    assert load_schema("a int")["properties"] == {"a": {"type": "integer"}}


def test_allows_is_one_bit_of_the_mask_process_applies(random_lm):
    """The engine's greedy fast path takes the batch's argmax when the grammar allows it: allows()
    must agree with the mask on every token of the (padded) vocabulary, state after state."""
    model, tok = random_lm
    V = model.cfg.vocab_size
    proc = JsonSchema(tok, SCHEMAS[0], vocab_size=V)
    reply = tok.encode('{"intent":"cancel","order_id":null,"urgency":42}') + [tok.eos_id]
    for t in reply:
        logits = proc.process(torch.zeros(V))
        assert [proc.allows(i) for i in range(V)] == torch.isfinite(logits).tolist()
        proc.accept(t)
    assert proc.is_done()


def test_the_greedy_fast_path_changes_no_reply(random_lm, monkeypatch):
    """Constrained greedy replies through the engine, with the fast path and with every row masked
    in full (the path it skips), are the same tokens, and the reference loop's."""
    from pocketlm.infer import engine as engine_module
    from pocketlm.infer.engine import Engine
    from pocketlm.infer.sampling import SamplingParams

    model, tok = random_lm
    schema = bounded(SCHEMAS[1])
    params = SamplingParams(max_tokens=150, temperature=0)

    def replies():
        engine = Engine(model, tok, max_batch=4)
        reqs = [engine.submit(ids, params, processors=[JsonSchema(tok, schema, model.cfg.vocab_size)])
                for ids in prompts(tok, 4)]
        while engine.step():
            pass
        return [r.output_ids for r in reqs]

    taken, real = [], engine_module.let_through
    monkeypatch.setattr(engine_module, "let_through", lambda ps, token: taken.append(real(ps, token)) or taken[-1])
    fast = replies()
    assert any(taken) and not all(taken)  # both ways ran: the argmax let through, and masked in full
    monkeypatch.setattr(engine_module, "let_through", lambda processors, token: False)
    assert replies() == fast
    assert fast == [decode(model, ids, JsonSchema(tok, schema, model.cfg.vocab_size), n=150)
                    for ids in prompts(tok, 4)]
