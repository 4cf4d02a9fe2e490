"""The engine's shared-prefix cache (Engine.cache_prefix) is keyed by the adapter's content hash: keys and values
computed under one adapter are reused by requests on that adapter (or another name with the same
contents) and never by the base model, another adapter, or different contents loaded under the same
name. Each reply is the greedy reply of the base with that adapter merged, so a wrong reuse fails."""

from tiny_lm import reference_greedy, tiny_adapter, tiny_lm

from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_completion
from pocketlm.infer.sampling import SamplingParams

N = 10


def test_a_prefix_is_reused_only_under_the_same_adapter_contents(tmp_path):
    model, tok = tiny_lm()
    a_path, merged_a = tiny_adapter(model, tmp_path / "a", scale=0.3)
    b_path, merged_b = tiny_adapter(model, tmp_path / "b", scale=-0.3)
    ids = encode_completion(tok, "ROMEO: But soft, what light through yonder window breaks?")
    want = {name: reference_greedy(m, ids, N) for name, m in (("a", merged_a), ("b", merged_b), (None, model))}
    assert len({tuple(w) for w in want.values()}) == 3  # the adapters change the reply: a wrong reuse shows

    engine = Engine(model, tok, max_batch=2, precision="fp32")
    engine.add_adapter("a", a_path)
    engine.add_adapter("b", b_path)
    prefix = ids[:-3]
    engine.cache_prefix(prefix, adapter="a")
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)

    def reply(adapter):
        before = engine.reused_tokens
        out = engine.generate(ids, params, adapter_id=adapter).output_ids
        return out, engine.reused_tokens - before

    assert reply("a") == (want["a"], len(prefix))
    assert reply("b") == (want["b"], 0)
    assert reply(None) == (want[None], 0)
    engine.add_adapter("a-again", a_path)  # same contents, another name: same identity
    assert reply("a-again") == (want["a"], len(prefix))
    engine.remove_adapter("a")
    engine.add_adapter("a", b_path)  # the name again, other contents: nothing reused
    assert engine.adapter_identity("a") == engine.adapter_identity("b") != engine.adapter_identity("a-again")
    assert reply("a") == (want["b"], 0)
    engine.cache_prefix(prefix)  # the base model's own prefix
    assert reply(None) == (want[None], len(prefix))
    assert reply("b") == (want["b"], 0)
