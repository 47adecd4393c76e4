# Fresh machine: `make test` creates .venv, installs the CPU build of PyTorch and litevar, runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install test test-fast bench bench-default eval-default attention-default quant-default kv-default kv-shapes clean data default-model default-mvar default-d2 demo quality

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

# Tests that need Fashion-MNIST skip (saying why) when the data cannot be fetched.
test: $(BIN)/.installed
	-@$(MAKE) --no-print-directory data
	$(BIN)/python -m pytest -q tests

# The fast tier (about 4 min on the 2-core AVX2 EPYC; the whole suite about 11): everything but the tests marked
# slow (C++ extension build, torch.compile, spawned processes, the longest runs); `make test` runs those too.
# LITEVAR_NATIVE=0: sparse attention takes the pure-PyTorch kernel, so no test builds the C++ one (~20 s on a
# fresh machine).
test-fast: $(BIN)/.installed
	-@$(MAKE) --no-print-directory data
	LITEVAR_NATIVE=0 $(BIN)/python -m pytest -q -m "not slow" tests

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_sampling.py --model var-d16 --dtypes bf16 fp32 --batches 8 1 \
		--out benchmarks/results/sampling_cpu_d16.json

# The default model: dense fp32 vs bf16, each in its own process (JSON + PNG under benchmarks/results/).
bench-default: $(BIN)/.installed
	$(BIN)/litevar bench --recipe bf16 --threads 2 --out benchmarks/results/bench_default_bf16.json

# Fidelity to the dense fp32 model and quality vs Fashion-MNIST of the default model at fp32 (the identity) and bf16.
eval-default: $(BIN)/.installed data
	$(BIN)/litevar eval --recipe fp32 --per-class 100 --overwrite --out runs/eval
	$(BIN)/litevar eval --recipe bf16 --per-class 100 --overwrite --out runs/eval
	$(BIN)/litevar eval --compare runs/eval/eval_fp32.json runs/eval/eval_bf16.json

# LiteVAR attention on the default model: calibrate plans, bench and eval every recipe of benchmarks/recipes/default.
# About 10 min of benches and 80 min of evals (1 thread) on the 2-core CPU; the table is printed at the end.
attention-default: $(BIN)/.installed data
	$(BIN)/litevar calibrate-attention --dtype fp32 --samples 64 --seed 100000 --threshold 0.8 0.9 0.95 0.99 \
		--out benchmarks/results/attention/plans --overwrite
	for r in benchmarks/recipes/default/*.json; do n=$$(basename $$r .json); \
		$(BIN)/litevar bench --recipe $$r --threads 2 --out benchmarks/results/attention/bench_$$n.json || exit 1; \
		$(BIN)/litevar eval --recipe $$r --per-class 50 --threads 1 --out runs/eval50 --name $$n --overwrite || exit 1; \
		cp runs/eval50/eval_$$n.json runs/eval50/eval_$$n.md benchmarks/results/attention/; done
	$(BIN)/python benchmarks/attention_table.py

# Quantization on the default model: eval every recipe of benchmarks/recipes/quant/default (500 images each, fake
# quant in fp32 against the dense fp32 reference; ~7 min per recipe at 1 thread). Finished reports are kept: rerun to resume.
quant-default: $(BIN)/.installed data
	mkdir -p benchmarks/results/quant
	for r in benchmarks/recipes/quant/default/*.json; do n=$$(basename $$r .json); \
		[ -f benchmarks/results/quant/eval_$$n.json ] && continue; \
		$(BIN)/litevar eval --recipe $$r --per-class 50 --threads 1 --out runs/eval50 --name $$n --overwrite || exit 1; \
		cp runs/eval50/eval_$$n.json runs/eval50/eval_$$n.md benchmarks/results/quant/; done

# KV-cache compression on the default model: every recipe of benchmarks/recipes/kv/default (eval: 500 images, fp32,
# against the dense fp32 reference; bench: batch 8). Finished reports are kept: rerun to resume.
KV := benchmarks/results/kv
kv-default: $(BIN)/.installed data
	[ -f $(KV)/heads_default.json ] || $(BIN)/litevar calibrate-kv --samples 16 --out $(KV)/heads_default.json
	for r in benchmarks/recipes/kv/default/*.json; do n=$$(basename $$r .json); \
		[ -f $(KV)/bench_$$n.json ] || $(BIN)/litevar bench --recipe $$r --threads 2 --out $(KV)/bench_$$n.json || exit 1; \
		[ -f $(KV)/eval_$$n.json ] && continue; \
		$(BIN)/litevar eval --recipe $$r --per-class 50 --threads 1 --out runs/eval50 --name $$n --overwrite || exit 1; \
		cp runs/eval50/eval_$$n.json runs/eval50/eval_$$n.md $(KV)/; done
	$(BIN)/python benchmarks/kv_table.py

# HACK 70% vs dense on released shapes with random weights (memory and time; fp32: see RESULTS.md for why).
kv-shapes: $(BIN)/.installed
	mkdir -p $(KV)/shapes
	for s in var-d30 var-d36; do [ -f benchmarks/recipes/kv/shapes/heads_$$s.json ] || $(BIN)/litevar calibrate-kv \
		--shape $$s --samples 1 --batch-size 1 --out benchmarks/recipes/kv/shapes/heads_$$s.json || exit 1; done
	[ -f $(KV)/shapes/memory_var-d30_hack_r70.json ] || $(BIN)/python benchmarks/bench_kv_memory.py --shape var-d30 \
		--recipe benchmarks/recipes/kv/shapes/hack_r70_var-d30.json --batch 8 1 --out $(KV)/shapes/memory_var-d30_hack_r70.json
	[ -f $(KV)/shapes/memory_var-d36_hack_r70.json ] || $(BIN)/python benchmarks/bench_kv_memory.py --shape var-d36 \
		--recipe benchmarks/recipes/kv/shapes/hack_r70_var-d36.json --batch 1 --out $(KV)/shapes/memory_var-d36_hack_r70.json

# Fashion-MNIST from the Debian package, unpacked under .data/ without root when it is not installed.
FMNIST := .data/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
data:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	else $(MAKE) --no-print-directory $(FMNIST); fi

$(FMNIST):
	mkdir -p .data
	cd .data && apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb . && rm -f dataset-fashion-mnist_*.deb

# The whole default model from scratch (about 1.5 h on a 2-core CPU); rerun to resume after an interruption.
default-model: $(BIN)/.installed data
	$(BIN)/litevar train-vae --out runs/default/vae --threads 2
	$(BIN)/litevar train-var --vae runs/default/vae/vae.safetensors --out runs/default/var --threads 2
	$(BIN)/python -m litevar.train.ship runs/default

# The shipped M-VAR: same VQ-VAE, depth, recipe and step budget as the default VAR (about 2.5 h on 2 cores at fp32,
# resumable), then its quality in runs/quality-mvar and on its card.
default-mvar: $(BIN)/.installed data
	$(BIN)/litevar train-var --arch mvar --fp32 --vae runs/default/vae/vae.safetensors --out runs/default/mvar --threads 2
	$(BIN)/python -m litevar.train.ship runs/default --model mvar
	$(BIN)/litevar quality generated --var-ckpt default-mvar --cfg 1.5 --out runs/quality-mvar
	$(BIN)/python -m litevar.train.ship runs/default --model mvar --card-only runs/quality-mvar

# The shipped depth-2 VAR on the same VQ-VAE (draft-refine's refiner for the default model): same recipe and steps.
default-d2: $(BIN)/.installed data
	$(BIN)/litevar train-var --depth 2 --fp32 --vae runs/default/vae/vae.safetensors --out runs/default/var-d2 --threads 2
	$(BIN)/python -m litevar.train.ship runs/default --model var-d2

# 10 classes x 8 samples of the shipped default model: per-image PNGs and a labelled grid.
demo: $(BIN)/.installed
	$(BIN)/litevar generate --per-class 8 --out demo

# The README's quality table of the default model (FD-EffLite0, precision/recall, class-consistency, PSNR).
quality: $(BIN)/.installed data
	$(BIN)/litevar quality real
	$(BIN)/litevar quality recon
	$(BIN)/litevar quality generated --cfg 1.5
	$(BIN)/litevar quality generated --cfg 5

clean:
	rm -rf $(VENV) .pytest_cache
