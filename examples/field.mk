# The field's methods side by side (issue 27): UltraEdit, AlphaEdit, AlphaEdit + NAS, AlphaEdit + SPHERE,
# MEMIT + SPHERE and MEMIT on one model, the same CounterFact records in batches of 10, each run from the unedited
# model, then scored on those records and WikiText-2 perplexity. One table per model (field_table.py).
#
#   make -C examples -f field.mk MODEL=smollm2 N=200            # SmolLM2, records 0-199
#   make -C examples -f field.mk MODEL=gemma3-270m N=100 -j2    # Gemma-3, records 0-99
#
# Every step is a file; running make again continues (an interrupted edit resumes where it stopped). Only records
# 0-4999 of counterfact-edit.json may be used (5000-9999 are reserved for acceptance measurements).

MODEL        ?= smollm2
N            ?= 200
BATCH        ?= 10
DATA         ?= $(abspath ../../shared/data)
PRUNECLI     ?= $(abspath ../.venv/bin/prunecli)
PYTHON       ?= $(abspath ../.venv/bin/python)
WORK         ?= work-field/$(MODEL)
THREADS      ?= 1
STATS_TOKENS ?= 50000
ANCHOR_COUNT ?= 300
PPL_TOKENS   ?= 4096
EVAL_FLAGS   ?= --tasks counterfact,perplexity --max-tokens $(PPL_TOKENS) --window 512 --stride 448 --batch-size 16 \
                --data-dir $(DATA)
CF           := $(DATA)/counterfact/counterfact-edit.json
TEXT         := $(DATA)/wikitext/wiki.test.raw
CONFIGS      := ultraedit memit memit-sphere alphaedit alphaedit-nas alphaedit-sphere

ifneq ($(shell [ $(N) -le 5000 ] && echo ok),ok)
$(error N = $(N): records 5000-9999 of CounterFact are reserved)
endif

export OMP_NUM_THREADS := $(THREADS)
CLI := $(PRUNECLI) --threads $(THREADS)

# config -> edit flags, and the files they need
flags_ultraedit        := --method ultraedit
flags_memit            := --method memit --stats $(WORK)/stats-memit.safetensors
flags_memit-sphere     := $(flags_memit) --sphere
flags_alphaedit        := --method alphaedit --stats $(WORK)/stats-alphaedit.safetensors
flags_alphaedit-nas    := $(flags_alphaedit) --nas $(WORK)/anchor-alphaedit.safetensors
flags_alphaedit-sphere := $(flags_alphaedit) --sphere
needs_memit            := $(WORK)/stats-memit.safetensors
needs_memit-sphere     := $(needs_memit)
needs_alphaedit        := $(WORK)/stats-alphaedit.safetensors
needs_alphaedit-nas    := $(needs_alphaedit) $(WORK)/anchor-alphaedit.safetensors
needs_alphaedit-sphere := $(needs_alphaedit)

.PHONY: all
all: $(WORK)/table.md

$(WORK):
	mkdir -p $@

$(WORK)/stats-%.safetensors: | $(WORK)
	$(CLI) stats $(MODEL) --method $* --text $(TEXT) --tokens $(STATS_TOKENS) -o $@ --force --json > $@.json

$(WORK)/anchor-%.safetensors: | $(WORK)
	$(CLI) anchor $(MODEL) --method $* --count $(ANCHOR_COUNT) --data-dir $(DATA) -o $@ --force --json > $@.json

define config
$(WORK)/$(1).safetensors: $(needs_$(1)) | $(WORK)
	$(CLI) edit $(MODEL) --requests $(CF) --limit $(N) --batch-size $(BATCH) $(flags_$(1)) \
	    -o $(WORK)/$(1).partial.safetensors --checkpoint-every 50 --resume --json > $(WORK)/$(1).edit.json
	mv $(WORK)/$(1).partial.safetensors $$@

$(WORK)/$(1).eval.json: $(WORK)/$(1).safetensors
	$(CLI) evaluate $(MODEL) --delta $$< --requests $(CF) --limit $(N) $(EVAL_FLAGS) -o $$@ --force
endef
$(foreach c,$(CONFIGS),$(eval $(call config,$(c))))

$(WORK)/unedited.eval.json: | $(WORK)
	$(CLI) evaluate $(MODEL) --requests $(CF) --limit $(N) $(EVAL_FLAGS) -o $@ --force

$(WORK)/table.md: $(WORK)/unedited.eval.json $(foreach c,$(CONFIGS),$(WORK)/$(c).eval.json)
	$(PYTHON) field_table.py $(WORK) $(CONFIGS) > $@
	cat $@
