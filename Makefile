# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv first if it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint venv clean model release-check still-model

venv: $(STAMP)

# Everything (the [all] extra: training, review app, OPC UA, camera) plus the dev tools, at the exact versions of
# constraints.txt; pyproject.toml keeps ranges. A line machine needs only the core: pip install -c constraints.txt .
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[all,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vialinspect.demo --out demo_out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Reproduces the committed default model package (models/default): simulate a training lot (droplets on the glass
# of 40% of the containers instead of 10%: good units' droplets set the crack threshold), train the training
# defaults' 0.95-GFLOP network (55-minute budget on 2 CPU cores; the cosine schedule is planned over 30 epochs
# and the budget ends it first: 24 on a machine that trains in bfloat16, fewer on one that does not; cracks drawn
# three times as often), export with parity checks, then set the thresholds on an independent calibration lot of
# 3,200 default containers (~1,600 good units; the validation split's ~240 leave each threshold to one unit's
# score), and fit the out-of-domain guard on both lots (units unlike them are not decided:
# not_inspected:out_of_domain). benchmarks/quality.py tests on default data with another seed (100). Training
# under a time budget depends on the machine's speed.
model: $(STAMP)
	$(BIN)/vialinspect generate --out build/train_data --containers 3000 --frames 4 --seed 200 --nuisance droplet=0.4 --overwrite
	$(BIN)/vialinspect train --data build/train_data --out build/model_run --max-minutes 55
	$(BIN)/vialinspect export --checkpoint build/model_run/best.pt --out build/model_pkg --overwrite
	$(BIN)/vialinspect generate --out build/calib_data --containers 3200 --frames 4 --seed 10 --overwrite
	$(BIN)/vialinspect package calibrate build/model_pkg --data build/calib_data --out build/model_cal --overwrite \
		--reason "thresholds on a calibration lot of 3,200 simulated containers (seed 10)"
	$(BIN)/vialinspect package fit-domain build/model_cal --data build/calib_data --data build/train_data \
		--out models/default --overwrite --reason "out-of-domain guard fitted on make model's calibration lot \
		(3,200, seed 10) and training lot (3,000, seed 200, droplets on 40%)"
	$(MAKE) release-check

# Reproduces the still-image transfer model (models/still, `--init builtin:still`), an opt-in start for a line's own
# still images (one frame, image-level labels; docs/new_line.md has what it gave and why it is not the default
# start): 3,000 simulated containers, one frame each, every container
# through its own camera (--optics varied: 35-90 µm/px, light, blur, noise, vignetting, JPEG; lot codes and
# silicone oil on), trained from the default model (its mean-frame weights; motion needs frames) with exact masks
# and 4 hard negatives per class map (what teaches dust, lot codes and bubbles apart from particles in one still
# image), 45-minute budget on 2 CPU cores. Not a model to decide units with: a starting point (docs/new_line.md).
# The committed models/still was trained from the earlier default (the 2.42-GFLOP network, c663d0a4); run today,
# this starts from the current default's 0.95-GFLOP network and makes a different package (not measured).
still-model: $(STAMP)
	$(BIN)/vialinspect generate --out build/still_data --containers 3000 --frames 1 --optics varied --seed 501 --overwrite
	echo '{"map_hard_negatives": 4, "epochs": 40, "patience": 8}' > build/still_settings.json
	$(BIN)/vialinspect train --data build/still_data --out build/still_run --init builtin:default \
		--config build/still_settings.json --max-minutes 45
	$(BIN)/vialinspect export --checkpoint build/still_run/best.pt --out models/still --overwrite

# The release check of a default model: the retraining demonstration (benchmarks/retrain_loop.py: a syringe line
# with silicone oil the model never saw, reviewed rejects, retrain with its defaults (a motion veto fitted on the
# reviewed false rejects), the gate, promotion) must meet its target with models/default on two seeds; the JSON of
# each run lands in build/release_check. A seed takes ~4 minutes on 2 CPU cores. A model that fails it is not
# committed as the default (docs/retraining.md).
release-check: $(STAMP)
	@status=0; for seed in 0 1; do \
		$(BIN)/python benchmarks/retrain_loop.py --check --seed $$seed --work build/release_check \
			|| status=1; \
	done; test $$status -eq 0 || { echo "release check FAILED: retraining misses its target with models/default"; \
		exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf demo_out .pytest_cache .ruff_cache build *.egg-info
