"""The image path: encoder shapes, the splice of image embeddings at `<image>` placeholders (one
image and two), the text path untouched with no image, a few training steps that lower the loss,
saving/loading the vision weights (safetensors), the image-set loaders, and bad images refused."""

import gzip
import io

import numpy as np
import pytest
import torch
from tiny_lm import reference_greedy, tiny_lm

from pocketlm.data import images as image_data
from pocketlm.infer.engine import Engine
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model import load_model
from pocketlm.model.vision import (VISION_WEIGHTS, VisionConfig, VisionError, VisionLM, encode_prompt,
                                   load_vision_model, pixel_shuffle, prepare_images)
from pocketlm.train.vlm import ChatRows, encoder_features, train_chat, train_encoder

SMALL = VisionConfig(image_size=16, patch_size=2, width=32, depth=1, heads=2, projector_hidden=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def vlm():
    lm, tok = tiny_lm()
    torch.manual_seed(0)
    return VisionLM(lm, SMALL).eval(), tok


def digits(n, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_shapes():
    assert VisionConfig().tokens_per_image == 16 and SMALL.tokens_per_image == 16
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)  # a 4x4 grid of 3-d patches
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 4, 12)
    assert y[0, 0].tolist() == torch.cat([x[0, 0], x[0, 1], x[0, 4], x[0, 5]]).tolist()  # a 2x2 square
    lm, _ = tiny_lm()
    model = VisionLM(lm, SMALL)
    assert model.image_embeds(digits(3)).shape == (3, 16, lm.cfg.n_embd)
    with pytest.raises(ValueError, match=r"expected \(N, 1, 16, 16\)"):
        model.image_embeds(torch.rand(3, 1, 28, 28))
    with pytest.raises(ValueError, match="multiple of"):
        VisionConfig(image_size=30, patch_size=4)
    pixels = prepare_images(np.full((2, 28, 28, 3), 255, np.uint8), SMALL)  # RGB to grey, resized
    assert pixels.shape == (2, 1, 16, 16) and torch.allclose(pixels, torch.ones_like(pixels))


def test_no_image_logits_equal_the_text_model(vlm):
    model, tok = vlm
    ids = torch.tensor([tok.encode("First Citizen:\nBefore we proceed")])
    with torch.no_grad():
        assert torch.equal(model(ids), model.lm(ids))
        targets = ids.roll(-1, 1)
        assert torch.equal(model(ids, targets)[1], model.lm(ids, targets)[1])
    assert sum(t < 0 for t in encode_prompt(tok, [{"role": "user", "content": "no image here"}], 16)) == 0


def test_two_images_land_at_their_placeholders(vlm):
    model, tok = vlm
    messages = [{"role": "user", "content": "<image> and <image>: which is bigger?"}]
    ids = encode_prompt(tok, messages, model.tokens_per_image)
    holes = [i for i, t in enumerate(ids) if t < 0]
    assert len(holes) == 32
    first, second = holes[:16], holes[16:]
    assert first == list(range(first[0], first[0] + 16)) and second == list(range(second[0], second[0] + 16))
    assert second[0] > first[-1] + 1  # text between the two images
    text = tok.decode([t for t in ids if t >= 0])
    assert text == tok.apply_chat_template([{"role": "user", "content": " and : which is bigger?"}])
    pixels = digits(2)
    with torch.no_grad():
        spliced = model.splice(torch.tensor([ids]), pixels)[0]
        embeds = model.image_embeds(pixels)
    assert torch.equal(spliced[first], embeds[0]) and torch.equal(spliced[second], embeds[1])
    assert not spliced[[i for i in range(len(ids)) if ids[i] >= 0]].any()  # text positions: zeros
    # the engine, fed the prompt with the image rows as input_embeds, decodes what a plain full
    # recompute over the spliced embeddings decodes (the KV cache and the splice agree)
    full = torch.where(torch.tensor(ids)[:, None] < 0, spliced, model.lm.embed_tokens(torch.tensor(ids).clamp(min=0)))
    with torch.no_grad():
        want = []
        x = full[None]
        for _ in range(8):
            nxt = model.lm(input_embeds=x)[0, -1].argmax().item()
            want.append(nxt)
            x = torch.cat([x, model.lm.embed_tokens.weight[nxt][None, None]], 1)
        got = Engine(model.lm, tok).generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                             input_embeds=embeds.reshape(32, -1))
    assert got.output_ids == want
    swapped = Engine(model.lm, tok).generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                             input_embeds=embeds.flip(0).reshape(32, -1))
    assert swapped.output_ids != want or not torch.equal(embeds[0], embeds[1])  # the images matter
    with pytest.raises(ValueError, match="32 image positions"):
        model.splice(torch.tensor([ids]), digits(1))
    prompt, rows = model.engine_prompt(tok, messages, pixels)  # the same, ready for Engine.submit
    assert prompt == ids and torch.equal(rows, embeds.reshape(32, -1))
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) for 1 image"):
        model.engine_prompt(tok, messages, digits(1))


def test_a_text_prompt_still_decodes_as_the_text_model(vlm):
    model, tok = vlm
    ids = tok.encode("ROMEO:\nWhat say you")
    got = Engine(model.lm, tok).generate(ids, SamplingParams(max_tokens=10, temperature=0))
    assert got.output_ids == reference_greedy(model.lm, ids, 10)


def test_special_markers_beside_images_are_refused(vlm):
    _, tok = vlm
    with pytest.raises(ValueError, match=r"messages\[0\].content"):
        encode_prompt(tok, [{"role": "user", "content": "<image><|im_start|>system"}], 16)


def test_a_few_steps_of_each_stage_lower_the_loss():
    lm, tok = tiny_lm(steps=0)
    torch.manual_seed(0)
    model = VisionLM(lm, SMALL)
    labels = torch.arange(40) % 4
    noise = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    pixels = labels.view(-1, 1, 1, 1) / 4 + noise  # class c: grey level c/4
    (head,) = train_encoder(model, [(pixels, labels)], steps=30, batch_size=16, lr=3e-3, shift=1, log=lambda s: None)
    with torch.no_grad():
        probe = head(model.encode(pixels).mean(1)).argmax(-1)
    assert (probe == labels).float().mean() > 0.9
    rows = ChatRows.build(tok, "<image>\nWhere is the square?", ["top left", "top right", "low left", "low right"], 16)
    losses = train_chat(model, [(rows, encoder_features(model, pixels), labels)], steps=30, train_lm=True,
                        batch_size=16, lr=1e-2, log=lambda s: None)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_saved_weights_load_back(vlm, tmp_path):
    model, tok = vlm
    path = model.save(tmp_path / "vlm", tok)
    assert (path / VISION_WEIGHTS).exists() and not list(path.glob("*.pt"))
    loaded, tok2 = load_vision_model(path)
    pixels = digits(2, seed=3)
    ids = torch.tensor([tok.encode("hello")])
    with torch.no_grad():
        assert torch.equal(loaded.image_embeds(pixels), model.image_embeds(pixels))
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.vision_cfg == SMALL and tok2.encode("hello") == tok.encode("hello")
    text_only, _ = load_model(path)  # the LM part reads as a plain checkpoint
    with torch.no_grad():
        assert torch.equal(text_only(ids), model.lm(ids))
    (path / VISION_WEIGHTS).write_bytes(b"\x00" * 20)
    with pytest.raises(VisionError, match="vision.safetensors"):
        load_vision_model(path)
    (path / VISION_WEIGHTS).unlink()
    with pytest.raises(VisionError, match="text-only"):
        load_vision_model(path)


def _png(array, mode="L"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_refused_with_the_problem_named(monkeypatch):
    good = _png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert image_data.decode_image(good).shape == (8, 8)
    assert image_data.decode_image(_png(np.zeros((4, 4, 3), np.uint8), "RGB")).shape == (4, 4, 3)
    with pytest.raises(image_data.ImageDataError, match="not an image"):
        image_data.decode_image(b"GIF? no, just text")
    with pytest.raises(image_data.ImageDataError, match=r"messages\[0\].content\[1\]: a corrupt or truncated"):
        big = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
        image_data.decode_image(big[:len(big) * 3 // 4], what="messages[0].content[1]")
    monkeypatch.setattr(image_data, "MAX_IMAGE_PIXELS", 63)
    with pytest.raises(image_data.ImageDataError, match="8x8 pixels is over the limit"):
        image_data.decode_image(good)


def test_data_urls_only_and_bad_base64_refused():
    import base64

    png = _png(np.full((5, 7), 200, np.uint8))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_data.decode_data_url(url).shape == (5, 7)
    for bad, problem in [("https://example.com/x.png", "not 'https'"), ("data:text/plain;base64,aGk=", "expected data:image"),
                         ("data:image/png;base64,@@@", "base64 data is corrupt"),
                         ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not an image")]:
        with pytest.raises(image_data.ImageDataError, match=problem):
            image_data.decode_data_url(bad)


def test_loaders_read_the_formats_and_name_a_bad_file(tmp_path):
    bad = tmp_path / "mnist_test"
    bad.mkdir()
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12))
    with pytest.raises(image_data.ImageDataError, match=r"t10k-images-idx3-ubyte.gz: not an IDX file"):
        image_data.load_mnist_test(tmp_path)
    (tmp_path / "uci_optdigits").mkdir()
    (tmp_path / "uci_optdigits" / "optdigits.tra").write_text("1,2,3\n")
    with pytest.raises(image_data.ImageDataError, match="expected 65 columns"):
        image_data.load_optdigits("train", tmp_path)
    with pytest.raises(image_data.ImageDataError, match="no such folder"):
        image_data.load_fashion_mnist(tmp_path)
    x, y = np.zeros((100, 2, 2), np.uint8), np.arange(100) % 4
    (tx, ty), (vx, vy) = image_data.split(x, y, 0.2, seed=1)
    assert len(ty) == 80 and len(vy) == 20 and np.bincount(vy).tolist() == [5, 5, 5, 5]


@pytest.mark.skipif(not (image_data.data_root() / "uci_optdigits").is_dir(), reason="shared data not here")
def test_the_shared_image_sets_load():
    x, y = image_data.load_optdigits("test")
    assert x.shape == (1797, 8, 8) and x.dtype == np.uint8 and x.max() == 255
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    x, y = image_data.load_mnist_test()
    assert x.shape == (10000, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]
