.DEFAULT_GOAL := help
VENV := .venv/bin
SAMPLES ?= ../shared/data/imagenet-sample-200
OUT ?= out/sample-200

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## create .venv and install visionbatch with its test extras
	bash scripts/setup.sh

demo: setup ## set up, then classify the sample images with a local Ray
	bash scripts/demo.sh $(SAMPLES) $(OUT)

test: setup ## set up, then run the whole test suite
	$(VENV)/python -m pytest -n 3 --dist loadgroup -ra --durations=25

bench: setup ## set up, then run the benchmark (see benchmarks/README)
	$(VENV)/python benchmarks/bench.py

.PHONY: help setup demo test bench
