"""OpenAI's logit_bias, presence_penalty and frequency_penalty: through `pocketlm serve` with the official
client (they were accepted and silently ignored before), and the penalties' arithmetic on known logits."""

import openai
import pytest
import torch
from tiny_lm import running_server, tiny_lm

from pocketlm.infer.processors import LogitBias, ReplyPenalties
from pocketlm.model import save_checkpoint

ASK = [{"role": "user", "content": "Speak, good sir."}]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def client(lm, tmp_path_factory):
    model, tok = lm
    ckpt = save_checkpoint(tmp_path_factory.mktemp("bias") / "tiny", model, tok)
    with running_server(ckpt, "--max-batch", "2") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reply(client, n=8, **kw):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=n, temperature=0, **kw)
    return r.choices[0].message.content


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_one(client, lm):
    _, tok = lm
    forced = tok.encode("the")[-1]
    assert reply(client, 5, logit_bias={str(forced): 100}) == tok.decode([forced]) * 5
    plain = reply(client)
    first = tok.encode(plain)[0]
    banned = reply(client, logit_bias={str(first): -100})
    assert banned != plain and not banned.startswith(tok.decode([first]))


def test_penalties_change_a_greedy_reply_and_streaming_agrees(client):
    plain = reply(client, 40)
    penalised = reply(client, 40, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised != plain
    chunks = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0, stream=True,
                                            presence_penalty=2.0, frequency_penalty=2.0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == penalised


@pytest.mark.parametrize("field,value,says", [
    ("logit_bias", {"abc": 1}, "logit_bias: keys are token ids"),
    ("logit_bias", {"5": 101}, "logit_bias[5]"),
    ("logit_bias", {"999999": 1}, "outside this model's vocabulary"),
    ("frequency_penalty", 2.5, "frequency_penalty"),
])
def test_bad_values_are_4xx_naming_the_field(client, field, value, says):
    with pytest.raises(openai.APIStatusError) as e:
        reply(client, **{field: value})
    assert e.value.status_code in (400, 422) and says in str(e.value)


def test_penalties_follow_openais_formula():
    p = ReplyPenalties(frequency=0.5, presence=1.0, vocab_size=4)
    for t in (2, 2, 3):
        p.accept(t)
    out = p.process(torch.zeros(4))
    assert out.tolist() == [0.0, 0.0, -2.0, -1.5]  # token 2: 0.5 x 2 + 1; token 3: 0.5 x 1 + 1
    assert LogitBias({1: 3.0, 3: -2.0}).process(torch.ones(4)).tolist() == [1.0, 4.0, 1.0, -1.0]
