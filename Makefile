# `make serve` and `make test` each do the whole set-up first (scripts/setup.sh, idempotent);
# `make test` also puts sglang-router in .venv-router for the test of nl behind it.
.PHONY: setup serve test

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/nl serve $(ARGS)

test: setup
	@bash scripts/setup_sglang_router.sh
	.venv/bin/python -m pytest -q -rs $(ARGS)
